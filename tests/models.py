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


def build_half_plus_two_tf1(export_dir: str, b: float = 2.0, c: float = 3.0) -> str:
    """TF Serving's ``saved_model_half_plus_two`` as its builder makes it
    (tensorflow_serving/servables/tensorflow/testdata/saved_model_half_plus_two.py, CPU, no
    TFLite): a TF1 graph written by ``SavedModelBuilder`` that parses tf.Examples; ``x`` is the
    parsed feature (declared [-1, 1]), y = a·x + b, y2 = a·x + c, y3 = a2·x2 + c2, an asset file and
    a main op that assigns it. ``b=3.0`` is ``saved_model_half_plus_three``."""
    import tempfile

    import tensorflow as tf

    v1 = tf.compat.v1
    build_info = v1.saved_model.utils.build_tensor_info
    build_def = v1.saved_model.signature_def_utils.build_signature_def
    consts = v1.saved_model.signature_constants
    with tf.Graph().as_default(), v1.Session() as sess, tempfile.TemporaryDirectory() as assets:
        a_ = v1.Variable(0.5, name="a")
        b_ = v1.Variable(b, name="b")
        c_ = v1.Variable(c, name="c")
        serialized_tf_example = v1.placeholder(tf.string, name="tf_example", shape=[None])
        tf_example = v1.parse_example(serialized_tf_example, {
            "x": v1.FixedLenFeature([1], dtype=tf.float32),
            "x2": v1.FixedLenFeature([1], dtype=tf.float32, default_value=[0.0])})
        x = tf.identity(tf_example["x"], name="x")
        y = tf.identity(tf.add(tf.multiply(a_, x), b_), name="y")
        y2 = tf.identity(tf.add(tf.multiply(a_, x), c_), name="y2")
        x2 = tf.identity(tf_example["x2"], name="x2")
        a2 = v1.Variable(0.5, name="a2")
        c2 = v1.Variable(3.0, name="c2")
        y3 = tf.identity(tf.add(tf.multiply(a2, x2), c2), name="y3")

        asset = os.path.join(assets, "foo.txt")
        with open(asset, "w") as f:
            f.write("asset-file-contents")
        v1.add_to_collection(v1.GraphKeys.ASSET_FILEPATHS, tf.constant(asset))
        filename = v1.Variable("foo.txt", name="filename_tensor", trainable=False, collections=[])
        assign_filename_op = filename.assign("foo.txt")

        def regression(inp: Any, out: Any) -> Any:
            return build_def({consts.REGRESS_INPUTS: build_info(inp)},
                             {consts.REGRESS_OUTPUTS: build_info(out)}, consts.REGRESS_METHOD_NAME)

        signature_def_map = {
            "regress_x_to_y": regression(serialized_tf_example, y),
            "regress_x_to_y2": regression(serialized_tf_example, y2),
            "regress_x2_to_y3": regression(x2, y3),
            "classify_x_to_y": build_def({consts.CLASSIFY_INPUTS: build_info(serialized_tf_example)},
                                         {consts.CLASSIFY_OUTPUT_SCORES: build_info(y)},
                                         consts.CLASSIFY_METHOD_NAME),
            consts.DEFAULT_SERVING_SIGNATURE_DEF_KEY: build_def(
                {"x": build_info(x)}, {"y": build_info(y)}, consts.PREDICT_METHOD_NAME),
        }
        sess.run(v1.global_variables_initializer())
        builder = v1.saved_model.builder.SavedModelBuilder(export_dir)
        builder.add_meta_graph_and_variables(
            sess, [v1.saved_model.tag_constants.SERVING], signature_def_map=signature_def_map,
            assets_collection=v1.get_collection(v1.GraphKeys.ASSET_FILEPATHS),
            main_op=tf.group(assign_filename_op))
        builder.save()
    return export_dir


