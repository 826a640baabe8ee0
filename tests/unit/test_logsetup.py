"""setup_logging and SecretMask: no configured secret reaches a formatted log line."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.config import LoggingConfig
from bridge.logsetup import (
    DRIVER_LOGGERS,
    HOOK_SECRET_MASK,
    SecretMask,
    mask_driver_logs,
    setup_logging,
)

TOKEN = "as-token-" + "S3cr3t" * 6
PASSWORD = "pg-Passw0rd"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """setup_logging replaces the root handlers; close ours and put pytest's back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    names = ("aiohttp.access", "alembic.runtime.migration", "passerelle.test")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
    for name, value in levels.items():
        logging.getLogger(name).setLevel(value)


def masked_handler() -> tuple[logging.Handler, io.StringIO]:
    """A handler of our own, with the filter setup_logging put on the root handlers."""
    root = logging.getLogger()
    masks = [f for h in root.handlers for f in h.filters if isinstance(f, SecretMask)]
    assert masks, "setup_logging installed no SecretMask"
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(masks[0])
    root.addHandler(handler)
    return handler, stream


def setup(
    capsys: pytest.CaptureFixture[str], file: Path | None = None, level: str = "DEBUG"
) -> logging.Logger:
    capsys.readouterr()
    setup_logging(
        LoggingConfig(level=level, loggers={}, file=str(file) if file else None),
        [TOKEN, PASSWORD, "abc", ""],
    )
    return logging.getLogger("passerelle.test")


def test_secret_in_message_is_masked(capsys: pytest.CaptureFixture[str]) -> None:
    log = setup(capsys)
    _, stream = masked_handler()
    log.info(f"sending with token {TOKEN} now")
    err = capsys.readouterr().err
    for output in (err, stream.getvalue()):
        assert TOKEN not in output
        assert "sending with token *** now" in output


def test_secret_in_args_is_masked(capsys: pytest.CaptureFixture[str]) -> None:
    log = setup(capsys)
    _, stream = masked_handler()
    log.warning("connect %s with %r (%d tries)", f"postgresql://u:{PASSWORD}@db/p", TOKEN, 3)
    err = capsys.readouterr().err
    for output in (err, stream.getvalue()):
        assert TOKEN not in output
        assert PASSWORD not in output
        assert "connect postgresql://u:***@db/p with '***' (3 tries)" in output


def test_secret_in_mapping_args_is_masked(capsys: pytest.CaptureFixture[str]) -> None:
    log = setup(capsys)
    log.info("headers: %(auth)s", {"auth": f"Bearer {TOKEN}"})
    log.info({"as_token": TOKEN})
    err = capsys.readouterr().err
    assert TOKEN not in err
    assert "headers: Bearer ***" in err
    assert "{'as_token': '***'}" in err


def test_secret_in_traceback_is_masked(capsys: pytest.CaptureFixture[str]) -> None:
    log = setup(capsys)
    _, stream = masked_handler()

    def fail() -> None:
        raise RuntimeError(f"homeserver refused {TOKEN}")

    try:
        try:
            fail()
        except RuntimeError as e:
            raise ValueError(f"wrapped, password {PASSWORD}") from e
    except ValueError:
        log.exception("request failed for %s", TOKEN)
    err = capsys.readouterr().err
    for output in (err, stream.getvalue()):
        assert TOKEN not in output
        assert PASSWORD not in output
        assert "request failed for ***" in output
        assert "Traceback (most recent call last)" in output
        assert "RuntimeError: homeserver refused ***" in output
        assert "ValueError: wrapped, password ***" in output


def test_secret_in_exc_info_tuple_is_masked(capsys: pytest.CaptureFixture[str]) -> None:
    log = setup(capsys)
    try:
        raise KeyError(TOKEN)
    except KeyError as e:
        log.error("lookup failed", exc_info=e)
    err = capsys.readouterr().err
    assert TOKEN not in err
    assert "KeyError: '***'" in err


def test_log_file_is_masked_too(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "passerelle.log"
    log = setup(capsys, file=path)
    try:
        raise OSError(PASSWORD)
    except OSError:
        log.exception("token %s", TOKEN)
    for handler in logging.getLogger().handlers:
        handler.flush()
    text = path.read_text(encoding="utf-8")
    assert "token ***" in text
    assert "OSError: ***" in text
    assert TOKEN not in text
    assert PASSWORD not in text
    assert TOKEN not in capsys.readouterr().err


def test_longest_secret_wins() -> None:
    mask = SecretMask(["abcd", "abcdefgh"])
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "key=abcdefgh", None, None)
    assert mask.filter(record) is True
    assert record.getMessage() == "key=***"


def test_short_secrets_are_ignored(capsys: pytest.CaptureFixture[str]) -> None:
    mask = SecretMask(["abc", "", "x"])
    assert mask.secrets == []
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "abc %s", ("x",), None)
    assert mask.filter(record) is True
    assert record.getMessage() == "abc x"
    log = setup(capsys)
    log.info("the abc of it")
    assert "the abc of it" in capsys.readouterr().err


def test_four_characters_are_masked() -> None:
    mask = SecretMask(["abcd"])
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%s!", ("abcd",), None)
    mask.filter(record)
    assert record.getMessage() == "***!"


def test_lines_without_secrets_are_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    log = setup(capsys)
    log.info("%d rooms, %s", 3, "all fine")
    assert "passerelle.test: 3 rooms, all fine" in capsys.readouterr().err


def test_levels_are_applied(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(
        LoggingConfig(level="WARNING", loggers={"passerelle.test": "DEBUG"}, file=None), [TOKEN]
    )
    logging.getLogger("passerelle.other").info("hidden line")
    logging.getLogger("passerelle.test").debug("shown line")
    err = capsys.readouterr().err
    assert "hidden line" not in err
    assert "shown line" in err
    assert logging.getLogger("aiohttp.access").level == logging.WARNING


def test_setup_replaces_previous_handlers(capsys: pytest.CaptureFixture[str]) -> None:
    setup(capsys)
    setup(capsys)
    logging.getLogger("passerelle.test").info("once")
    assert capsys.readouterr().err.count("once") == 1


def test_bad_format_arguments_do_not_raise_into_the_caller(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logging, "raiseExceptions", False)
    log = setup(capsys)
    log.warning("%s and %s", "only one")  # must not raise, as with plain logging
    log.info("still logging %s", TOKEN)
    assert "still logging ***" in capsys.readouterr().err


def test_webhook_secrets_made_at_run_time_masked_by_their_form() -> None:
    """A secret made by `webhook new` is in no config: masked by its whsec_ form, also in the
    database driver's records of statement parameters."""
    made = "whsec_" + "A1b2+/c3" * 5 + "="
    record = logging.LogRecord(
        "aiosqlite", logging.DEBUG, __file__, 1, "executing %r", (("x", made, 1),), None
    )
    assert HOOK_SECRET_MASK.filter(record)
    assert made not in record.getMessage()
    assert "whsec_***" in record.getMessage()
    mask_driver_logs()
    mask_driver_logs()
    for name in DRIVER_LOGGERS:
        assert logging.getLogger(name).filters.count(HOOK_SECRET_MASK) == 1
    plain = logging.LogRecord("x", logging.INFO, __file__, 1, "made webhook %s", ("ci",), None)
    HOOK_SECRET_MASK.filter(plain)
    assert plain.getMessage() == "made webhook ci"
