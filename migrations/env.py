"""Alembic environment: runs revisions against the configured operational store."""

from __future__ import annotations

from typing import Any

from alembic import context

from cdp.db import Base, make_engine
from migrations.models import load_all_models

load_all_models()

# Tables owned by libraries rather than by our models (APScheduler's job store).
EXTERNAL_TABLES = {"apscheduler_jobs"}


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:  # Any: alembic
    """Leave out tables our models do not own."""
    return not (type_ == "table" and name in EXTERNAL_TABLES)


def run_migrations() -> None:
    """Run migrations online with the configured URL."""
    config = context.config
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(str(url))
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


def _run(connection: Any) -> None:  # Any: SQLAlchemy connection
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        include_name=include_name,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()


run_migrations()
