"""FastAPI dependencies for the platform's shared objects (settings, warehouse, jobs)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from cdp.config import Settings
from cdp.warehouse import Warehouse


def get_app_settings(request: Request) -> Settings:
    """The settings of the running app."""
    settings: Settings = request.app.state.settings
    return settings


def get_warehouse(request: Request) -> Warehouse:
    """The warehouse of the running app."""
    warehouse: Warehouse = request.app.state.warehouse
    return warehouse


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
WarehouseDep = Annotated[Warehouse, Depends(get_warehouse)]
