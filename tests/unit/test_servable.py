"""How ``tfwsgi.servable`` imports TensorFlow (in a fresh interpreter: the test session has its own)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_tensorflow_comes_without_keras_and_keras_still_loads_on_first_use() -> None:
    code = (
        "import sys\n"
        "import tfwsgi.servable as s\n"
        "assert 'tensorflow' in sys.modules\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('keras', 'matplotlib')], 'imported'\n"
        "assert not s.runtime_initialized()\n"
        "assert s.tf.keras.layers.Dense(2).units == 2\n"
        "assert 'keras' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300,
                   env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"})


def test_each_signature_is_called_flat_and_answers_as_the_public_call(tmp_path: Path) -> None:
    """Signature.run calls the signature function flat (skipping the keyword binding); every
    signature of a many-dtype model must take that path and answer exactly as ``fn(**feeds)``."""
    import numpy as np
    import tensorflow as tf

    from models import build_multi
    from tfwsgi.servable import Servable

    servable = Servable("multi", 1, build_multi(str(tmp_path / "multi" / "1")))
    assert len(servable.signatures) >= 5
    # A serialized tf.Example for the classify/regress signatures (any string for the others).
    example = tf.train.Example(features=tf.train.Features(feature={
        "x": tf.train.Feature(float_list=tf.train.FloatList(value=[1.0]))})).SerializeToString()
    for name, sig in servable.signatures.items():
        assert sig.flat_order is not None and set(sig.flat_order) == set(sig.inputs), name
        assert sig.inference is not None, name
        inputs = {}
        for key, dtype in sig.inputs.items():
            shape = [2 if d is None else d for d in sig.input_shapes[key].as_list()]
            inputs[key] = (np.full(shape, example, dtype=object) if dtype.kind == "O"
                           else np.ones(shape, dtype=dtype))
        flat = sig.run(inputs)
        public = sig.fn(**{k: tf.constant(v, dtype=tf.string if v.dtype.kind == "O" else None)
                           for k, v in inputs.items()})
        assert set(flat) == set(public), name
        for key, value in public.items():
            np.testing.assert_array_equal(flat[key], value.numpy(), err_msg=f"{name}/{key}")


def test_op_errors_keep_the_ops_status_message_as_tf_serving_answers_it() -> None:
    """Python's runtime wraps an op's status in its own text; the answer is the status alone."""
    from tfwsgi.servable import op_message

    status = "Matrix size-incompatible: In[0]: [2,3], In[1]: [4,3]\n\t [[{{node MatMul}}]]"
    eager = ("Graph execution error:\n\nDetected at node MatMul defined at (most recent call last):\n"
             f"<stack traces unavailable>\n{status} [Op:__inference_signature_wrapper_938]")
    traced = ('Detected at node MatMul defined at (most recent call last):\n  File "x.py", line 10, in f\n\n'
              f'  File "y.py", line 2, in g\n\n{status}')
    assert op_message(eager) == status
    assert op_message(traced) == status
    assert op_message(status) == status
    assert op_message("assertion failed: [x must be > 0]") == "assertion failed: [x must be > 0]"
