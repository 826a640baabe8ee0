"""Logging set-up, with a filter that masks every configured secret in every record."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

from bridge.config import LoggingConfig

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class SecretMask(logging.Filter):
    """Replaces known secret values (tokens, passwords) wherever they appear in a log line."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        try:
            message = record.getMessage()
        except Exception:
            # Arguments that do not fit the format: let the handler report it as usual.
            return True
        masked = message
        for secret in self.secrets:
            masked = masked.replace(secret, "***")
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            formatter = logging.Formatter()
            record.exc_text = formatter.formatException(record.exc_info)
        if record.exc_text:
            for secret in self.secrets:
                record.exc_text = record.exc_text.replace(secret, "***")
        return True


def setup_logging(config: LoggingConfig, secrets: Iterable[str] = ()) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    mask = SecretMask(secrets)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if config.file:
        handlers.append(logging.FileHandler(config.file, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.addFilter(mask)
        root.addHandler(handler)
    root.setLevel(config.level)
    # Libraries stay quieter than the bridge unless asked for.
    for name in ("aiohttp.access", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(config.level)))
    for name, level in config.loggers.items():
        logging.getLogger(name).setLevel(level)
