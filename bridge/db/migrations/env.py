"""Alembic environment: runs on the connection the bridge hands over (never its own engine)."""

from alembic import context

from bridge.db.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
