"""How ``tfwsgi.servable`` imports TensorFlow (in a fresh interpreter: the test session has its own)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


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


def test_each_signature_runs_in_the_session_and_answers_as_the_tf2_public_call(tmp_path: Path) -> None:
    """Signature.run feeds and fetches a signature by its tensor names in a Session, as TF
    Serving runs it; every signature of a many-dtype model must answer exactly as the same
    signature loaded by ``tf.saved_model.load`` and called as ``fn(**feeds)``."""
    import numpy as np
    import tensorflow as tf

    from models import build_multi
    from tfwsgi.servable import Servable

    path = build_multi(str(tmp_path / "multi" / "1"))
    servable = Servable("multi", 1, path)
    public_signatures = tf.saved_model.load(path).signatures
    assert len(servable.signatures) >= 5
    assert set(servable.signatures) == set(public_signatures)
    # A serialized tf.Example for the classify/regress signatures (any string for the others).
    example = tf.train.Example(features=tf.train.Features(feature={
        "x": tf.train.Feature(float_list=tf.train.FloatList(value=[1.0]))})).SerializeToString()
    for name, sig in servable.signatures.items():
        assert set(sig.feeds) == set(sig.inputs) and set(sig.fetches) == set(sig.outputs), name
        inputs = {}
        for key, dtype in sig.inputs.items():
            shape = [2 if d is None else d for d in sig.input_shapes[key].as_list()]
            inputs[key] = (np.full(shape, example, dtype=object) if dtype.kind == "O"
                           else np.ones(shape, dtype=dtype))
        ran = sig.run(inputs)
        feeds = {k: tf.constant(v, dtype=tf.string if v.dtype.kind == "O" else None)
                 for k, v in inputs.items()}
        public = public_signatures[name](**feeds)
        assert set(ran) == set(public), name
        for key, value in public.items():
            assert ran[key].dtype == value.numpy().dtype, f"{name}/{key}"
            np.testing.assert_array_equal(ran[key], value.numpy(), err_msg=f"{name}/{key}")


def test_one_inter_op_thread_runs_the_graph_in_the_calling_thread() -> None:
    from tfwsgi import servable

    saved = servable._configured
    try:
        servable._configured = (2, 1)
        config = servable.session_config()
        assert (config.intra_op_parallelism_threads, config.inter_op_parallelism_threads) == (2, -1)
        servable._configured = (1, 4)
        config = servable.session_config()
        assert (config.intra_op_parallelism_threads, config.inter_op_parallelism_threads) == (1, 4)
        assert config.allow_soft_placement
    finally:
        servable._configured = saved


# A fresh interpreter's worker threads configured from argv[1] (the inter-op threads), and a
# Signature whose Session callable is ``call`` (defined by the script that follows).
_FAKE_SIGNATURE = """
import sys, threading, time
import numpy as np
from tfwsgi import servable
servable.configure_threads(1, int(sys.argv[1]))
def signature(call):
    return servable.Signature(name="s", method_name="m", inputs={"x": np.dtype("float32")}, input_shapes={},
                              outputs={"y": np.dtype("float32")}, call=call, feeds=("x",), fetches=("y",))
"""


def _run_script(script: str, inter_op: int) -> str:
    out = subprocess.run([sys.executable, "-c", _FAKE_SIGNATURE + script, str(inter_op)], check=True,
                         timeout=300, capture_output=True, text=True,
                         env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"})
    return out.stdout.strip().splitlines()[-1]


_TURNS = """
active, most = [0], [0]
lock = threading.Lock()
def call(x):
    with lock:
        active[0] += 1
        most[0] = max(most[0], active[0])
    time.sleep(0.05)  # the graph's run, the GIL released
    with lock:
        active[0] -= 1
    return [x * 2]
sig = signature(call)
threads = [threading.Thread(target=sig.run, args=({"x": np.ones(1, np.float32)},)) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(most[0])
"""


@pytest.mark.parametrize("inter_op, most", [(1, 1), (2, 4)])
def test_with_one_inter_op_thread_the_calling_threads_take_turns(inter_op: int, most: int) -> None:
    """One inter-op thread: graphs run in the calling threads, one run at a time in a worker,
    as runs take turns on TF Serving's one inter-op thread. With more, TensorFlow's inter-op pool
    bounds the ops, and the calls go in together."""
    assert int(_run_script(_TURNS, inter_op)) == most


_DEADLINE = """
from tfwsgi.errors import DeadlineExceeded
ran = []
def call(x):
    ran.append(float(x[0]))
    time.sleep(0.3)  # the graph's run, the GIL released
    return [x * 2]
sig = signature(call)
first = threading.Thread(target=sig.run, args=({"x": np.full(1, 1, np.float32)},))
first.start()
time.sleep(0.05)  # the first run holds the turn
started = time.monotonic()
try:
    sig.run({"x": np.full(1, 2, np.float32)}, deadline=started + 0.1)
    outcome = "ran"
except DeadlineExceeded as exc:
    outcome = "deadline " + str(exc)
waited = time.monotonic() - started
first.join()
late = sig.run({"x": np.full(1, 3, np.float32)}, deadline=time.monotonic() + 5)  # its turn comes in time
print(outcome, "|", round(waited, 3), "|", ran, "|", late["y"].tolist())
"""


def test_a_call_whose_deadline_passes_while_it_waits_for_its_turn_is_not_run() -> None:
    """With one inter-op thread a call waits for the graph's turn; if its deadline passes first it
    is answered DEADLINE_EXCEEDED at the deadline and never runs, as the batcher drops a task
    whose deadline passed while queued. A call whose turn comes in time runs."""
    outcome, waited, ran, late = _run_script(_DEADLINE, 1).split(" | ")
    assert outcome.startswith("deadline Deadline exceeded"), outcome
    assert 0.09 <= float(waited) < 0.25, waited  # answered at its deadline, not after the first run
    assert ran == "[1.0, 3.0]", ran  # the late call never ran
    assert late == "[6.0]"


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


def test_a_signature_with_a_tensor_of_no_one_name_is_refused_when_called() -> None:
    """A TensorInfo encoded as coo_sparse or composite has no one tensor to feed or fetch: that
    signature refuses its calls (the model still loads and its other signatures serve)."""
    import numpy as np
    import pytest
    from tensorflow.core.protobuf import meta_graph_pb2

    from tfwsgi.errors import Unimplemented
    from tfwsgi.servable import _callable

    sig_def = meta_graph_pb2.SignatureDef()
    sig_def.inputs["x"].coo_sparse.values_tensor_name = "values:0"
    sig_def.outputs["y"].name = "y:0"
    call, feeds, fetches = _callable(None, sig_def)
    assert (feeds, fetches) == (("x",), ("y",))
    with pytest.raises(Unimplemented, match="Signature tensor x is a coo_sparse tensor"):
        call(np.zeros(1))
