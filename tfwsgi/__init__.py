"""tfwsgi: TensorFlow Serving's REST API on gunicorn prefork workers.

``gunicorn -c gunicorn_conf.py tfwsgi:app``. Importing this package is cheap and TensorFlow-free;
``tfwsgi.app`` is built on first access, by ``tfwsgi.application.create_app()`` (under gunicorn:
in each worker, after ``post_fork``), which loads the worker's models.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "app":
        from .application import create_app

        try:
            app = create_app()
        except AttributeError as exc:  # gunicorn would report "Failed to find attribute 'app'"
            raise RuntimeError(f"tfwsgi: building the app failed: {exc!r}") from exc
        globals()["app"] = app
        return app
    raise AttributeError(f"module 'tfwsgi' has no attribute {name!r}")
