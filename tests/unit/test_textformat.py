"""The one reader of TF Serving's text formats: its messages, and errors that name the file."""

from __future__ import annotations

import pytest

from tfwsgi import textformat
from tfwsgi.errors import ConfigError


def test_each_format_reads_into_its_message():
    config = textformat.parse(textformat.model_server_config(),
                              'model_config_list { config { name: "m" base_path: "/m" } }', "f")
    assert config.model_config_list.config[0].name == "m"
    batching = textformat.parse(textformat.batching_parameters(),
                                "max_batch_size { value: 8 } allowed_batch_sizes: 8", "f")
    assert (batching.max_batch_size.value, list(batching.allowed_batch_sizes)) == (8, [8])
    monitoring = textformat.parse(textformat.monitoring_config(),
                                  'prometheus_config { enable: true path: "/p" }', "f")
    assert (monitoring.prometheus_config.enable, monitoring.prometheus_config.path) == (True, "/p")


@pytest.mark.parametrize("message_class", [textformat.model_server_config, textformat.batching_parameters,
                                           textformat.monitoring_config])
def test_a_syntax_error_names_its_origin(message_class):
    with pytest.raises(ConfigError, match=r"^/etc/x\.conf: 1:1 : .*no_such_field"):
        textformat.parse(message_class(), "no_such_field: 1", "/etc/x.conf")


def test_unset_fields_are_unset_and_each_parse_is_a_new_message():
    cls = textformat.batching_parameters()
    first = textformat.parse(cls, "num_batch_threads { value: 2 }", "f")
    second = textformat.parse(cls, "", "f")
    assert first.HasField("num_batch_threads") and not second.HasField("num_batch_threads")
