"""error: Unsupported operand types for + ("str" and "int")"""

from __future__ import annotations

from tfwsgi.settings import Settings


def next_port(settings: Settings) -> int:
    return settings.memcached + 1
