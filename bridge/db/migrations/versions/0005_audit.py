"""Audit log: hash-chained rows of every relayed or refused item, and the chain's head; the
Matrix sender and content digest of each outgoing mail, for its audit row."""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

GENESIS = "0" * 64


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("time", sa.BigInteger, nullable=False),
        sa.Column("direction", sa.String(16), nullable=False),
        sa.Column("item_key", sa.String(1000), nullable=True, unique=True),
        sa.Column("link", sa.String(512), nullable=False),
        sa.Column("room_id", sa.String(255), nullable=True),
        sa.Column("sender", sa.String(512), nullable=True),
        sa.Column("recipients", sa.Text, nullable=False),
        sa.Column("ids", sa.Text, nullable=False),
        sa.Column("verdict", sa.String(16), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("body_sha256", sa.String(64), nullable=True),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_index("ix_audit_log_time", "audit_log", ["time"])
    op.create_index("ix_audit_log_link", "audit_log", ["link", "seq"])
    head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.bulk_insert(head, [{"id": 1, "seq": 0, "hash": GENESIS}])
    with op.batch_alter_table("mail_outbox") as batch:
        batch.add_column(sa.Column("sender", sa.String(255), nullable=True))
        batch.add_column(sa.Column("body_sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("mail_outbox") as batch:
        batch.drop_column("body_sha256")
        batch.drop_column("sender")
    op.drop_table("audit_head")
    op.drop_table("audit_log")
