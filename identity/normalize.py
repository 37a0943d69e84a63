"""Normalisation of identifier values for lookups, the same way ingestion stores them.

Minimal local version: emails trimmed and lower-cased, phones to E.164 with the default
region, every other kind trimmed. To be folded onto `cdp/identifiers.py` when it lands.
"""

from __future__ import annotations

import phonenumbers


def normalize(kind: str, value: str, *, default_region: str) -> str | None:
    """The normalised form of an identifier value, or None when it is not usable."""
    value = value.strip()
    if not value:
        return None
    if kind == "email":
        value = value.lower()
        return value if "@" in value else None
    if kind == "phone":
        try:
            number = phonenumbers.parse(value, default_region)
        except phonenumbers.NumberParseException:
            return None
        if not phonenumbers.is_valid_number(number):
            return None
        return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))
    return value
