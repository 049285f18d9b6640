"""error: Incompatible return value type (got "int", expected "str")"""

from __future__ import annotations

from tfwsgi.settings import Settings


def workers(settings: Settings) -> str:
    return settings.workers
