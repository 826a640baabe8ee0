"""Mail to send: the durable outbox."""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mail_outbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("link_id", sa.Integer, sa.ForeignKey("link.id"), nullable=False),
        sa.Column("room_id", sa.String(255), nullable=False),
        sa.Column("event_id", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("message_id", sa.String(998), nullable=False),
        sa.Column("raw", sa.LargeBinary, nullable=False),
        sa.Column("mail_from", sa.String(320), nullable=False),
        sa.Column("recipients", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("first_tried_at", sa.BigInteger, nullable=True),
        sa.Column("next_attempt_at", sa.BigInteger, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("smtp_code", sa.Integer, nullable=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("finished_at", sa.BigInteger, nullable=True),
        sa.Column("reported", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.UniqueConstraint("link_id", "event_id", name="ux_mail_outbox_event"),
    )
    op.create_index("ix_mail_outbox_due", "mail_outbox", ["state", "next_attempt_at"])
    op.create_index("ix_mail_outbox_report", "mail_outbox", ["reported", "state"])
    op.create_index("ix_mail_outbox_event_id", "mail_outbox", ["event_id"])


def downgrade() -> None:
    op.drop_table("mail_outbox")
