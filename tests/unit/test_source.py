"""Model configs, version policies and the source's proposals, over directories the tests make."""

from __future__ import annotations

import time

import pytest

from tfwsgi.errors import ConfigError
from tfwsgi.settings import from_env
from tfwsgi.source import (
    ALL,
    LATEST,
    SPECIFIC,
    AspiredVersions,
    ModelConfig,
    Source,
    VersionPolicy,
    aspired_versions,
    model_configs,
    parse_model_config,
    scan_versions,
)


def test_scan_versions_reads_numeric_directories(tmp_path):
    for d in ("1", "00000123", "7", "tmp", "2.bak"):
        (tmp_path / d).mkdir()
    (tmp_path / "9").write_text("a file, not a version")
    assert scan_versions(str(tmp_path)) == {1: str(tmp_path / "1"), 123: str(tmp_path / "00000123"),
                                            7: str(tmp_path / "7")}
    assert scan_versions(str(tmp_path / "missing")) == {}


@pytest.mark.parametrize(("policy", "expected"), [
    (VersionPolicy(), [9]),
    (VersionPolicy(LATEST, num_versions=2), [9, 5]),
    (VersionPolicy(ALL), [9, 5, 1]),
    (VersionPolicy(SPECIFIC, versions=(1, 4)), [1]),
])
def test_aspired_versions(policy, expected):
    assert policy.aspired([1, 5, 9]) == expected


def test_parse_model_config_with_policies_and_labels():
    models = parse_model_config("""
        model_config_list {
          config { name: "a" base_path: "/m/a" model_platform: "tensorflow" }
          config {
            name: "b" base_path: "/m/b"
            model_version_policy { latest { num_versions: 3 } }
          }
          config {
            name: "c" base_path: "/m/c"
            model_version_policy { specific { versions: 4 versions: 2 } }
            version_labels { key: "stable" value: 2 }
            version_labels { key: "canary" value: 4 }
          }
          config { name: "d" base_path: "/m/d" model_version_policy { all {} } }
        }""")
    assert [m.name for m in models] == ["a", "b", "c", "d"]
    assert models[0].policy == VersionPolicy(LATEST, 1)
    assert models[1].policy == VersionPolicy(LATEST, 3)
    assert models[2].policy == VersionPolicy(SPECIFIC, versions=(4, 2))
    assert models[2].labels == {"stable": 2, "canary": 4}
    assert models[3].policy.kind == ALL


@pytest.mark.parametrize(("text", "match"), [
    ("model_config_list { config { name: 'a' } }", "no base_path"),
    ("model_config_list { config { base_path: '/x' } }", "no name"),
    ("model_config_list { config { name: 'a' base_path: '/x' } config { name: 'a' base_path: '/y' } }",
     "configured twice"),
    ("model_config_list { config { name: 'a' base_path: '/x' model_platform: 'pytorch' } }",
     "not supported"),
    ("model_config_list { config { name: 'a' base_path: '/x' "
     "model_version_policy { specific { } } } }", "lists no versions"),
    ("model_config_list { config { name: 'a' nonsense: 1 } }", "nonsense"),
    ("this is not a config", "1:"),
])
def test_parse_model_config_errors(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_model_config(text)


def test_model_configs_from_settings(tmp_path):
    assert model_configs(from_env({"TFWSGI_MODEL_BASE_PATH": "/m/x"}))[0].name == "default"
    cfg = tmp_path / "c.config"
    cfg.write_text("model_config_list { config { name: 'z' base_path: '/m/z' } }")
    configs = model_configs(from_env({"TFWSGI_MODEL_CONFIG_FILE": str(cfg),
                                      "TFWSGI_MODEL_BASE_PATH": "/ignored"}))
    assert [c.name for c in configs] == ["z"]
    with pytest.raises(ConfigError, match="no model to serve"):
        model_configs(from_env({}))
    with pytest.raises(ConfigError, match="cannot read"):
        model_configs(from_env({"TFWSGI_MODEL_CONFIG_FILE": str(tmp_path / "missing")}))


# ------------------------------------------------------------------ the source proposes

def test_aspired_versions_under_each_policy():
    on_disk = {1: "/m/1", 2: "/m/2", 3: "/m/3"}
    latest = aspired_versions(ModelConfig("m", "/m", labels={"stable": 2}), on_disk)
    assert (latest.versions, latest.labels) == ({3: "/m/3"}, {"stable": 2})
    assert list(latest.fallback.items()) == [(2, "/m/2"), (1, "/m/1")]  # newest first
    pinned = aspired_versions(ModelConfig("m", "/m", VersionPolicy(SPECIFIC, versions=(2,))), on_disk)
    assert (pinned.versions, pinned.fallback) == ({2: "/m/2"}, {})  # a pin names all that may serve
    every = aspired_versions(ModelConfig("m", "/m", VersionPolicy(ALL)), on_disk)
    assert list(every.versions) == [3, 2, 1] and every.fallback == {}
    assert aspired_versions(ModelConfig("m", "/m"), {}) == AspiredVersions()


def test_source_proposes_every_model_in_one_call(tmp_path, caplog):
    (tmp_path / "a" / "1").mkdir(parents=True)
    proposals: list = []
    source = Source([ModelConfig("a", str(tmp_path / "a")), ModelConfig("b", str(tmp_path / "b"))],
                    proposals.append)
    source.propose(initial=True)
    assert [sorted(p) for p in proposals] == [["a", "b"]]
    assert proposals[0]["a"].versions == {1: str(tmp_path / "a" / "1")}
    assert proposals[0]["b"].versions == {}
    assert "no versions of model b found" in caplog.text
    source.set_configs([ModelConfig("b", str(tmp_path / "b"))])  # a removed model is left out
    assert sorted(proposals[-1]) == ["b"]


def test_source_polls_the_config_and_keeps_it_after_a_bad_edit(tmp_path, caplog):
    configs: list = [[ModelConfig("a", "/a")]]

    def read():
        if isinstance(configs[-1], Exception):
            raise configs[-1]
        return configs[-1]

    proposals: list = []
    source = Source(configs[0], proposals.append, read)
    source.poll_config()
    assert proposals == []  # unchanged: nothing proposed
    configs.append(ConfigError("bad edit"))
    source.poll_config()
    assert proposals == [] and source.configs == [ModelConfig("a", "/a")]
    assert "model config not reloaded: bad edit" in caplog.text
    configs.append([ModelConfig("b", "/b")])
    source.poll_config()
    assert [sorted(p) for p in proposals] == [["b"]]


def test_source_polls_the_base_paths_in_its_thread(tmp_path):
    proposals: list = []
    source = Source([ModelConfig("a", str(tmp_path))], proposals.append)
    source.start(0.02)
    try:
        (tmp_path / "5").mkdir()
        deadline = time.monotonic() + 10
        while not (proposals and 5 in proposals[-1]["a"].versions):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        source.stop()


def test_source_with_polling_off_starts_no_thread(tmp_path):
    source = Source([ModelConfig("a", str(tmp_path))], lambda proposal: None)
    source.start(0, 5)  # no config file to poll: nothing to watch
    assert source._thread is None
