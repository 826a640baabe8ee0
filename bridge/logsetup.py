"""Logging set-up, with a filter that masks every configured secret in every record."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable

from bridge.config import LoggingConfig

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Webhook secrets made at run time (`webhook new`, the provisioning API) are in no config, so
# not among the known values: they are masked by their form wherever they appear.
_HOOK_SECRET = re.compile(r"whsec_[A-Za-z0-9+/]{8,}={0,2}")
# Loggers of database drivers that print a statement's parameters (aiosqlite at DEBUG): the
# webhook secrets the bridge stores are masked there even without setup_logging's handlers.
DRIVER_LOGGERS = ("aiosqlite",)


class SecretMask(logging.Filter):
    """Replaces known secret values (tokens, passwords) wherever they appear in a log line."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            # Arguments that do not fit the format: let the handler report it as usual.
            return True
        masked = self._mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            formatter = logging.Formatter()
            record.exc_text = formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._mask(record.exc_text)
        return True

    def _mask(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        if "whsec_" in text:
            text = _HOOK_SECRET.sub("whsec_***", text)
        return text


# Without known values: only the webhook secrets, by their form.
HOOK_SECRET_MASK = SecretMask(())


def mask_driver_logs() -> None:
    """Mask webhook secrets in the records of the database drivers' loggers (idempotent)."""
    for name in DRIVER_LOGGERS:
        logging.getLogger(name).addFilter(HOOK_SECRET_MASK)


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