def build_estimator_style(export_dir: str) -> str:
    """A binary linear classifier exported as ``tf.estimator``'s ``export_saved_model`` with
    ``build_parsing_serving_input_receiver_fn`` exports one (tf.estimator itself left TensorFlow
    in 2.16): a TF1 graph fed serialized tf.Examples through the string placeholder
    ``input_example_tensor``, a vocabulary table initialized by the legacy init op, and the canned
    head's signatures: ``serving_default`` and ``classification`` (inputs → classes, scores),
    ``regression`` (inputs → outputs: the logistic), ``predict`` (examples → logits, logistic,
    probabilities, class_ids, classes).

    logit = weight[color] + 0.5·size - 1, colors "red" (+2), "green" (0), "blue" (-2), else -1."""
    import tensorflow as tf

    v1 = tf.compat.v1
    info = v1.saved_model.utils.build_tensor_info
    build_def = v1.saved_model.signature_def_utils.build_signature_def
    consts = v1.saved_model.signature_constants
    with tf.Graph().as_default(), v1.Session() as sess:
        examples = v1.placeholder(tf.string, shape=[None], name="input_example_tensor")
        features = v1.parse_example(examples, {
            "color": v1.FixedLenFeature([1], tf.string, default_value=[""]),
            "size": v1.FixedLenFeature([1], tf.float32, default_value=[0.0])})
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(["red", "green", "blue"]),
                                                tf.constant([0, 1, 2], tf.int64)), default_value=3)
        ids = table.lookup(features["color"])
        weights = v1.Variable([2.0, 0.0, -2.0, -1.0], name="linear/color/weights")
        size_weight = v1.Variable(0.5, name="linear/size/weights")
        bias = v1.Variable(-1.0, name="linear/bias_weights")
        logits = tf.identity(tf.gather(weights, ids) + size_weight * features["size"] + bias,
                             name="head/logits")  # [batch, 1]
        logistic = tf.sigmoid(logits, name="head/logistic")
        probabilities = tf.concat([1.0 - logistic, logistic], axis=1, name="head/probabilities")
        class_ids = tf.cast(logits > 0.0, tf.int64, name="head/class_ids")
        classes = tf.strings.as_string(class_ids, name="head/classes")
        batch = tf.shape(logits)[0]
        all_classes = tf.tile(tf.constant([["0", "1"]]), [batch, 1], name="head/all_classes")
        classification = build_def({consts.CLASSIFY_INPUTS: info(examples)},
                                   {consts.CLASSIFY_OUTPUT_CLASSES: info(all_classes),
                                    consts.CLASSIFY_OUTPUT_SCORES: info(probabilities)},
                                   consts.CLASSIFY_METHOD_NAME)
        signatures = {
            consts.DEFAULT_SERVING_SIGNATURE_DEF_KEY: classification,
            "classification": classification,
            "regression": build_def({consts.REGRESS_INPUTS: info(examples)},
                                    {consts.REGRESS_OUTPUTS: info(logistic)}, consts.REGRESS_METHOD_NAME),
            "predict": build_def({"examples": info(examples)},
                                 {"logits": info(logits), "logistic": info(logistic),
                                  "probabilities": info(probabilities), "class_ids": info(class_ids),
                                  "classes": info(classes)}, consts.PREDICT_METHOD_NAME),
        }
        sess.run(v1.global_variables_initializer())
        builder = v1.saved_model.builder.SavedModelBuilder(export_dir)
        builder.add_meta_graph_and_variables(
            sess, [v1.saved_model.tag_constants.SERVING], signature_def_map=signatures,
            main_op=v1.tables_initializer())
        builder.save()
    return export_dir


def build_typed(export_dir: str) -> str:
    """A TF1 graph (``SavedModelBuilder``) with several signatures over int64, bool and string
    tensors, declared with shapes that the requests below do not always have:
    ``serving_default``: ids (int64 [-1]), flags (bool [-1]), words (string [-1]) →
    ids_plus_one, flags_negated, words_upper, words_bytes (echo, written as b64);
    ``int64``: ids → twice; ``bool``: flags → any (a scalar, reduced over the batch);
    ``string``: words → length (int32), joined (scalar string)."""
    import tensorflow as tf

    v1 = tf.compat.v1
    info = v1.saved_model.utils.build_tensor_info
    build_def = v1.saved_model.signature_def_utils.build_signature_def
    predict = v1.saved_model.signature_constants.PREDICT_METHOD_NAME
    with tf.Graph().as_default(), v1.Session() as sess:
        ids = v1.placeholder(tf.int64, shape=[None], name="ids")
        flags = v1.placeholder(tf.bool, shape=[None], name="flags")
        words = v1.placeholder(tf.string, shape=[None], name="words")
        signatures = {
            "serving_default": build_def(
                {"ids": info(ids), "flags": info(flags), "words": info(words)},
                {"ids_plus_one": info(ids + 1), "flags_negated": info(tf.logical_not(flags)),
                 "words_upper": info(tf.strings.upper(words)), "words_bytes": info(tf.identity(words))},
                predict),
            "int64": build_def({"ids": info(ids)}, {"twice": info(ids * 2)}, predict),
            "bool": build_def({"flags": info(flags)}, {"any": info(tf.reduce_any(flags))}, predict),
            "string": build_def({"words": info(words)},
                                {"length": info(tf.strings.length(words)),
                                 "joined": info(tf.strings.reduce_join(words, separator=" "))}, predict),
        }
        builder = v1.saved_model.builder.SavedModelBuilder(export_dir)
        builder.add_meta_graph_and_variables(sess, ["serve"], signature_def_map=signatures)
        builder.save()
    return export_dir


def build_zoo(root: str) -> str:
    """TF Serving's test models and their kin, each made as upstream makes it, under ``root``, and
    a model config naming them (tests/e2e/test_zoo_e2e.py)."""
    build_half_plus_two_tf1(os.path.join(root, "half_plus_two", "123"))
    build_half_plus_two_tf1(os.path.join(root, "half_plus_two_2_versions", "123"))
    build_half_plus_two_tf1(os.path.join(root, "half_plus_two_2_versions", "124"))
    build_half_plus_two_tf1(os.path.join(root, "half_plus_three", "123"), b=3.0)
    build_half_plus_two(os.path.join(root, "half_plus_two_tf2", "1"))
    build_keras3(os.path.join(root, "keras", "1"))
    build_estimator_style(os.path.join(root, "estimator", "1"))
    build_typed(os.path.join(root, "typed", "1"))
    names = ["half_plus_two", "half_plus_two_2_versions", "half_plus_three", "half_plus_two_tf2", "keras",
             "estimator", "typed"]
    config = os.path.join(root, "zoo.config")
    with open(config, "w") as f:
        f.write("model_config_list {\n")
        for name in names:
            policy = " model_version_policy { all {} }" if name == "half_plus_two_2_versions" else ""
            f.write(f'  config {{ name: "{name}" base_path: "{root}/{name}" '
                    f'model_platform: "tensorflow"{policy} }}\n')
        f.write("}\n")
    return config


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

    if sys.argv[1] == "--zoo":
        print(build_zoo(sys.argv[2]))
    else:
        print(build_all(sys.argv[1]))
