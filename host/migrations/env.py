"""Alembic environment: runs on the connection mailhost.store.upgrade hands over."""
from __future__ import annotations

from alembic import context
from mailhost.store import Base, include_object

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # `alembic` run by hand: build an engine from the URL given
    from mailhost.store import make_engine

    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    connection = engine.connect()

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=True,  # SQLite cannot ALTER most things; batch mode copies the table
    compare_type=True,
    include_object=include_object,  # indexes kept in the migrations only
)
with context.begin_transaction():
    context.run_migrations()
