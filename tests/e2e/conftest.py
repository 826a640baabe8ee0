"""Mail servers shared by the end-to-end tests: one Dovecot and one Postfix per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bridge.harness.dovecot import DovecotServer
from bridge.harness.postfix import PostfixServer


@pytest.fixture(scope="session")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DovecotServer]:
    server = DovecotServer(tmp_path_factory.mktemp("dovecot"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postfix(
    tmp_path_factory: pytest.TempPathFactory, dovecot: DovecotServer
) -> Iterator[PostfixServer]:
    server = PostfixServer(tmp_path_factory.mktemp("postfix"), lmtp_port=dovecot.lmtp_port)
    server.start()
    try:
        yield server
    finally:
        server.stop()
