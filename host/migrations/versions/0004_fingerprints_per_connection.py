"""incoming: content fingerprints are looked up per connection, across its folders

A connection recognises content it stored before whatever folder name it reads now:
the same folder typed another way (Graph's ``inbox`` and ``Inbox``, an IMAP path with
the server's delimiter), or a folder holding copies of mail it stored from another
(the move action's target). The index that answers those lookups drops the folder.

Revision ID: 0004
Revises: 0003
"""
from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("incoming_seen", schema=None) as batch_op:
        batch_op.drop_index("ix_incoming_seen_fingerprint")
        batch_op.create_index("ix_incoming_seen_fingerprint", ["connection_id", "fingerprint"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("incoming_seen", schema=None) as batch_op:
        batch_op.drop_index("ix_incoming_seen_fingerprint")
        batch_op.create_index("ix_incoming_seen_fingerprint", ["connection_id", "folder", "fingerprint"],
                              unique=False)
