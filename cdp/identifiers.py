"""Identifier normalisation shared by every layer: one way to turn a raw value into a key.

Ingestion normalises identifiers before storing them; identity and loyalty normalise lookup
values with the same functions, so `"  Ann@Example.COM "` finds what `ann@example.com` stored.
Each rule has a scalar form (one value) and, where bulk paths need it, a Polars form.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from functools import lru_cache

import phonenumbers
import polars as pl

USER_ID = "user_id"
EMAIL = "email"
PHONE = "phone"
ANONYMOUS_ID = "anonymous_id"
DEVICE_ID = "device_id"
LOYALTY_CARD = "loyalty_card"

BUILTIN_KINDS: frozenset[str] = frozenset(
    {USER_ID, EMAIL, PHONE, ANONYMOUS_ID, DEVICE_ID, LOYALTY_CARD}
)
# Custom kinds a mapping declares: lower snake case, so they never clash with SQL or paths.
KIND_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
COMPOSITE_SEPARATOR = "|"

# Values systems put where they have no real identifier; never an identity key.
PLACEHOLDERS: frozenset[str] = frozenset(
    {
        "",
        "-",
        "--",
        "?",
        "0",
        "n/a",
        "na",
        "nan",
        "nil",
        "none",
        "null",
        "undefined",
        "unknown",
        "anonymous",
        "test",
        "test@test.com",
        "test@example.com",
        "email@example.com",
        "noemail@noemail.com",
        "no@email.com",
        "none@none.com",
        "null@null.com",
        "unknown@unknown.com",
        "example@example.com",
        "0000000000",
        "1234567890",
        "0123456789",
    }
)
_REPEATED_DIGIT = re.compile(r"^(\d)\1+$")
_REPEATED_DIGIT_POLARS = (
    r"^[\s().\-/+]*(?:"
    + "|".join(f"{d}(?:[\\s().\\-/]*{d})+" for d in "0123456789")
    + r")[\s().\-/]*$"
)
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_PHONE_NOISE = re.compile(r"[\s().\-/]")


def is_placeholder(value: str) -> bool:
    """Whether a (trimmed) value is a placeholder such as `unknown` or `0000000000`."""
    folded = value.strip().lower()
    if folded in PLACEHOLDERS:
        return True
    digits = _PHONE_NOISE.sub("", folded).lstrip("+")
    return bool(_REPEATED_DIGIT.match(digits))


def normalise_id(value: object) -> str | None:
    """An opaque id trimmed; None when empty or a placeholder."""
    if value is None:
        return None
    text = str(value).strip()
    if not text or is_placeholder(text):
        return None
    return text


def normalise_email(value: object) -> str | None:
    """An email trimmed and lower-cased; None when not an address or a placeholder."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if not _EMAIL.match(text) or is_placeholder(text):
        return None
    return text


@lru_cache(maxsize=200_000)
def normalise_phone(value: str, region: str) -> str | None:
    """A phone number in E.164 (`+33612345678`), reading national numbers in `region`."""
    text = value.strip()
    if not text or is_placeholder(text):
        return None
    try:
        number = phonenumbers.parse(text, region.upper())
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(number):
        return None
    e164: str = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return None if is_placeholder(e164) else e164


def fold_text(value: object) -> str | None:
    """A name-like value lower-cased, trimmed, accents stripped and spaces collapsed."""
    if value is None:
        return None
    decomposed = unicodedata.normalize("NFKD", str(value))
    stripped = "".join(c for c in decomposed if unicodedata.category(c) != "Mn")
    folded = " ".join(stripped.lower().split())
    return folded or None


# A folded part that is a date at midnight, written as a date-time ("1980-02-01 00:00:00",
# "1980-02-01t00:00:00.000z", "...+00:00"): the date alone, so a birth date gives the same key
# from a DATE column, a TIMESTAMP column or an ISO string. Same text in Python and Rust.
_MIDNIGHT = r"^([0-9]{4}-[0-9]{2}-[0-9]{2})[ t]00:00(?::00(?:\.0+)?)?(?:z|[+-]00:?00| utc)?$"
_MIDNIGHT_RE = re.compile(_MIDNIGHT)


def _part(value: object) -> str | None:
    folded = fold_text(value)
    return None if folded is None else _MIDNIGHT_RE.sub(r"\1", folded)


def composite_value(parts: Sequence[object]) -> str | None:
    """A composite key from its parts, folded and joined with `|`; None if any part is empty.
    A part that is a date-time at midnight counts as its date (see `_MIDNIGHT`)."""
    folded = [_part(p) for p in parts]
    if any(p is None for p in folded):
        return None
    return COMPOSITE_SEPARATOR.join(p for p in folded if p is not None)


def normalise(kind: str, value: object, *, region: str) -> str | None:
    """The normalised value of an identifier of `kind`, or None if it must be dropped."""
    if kind == EMAIL:
        return normalise_email(value)
    if kind == PHONE:
        return None if value is None else normalise_phone(str(value), region)
    return normalise_id(value)


def is_valid_kind(kind: str) -> bool:
    """Whether `kind` is a well-formed identifier kind name."""
    return bool(KIND_PATTERN.match(kind))


# Polars forms of the same rules, for bulk paths (files, database pulls).


# The placeholders (any case) or a repeated digit, as one Rust regex: one pass over each
# value, no lower-cased copy (Rust regexes have no backreferences: `(\d)\1+` is spelled out).
_PLACEHOLDER_POLARS = (
    "(?i)^(?:"
    + "|".join(re.escape(p) for p in sorted(PLACEHOLDERS))
    + ")$|"
    + _REPEATED_DIGIT_POLARS
)


def _placeholder_expr(expr: pl.Expr) -> pl.Expr:
    return expr.str.contains(_PLACEHOLDER_POLARS)


def id_expr(expr: pl.Expr) -> pl.Expr:
    """Polars: ids trimmed, null when empty or a placeholder."""
    text = expr.cast(pl.String).str.strip_chars()
    return pl.when(~_placeholder_expr(text)).then(text)


def email_expr(expr: pl.Expr) -> pl.Expr:
    """Polars: emails trimmed and lower-cased, null when not an address or a placeholder."""
    text = expr.cast(pl.String).str.strip_chars().str.to_lowercase()
    bad = ~text.str.contains(_EMAIL.pattern) | _placeholder_expr(text)
    return pl.when(~bad).then(text)


def fold_expr(expr: pl.Expr) -> pl.Expr:
    """Polars: the `fold_text` rule (lower, trim, no accents, single spaces)."""
    text = expr.cast(pl.String).str.normalize("NFKD").str.replace_all(r"\p{Mn}", "")
    text = text.str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars()
    return pl.when(text != "").then(text)


def composite_expr(parts: Sequence[pl.Expr]) -> pl.Expr:
    """Polars: a composite key of folded parts joined by `|`, null if any part is empty."""
    return pl.concat_str(
        [fold_expr(p).str.replace(_MIDNIGHT, "${1}") for p in parts],
        separator=COMPOSITE_SEPARATOR,
    )


def normalise_phones(values: pl.Series, *, region: str) -> pl.Series:
    """Polars: phones to E.164; each distinct raw value is parsed once (phonenumbers is Python)."""
    raw = values.cast(pl.String)
    distinct = raw.drop_nulls().unique()
    lookup = pl.DataFrame(
        {
            "raw": distinct,
            "e164": pl.Series([normalise_phone(v, region) for v in distinct], dtype=pl.String),
        }
    )
    joined = raw.to_frame("raw").join(lookup, on="raw", how="left", maintain_order="left")
    return joined["e164"].alias(values.name)
