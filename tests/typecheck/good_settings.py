"""Settings used as declared: mypy must accept this file."""

from __future__ import annotations

import dataclasses

from tfwsgi.settings import Settings, from_env


def body_limit_mib(settings: Settings) -> int:
    return settings.max_request_bytes // (1024 * 1024)


def cors(settings: Settings) -> bool:
    return settings.rest_api_enable_cors_support


def server(settings: Settings) -> str:
    return settings.memcached.split(",")[0]


smaller = dataclasses.replace(from_env({}), max_request_bytes=1024)
