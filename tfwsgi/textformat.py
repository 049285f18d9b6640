"""TF Serving's text-format files, read by protobuf's own parser into TF Serving's messages.

One reader, ``parse``, for the three files tfwsgi takes: the model config (``ModelServerConfig``,
shipped by tensorflow-serving-api), the batching parameters and the monitoring config (which it
does not ship: built here from their fields, as TF Serving's .proto files declare them). Every
class is built on first use: importing this module imports no protobuf and no TensorFlow.
"""

from __future__ import annotations

import functools
from typing import Any

from .errors import ConfigError


def parse(message_class: Any, text: str, origin: str) -> Any:
    """``text`` read into a new ``message_class``; a syntax error is a ConfigError naming ``origin``."""
    from google.protobuf import text_format

    msg = message_class()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    return msg


@functools.cache
def model_server_config() -> Any:
    """TF Serving's ``ModelServerConfig`` (config/model_server_config.proto)."""
    from tensorflow_serving.config import model_server_config_pb2

    return model_server_config_pb2.ModelServerConfig


def _message_class(file: Any, full_name: str, dependencies: tuple[bytes, ...] = ()) -> Any:
    """The class of message ``full_name`` declared in ``file`` (a FileDescriptorProto)."""
    from google.protobuf import descriptor_pool, message_factory

    pool = descriptor_pool.DescriptorPool()
    for serialized in dependencies:
        pool.AddSerializedFile(serialized)
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))


@functools.cache
def batching_parameters() -> Any:
    """TF Serving's ``BatchingParameters`` (session_bundle_config.proto), its fields and wrapper types."""
    from google.protobuf import descriptor_pb2, wrappers_pb2

    f = descriptor_pb2.FileDescriptorProto(name="tfwsgi_batching.proto", package="tensorflow.serving",
                                           dependency=["google/protobuf/wrappers.proto"])
    m = f.message_type.add(name="BatchingParameters")
    fields = [("max_batch_size", 1, ".google.protobuf.Int64Value"),
              ("batch_timeout_micros", 2, ".google.protobuf.Int64Value"),
              ("max_enqueued_batches", 3, ".google.protobuf.Int64Value"),
              ("num_batch_threads", 4, ".google.protobuf.Int64Value"),
              ("thread_pool_name", 5, ".google.protobuf.StringValue"),
              ("allowed_batch_sizes", 6, None),
              ("pad_variable_length_inputs", 7, None),
              ("enable_large_batch_splitting", 8, ".google.protobuf.BoolValue")]
    T = descriptor_pb2.FieldDescriptorProto
    for name, number, type_name in fields:
        fd = m.field.add(name=name, number=number)
        if type_name:
            fd.type, fd.type_name, fd.label = T.TYPE_MESSAGE, type_name, T.LABEL_OPTIONAL
        elif name == "allowed_batch_sizes":
            fd.type, fd.label = T.TYPE_INT64, T.LABEL_REPEATED
        else:
            fd.type, fd.label = T.TYPE_BOOL, T.LABEL_OPTIONAL
    return _message_class(f, "tensorflow.serving.BatchingParameters",
                          (wrappers_pb2.DESCRIPTOR.serialized_pb,))


@functools.cache
def monitoring_config() -> Any:
    """TF Serving's ``MonitoringConfig`` (config/monitoring_config.proto)."""
    from google.protobuf import descriptor_pb2

    T = descriptor_pb2.FieldDescriptorProto
    f = descriptor_pb2.FileDescriptorProto(name="tfwsgi_monitoring.proto", package="tensorflow.serving")
    prometheus = f.message_type.add(name="PrometheusConfig")
    prometheus.field.add(name="enable", number=1, type=T.TYPE_BOOL, label=T.LABEL_OPTIONAL)
    prometheus.field.add(name="path", number=2, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL)
    config = f.message_type.add(name="MonitoringConfig")
    config.field.add(name="prometheus_config", number=1, type=T.TYPE_MESSAGE, label=T.LABEL_OPTIONAL,
                     type_name=".tensorflow.serving.PrometheusConfig")
    return _message_class(f, "tensorflow.serving.MonitoringConfig")
