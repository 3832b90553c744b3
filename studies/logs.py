"""Logging of the study commands and their worker processes: levels, one line per failed trial, redaction."""

from __future__ import annotations

import logging

import optuna

from experiments.redact import install_log_redaction


class _QuietTrialFailed(logging.Filter):
    """Optuna logs a traceback for every caught exception; a diverged fit needs only its reason."""

    def filter(self, record: logging.LogRecord) -> bool:
        from .objective import TrialFailed

        if record.exc_info and isinstance(record.exc_info[1], TrialFailed | KeyboardInterrupt):
            record.exc_info = None  # Ctrl-C / SIGTERM: the command says "interrupted" once
        return True


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("studies").setLevel(logging.INFO if verbose else logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)
    for handler in optuna.logging.get_logger("optuna").handlers:  # a logger's own filter misses its children
        if not any(isinstance(f, _QuietTrialFailed) for f in handler.filters):
            handler.addFilter(_QuietTrialFailed())
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    install_log_redaction("optuna")
