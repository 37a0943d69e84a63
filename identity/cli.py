"""`cdp identity ...` commands: resolve now, or rebuild every profile."""

from __future__ import annotations

import json
from collections.abc import Callable

import typer

from cdp.config import Settings
from cdp.db import Database
from cdp.warehouse import Warehouse
from identity import service

app = typer.Typer(help="Identity resolution: resolve new events or rebuild all profiles.")


def _run(settings: Settings, open_warehouse: Callable[[str], Warehouse], *, full: bool) -> str:
    db = Database.from_settings(settings)
    warehouse = open_warehouse("cdp identity " + ("rebuild" if full else "resolve"))
    try:
        with db.begin() as session:
            rules = service.get_rules(session)
        result = service.resolve(warehouse, settings=settings, rules=rules, full=full)
    finally:
        warehouse.close()
        db.dispose()
    return json.dumps(result.as_dict())


def register(
    parent: typer.Typer,
    settings: Callable[[], Settings],
    open_warehouse: Callable[[Settings, str], Warehouse],
    echo: Callable[[str], None],
    guard: Callable[[Callable[[], None]], Callable[[], None]],
) -> None:
    """Mount the identity commands under `cdp identity` (`guard` turns errors into exit 1)."""

    @app.command()
    @guard
    def rebuild() -> None:
        """Recompute every profile from the whole graph (ids kept, changes published)."""
        current = settings()
        echo(_run(current, lambda holder: open_warehouse(current, holder), full=True))

    @app.command()
    @guard
    def resolve() -> None:
        """Resolve the events ingested since the last run."""
        current = settings()
        echo(_run(current, lambda holder: open_warehouse(current, holder), full=False))

    parent.add_typer(app, name="identity")
