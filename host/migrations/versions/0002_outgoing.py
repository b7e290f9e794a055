"""outgoing pipeline: accepted recipients, queue age, the server's SIZE

Revision ID: 0002
Revises: 0001
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outgoing_queue", schema=None) as batch_op:
        batch_op.add_column(sa.Column("accepted", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("queued_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("outgoing_connections", schema=None) as batch_op:
        batch_op.add_column(sa.Column("server_size_limit", sa.Integer(), nullable=True))
    # Messages queued before this revision count their age from their creation.
    op.execute("UPDATE outgoing_queue SET queued_at = created_at WHERE queued_at IS NULL")


def downgrade() -> None:
    with op.batch_alter_table("outgoing_connections", schema=None) as batch_op:
        batch_op.drop_column("server_size_limit")
    with op.batch_alter_table("outgoing_queue", schema=None) as batch_op:
        batch_op.drop_column("queued_at")
        batch_op.drop_column("accepted")
