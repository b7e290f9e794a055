"""queues and log: an id once given out never names another row (SQLite AUTOINCREMENT)

SQLite gives a new row the largest id in its table plus one, so deleting or purging the
newest queue items handed their ids to the next messages: `send` printed an id it had
printed before, and the message_stored and message_sent hooks saw one id for two
messages. PostgreSQL's sequences never go back; on SQLite, AUTOINCREMENT makes the ids
behave the same. (SQLite changes a table by copying it: mailhost.store.upgrade turns
foreign keys off meanwhile, so no ON DELETE action runs on the rows that refer to it.)

Revision ID: 0005
Revises: 0004
"""
from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TABLES = ("incoming_log", "incoming_queue", "outgoing_queue")


def _recreate(autoincrement: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":  # PostgreSQL's sequences never go back
        return
    for table in TABLES:
        with op.batch_alter_table(table, recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}):
            pass


def upgrade() -> None:
    _recreate(autoincrement=True)


def downgrade() -> None:
    _recreate(autoincrement=False)
