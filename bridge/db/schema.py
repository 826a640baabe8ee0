"""Table definitions (SQLAlchemy Core). Migrations in db/migrations create them."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
)

metadata = MetaData()

# Appservice transactions already taken: SHA-256 of the homeserver's txnId, digest of the body.
appservice_txn = Table(
    "appservice_txn",
    metadata,
    Column("txn_key", String(64), primary_key=True),
    Column("digest", String(64), nullable=False),
    Column("received_at", BigInteger, nullable=False),
)

# Every event the homeserver pushed, stored before the transaction is answered. The unique
# event_id is what makes a replayed or re-numbered transaction harmless.
inbox_event = Table(
    "inbox_event",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("event_id", String(255), nullable=False, unique=True),
    Column("room_id", String(255), nullable=False),
    Column("event_type", String(255), nullable=False),
    Column("sender", String(255), nullable=False),
    Column("event_json", Text, nullable=False),
    Column("origin_ts", BigInteger, nullable=False),
    Column("received_at", BigInteger, nullable=False),
    # pending → done, or pending → dead (see dead_letter)
    Column("state", String(16), nullable=False, server_default="pending"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", Text, nullable=True),
    Column("done_at", BigInteger, nullable=True),
    Index("ix_inbox_event_state_seq", "state", "seq"),
    Index("ix_inbox_event_room_ts", "room_id", "origin_ts"),
)

# What could not be taken or handled: malformed events, handler failures past the retry limit.
dead_letter = Table(
    "dead_letter",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("source", String(32), nullable=False),
    Column("ref", String(255), nullable=True),
    Column("payload", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

# Ghost users, one per remote identity (mail address, external user).
ghost = Table(
    "ghost",
    metadata,
    Column("mxid", String(255), primary_key=True),
    Column("remote_kind", String(32), nullable=False),
    Column("remote_id", String(512), nullable=False),
    Column("display_name", String(512), nullable=True),
    Column("registered", Boolean, nullable=False, server_default=false()),
    Column("created_at", BigInteger, nullable=False),
    Index("ux_ghost_remote", "remote_kind", "remote_id", unique=True),
)

# Rooms the bot has been invited to or joined.
room = Table(
    "room",
    metadata,
    Column("room_id", String(255), primary_key=True),
    Column("is_direct", Boolean, nullable=False, server_default=false()),
    Column("bot_membership", String(16), nullable=False),
    Column("encrypted", Boolean, nullable=False, server_default=false()),
    # joined + invited members, refreshed on membership changes; ≤ 2 means a direct chat
    Column("member_count", Integer, nullable=False, server_default="0"),
    Column("invited_by", String(255), nullable=True),
    Column("updated_at", BigInteger, nullable=False),
)

# Links between a room and a remote (mailing list, mailbox, external room, webhook).
link = Table(
    "link",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(255), nullable=False, unique=True),
    Column("room_id", String(255), ForeignKey("room.room_id"), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("remote", String(512), nullable=False),
    Column("settings_json", Text, nullable=False, server_default="{}"),
    Column("paused", Boolean, nullable=False, server_default=false()),
    Column("created_by", String(255), nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Index("ix_link_room", "room_id"),
)

# Small pieces of bridge state (schema facts, last ping, ...).
kv = Table(
    "kv",
    metadata,
    Column("key", String(255), primary_key=True),
    Column("value", Text, nullable=False),
)

# Every mail fetched from a linked mailbox, stored before it is handled. (mailbox, uidvalidity,
# uid) makes a refetch harmless; message_id lets a changed UIDVALIDITY resync without reposting.
# state: pending → done | duplicate | rejected | ignored | quarantined; a backfilled mail
# starts in state backfill instead of pending (see mail_backfill).
mail_raw = Table(
    "mail_raw",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("link_id", Integer, ForeignKey("link.id"), nullable=False),
    Column("mailbox", String(320), nullable=False),
    Column("uidvalidity", BigInteger, nullable=False),
    Column("uid", BigInteger, nullable=False),
    Column("message_id", String(998), nullable=True),
    Column("raw", LargeBinary, nullable=True),
    Column("size", BigInteger, nullable=False),
    Column("received_at", BigInteger, nullable=False),
    Column("state", String(16), nullable=False, server_default="pending"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", Text, nullable=True),
    Column("event_id", String(255), nullable=True),
    UniqueConstraint("mailbox", "uidvalidity", "uid", name="ux_mail_raw_uid"),
    Index("ix_mail_raw_state", "state", "id"),
    Index("ix_mail_raw_link_mid", "link_id", "message_id"),
)

# History backfills of a mail link (`backfill` command): what was asked, how far it got, and
# who runs it (owner "host:pid:kind", heartbeat). Its mails wait in mail_raw in state
# "backfill", out of the live queue. state: running → done | failed
mail_backfill = Table(
    "mail_backfill",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("link_id", Integer, nullable=False),
    Column("mailbox", String(320), nullable=False),
    Column("room_id", String(255), nullable=False),
    Column("since", String(10), nullable=True),
    Column("last", Integer, nullable=True),
    Column("uidvalidity", BigInteger, nullable=True),
    Column("upto_uid", BigInteger, nullable=True),
    Column("state", String(16), nullable=False, server_default="running"),
    Column("total", Integer, nullable=False, server_default="0"),
    Column("handled", Integer, nullable=False, server_default="0"),
    Column("posted", Integer, nullable=False, server_default="0"),
    Column("owner", String(255), nullable=True),
    Column("heartbeat_at", BigInteger, nullable=True),
    Column("notice_event_id", String(255), nullable=True),
    Column("requested_by", String(255), nullable=True),
    Column("last_error", Text, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("finished_at", BigInteger, nullable=True),
    Index("ix_mail_backfill_link_state", "link_id", "state"),
)

# Message-ID ⇄ Matrix event, per link: the first writer of a Message-ID wins.
message_map = Table(
    "message_map",
    metadata,
    Column("link_id", Integer, ForeignKey("link.id"), primary_key=True),
    Column("message_id", String(998), primary_key=True),
    Column("room_id", String(255), nullable=False),
    Column("event_id", String(255), nullable=False),
    Column("thread_root", String(255), nullable=False),
    Column("subject", Text, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Index("ix_message_map_event", "event_id"),
)

# Refused senders already reported to a room today (once per sender per day).
sender_notice = Table(
    "sender_notice",
    metadata,
    Column("link_id", Integer, ForeignKey("link.id"), primary_key=True),
    Column("address", String(320), primary_key=True),
    Column("day", String(10), primary_key=True),
    Column("refused", Integer, nullable=False, server_default="0"),
)

# Mail the bridge sends for a Matrix event, stored before the first attempt so that a crash or
# an unreachable server loses nothing; (link_id, event_id) makes a re-run handler harmless.
# state: pending → sent | failed; reported: the outcome was told to the room.
mail_outbox = Table(
    "mail_outbox",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("link_id", Integer, ForeignKey("link.id"), nullable=False),
    Column("room_id", String(255), nullable=False),
    Column("event_id", String(255), nullable=False),
    Column("kind", String(16), nullable=False),  # message | correction
    Column("message_id", String(998), nullable=False),  # without <>
    Column("raw", LargeBinary, nullable=False),
    Column("mail_from", String(320), nullable=False),
    Column("recipients", Text, nullable=False),  # JSON list of addresses
    Column("state", String(16), nullable=False, server_default="pending"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("first_tried_at", BigInteger, nullable=True),
    Column("next_attempt_at", BigInteger, nullable=False),
    Column("last_error", Text, nullable=True),
    Column("smtp_code", Integer, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("finished_at", BigInteger, nullable=True),
    Column("reported", Boolean, nullable=False, server_default=false()),
    # For the audit row: the Matrix user who wrote it, SHA-256 of its event content (0005).
    Column("sender", String(255), nullable=True),
    Column("body_sha256", String(64), nullable=True),
    UniqueConstraint("link_id", "event_id", name="ux_mail_outbox_event"),
    Index("ix_mail_outbox_due", "state", "next_attempt_at"),
    Index("ix_mail_outbox_report", "reported", "state"),
    Index("ix_mail_outbox_event_id", "event_id"),
)

# --- external ministry servers ("remotes") ----------------------------------------------------

# Per remote: the /sync position. It only moves in the commit that stores the batch's events,
# so a crash anywhere re-reads what was not stored, and nothing stored is read twice.
remote_sync = Table(
    "remote_sync",
    metadata,
    Column("remote", String(64), primary_key=True),
    Column("next_batch", Text, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

# Every event /sync gave for a linked remote room, stored before the position moves on.
# state: pending → done | refused | ignored | failed
remote_inbox = Table(
    "remote_inbox",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("remote", String(64), nullable=False),
    Column("room_id", String(255), nullable=False),
    Column("event_id", String(255), nullable=False),
    Column("event_json", Text, nullable=False),
    Column("received_at", BigInteger, nullable=False),
    Column("state", String(16), nullable=False, server_default="pending"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", Text, nullable=True),
    UniqueConstraint("remote", "event_id", name="ux_remote_inbox_event"),
    Index("ix_remote_inbox_state", "state", "id"),
)

# Remote event ⇄ agency event, per link, whichever side wrote it first (one to one).
# remote_sender: who wrote it on the remote side (the bridge's own account for direction
# "out"), so that only its author's redaction is mirrored.
remote_event_map = Table(
    "remote_event_map",
    metadata,
    Column("link_id", Integer, ForeignKey("link.id"), primary_key=True),
    Column("remote_event_id", String(255), primary_key=True),
    Column("agency_event_id", String(255), nullable=False),
    Column("remote_sender", String(255), nullable=False),
    Column("direction", String(3), nullable=False),  # in | out
    Column("created_at", BigInteger, nullable=False),
    UniqueConstraint("link_id", "agency_event_id", name="ux_remote_event_map_agency"),
)

# Agency events to send to a remote room, stored before the first attempt; (link_id,
# event_id) makes a re-run handler harmless, and the transaction ID derived from the event
# makes a resend after a crash harmless on the remote server.
# state: pending → sent | failed; reported: a failure was told to the room.
remote_outbox = Table(
    "remote_outbox",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("link_id", Integer, ForeignKey("link.id"), nullable=False),
    Column("room_id", String(255), nullable=False),
    Column("event_id", String(255), nullable=False),
    Column("plan_json", Text, nullable=False),
    Column("state", String(16), nullable=False, server_default="pending"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", BigInteger, nullable=False),
    Column("last_error", Text, nullable=True),
    Column("remote_event_id", String(255), nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("finished_at", BigInteger, nullable=True),
    Column("reported", Boolean, nullable=False, server_default=false()),
    UniqueConstraint("link_id", "event_id", name="ux_remote_outbox_event"),
    Index("ix_remote_outbox_due", "state", "link_id", "id"),
    Index("ix_remote_outbox_report", "reported", "state"),
)

# --- audit log --------------------------------------------------------------------------------

# Append-only: one row per relayed or refused item, chained by hash (bridge/core/audit.py).
# seq is given by the appender (no gaps); item_key, where set, makes a repeated record a no-op.
audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("time", BigInteger, nullable=False),  # ms since the epoch, UTC
    Column("direction", String(16), nullable=False),
    Column("item_key", String(1000), nullable=True, unique=True),
    Column("link", String(512), nullable=False),
    Column("room_id", String(255), nullable=True),
    Column("sender", String(512), nullable=True),
    Column("recipients", Text, nullable=False),  # JSON list
    Column("ids", Text, nullable=False),  # JSON object: message_id, event_id, remote_event_id
    Column("verdict", String(16), nullable=True),
    Column("outcome", String(16), nullable=False),
    Column("reason", Text, nullable=True),
    Column("body_sha256", String(64), nullable=True),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Index("ix_audit_log_time", "time"),
    Index("ix_audit_log_link", "link", "seq"),
)

# The chain's head (one row, id 1): the last seq and hash, so that removing rows from the end
# is seen too (a chain alone cannot tell a truncated log from a shorter one).
audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
)

# Verified webhook requests, stored before they are answered 202; (hook, webhook_id) is what
# makes a redelivered request a duplicate. state: pending → done | ignored | failed.
webhook_inbox = Table(
    "webhook_inbox",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("hook", String(32), nullable=False),
    Column("webhook_id", String(255), nullable=False),
    Column("body", Text, nullable=False),
    Column("received_at", BigInteger, nullable=False),
    Column("state", String(16), nullable=False, server_default="pending"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", Text, nullable=True),
    Column("event_id", String(255), nullable=True),
    UniqueConstraint("hook", "webhook_id", name="ux_webhook_inbox_id"),
    Index("ix_webhook_inbox_state", "state", "id"),
)

# A hook's thread key → the event that started that Matrix thread, per room.
webhook_thread = Table(
    "webhook_thread",
    metadata,
    Column("hook", String(32), primary_key=True),
    Column("room_id", String(255), primary_key=True),
    Column("thread_key", String(255), primary_key=True),
    Column("root_event_id", String(255), nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

# Hooks made in their room with `webhook new` (inbound) or `webhook out` (outbound, url set);
# names are unique across these and the config's.
# previous_secret stays valid until previous_expires_at (ms) after a `webhook rotate`.
webhook_room_hook = Table(
    "webhook_room_hook",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("room_id", String(255), nullable=False),
    Column("secret", String(255), nullable=False),
    Column("previous_secret", String(255), nullable=True),
    Column("previous_expires_at", BigInteger, nullable=True),
    Column("created_by", String(255), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("url", String(2048), nullable=True),  # set: outbound (`webhook out`)
)


# Room events to POST to outbound hooks, one row per (hook, event), sent in id order per hook.
# state: pending → sent | failed; a failed row is told next to its message once (reported).
webhook_outbox = Table(
    "webhook_outbox",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("hook", String(32), nullable=False),
    Column("room_id", String(255), nullable=False),
    Column("event_id", String(255), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("payload", Text, nullable=False),
    Column("sender", String(255), nullable=True),
    Column("state", String(16), nullable=False, server_default="pending"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", BigInteger, nullable=False),
    Column("last_error", Text, nullable=True),
    Column("status_code", Integer, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("finished_at", BigInteger, nullable=True),
    Column("reported", Boolean, nullable=False, server_default=false()),
    UniqueConstraint("hook", "event_id", name="ux_webhook_outbox_event"),
    Index("ix_webhook_outbox_due", "state", "hook", "id"),
    Index("ix_webhook_outbox_report", "reported", "state"),
)


# Units of work shared by several bridge instances: one holder at a time (owner), until
# expires_at (ms, the database's clock). epoch counts takeovers: a write that settles work
# checks it (fencing), so a holder that lost its lease can never commit after a takeover.
lease = Table(
    "lease",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("owner", String(255), nullable=False),
    Column("epoch", BigInteger, nullable=False),
    Column("acquired_at", BigInteger, nullable=False),
    Column("renewed_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Index("ix_lease_owner", "owner"),
)
