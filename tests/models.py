"""Small SavedModels the tests serve, built with the installed TensorFlow (never downloaded)."""

from __future__ import annotations

import os
from typing import Any

from tfwsgi.demo import build_half_plus_two


def build_keras3(export_dir: str) -> str:
    """A Keras 3 functional model exported with ``model.export`` (TF SavedModel format)."""
    import keras
    import numpy as np

    inputs = keras.Input(shape=(4,), name="features")
    hidden = keras.layers.Dense(3, activation="relu", name="hidden")(inputs)
    outputs = keras.layers.Dense(2, activation="softmax", name="probs")(hidden)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(size=w.shape).astype("float32") for w in model.get_weights()])
    model.export(export_dir, format="tf_saved_model")
    return export_dir


def build_multi(export_dir: str) -> str:
    """``tf.saved_model.save`` with several signatures, dtypes, shapes and outputs."""
    import tensorflow as tf

    class Multi(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="a"),
                                      tf.TensorSpec([None], tf.int32, name="b")])
        def two_in_two_out(self, a: Any, b: Any) -> Any:
            return {"sum": tf.reduce_sum(a, axis=1) + tf.cast(b, tf.float32), "b_twice": b * 2}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="s")])
        def strings(self, s: Any) -> Any:
            return {"upper": tf.strings.upper(s), "echo_bytes": s,
                    "length": tf.strings.length(s)}

        @tf.function(input_signature=[tf.TensorSpec([], tf.float32, name="x")])
        def scalar(self, x: Any) -> Any:
            return {"y": x * 2.0}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.bool, name="flag")])
        def boolean(self, flag: Any) -> Any:
            return {"negated": tf.logical_not(flag)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
        def positive_only(self, x: Any) -> Any:
            with tf.control_dependencies([tf.debugging.assert_positive(x, message="x must be > 0")]):
                return {"y": tf.math.log(x)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.float64, name="x")])
        def double(self, x: Any) -> Any:
            return {"y": x / 3.0}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
        def slow(self, x: Any) -> Any:
            """y = x + 1 after about a quarter of a second of matrix products."""
            m = tf.random.stateless_normal([256, 256], seed=[1, 2]) / 16.0
            _, acc = tf.while_loop(lambda i, a: i < 400,
                                   lambda i, a: (i + 1, tf.math.tanh(tf.linalg.matmul(a, m))),
                                   [tf.constant(0), m])
            return {"y": x + 1.0 + 0.0 * tf.reduce_sum(acc)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def classify_with_classes(self, inputs: Any) -> Any:
            x = tf.io.parse_example(inputs, {"x": tf.io.FixedLenFeature([1], tf.float32)})["x"]
            n = tf.shape(x)[0]
            classes = tf.tile(tf.constant([["neg", "pos"]]), [n, 1])
            p = tf.sigmoid(x)
            return {"classes": classes, "scores": tf.concat([1.0 - p, p], axis=1)}

    m = Multi()
    tf.saved_model.save(m, export_dir, signatures={
        "serving_default": m.two_in_two_out,
        "strings": m.strings,
        "scalar": m.scalar,
        "boolean": m.boolean,
        "positive_only": m.positive_only,
        "double": m.double,
        "classify_with_classes": m.classify_with_classes,
        "slow": m.slow,
    })
    return export_dir


def build_all(root: str) -> str:
    """Every test model under ``root``, and a TF Serving model config file naming them."""
    build_half_plus_two(os.path.join(root, "hp", "1"), b=2.0)
    build_half_plus_two(os.path.join(root, "hp", "2"), b=3.0)
    build_half_plus_two(os.path.join(root, "hp", "3"), b=4.0)
    build_keras3(os.path.join(root, "keras", "1"))
    build_multi(os.path.join(root, "multi", "7"))
    # A model whose newest version is broken: status must say so, version 1 keeps serving.
    build_half_plus_two(os.path.join(root, "flaky", "1"))
    broken = os.path.join(root, "flaky", "2")
    os.makedirs(os.path.join(broken, "variables"))
    with open(os.path.join(broken, "saved_model.pb"), "wb") as f:
        f.write(b"this is not a protobuf")
    config = os.path.join(root, "models.config")
    with open(config, "w") as f:
        f.write(f"""
model_config_list {{
  config {{
    name: "hp"
    base_path: "{root}/hp"
    model_platform: "tensorflow"
    model_version_policy {{ specific {{ versions: 1 versions: 2 }} }}
    version_labels {{ key: "stable" value: 1 }}
    version_labels {{ key: "canary" value: 2 }}
  }}
  config {{ name: "keras" base_path: "{root}/keras" }}
  config {{ name: "multi" base_path: "{root}/multi" }}
  config {{
    name: "flaky"
    base_path: "{root}/flaky"
    model_version_policy {{ all {{}} }}
  }}
}}
""")
    return config


if __name__ == "__main__":
    import sys

    print(build_all(sys.argv[1]))
