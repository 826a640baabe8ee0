"""History backfill of mail links: one row per backfill job (its mails wait in mail_raw)."""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mail_backfill",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("link_id", sa.Integer, nullable=False),
        sa.Column("mailbox", sa.String(320), nullable=False),
        sa.Column("room_id", sa.String(255), nullable=False),
        sa.Column("since", sa.String(10), nullable=True),
        sa.Column("last", sa.Integer, nullable=True),
        sa.Column("uidvalidity", sa.BigInteger, nullable=True),
        sa.Column("upto_uid", sa.BigInteger, nullable=True),
        sa.Column("state", sa.String(16), nullable=False, server_default="running"),
        sa.Column("total", sa.Integer, nullable=False, server_default="0"),
        sa.Column("handled", sa.Integer, nullable=False, server_default="0"),
        sa.Column("posted", sa.Integer, nullable=False, server_default="0"),
        sa.Column("owner", sa.String(255), nullable=True),
        sa.Column("heartbeat_at", sa.BigInteger, nullable=True),
        sa.Column("notice_event_id", sa.String(255), nullable=True),
        sa.Column("requested_by", sa.String(255), nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("finished_at", sa.BigInteger, nullable=True),
    )
    op.create_index("ix_mail_backfill_link_state", "mail_backfill", ["link_id", "state"])


def downgrade() -> None:
    op.drop_index("ix_mail_backfill_link_state", table_name="mail_backfill")
    op.drop_table("mail_backfill")
