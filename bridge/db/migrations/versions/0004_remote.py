"""External ministry servers: /sync position, remote inbox, event map, remote outbox."""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "remote_sync",
        sa.Column("remote", sa.String(64), primary_key=True),
        sa.Column("next_batch", sa.Text, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "remote_inbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("remote", sa.String(64), nullable=False),
        sa.Column("room_id", sa.String(255), nullable=False),
        sa.Column("event_id", sa.String(255), nullable=False),
        sa.Column("event_json", sa.Text, nullable=False),
        sa.Column("received_at", sa.BigInteger, nullable=False),
        sa.Column("state", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.UniqueConstraint("remote", "event_id", name="ux_remote_inbox_event"),
    )
    op.create_index("ix_remote_inbox_state", "remote_inbox", ["state", "id"])
    op.create_table(
        "remote_event_map",
        sa.Column("link_id", sa.Integer, sa.ForeignKey("link.id"), primary_key=True),
        sa.Column("remote_event_id", sa.String(255), primary_key=True),
        sa.Column("agency_event_id", sa.String(255), nullable=False),
        sa.Column("remote_sender", sa.String(255), nullable=False),
        sa.Column("direction", sa.String(3), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("link_id", "agency_event_id", name="ux_remote_event_map_agency"),
    )
    op.create_table(
        "remote_outbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("link_id", sa.Integer, sa.ForeignKey("link.id"), nullable=False),
        sa.Column("room_id", sa.String(255), nullable=False),
        sa.Column("event_id", sa.String(255), nullable=False),
        sa.Column("plan_json", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.BigInteger, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("remote_event_id", sa.String(255), nullable=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("finished_at", sa.BigInteger, nullable=True),
        sa.Column("reported", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.UniqueConstraint("link_id", "event_id", name="ux_remote_outbox_event"),
    )
    op.create_index("ix_remote_outbox_due", "remote_outbox", ["state", "link_id", "id"])
    op.create_index("ix_remote_outbox_report", "remote_outbox", ["reported", "state"])


def downgrade() -> None:
    for table in ("remote_outbox", "remote_event_map", "remote_inbox", "remote_sync"):
        op.drop_table(table)
