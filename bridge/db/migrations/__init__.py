"""Alembic migrations of the mapping database."""
