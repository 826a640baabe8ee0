"""Outbound webhooks: the URL of hooks made in rooms with `webhook out`, and the durable
delivery outbox."""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A room hook with a URL is outbound: the room's messages are POSTed there (names stay
    # unique across both directions).
    with op.batch_alter_table("webhook_room_hook") as batch:
        batch.add_column(sa.Column("url", sa.String(2048), nullable=True))
    op.create_table(
        "webhook_outbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("hook", sa.String(32), nullable=False),
        sa.Column("room_id", sa.String(255), nullable=False),
        sa.Column("event_id", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("sender", sa.String(255), nullable=True),
        sa.Column("state", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.BigInteger, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("status_code", sa.Integer, nullable=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("finished_at", sa.BigInteger, nullable=True),
        sa.Column("reported", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.UniqueConstraint("hook", "event_id", name="ux_webhook_outbox_event"),
    )
    op.create_index("ix_webhook_outbox_due", "webhook_outbox", ["state", "hook", "id"])
    op.create_index("ix_webhook_outbox_report", "webhook_outbox", ["reported", "state"])


def downgrade() -> None:
    op.drop_index("ix_webhook_outbox_report", table_name="webhook_outbox")
    op.drop_index("ix_webhook_outbox_due", table_name="webhook_outbox")
    op.drop_table("webhook_outbox")
    with op.batch_alter_table("webhook_room_hook") as batch:
        batch.drop_column("url")
