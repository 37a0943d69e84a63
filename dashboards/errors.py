"""Errors of the dashboards package."""

from __future__ import annotations

from cdp.errors import Invalid, NotFound, Unauthorized


class UnknownMetric(Invalid):
    """The metric is not in the catalogue."""

    code = "dashboards.unknown_metric"


class UnsupportedBreakdown(Invalid):
    """The metric does not offer this breakdown."""

    code = "dashboards.unsupported_breakdown"


class UnsupportedGrain(Invalid):
    """The metric does not offer this time grain."""

    code = "dashboards.unsupported_grain"


class InvalidRange(Invalid):
    """The date range is empty or too long."""

    code = "dashboards.invalid_range"


class DashboardNotFound(NotFound):
    """No custom dashboard has this id."""

    code = "dashboards.not_found"


class NotSignedIn(Unauthorized):
    """The dashboard session cookie is missing, unknown or expired."""

    code = "dashboards.not_signed_in"


class SegmentsRequired(Invalid):
    """A metric about two segments was asked for without both of them."""

    code = "dashboards.segments_required"


class UnknownSegment(Invalid):
    """A segment named in a KPI request does not exist."""

    code = "dashboards.unknown_segment"


class UnknownProgram(Invalid):
    """A loyalty programme named in a KPI request does not exist."""

    code = "dashboards.unknown_program"
