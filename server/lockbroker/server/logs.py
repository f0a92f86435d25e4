"""Structured logs: one JSON object per line on stderr, and nothing else on stderr.

What else could write to stderr, and where it goes instead:
- Python warnings and uncaught exceptions: through logging, so they are JSON lines too.
- OpenTelemetry console spans: stdout or OTEL_EXPORTER_CONSOLE_FILE (see interceptors.tracing).
- grpc's C core logs (glog-style "E1207 12:00:00.000 ... file.cc:123] ...") are written by C code
  straight to file descriptor 2, out of Python's reach. `quiet_grpc_core` keeps them to errors
  unless the user set GRPC_VERBOSITY; someone debugging grpc with GRPC_VERBOSITY=debug gets its
  plain-text lines among the JSON ones, knowingly.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from types import TracebackType

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        # json.dumps escapes newlines inside strings: a traceback stays on its record's one line.
        return json.dumps(doc, default=str)


def quiet_grpc_core(env: dict[str, str] | os._Environ[str] = os.environ) -> None:
    """GRPC_VERBOSITY=ERROR unless set. Takes effect only if grpc has not been imported yet."""
    env.setdefault("GRPC_VERBOSITY", "ERROR")


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("lockbroker").critical("uncaught exception", exc_info=(kind, value, tb))


def setup(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught


def set_level(level: str) -> None:
    """Change the level of the running broker (SIGHUP)."""
    logging.getLogger().setLevel(level.upper())
