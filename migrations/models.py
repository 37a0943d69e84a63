"""Imports every package's SQLAlchemy models so `Base.metadata` knows all tables."""

from __future__ import annotations

import importlib

MODEL_MODULES = (
    "cdp.auth",
    "cdp.scheduler",
    "ingestion.models",
    "identity.models",
    "segments.models",
    "loyalty.models",
    "dashboards.models",
)


def load_all_models() -> None:
    """Import the model modules that exist."""
    for name in MODEL_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
