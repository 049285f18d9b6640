"""error: Property "workers" defined in "Settings" is read-only"""

from __future__ import annotations

from tfwsgi.settings import Settings


def more_workers(settings: Settings) -> None:
    settings.workers = 4
