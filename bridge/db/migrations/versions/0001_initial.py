"""Initial schema: transactions, inbox, dead letters, ghosts, rooms, links, key-value."""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "appservice_txn",
        sa.Column("txn_key", sa.String(64), primary_key=True),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("received_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "inbox_event",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(255), nullable=False, unique=True),
        sa.Column("room_id", sa.String(255), nullable=False),
        sa.Column("event_type", sa.String(255), nullable=False),
        sa.Column("sender", sa.String(255), nullable=False),
        sa.Column("event_json", sa.Text, nullable=False),
        sa.Column("origin_ts", sa.BigInteger, nullable=False),
        sa.Column("received_at", sa.BigInteger, nullable=False),
        sa.Column("state", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("done_at", sa.BigInteger, nullable=True),
    )
    op.create_index("ix_inbox_event_state_seq", "inbox_event", ["state", "seq"])
    op.create_index("ix_inbox_event_room_ts", "inbox_event", ["room_id", "origin_ts"])
    op.create_table(
        "dead_letter",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("ref", sa.String(255), nullable=True),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "ghost",
        sa.Column("mxid", sa.String(255), primary_key=True),
        sa.Column("remote_kind", sa.String(32), nullable=False),
        sa.Column("remote_id", sa.String(512), nullable=False),
        sa.Column("display_name", sa.String(512), nullable=True),
        sa.Column("registered", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ux_ghost_remote", "ghost", ["remote_kind", "remote_id"], unique=True)
    op.create_table(
        "room",
        sa.Column("room_id", sa.String(255), primary_key=True),
        sa.Column("is_direct", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("bot_membership", sa.String(16), nullable=False),
        sa.Column("encrypted", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("member_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("invited_by", sa.String(255), nullable=True),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "link",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("room_id", sa.String(255), sa.ForeignKey("room.room_id"), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("remote", sa.String(512), nullable=False),
        sa.Column("settings_json", sa.Text, nullable=False, server_default="{}"),
        sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_by", sa.String(255), nullable=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_link_room", "link", ["room_id"])
    op.create_table(
        "kv",
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )


def downgrade() -> None:
    for table in ("kv", "link", "room", "ghost", "dead_letter", "inbox_event", "appservice_txn"):
        op.drop_table(table)
