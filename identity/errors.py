"""Errors of the identity package."""

from __future__ import annotations

from cdp.errors import Invalid, NotFound


class ProfileNotFound(NotFound):
    """No profile has this id."""

    code = "identity.profile_not_found"


class IdentifierNotFound(NotFound):
    """No profile holds this identifier."""

    code = "identity.identifier_not_found"


class InvalidIdentifier(Invalid):
    """The identifier value cannot be normalised for its kind."""

    code = "identity.invalid_identifier"
