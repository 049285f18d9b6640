"""The peer of the throughput benchmark: the plain Flask app people write to serve a model.

    BENCH_MODEL_DIR=/path/to/savedmodel gunicorn -w 2 bench.peers.plain_app:app

The SavedModel loads in each worker (gunicorn imports this module after fork), one intra-op
thread per worker (its best setting, measured); each request: stdlib JSON, numpy, the signature.
"""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow as tf
from flask import Flask, Response, request

tf.config.threading.set_intra_op_parallelism_threads(int(os.environ.get("BENCH_INTRA_OP", "1")))
tf.config.threading.set_inter_op_parallelism_threads(1)

app = Flask(__name__)
_model = tf.saved_model.load(os.environ["BENCH_MODEL_DIR"])
_serve = _model.signatures["serving_default"]


@app.post("/v1/models/m:predict")
def predict() -> Response:
    x = np.asarray(json.loads(request.get_data())["instances"], dtype=np.float32)
    y = _serve(x=tf.constant(x))["y"].numpy()
    return Response(json.dumps({"predictions": y.tolist()}), mimetype="application/json")
