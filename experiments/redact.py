"""Credentials out of everything the project records or prints: params, tags, log lines, errors, artifacts.

A password can reach a command line (`--storage postgresql://user:PASSWORD@host/db`), an error message that
quotes the URL, or a log line. `redact(text)` replaces every password it can recognise with `***`:

    redact("postgresql+psycopg://optuna:s3cret@db/optuna")    -> "postgresql+psycopg://optuna:***@db/optuna"
    redact("sqlite:///x.db?password=s3cret&mode=ro")          -> "sqlite:///x.db?password=***&mode=ro"
    redact("--password s3cret") / redact("PGPASSWORD=s3cret") -> "--password ***" / "PGPASSWORD=***"

`RedactingFilter` applies it to every log record a handler emits (`install_log_redaction()` puts it on the
root logger's handlers, which the command-line entry points configure).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

MASK = "***"

# scheme://user:password@host: the password is everything between the first ':' after the user and the last
# '@' before the host (passwords may hold '@' and ':'); a host never contains '/', '@' or whitespace
_USERINFO = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s'\"]*):(?P<secret>[^\s'\"/]*)@(?=[^@\s'\"/]*(?:[/?#\s'\"]|$))"
)
# key=value and --key value forms of credential-like names (query strings, DSNs, environment, flags)
_KEYS = r"password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key"
_ASSIGNED = re.compile(rf"(?P<head>(?:[A-Za-z0-9_]*(?:{_KEYS}))\s*[=:]\s*)(?P<secret>[^\s&;,'\"]+)", re.IGNORECASE)
_FLAG = re.compile(rf"(?P<head>--?[A-Za-z0-9_-]*(?:{_KEYS})[A-Za-z0-9_-]*(?:\s+|=))(?P<secret>[^\s'\"]+)", re.IGNORECASE)


def redact(text: object) -> str:
    """`text` (made a string) with every recognisable credential replaced by ***."""
    out = str(text)
    if not out:
        return out
    out = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@" if m["secret"] != MASK else m[0], out)
    out = _FLAG.sub(lambda m: m["head"] + MASK, out)
    return _ASSIGNED.sub(lambda m: m["head"] + MASK, out)


def redact_mapping(values: Mapping[str, object]) -> dict[str, str]:
    """Every value of `values` as a redacted string (keys are kept: they are names, not secrets)."""
    return {str(k): redact("None" if v is None else v) for k, v in values.items()}


class RedactingFilter(logging.Filter):
    """Rewrites a record's message (arguments filled in) and exception text through `redact`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_info, record.exc_text = None, redact(text)
        return True


def install_log_redaction(*loggers: str) -> None:
    """Put a RedactingFilter on every handler of the root logger (after logging.basicConfig) and of the named
    loggers (libraries such as optuna that keep their own handler)."""
    for handler in [h for name in ("", *loggers) for h in logging.getLogger(name).handlers]:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
