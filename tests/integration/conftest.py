"""Fixtures shared by the SMTP and outbox tests: a scripted aiosmtpd sink on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.test_smtp import ScriptedHandler, start_sink


@pytest.fixture
def handler() -> ScriptedHandler:
    return ScriptedHandler()


@pytest.fixture
def sink(handler: ScriptedHandler) -> Iterator[int]:
    controller, port = start_sink(handler)
    try:
        yield port
    finally:
        controller.stop()
