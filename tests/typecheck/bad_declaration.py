"""error: Incompatible types in assignment (expression has type "int", variable has type "str")"""

from __future__ import annotations

from dataclasses import dataclass

from tfwsgi.settings import setting


@dataclass(frozen=True)
class MoreSettings:
    rest_api_port: str = setting(8501, "A default that does not match the declared type.")
