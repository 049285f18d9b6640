"""The package's surface: ``tfwsgi:app`` is the only ``app`` there is."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import tfwsgi


def test_no_submodule_shadows_the_app_attribute() -> None:
    """gunicorn resolves ``tfwsgi:app`` with getattr: a submodule named ``app``, once imported
    by anyone, would be found instead of the WSGI app and refused."""
    names = {m.name for m in pkgutil.iter_modules(tfwsgi.__path__)}
    assert "app" not in names
    for name in names - {"__main__"}:
        importlib.import_module(f"tfwsgi.{name}")
    assert "app" not in vars(tfwsgi)  # importing every module built nothing and shadowed nothing


# servable.py runs TensorFlow; grpc_api.py runs none, but tensorflow-serving-api's generated
# services import the `tensorflow` package (TensorProto and the other messages live in it), so it
# is imported only in a worker (hooks.post_fork), where servable.py has loaded TensorFlow.
TENSORFLOW_MODULES = {"servable", "grpc_api"}


def test_importing_every_module_but_the_servable_stays_tensorflow_free() -> None:
    names = sorted(m.name for m in pkgutil.iter_modules(tfwsgi.__path__) if m.name not in TENSORFLOW_MODULES)
    code = f"import sys, {', '.join('tfwsgi.' + n for n in names)}; sys.exit('tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
