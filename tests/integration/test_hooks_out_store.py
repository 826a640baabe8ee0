"""The outbound webhook outbox (SQLite and PostgreSQL): queued once per hook and event, sent in
order, retried, finished once with its audit row, failures told once."""

from __future__ import annotations

from bridge.core.audit import AuditEntry
from bridge.core.ids import EventID, RoomID
from bridge.db import audit as audit_db
from bridge.db import hooks_out as outbox_db
from bridge.db import room_hooks
from bridge.db.engine import Database

ROOM = RoomID("!tickets:localhost")


def audit(outcome: str, event_id: str) -> AuditEntry:
    return AuditEntry(
        direction="webhook_out",
        link="webhook:tickets",
        room_id=ROOM,
        sender="@alice:localhost",
        outcome=outcome,
        ids={"event_id": event_id},
    )


async def queue(db: Database, hook: str, n: int) -> int | None:
    return await outbox_db.enqueue(
        db,
        hook=hook,
        room_id=ROOM,
        event_id=EventID(f"$e{n}:localhost"),
        kind="message.created",
        payload={"type": "message.created", "data": {"text": f"n°{n} ✓"}},
        sender="@alice:localhost",
    )


async def test_queue_send_retry_fail_and_tell(db: Database) -> None:
    first = await queue(db, "tickets", 1)
    assert first is not None
    assert await queue(db, "tickets", 1) is None  # a handler run again: nothing twice
    assert await queue(db, "alerts", 1) is not None  # another hook has its own row
    for n in (2, 3):
        await queue(db, "tickets", n)
    assert await outbox_db.hooks_with_pending(db) == {"tickets", "alerts"}
    items = await outbox_db.next_pending(db, "tickets", 10)
    assert [i.event_id for i in items] == ["$e1:localhost", "$e2:localhost", "$e3:localhost"]
    assert items[0].payload["data"]["text"] == "n°1 ✓"
    count, oldest = await outbox_db.pending_summary(db)
    assert count == 4
    assert oldest is not None

    await outbox_db.mark_retry(db, items[0].id, "HTTP 503", 503, 123)
    again = (await outbox_db.next_pending(db, "tickets", 1))[0]
    assert (again.attempts, again.next_attempt_at) == (1, 123)

    head = await audit_db.head(db)
    await outbox_db.finish(
        db, items[0].id, "sent", status=200, error=None, audit=audit("sent", "$e1")
    )
    # A repeat (e.g. after a crash between the POST and this commit) records nothing twice.
    await outbox_db.finish(
        db, items[0].id, "sent", status=200, error=None, audit=audit("sent", "$e1")
    )
    await outbox_db.finish(
        db,
        items[1].id,
        "failed",
        status=400,
        error="HTTP 400, a refusal",
        audit=audit("failed", "$e2"),
    )
    assert (await audit_db.head(db))[0] == head[0] + 2

    assert await outbox_db.delivered_or_queued(
        db, "tickets", ["$e1:localhost", "$e2:localhost", "$e3:localhost", "$x:localhost"]
    ) == {"$e1:localhost", "$e3:localhost"}  # failed ones are not: an edit of it goes nowhere
    assert await outbox_db.delivered_or_queued(db, "tickets", []) == set()

    told = await outbox_db.failures_to_report(db, 10)
    assert [(hook, event, error) for _id, hook, _room, event, error in told] == [
        ("tickets", "$e2:localhost", "HTTP 400, a refusal")
    ]
    await outbox_db.mark_reported(db, told[0][0])
    assert await outbox_db.failures_to_report(db, 10) == []
    assert await outbox_db.counts(db) == {"pending": 2, "sent": 1, "failed": 1}


async def test_outbound_room_hooks_share_the_name_space(db: Database) -> None:
    made = await room_hooks.create(
        db, "tickets", ROOM, "whsec_x", "@alice:localhost", url="https://t.example/h"
    )
    assert made is not None
    assert made.outbound
    assert await room_hooks.create(db, "tickets", ROOM, "whsec_y", "@bob:localhost") is None
    (found,) = await room_hooks.all_hooks(db)
    assert (found.url, found.outbound) == ("https://t.example/h", True)


async def test_revoked_hook_drops_its_waiting_deliveries(db: Database) -> None:
    for n in (1, 2):
        await queue(db, "tickets", n)
    await queue(db, "alerts", 3)
    head = await audit_db.head(db)
    dropped = await outbox_db.drop_pending(
        db, "tickets", "revoked", lambda item: audit("failed", item.event_id)
    )
    assert dropped == 2
    assert (await audit_db.head(db))[0] == head[0] + 2
    assert await outbox_db.next_pending(db, "tickets", 10) == []
    assert [i.hook for i in await outbox_db.next_pending(db, "alerts", 10)] == ["alerts"]
    # Not told one by one: whoever revoked the hook was answered.
    assert await outbox_db.failures_to_report(db, 10) == []
    assert await outbox_db.drop_pending(db, "tickets", "again", lambda i: audit("failed", "")) == 0
