"""Errors of the segments package."""

from __future__ import annotations

from cdp.errors import Conflict, Invalid, NotFound


class InvalidRule(Invalid):
    """A rule or attribute definition that cannot be compiled; the message names the path."""

    code = "segments.invalid_rule"


class InvalidAttribute(Invalid):
    """An attribute definition that is not acceptable."""

    code = "segments.invalid_attribute"


class AttributeNotFound(NotFound):
    """No attribute of that name."""

    code = "segments.attribute_not_found"


class AttributeConflict(Conflict):
    """The attribute name is taken, built in, or still used by a segment."""

    code = "segments.attribute_conflict"


class SegmentNotFound(NotFound):
    """No segment of that id."""

    code = "segments.segment_not_found"


class SegmentConflict(Conflict):
    """The segment name is taken, or another segment still refers to it."""

    code = "segments.segment_conflict"
