"""Fixtures shared by the end-to-end tests of the remote relay: an agency person, a ministry
person, and their two rooms linked through a running bridge."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge.harness.synapse import MatrixTestClient, SynapseServer
from tests.conftest import SynapseSetup, UserFactory
from tests.e2e.test_remote_relay import Linked, LinkFactory, link_rooms


@pytest.fixture
async def people(
    make_user: UserFactory, make_ministry_user: UserFactory
) -> tuple[MatrixTestClient, MatrixTestClient]:
    """Alice Martin on the agency's homeserver, Bob Durand on the ministry's."""
    alice = await make_user("alice")
    await alice.set_displayname("Alice Martin")
    bob = await make_ministry_user("bob")
    await bob.set_displayname("Bob Durand")
    return alice, bob


@pytest.fixture
async def link_with(
    synapse_setup: SynapseSetup,
    ministry_synapse: SynapseServer,
    ministry_bridge_account: tuple[str, str],
    people: tuple[MatrixTestClient, MatrixTestClient],
    db_url: str,
    tmp_path: Path,
) -> AsyncIterator[LinkFactory]:
    """Start a bridge and link Alice's room to Bob's, with options: `account=(user, token)`
    for the bridge's remote account, `permissions=`, or any key of the remote's settings."""
    started: list[Linked] = []

    async def make(*, account: tuple[str, str] | None = None, **options: Any) -> Linked:
        alice, bob = people
        setup = await link_rooms(
            synapse_setup,
            ministry_synapse,
            account or ministry_bridge_account,
            alice,
            bob,
            db_url,
            tmp_path,
            **options,
        )
        started.append(setup)
        return setup

    try:
        yield make
    finally:
        for setup in started:
            setup.bridge.stop()


@pytest.fixture
async def linked(link_with: LinkFactory) -> Linked:
    """A running bridge, Alice's room linked to Bob's with `link-remote`."""
    return await link_with()
