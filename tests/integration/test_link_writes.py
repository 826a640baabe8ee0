"""Links written many at a time (thousands of config links at start-up) mean the same as
one at a time: created, or updated in place (room, settings, unpaused), never doubled."""

from __future__ import annotations

from bridge.config import DatabaseConfig
from bridge.core.ids import RoomID
from bridge.core.links import LinkSettings
from bridge.db import links as link_db
from bridge.db.engine import open_database


def _write(n: int, room: str, senders: tuple[str, ...] = ("gouv.fr",)) -> link_db.LinkWrite:
    return link_db.LinkWrite(
        RoomID(f"!{room}{n}:agency.example"),
        "mail",
        f"list{n}@agency.example",
        LinkSettings(allowed_senders=senders),
        "config",
    )


async def test_many_links_written_in_chunks_create_then_update(db_url: str) -> None:
    db = await open_database(DatabaseConfig(url=db_url, pool_size=2))
    try:
        await link_db.save_links(db, [_write(n, "a") for n in range(1_203)], chunk=500)
        links = {link.remote: link for link in await link_db.all_links(db)}
        assert len(links) == 1_203
        first = links["list7@agency.example"]
        assert first.room_id == "!a7:agency.example"
        assert first.settings.allowed_senders == ("gouv.fr",)
        assert first.source == "config"
        assert not first.paused
        await link_db.set_paused(db, first.id, True)

        # Written again: 10 move room and change settings, 5 are new; one batch, no doubles.
        again = [_write(n, "b", ("*.gouv.fr",)) for n in range(10)]
        again += [_write(n, "a") for n in range(1_203, 1_208)]
        await link_db.save_links(db, again)
        after = {link.remote: link for link in await link_db.all_links(db)}
        assert len(after) == 1_208
        moved = after["list7@agency.example"]
        assert moved.id == first.id  # updated in place: its mappings stay attached
        assert moved.room_id == "!b7:agency.example"
        assert moved.settings.allowed_senders == ("*.gouv.fr",)
        assert not moved.paused
        assert after["list11@agency.example"].room_id == "!a11:agency.example"
        assert after["list1207@agency.example"].room_id == "!a1207:agency.example"

        # One at a time: the same meaning.
        one = await link_db.save_link(
            db,
            room_id=RoomID("!c1:agency.example"),
            kind="mail",
            remote="list1@agency.example",
            settings=LinkSettings(),
            source="bot",
            created_by=None,
        )
        assert one.id == after["list1@agency.example"].id
        assert (one.room_id, one.source, one.settings) == (
            "!c1:agency.example",
            "bot",
            LinkSettings(),
        )
        assert len(await link_db.all_links(db)) == 1_208
    finally:
        await db.close()
