"""Inbound webhooks: the inbox of verified requests and the thread roots of thread keys."""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "webhook_inbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("hook", sa.String(32), nullable=False),
        sa.Column("webhook_id", sa.String(255), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("received_at", sa.BigInteger, nullable=False),
        sa.Column("state", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("event_id", sa.String(255), nullable=True),
        sa.UniqueConstraint("hook", "webhook_id", name="ux_webhook_inbox_id"),
    )
    op.create_index("ix_webhook_inbox_state", "webhook_inbox", ["state", "id"])
    op.create_table(
        "webhook_thread",
        sa.Column("hook", sa.String(32), primary_key=True),
        sa.Column("room_id", sa.String(255), primary_key=True),
        sa.Column("thread_key", sa.String(255), primary_key=True),
        sa.Column("root_event_id", sa.String(255), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("webhook_thread")
    op.drop_index("ix_webhook_inbox_state", table_name="webhook_inbox")
    op.drop_table("webhook_inbox")
