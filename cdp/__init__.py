"""Customer Data Platform core: configuration, stores, app factory, auth, jobs and CLI."""

__version__ = "0.1.0"
