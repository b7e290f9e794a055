"""incoming: one acknowledgement mark per folder, stored items point at their pass

A download pass wrote three rows per message and updated one of them again after the
acknowledgement. Acknowledgements run in the order the keys were stored, so one
number per folder (``folder_cursors.acknowledged_through``) replaces the per-key flag,
and a stored item names its pass (``incoming_queue.log_id``) instead of a second copy
of its Message-ID, From and Subject in ``incoming_log_entries`` (which keeps the other
outcomes: duplicates).

Revision ID: 0003
Revises: 0002
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("incoming_queue", schema=None) as batch_op:
        batch_op.add_column(sa.Column("log_id", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_incoming_queue_log_id"), ["log_id"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_incoming_queue_log_id_incoming_log"), "incoming_log", ["log_id"], ["id"],
            ondelete="SET NULL")
    with op.batch_alter_table("folder_cursors", schema=None) as batch_op:
        batch_op.add_column(sa.Column("acknowledged_through", sa.Integer(), nullable=True))
    # Every folder with stored keys gets a cursor row (POP3 had none), acknowledged up
    # to just below its first unacknowledged key: the next pass repeats the rest.
    empty = "'{}'" if op.get_bind().dialect.name == "sqlite" else "CAST('{}' AS JSON)"
    op.execute(
        "INSERT INTO folder_cursors (connection_id, folder, state, updated_at) "
        f"SELECT s.connection_id, s.folder, {empty}, CURRENT_TIMESTAMP "
        "FROM (SELECT DISTINCT connection_id, folder FROM incoming_seen) s "
        "WHERE NOT EXISTS (SELECT 1 FROM folder_cursors c "
        "WHERE c.connection_id = s.connection_id AND c.folder = s.folder)"
    )
    op.execute(
        "UPDATE folder_cursors SET acknowledged_through = COALESCE("
        "(SELECT MIN(s.id) - 1 FROM incoming_seen s WHERE s.connection_id = folder_cursors.connection_id "
        "AND s.folder = folder_cursors.folder AND s.acknowledged = false), "
        "(SELECT MAX(s.id) FROM incoming_seen s WHERE s.connection_id = folder_cursors.connection_id "
        "AND s.folder = folder_cursors.folder))"
    )
    with op.batch_alter_table("incoming_seen", schema=None) as batch_op:
        batch_op.drop_index("ix_incoming_seen_unacknowledged")
        batch_op.drop_column("acknowledged")
        batch_op.create_index("ix_incoming_seen_order", ["connection_id", "folder", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("incoming_seen", schema=None) as batch_op:
        batch_op.drop_index("ix_incoming_seen_order")
        batch_op.add_column(sa.Column("acknowledged", sa.Boolean(), nullable=False, server_default=sa.true()))
        batch_op.create_index("ix_incoming_seen_unacknowledged", ["connection_id", "folder", "acknowledged"],
                              unique=False)
    op.execute(
        "UPDATE incoming_seen SET acknowledged = false WHERE id > COALESCE((SELECT c.acknowledged_through "
        "FROM folder_cursors c WHERE c.connection_id = incoming_seen.connection_id "
        "AND c.folder = incoming_seen.folder), 0)"
    )
    with op.batch_alter_table("folder_cursors", schema=None) as batch_op:
        batch_op.drop_column("acknowledged_through")
    with op.batch_alter_table("incoming_queue", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_incoming_queue_log_id_incoming_log"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_incoming_queue_log_id"))
        batch_op.drop_column("log_id")
