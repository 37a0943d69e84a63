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


class NothingToUnmerge(Invalid):
    """The unmerge request names no identifier or link of the profile."""

    code = "identity.nothing_to_unmerge"


class OverrideNotFound(NotFound):
    """No active override has this id."""

    code = "identity.override_not_found"


class SuppressionNotFound(NotFound):
    """The identifier is not on the suppression list."""

    code = "identity.suppression_not_found"


class InvalidRules(Invalid):
    """The rules cannot run as given (a blocked pattern the warehouse's RE2 rejects)."""

    code = "identity.invalid_rules"


class InvalidTraitFilter(Invalid):
    """A trait filter names no trait (an empty key)."""

    code = "identity.invalid_trait_filter"
