"""gunicorn's logs as JSON lines (``TFWSGI_LOG_FORMAT=json``): one object per access or error line."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from gunicorn.glogging import Logger


class JsonFormatter(logging.Formatter):
    """A log record as one JSON object: time, level, logger, pid, message, and any ``access``."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        access = getattr(record, "access", None)
        if access is not None:
            doc.update(access)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


class JsonLogger(Logger):
    """gunicorn's Logger, with every handler it sets up writing JSON lines."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        formatter = JsonFormatter()
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.setFormatter(formatter)

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        """Overrides gunicorn 27.0 ``glogging.py`` ``Logger.access`` (same arguments; reads its
        ``access_log_enabled`` and ``access_log``); the status parsing is its ``atoms``'."""
        if not self.access_log_enabled:
            return
        status = resp.status
        if isinstance(status, str):
            status = status.split(None, 1)[0]
        fields = {
            "remote_addr": environ.get("REMOTE_ADDR", "-"),
            "method": environ.get("REQUEST_METHOD"),
            "path": environ.get("RAW_URI") or environ.get("PATH_INFO"),
            "protocol": environ.get("SERVER_PROTOCOL"),
            "status": int(status),
            "bytes": getattr(resp, "sent", None),
            "duration_us": request_time.seconds * 1_000_000 + request_time.microseconds,
            "user_agent": environ.get("HTTP_USER_AGENT"),
            "request_id": environ.get("HTTP_X_REQUEST_ID"),
            "cache_status": next((v for k, v in resp.headers if k.lower() == "cache-status"), None),
        }
        self.access_log.info("%s %s %s", fields["method"], fields["path"], fields["status"],
                             extra={"access": fields})
