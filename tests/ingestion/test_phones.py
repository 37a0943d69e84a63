"""The vectorised phone rewrite gives exactly what `phonenumbers` gives, value by value."""

from __future__ import annotations

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp.identifiers import normalise_phone
from ingestion.transform import _phone_plan, phones

EDGES = [
    "06 12 34 56 78",
    "0612345678",
    "+33 6 12 34 56 78",
    "+33-6-12-34-56-78",
    "0033 6 12 34 56 78",
    "00 33 6 12 34 56 78",
    "(06)12345678",
    "06.12.34.56.78",
    "06/12/34/56/78",
    "612345678",
    "33612345678",
    "+33 (0)6 12 34 56 78",
    "+330612345678",
    "0033 (0)6 12 34 56 78",
    "+33 (0)0 12 34 56 78",
    "+33 00612345678",
    "+49 (0)30 1234567",
    "0612345678 ext. 12",
    "06123456789",
    "0612",
    "++33612345678",
    "+33333333333",
    "33333333333",
    "0600000000",
    "0000000000",
    "0123456789",
    "01 23 45 67 89",
    "1234567890",
    "N/A",
    "unknown",
    "",
    " 06 12 34 56 78 ",
    "06 12 34 56 7a",
    "+1 415 555 0100",
    "+44 20 7946 0958",
    "+49 30 1234567",
    "030 1234567",
    "+32 2 123 45 67",
    "02 123 45 67",
    None,
]


def _expected(values: list[str | None], region: str) -> list[str | None]:
    return [None if v is None else normalise_phone(v, region) for v in values]


@pytest.mark.parametrize("region", ["FR", "DE", "BE", "US", "GB", "IT"])
def test_edge_cases_match_phonenumbers(region: str) -> None:
    got = phones(pl.Series("phone", EDGES, dtype=pl.String), region=region).to_list()
    assert got == _expected(EDGES, region)


def test_regions_with_plain_rules_take_the_fast_path() -> None:
    assert _phone_plan("FR") is not None
    assert _phone_plan("fr") is not None
    # Shared country code (+1, +44), or no trunk prefix (Italy): phonenumbers only.
    assert _phone_plan("US") is None
    assert _phone_plan("GB") is None
    assert _phone_plan("IT") is None
    assert _phone_plan("ZZ") is None


PREFIXES = st.sampled_from(
    ["", "0", "+33", "0033", "+33 (0)", "+330", "+49", "0049", "+49(0)", "+32", "+", "00", "33"]
)
SEPARATORS = st.sampled_from(["", " ", ".", "-", "/", "(", ")", "  "])
NUMBER = st.builds(
    lambda prefix, groups: prefix + "".join(s + d for s, d in groups),
    PREFIXES,
    st.lists(st.tuples(SEPARATORS, st.text("0123456789", min_size=1, max_size=3)), max_size=6),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(NUMBER, min_size=1, max_size=20), st.sampled_from(["FR", "DE", "BE"]))
def test_generated_numbers_match_phonenumbers(values: list[str], region: str) -> None:
    got = phones(pl.Series("phone", values, dtype=pl.String), region=region).to_list()
    assert got == _expected(list(values), region)
