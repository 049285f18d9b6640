"""The reference models of the throughput benchmark (issue 5), built with the installed TensorFlow."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_warmup(path: Path, inputs: dict[str, Any]) -> None:
    """``assets.extra/tf_serving_warmup_requests`` with one predict record of ``inputs`` (numpy
    arrays), which tfwsgi, like TF Serving, replays before the version is available."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    req = predict_pb2.PredictRequest()
    for name, value in inputs.items():
        req.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    (path / "assets.extra").mkdir(exist_ok=True)
    with tf.io.TFRecordWriter(str(path / "assets.extra" / "tf_serving_warmup_requests")) as w:
        w.write(prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=req)).SerializeToString())


def build_mlp(path: Path, seed: int = 0, hidden: int = 512, warmup: bool = False) -> None:
    """MLP 784→hidden→hidden→10 (512: the "mlp" rows), signature x [None, 784] → y [None, 10];
    with ``warmup``, a warmup record of one example."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)

    def w(*shape: int) -> tf.Variable:
        return tf.Variable(rng.normal(0, 0.05, size=shape).astype("float32"))

    class MLP(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1, self.b1 = w(784, hidden), w(hidden)
            self.w2, self.b2 = w(hidden, hidden), w(hidden)
            self.w3, self.b3 = w(hidden, 10), w(10)

        @tf.function(input_signature=[tf.TensorSpec([None, 784], tf.float32, name="x")])
        def serve(self, x: Any) -> Any:
            h = tf.nn.relu(x @ self.w1 + self.b1)
            h = tf.nn.relu(h @ self.w2 + self.b2)
            return {"y": tf.nn.softmax(h @ self.w3 + self.b3)}

    m = MLP()
    tf.saved_model.save(m, str(path), signatures={"serving_default": m.serve})
    if warmup:
        write_warmup(path, {"x": rng.random((1, 784), dtype="float32")})


def build_conv(path: Path, seed: int = 0) -> None:
    """A small conv net on 32×32×3 images (the "conv" row), signature x [None, 32, 32, 3] → y."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)

    def w(*shape: int) -> tf.Variable:
        return tf.Variable(rng.normal(0, 0.05, size=shape).astype("float32"))

    class Conv(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.k = [w(3, 3, 3, 64), w(3, 3, 64, 64), w(3, 3, 64, 128), w(3, 3, 128, 128),
                      w(3, 3, 128, 256)]
            self.dense = w(256, 10)

        @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32, name="x")])
        def serve(self, x: Any) -> Any:
            h = x
            for i, k in enumerate(self.k):
                h = tf.nn.relu(tf.nn.conv2d(h, k, 1, "SAME"))
                if i in (1, 3):
                    h = tf.nn.max_pool2d(h, 2, 2, "VALID")
            h = tf.reduce_mean(h, axis=[1, 2])
            return {"y": tf.nn.softmax(h @ self.dense)}

    m = Conv()
    tf.saved_model.save(m, str(path), signatures={"serving_default": m.serve})
