"""Errors of the ingestion package."""

from __future__ import annotations

from cdp.errors import (
    BadRequest,
    Conflict,
    Invalid,
    NotFound,
    PayloadTooLarge,
    TooManyRequests,
    Unauthorized,
    Unavailable,
)


class SourceNotFound(NotFound):
    """No source has this id."""

    code = "ingestion.source_not_found"


class ImportNotFound(NotFound):
    """No import has this id."""

    code = "ingestion.import_not_found"


class DuplicateSourceName(Conflict):
    """Another source has this name."""

    code = "ingestion.duplicate_source_name"


class WrongSourceKind(Conflict):
    """The operation does not apply to this kind of source."""

    code = "ingestion.wrong_source_kind"


class SourceDisabled(Conflict):
    """The source is disabled."""

    code = "ingestion.source_disabled"


class InvalidMapping(Invalid):
    """A mapping or a source configuration is not acceptable."""

    code = "ingestion.invalid_mapping"


class UnsupportedFile(Invalid):
    """A file the file connector cannot read."""

    code = "ingestion.unsupported_file"


class PullFailed(Invalid):
    """A database source could not be read."""

    code = "ingestion.pull_failed"


class InvalidWriteKey(Unauthorized):
    """No enabled `http` source has this write key."""

    code = "ingestion.invalid_write_key"


class MalformedRequest(BadRequest):
    """A tracking request that cannot be read or a message that cannot be stored."""

    code = "ingestion.malformed"


class BodyTooLarge(PayloadTooLarge):
    """A tracking request body over the limit."""

    code = "ingestion.body_too_large"


class QueueFull(TooManyRequests):
    """The writer's queue is full: the client should retry after a moment."""

    code = "ingestion.queue_full"


class WriterStopped(Unavailable):
    """The server is shutting down and takes no more events."""

    code = "ingestion.writer_stopped"


class ImportInterrupted(Unavailable):
    """A background import stopped by a server shutdown."""

    code = "ingestion.import_interrupted"
