"""Resolution rules: kind priority, per-kind limits, blocked values and the automatic cap."""

from __future__ import annotations

import hashlib
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_PRIORITY = ("user_id", "loyalty_card", "email", "phone", "device_id", "anonymous_id")


class IdentityRules(BaseModel):
    """The rules the resolver applies; stored in the operational store, edited by `data`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind_priority: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PRIORITY),
        description="Identifier kinds, most trusted first; unlisted kinds rank after them.",
    )
    limits: dict[str, int] = Field(
        default_factory=lambda: {"user_id": 1, "loyalty_card": 1, "email": 5, "phone": 5},
        description="Most identifiers of a kind one profile may hold.",
    )
    blocked_values: list[str] = Field(
        default_factory=lambda: [
            "test@test.com",
            "test@example.com",
            "unknown",
            "null",
            "undefined",
            "none",
            "n/a",
            "0000000000",
        ],
        description="Normalised values that never link anything, whatever their kind.",
    )
    blocked_patterns: list[str] = Field(
        default_factory=lambda: [r"\+?0+", r"(test|noreply|no-reply)@.*"],
        description="Regular expressions (RE2, whole value) of values that never link.",
    )
    auto_cap: int = Field(
        default=10,
        ge=1,
        description="A value linked to more distinct higher-priority identifiers is blocked.",
    )
    trait_source_priority: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Per trait, source ids whose values win (first wins) over recency.",
    )

    @field_validator("kind_priority")
    @classmethod
    def _unique_kinds(cls, kinds: list[str]) -> list[str]:
        if len(set(kinds)) != len(kinds):
            raise ValueError("a kind appears twice in kind_priority")
        if any(not k.strip() for k in kinds):
            raise ValueError("empty kind in kind_priority")
        return kinds

    @field_validator("limits")
    @classmethod
    def _positive_limits(cls, limits: dict[str, int]) -> dict[str, int]:
        bad = sorted(k for k, v in limits.items() if v < 1)
        if bad:
            raise ValueError(f"limits must be at least 1: {', '.join(bad)}")
        return limits

    @field_validator("blocked_patterns")
    @classmethod
    def _valid_patterns(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid pattern {pattern!r}: {exc}") from exc
        return patterns

    def rank(self, kind: str) -> int:
        """Priority rank of a kind: 0 is the most trusted; unlisted kinds share the last."""
        try:
            return self.kind_priority.index(kind)
        except ValueError:
            return len(self.kind_priority)

    def combined_pattern(self) -> str:
        """All blocked patterns as one regular expression ('' when there are none)."""
        return "|".join(f"(?:{p})" for p in self.blocked_patterns)

    def fingerprint(self) -> str:
        """A hash of the rules; the resolver rebuilds everything when it changes."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]
