"""Mail ingestion: raw mail store, Message-ID map, daily sender notices."""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mail_raw",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("link_id", sa.Integer, sa.ForeignKey("link.id"), nullable=False),
        sa.Column("mailbox", sa.String(320), nullable=False),
        sa.Column("uidvalidity", sa.BigInteger, nullable=False),
        sa.Column("uid", sa.BigInteger, nullable=False),
        sa.Column("message_id", sa.String(998), nullable=True),
        sa.Column("raw", sa.LargeBinary, nullable=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("received_at", sa.BigInteger, nullable=False),
        sa.Column("state", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("event_id", sa.String(255), nullable=True),
        sa.UniqueConstraint("mailbox", "uidvalidity", "uid", name="ux_mail_raw_uid"),
    )
    op.create_index("ix_mail_raw_state", "mail_raw", ["state", "id"])
    op.create_index("ix_mail_raw_link_mid", "mail_raw", ["link_id", "message_id"])
    op.create_table(
        "message_map",
        sa.Column("link_id", sa.Integer, sa.ForeignKey("link.id"), primary_key=True),
        sa.Column("message_id", sa.String(998), primary_key=True),
        sa.Column("room_id", sa.String(255), nullable=False),
        sa.Column("event_id", sa.String(255), nullable=False),
        sa.Column("thread_root", sa.String(255), nullable=False),
        sa.Column("subject", sa.Text, nullable=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_message_map_event", "message_map", ["event_id"])
    op.create_table(
        "sender_notice",
        sa.Column("link_id", sa.Integer, sa.ForeignKey("link.id"), primary_key=True),
        sa.Column("address", sa.String(320), primary_key=True),
        sa.Column("day", sa.String(10), primary_key=True),
        sa.Column("refused", sa.Integer, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    for table in ("sender_notice", "message_map", "mail_raw"):
        op.drop_table(table)
