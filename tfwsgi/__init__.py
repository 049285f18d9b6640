"""tfwsgi: TensorFlow Serving's REST API on gunicorn prefork workers.

``gunicorn -c gunicorn_conf.py tfwsgi:app``. Importing this package is cheap and TensorFlow-free;
``tfwsgi.app`` is built on first access (in a worker, after ``post_fork`` loaded the models).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "app":
        from .app import create_app

        app = create_app()
        globals()["app"] = app
        return app
    raise AttributeError(f"module 'tfwsgi' has no attribute {name!r}")
