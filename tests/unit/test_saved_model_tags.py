"""TFWSGI_SAVED_MODEL_TAGS (TF Serving's --saved_model_tags): which meta graph a SavedModel loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tfwsgi.errors import NotFound

NOT_FOUND = ("Could not find meta graph def matching supplied tags: {{ {} }}. To inspect available "
             "tag-sets in the SavedModel, please use the SavedModel CLI: `saved_model_cli`")


def _saved_model(path: Path, *tag_sets: list[str]) -> str:
    """A saved_model.pb with one (empty) meta graph per tag set."""
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    for i, tags in enumerate(tag_sets):
        mg = sm.meta_graphs.add()
        mg.meta_info_def.tags.extend(tags)
        mg.signature_def["serving_default"].method_name = f"graph {i}"
    path.mkdir(parents=True)
    (path / "saved_model.pb").write_bytes(sm.SerializeToString())
    return str(path)


def test_the_meta_graph_whose_tags_are_exactly_the_set_given(tmp_path: Path) -> None:
    """tensorflow/cc/saved_model/reader.cc, FindMetaGraphDef: tag sets must be equal."""
    from tfwsgi.servable import _read_meta_graph

    path = _saved_model(tmp_path / "m", ["serve", "gpu"], ["serve"], ["train"])
    assert _read_meta_graph(path).signature_def["serving_default"].method_name == "graph 1"
    assert _read_meta_graph(path, ("gpu", "serve")).signature_def["serving_default"].method_name == "graph 0"
    assert _read_meta_graph(path, ("train",)).signature_def["serving_default"].method_name == "graph 2"
    with pytest.raises(NotFound) as info:
        _read_meta_graph(path, ("serve", "tpu"))
    assert info.value.message == NOT_FOUND.format("serve tpu")


def test_a_model_without_the_default_tag_set_fails_with_tf_servings_message(tmp_path: Path) -> None:
    from tfwsgi.servable import Servable

    path = _saved_model(tmp_path / "m", ["serve", "gpu"])
    with pytest.raises(NotFound) as info:
        Servable("m", 1, path)
    assert info.value.message == NOT_FOUND.format("serve")


def test_a_tf1_model_saved_with_two_tags_loads_and_runs_with_them(tmp_path: Path) -> None:
    import tensorflow as tf

    from tfwsgi.servable import Servable

    path = str(tmp_path / "edge" / "1")
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        x = tf.compat.v1.placeholder(tf.float32, [None], name="x")
        y = tf.identity(x * 0.5 + 2.0, name="y")
        builder = tf.compat.v1.saved_model.Builder(path)
        sig = tf.compat.v1.saved_model.predict_signature_def({"x": x}, {"y": y})
        builder.add_meta_graph_and_variables(sess, ["serve", "edge"],
                                             signature_def_map={"serving_default": sig})
        builder.save()
    servable = Servable("edge", 1, path, ("edge", "serve"))
    out = servable.signature("").run({"x": np.array([1.0, 2.0, 5.0], np.float32)})
    np.testing.assert_allclose(out["y"], [2.5, 3.0, 4.5])
    with pytest.raises(NotFound, match=r"matching supplied tags: \{ serve \}"):
        Servable("edge", 1, path)


def test_the_setting_reaches_the_loader() -> None:
    from tfwsgi.settings import from_env, names

    assert names(from_env({}).saved_model_tags) == ("serve",)
    assert names(from_env({"TFWSGI_SAVED_MODEL_TAGS": "serve, gpu"}).saved_model_tags) == ("serve", "gpu")
