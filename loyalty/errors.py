"""Errors of the loyalty engine."""

from __future__ import annotations

from cdp.errors import Conflict, Invalid, NotFound


class ProgramNotFound(NotFound):
    """No programme with this id."""

    code = "loyalty.program_not_found"


class MemberNotFound(NotFound):
    """No member with this id (or profile)."""

    code = "loyalty.member_not_found"


class RewardNotFound(NotFound):
    """No reward with this id."""

    code = "loyalty.reward_not_found"


class RedemptionNotFound(NotFound):
    """No redemption with this id."""

    code = "loyalty.redemption_not_found"


class RuleNotFound(NotFound):
    """No earning rule with this id."""

    code = "loyalty.rule_not_found"


class TierNotFound(NotFound):
    """No tier with this id."""

    code = "loyalty.tier_not_found"


class InvalidProgram(Invalid):
    """A programme setting is not acceptable."""

    code = "loyalty.invalid_program"


class InvalidStatusChange(Conflict):
    """The requested status change is not allowed from the current status."""

    code = "loyalty.invalid_status_change"


class ProgramNotActive(Conflict):
    """The programme does not accept this operation in its current status."""

    code = "loyalty.program_not_active"


class MemberNotActive(Conflict):
    """The member has left or opted out of the programme."""

    code = "loyalty.member_not_active"


class AlreadyMember(Conflict):
    """The profile is already an active member."""

    code = "loyalty.already_member"


class InsufficientPoints(Conflict):
    """The member's active balance does not cover the debit."""

    code = "loyalty.insufficient_points"


class OutOfStock(Conflict):
    """The reward has no stock left."""

    code = "loyalty.out_of_stock"


class RedemptionLimitReached(Conflict):
    """The member has redeemed this reward as often as allowed."""

    code = "loyalty.redemption_limit_reached"


class RewardNotAvailable(Conflict):
    """The reward is outside its validity window, archived, or above the member's tier."""

    code = "loyalty.reward_not_available"


class RedemptionAlreadyCancelled(Conflict):
    """The redemption was cancelled already."""

    code = "loyalty.redemption_already_cancelled"


class IdempotencyKeyReused(Conflict):
    """The Idempotency-Key was used before with a different request."""

    code = "loyalty.idempotency_key_reused"


class InvalidRule(Invalid):
    """An earning rule, condition or formula is not acceptable."""

    code = "loyalty.invalid_rule"


class UnknownProfile(Invalid):
    """A profile id that identity never issued (enrolment checks it with identity)."""

    code = "loyalty.unknown_profile"


class UnknownIdentifier(Invalid):
    """No profile holds the identifier (yet: identity may not have resolved it)."""

    code = "loyalty.unknown_identifier"


class InvalidIdentifier(Invalid):
    """The identifier value cannot be normalised for its kind."""

    code = "loyalty.invalid_identifier"


class InvalidImport(Invalid):
    """An opening-balance file cannot be read."""

    code = "loyalty.invalid_import"


class IdempotencyKeyRequired(Invalid):
    """This write needs an Idempotency-Key header."""

    code = "loyalty.idempotency_key_required"
