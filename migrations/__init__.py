"""Alembic environment and revisions of the operational store."""
