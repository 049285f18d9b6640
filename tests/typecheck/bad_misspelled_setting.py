"""error: "Settings" has no attribute "max_request_bytez" """

from __future__ import annotations

from tfwsgi.settings import Settings


def body_limit(settings: Settings) -> int:
    return settings.max_request_bytez
