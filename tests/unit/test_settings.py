"""Settings are declared once; the README's table is generated from them."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from conftest import ROOT
from tfwsgi import settings
from tfwsgi.errors import ConfigError


def test_defaults():
    s = settings.from_env({})
    assert s.model_name == "default"
    assert s.rest_api_port == 8501
    assert s.tensorflow_intra_op_parallelism == 0
    assert s.rest_api_enable_cors_support is False


def test_env_vars_follow_tf_serving_flags():
    env = {
        "TFWSGI_MODEL_NAME": "half_plus_two",
        "TFWSGI_MODEL_BASE_PATH": "/models/hp",
        "TFWSGI_MODEL_CONFIG_FILE": "/etc/models.config",
        "TFWSGI_TENSORFLOW_INTRA_OP_PARALLELISM": "3",
        "TFWSGI_TENSORFLOW_INTER_OP_PARALLELISM": "2",
        "TFWSGI_REST_API_ENABLE_CORS_SUPPORT": "true",
    }
    s = settings.from_env(env)
    assert (s.model_name, s.model_base_path, s.model_config_file) == (
        "half_plus_two", "/models/hp", "/etc/models.config")
    assert (s.tensorflow_intra_op_parallelism, s.tensorflow_inter_op_parallelism) == (3, 2)
    assert s.rest_api_enable_cors_support is True


@pytest.mark.parametrize(("var", "value", "match"), [
    ("TFWSGI_REST_API_PORT", "http", "invalid literal"),
    ("TFWSGI_REST_API_PORT", "70000", "TCP port"),
    ("TFWSGI_TENSORFLOW_INTRA_OP_PARALLELISM", "-1", ">= 0"),
    ("TFWSGI_REST_API_ENABLE_CORS_SUPPORT", "maybe", "true/false"),
    ("TFWSGI_MAX_REQUEST_BYTES", "0", "> 0"),
])
def test_bad_values_name_the_variable(var, value, match):
    with pytest.raises(ConfigError, match=var) as err:
        settings.from_env({var: value})
    assert match in str(err.value)


def test_every_setting_has_doc_and_unique_env():
    envs = [s.env for s in settings.SETTINGS]
    assert len(envs) == len(set(envs))
    assert all(s.doc and s.env == "TFWSGI_" + s.name.upper() for s in settings.SETTINGS)
    assert all(isinstance(s.default, s.type) for s in settings.SETTINGS)


def test_settings_doc_table_matches_the_declarations():
    doc = (ROOT / "docs" / "settings.md").read_text()
    start = doc.index(settings.TABLE_START) + len(settings.TABLE_START)
    end = doc.index(settings.TABLE_END)
    assert doc[start:end].strip() == settings.markdown_table(), (
        "docs/settings.md's table is stale: `python -m tfwsgi.settings --update docs/settings.md`")
    assert "(docs/settings.md)" in (ROOT / "README.md").read_text(), "the README links the table"


def test_env_file(tmp_path):
    f = tmp_path / "tfwsgi.env"
    f.write_text("# comment\n\nTFWSGI_MODEL_NAME=a\nexport TFWSGI_WORKERS = 3\n"
                 "TFWSGI_CACHE_KEY_PREFIX='p: q'\nOTHER=ignored\nTFWSGI_ENV_FILE=/not/followed\n")
    assert settings.read_env_file(str(f)) == {
        "TFWSGI_MODEL_NAME": "a", "TFWSGI_WORKERS": "3", "TFWSGI_CACHE_KEY_PREFIX": "p: q"}
    env, keys = settings.with_env_file({"TFWSGI_ENV_FILE": str(f), "TFWSGI_MODEL_NAME": "b"}, set())
    assert env["TFWSGI_MODEL_NAME"] == "a" and keys == {"TFWSGI_MODEL_NAME", "TFWSGI_WORKERS",
                                                         "TFWSGI_CACHE_KEY_PREFIX"}
    # A key the file no longer sets goes back to its default.
    f.write_text("TFWSGI_MODEL_NAME=c\n")
    env2, keys2 = settings.with_env_file(env, keys)
    assert "TFWSGI_WORKERS" not in env2 and env2["TFWSGI_MODEL_NAME"] == "c"
    assert keys2 == {"TFWSGI_MODEL_NAME"}
    f.write_text("TFWSGI_WORKERS=many\n")
    with pytest.raises(ConfigError, match="TFWSGI_WORKERS"):
        settings.with_env_file(env2, keys2)
    f.write_text("no equals sign\n")
    with pytest.raises(ConfigError, match=":1: expected KEY=value"):
        settings.read_env_file(str(f))


def test_settings_are_frozen_and_typed():
    s = settings.from_env({"TFWSGI_WORKERS": "3"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.workers = 4
    with pytest.raises(AttributeError, match="max_request_bytez"):
        s.max_request_bytez  # noqa: B018
    types = typing.get_type_hints(settings.Settings)
    assert [(x.name, x.type) for x in settings.SETTINGS] == list(types.items())
    assert repr(s).startswith("Settings(env_file='', model_name='default', ")


def test_replace():
    s = settings.from_env({})
    t = s.replace(workers=3, memcached="m:11211")
    assert (t.workers, t.memcached, s.workers) == (3, "m:11211", 0)
    assert t == settings.from_env({"TFWSGI_WORKERS": "3", "TFWSGI_MEMCACHED": "m:11211"})
    with pytest.raises(ConfigError, match="unknown setting 'max_request_bytez'"):
        s.replace(max_request_bytez=1)
    with pytest.raises(ConfigError, match="setting 'workers' is int, got '3'"):
        s.replace(workers="3")
    with pytest.raises(ConfigError, match="setting 'workers' is int, got True"):
        s.replace(workers=True)


def test_the_cache_secret_stays_out_of_the_settings_repr() -> None:
    values = settings.from_env({"TFWSGI_CACHE_HMAC_KEY": "s3cr3t-value", "TFWSGI_CACHE_TTL_SECONDS": "77"})
    assert values.cache_hmac_key == "s3cr3t-value"
    assert "s3cr3t-value" not in repr(values) and "77" in repr(values)
