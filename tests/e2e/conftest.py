"""Fixtures shared by the end-to-end tests of the remote relay: an agency person, a ministry
person, and their two rooms linked through a running bridge."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge.harness.synapse import MatrixTestClient, SynapseServer
from tests.conftest import SynapseSetup, UserFactory
from tests.e2e.test_remote_relay import Linked, link_rooms


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
async def linked(
    synapse_setup: SynapseSetup,
    ministry_synapse: SynapseServer,
    ministry_bridge_account: tuple[str, str],
    people: tuple[MatrixTestClient, MatrixTestClient],
    db_url: str,
    tmp_path: Path,
) -> AsyncIterator[Linked]:
    """A running bridge, Alice's room linked to Bob's with `link-remote`."""
    alice, bob = people
    setup = await link_rooms(
        synapse_setup, ministry_synapse, ministry_bridge_account, alice, bob, db_url, tmp_path
    )
    try:
        yield setup
    finally:
        setup.bridge.stop()
