"""error: Unexpected keyword argument "max_request_bytez" for "replace" of "Settings" """

from __future__ import annotations

import dataclasses

from tfwsgi.settings import from_env

smaller = dataclasses.replace(from_env({}), max_request_bytez=1024)
