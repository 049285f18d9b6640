"""How ``tfwsgi.servable`` imports TensorFlow (in a fresh interpreter: the test session has its own)."""

from __future__ import annotations

import subprocess
import sys


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
