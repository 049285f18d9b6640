"""The bundled demo model: TF Serving's ``half_plus_two``, built here instead of downloaded.

``python -m tfwsgi.demo DIR`` writes ``DIR/half_plus_two/1``: y = 0.5·x + 2, with the predict,
classify and regress signatures of TF Serving's own test model, so its documented curl calls work.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def build_half_plus_two(export_dir: str, a: float = 0.5, b: float = 2.0, c: float = 3.0) -> str:
    """Save half_plus_two (y = a·x + b, y3 = a·x2 + c) as a SavedModel at ``export_dir``."""
    import tensorflow as tf

    def features(serialized: Any) -> Any:
        return tf.io.parse_example(serialized, {
            "x": tf.io.FixedLenFeature([1], tf.float32),
            "x2": tf.io.FixedLenFeature([1], tf.float32, default_value=[0.0]),
        })

    class HalfPlusTwo(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = tf.Variable(a, name="a")
            self.b = tf.Variable(b, name="b")
            self.c = tf.Variable(c, name="c")

        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
        def predict(self, x: Any) -> Any:
            return {"y": self.a * x + self.b}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def regress_x_to_y(self, inputs: Any) -> Any:
            return {"outputs": self.a * features(inputs)["x"] + self.b}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def regress_x2_to_y3(self, inputs: Any) -> Any:
            return {"outputs": self.a * features(inputs)["x2"] + self.c}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def classify_x_to_y(self, inputs: Any) -> Any:
            return {"scores": self.a * features(inputs)["x"] + self.b}

    model = HalfPlusTwo()
    signatures = {
        "serving_default": model.predict,
        "tensorflow/serving/predict": model.predict,
        "tensorflow/serving/regress": model.regress_x_to_y,
        "tensorflow/serving/classify": model.classify_x_to_y,
        "regress_x_to_y": model.regress_x_to_y,
        "regress_x2_to_y3": model.regress_x2_to_y3,
        "classify_x_to_y": model.classify_x_to_y,
    }
    tf.saved_model.save(model, export_dir, signatures=signatures)
    return export_dir


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: python -m tfwsgi.demo MODELS_DIR\n")
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    target = os.path.join(argv[1], "half_plus_two", "1")
    if os.path.exists(os.path.join(target, "saved_model.pb")):
        print(f"{target} already built")
        return 0
    from .cudalog import quiet_cuda_probe

    with quiet_cuda_probe():  # TensorFlow's CUDA probe lines stay out of `make serve`'s log
        build_half_plus_two(target)
    print(f"built {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
