"""The sample-data generator: layout, determinism, noise, links and ground truth."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from benchmarks.core import Result
from benchmarks.sample_data import run as run_benchmark
from cdp.sample_data import (
    CRM_FILE,
    DEVICES_FILE,
    FILES,
    MANIFEST,
    PERSONS_FILE,
    RECORDS_FILE,
    SOURCE_CRM,
    SOURCE_TILL,
    SOURCE_WEB,
    TILL_FILE,
    WEB_FILE,
    generate,
    is_generated,
)

CUSTOMERS = 2_000
SEED = 7
Event = dict[str, Any]  # Any: a parsed JSON object

CRM_COLUMNS = [
    "customer_id",
    "email",
    "phone",
    "first_name",
    "last_name",
    "birth_date",
    "postcode",
    "loyalty_card",
    "email_opt_in",
    "sms_opt_in",
    "signup_date",
    "updated_at",
]
PHONE_FORMATS = {
    "spaced": r"0[67]( \d\d){4}",
    "compact": r"0[67]\d{8}",
    "e164": r"\+33[67]\d{8}",
    "international spaced": r"\+33 [67]( \d\d){4}",
    "00 prefix": r"0033 [67]( \d\d){4}",
    "parenthesised": r"\(0[67]\)\d{8}",
    "dotted": r"0[67](\.\d\d){4}",
    "dashed": r"0[67](-\d\d){4}",
    "+33 (0)": r"\+33 \(0\)[67]( \d\d){4}",
    "no leading zero": r"[67]\d{8}",
}


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data set shared by the read-only tests of this module."""
    out = tmp_path_factory.mktemp("sample")
    generate(customers=CUSTOMERS, seed=SEED, out=out)
    return out


@pytest.fixture(scope="module")
def events(sample: Path) -> list[Event]:
    """The web events, parsed line by line (each line must be one JSON object)."""
    with (sample / WEB_FILE).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def crm(sample: Path) -> pl.DataFrame:
    """The CRM export, every column read as text."""
    return pl.read_csv(sample / CRM_FILE, infer_schema=False)


@pytest.fixture(scope="module")
def till(sample: Path) -> pl.DataFrame:
    """The till transactions."""
    return pl.read_parquet(sample / TILL_FILE)


@pytest.fixture(scope="module")
def persons(sample: Path) -> pl.DataFrame:
    """The ground-truth persons."""
    return pl.read_parquet(sample / PERSONS_FILE)


@pytest.fixture(scope="module")
def records(sample: Path) -> pl.DataFrame:
    """The ground-truth mapping of every source record to its person."""
    return pl.read_parquet(sample / RECORDS_FILE)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _luhn_ok(number: str) -> bool:
    total = 0
    for i, char in enumerate(reversed(number)):
        digit = int(char) * (2 if i % 2 else 1)
        total += digit - 9 if digit > 9 else digit
    return total % 10 == 0


def test_generate_writes_every_file_with_the_row_counts_of_the_manifest(
    sample: Path, events: list[Event], crm: pl.DataFrame, till: pl.DataFrame
) -> None:
    manifest = json.loads((sample / MANIFEST).read_text())
    assert manifest["customers"] == CUSTOMERS
    assert manifest["seed"] == SEED
    assert set(manifest["files"]) == set(FILES)
    counted = {
        CRM_FILE: crm.height,
        TILL_FILE: till.height,
        WEB_FILE: len(events),
        PERSONS_FILE: pl.read_parquet(sample / PERSONS_FILE).height,
        DEVICES_FILE: pl.read_parquet(sample / DEVICES_FILE).height,
        RECORDS_FILE: pl.read_parquet(sample / RECORDS_FILE).height,
    }
    assert {name: entry["rows"] for name, entry in manifest["files"].items()} == counted
    per_customer = (crm.height + till.height + len(events)) / CUSTOMERS
    assert 12 < per_customer < 30


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(tmp_path: Path) -> None:
    first = generate(customers=400, seed=3, out=tmp_path / "a")
    generate(customers=400, seed=3, out=tmp_path / "b")
    generate(customers=400, seed=4, out=tmp_path / "c")
    assert first["customers"] == 400
    for name in FILES:
        assert _digest(tmp_path / "a" / name) == _digest(tmp_path / "b" / name), name
    assert _digest(tmp_path / "a" / WEB_FILE) != _digest(tmp_path / "c" / WEB_FILE)


def test_chunk_size_does_not_change_the_data(tmp_path: Path) -> None:
    generate(customers=300, seed=5, out=tmp_path / "whole")
    generate(customers=300, seed=5, out=tmp_path / "chunked", chunk_rows=97)
    for name in (CRM_FILE, WEB_FILE):
        assert _digest(tmp_path / "whole" / name) == _digest(tmp_path / "chunked" / name)
    for name in (TILL_FILE, RECORDS_FILE, PERSONS_FILE, DEVICES_FILE):
        whole = pl.read_parquet(tmp_path / "whole" / name)
        chunked = pl.read_parquet(tmp_path / "chunked" / name)
        assert whole.equals(chunked), name


def test_summary_reports_paths_rows_and_speed(tmp_path: Path) -> None:
    summary = generate(customers=50, seed=1, out=tmp_path)
    files = summary["files"]
    assert isinstance(files, dict)
    assert files[WEB_FILE]["path"] == str(tmp_path / WEB_FILE)
    assert summary["rows"] == sum(entry["rows"] for entry in files.values())
    assert isinstance(summary["seconds"], float)
    json.dumps(summary)


def test_crm_has_its_columns_and_about_seventy_percent_of_customers(
    crm: pl.DataFrame, persons: pl.DataFrame
) -> None:
    assert crm.columns == CRM_COLUMNS
    assert crm["customer_id"].str.contains(r"^C\d{7}$").all()
    assert crm["customer_id"].is_unique().all()
    in_crm = persons["in_crm"].sum()
    assert 0.6 < in_crm / CUSTOMERS < 0.8
    assert crm.height > in_crm  # duplicate accounts
    assert crm["signup_date"].str.contains(r"^\d{4}-\d\d-\d\d$").all()
    assert crm["updated_at"].str.contains(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$").all()
    assert (crm["updated_at"].str.slice(0, 10) >= crm["signup_date"]).all()


def test_crm_is_noisy_like_a_real_export(crm: pl.DataFrame) -> None:
    emails = crm["email"].drop_nulls()
    assert (emails != emails.str.to_lowercase()).sum() > 10  # upper and title case
    assert (emails != emails.str.strip_chars()).sum() > 5  # padded with spaces
    assert {"test@test.com", "N/A"} <= set(emails.to_list())
    assert crm["email"].null_count() > 0
    phones = crm["phone"].drop_nulls().to_list()
    assert {"0000000000", "N/A"} <= set(phones)
    seen = {
        name for name, pattern in PHONE_FORMATS.items() for p in phones if re.fullmatch(pattern, p)
    }
    assert len(seen) >= 8, seen
    assert (crm["last_name"] == crm["last_name"].str.to_uppercase()).sum() > 100


def test_till_transactions_have_lines_cards_and_totals(till: pl.DataFrame) -> None:
    assert till.columns == [
        "transaction_id",
        "kind",
        "original_transaction_id",
        "store_id",
        "timestamp",
        "loyalty_card",
        "email",
        "phone",
        "lines",
        "total",
    ]
    assert till.schema["timestamp"] == pl.Datetime("ms", "UTC")
    line = till.schema["lines"]
    assert isinstance(line, pl.List)
    assert isinstance(line.inner, pl.Struct)
    assert [f.name for f in line.inner.fields] == [
        "sku",
        "category",
        "brand",
        "quantity",
        "unit_price",
    ]
    assert till["transaction_id"].is_unique().all()
    assert till["timestamp"].is_sorted()
    cards = till["loyalty_card"].drop_nulls()
    assert cards.str.contains(r"^LC\d{10}$").all()
    assert all(_luhn_ok(card[2:]) for card in cards.unique().to_list())
    assert 0 < till["loyalty_card"].null_count() < till.height  # members and anonymous shoppers
    sums = till.select(
        pl.col("lines")
        .list.eval(pl.element().struct["quantity"] * pl.element().struct["unit_price"])
        .list.sum()
        .round(2),
        pl.col("total").round(2),
    )
    assert (sums["lines"] == sums["total"]).all()
    categories = set(till["lines"].explode().struct.field("category").unique().to_list())
    assert {"beauty", "fashion", "home", "food"} <= categories


def test_till_refunds_reference_earlier_sales_of_the_same_card(till: pl.DataFrame) -> None:
    refunds = till.filter(pl.col("kind") == "refund")
    assert refunds.height > 0
    assert (refunds["total"] < 0).all()
    sales = till.filter(pl.col("kind") == "sale").select(
        "transaction_id", sale_ts="timestamp", sale_card="loyalty_card"
    )
    joined = refunds.join(
        sales, left_on="original_transaction_id", right_on="transaction_id", how="left"
    )
    assert joined["sale_ts"].null_count() == 0
    assert (joined["timestamp"] > joined["sale_ts"]).all()
    assert joined["loyalty_card"].eq_missing(joined["sale_card"]).all()
    quantities = refunds["lines"].explode().struct.field("quantity")
    assert (quantities < 0).all()


def test_till_sometimes_carries_noisy_contact_details(till: pl.DataFrame) -> None:
    emails = till["email"].drop_nulls()
    assert 0 < emails.len() < till.height * 0.2
    assert (emails != emails.str.to_lowercase()).any()
    assert {"0000000000"} <= set(till["phone"].drop_nulls().to_list())


def test_web_events_follow_the_segment_spec(events: list[Event], crm: pl.DataFrame) -> None:
    assert Counter(e["type"] for e in events).keys() == {"identify", "track", "page", "screen"}
    names = Counter(e["event"] for e in events if e["type"] == "track")
    assert set(names) == {
        "Product Viewed",
        "Product Added",
        "Order Completed",
        "Order Refunded",
        "Review Submitted",
    }
    assert len({e["messageId"] for e in events}) == len(events)
    customer_ids = set(crm["customer_id"].to_list())
    for event in events:
        assert "anonymousId" in event
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event["timestamp"])
        assert event.get("userId", "C0000001") in customer_ids
        if event["type"] == "screen" or "device" in event["context"]:
            assert event["context"]["device"]["id"]
    timestamps = [e["timestamp"] for e in events]
    assert timestamps == sorted(timestamps)
    start = datetime.fromisoformat(timestamps[0])
    assert datetime(2024, 10, 31, tzinfo=UTC) < start
    assert datetime.fromisoformat(timestamps[-1]) < datetime(2026, 11, 1, tzinfo=UTC)
    assert start.date() < datetime(2024, 11, 15).date()  # two years of history


def test_orders_carry_products_and_refunds_reference_earlier_orders(
    events: list[Event],
) -> None:
    orders = {e["properties"]["order_id"]: e for e in events if e.get("event") == "Order Completed"}
    assert orders
    for order in orders.values():
        props = order["properties"]
        assert props["currency"] == "EUR"
        products = props["products"]
        assert products
        assert set(products[0]) == {"sku", "category", "brand", "price", "quantity"}
        revenue = sum(p["price"] * p["quantity"] for p in products)
        assert props["revenue"] == pytest.approx(revenue, abs=0.011 * len(products))
        assert "userId" in order or "email" in order["context"]["traits"]
    refunds = [e for e in events if e.get("event") == "Order Refunded"]
    assert refunds
    for refund in refunds:
        order = orders[refund["properties"]["order_id"]]
        assert refund["timestamp"] > order["timestamp"]
        assert 0 < refund["properties"]["revenue"] <= order["properties"]["revenue"]
        assert refund.get("userId") == order.get("userId")


def test_identify_links_anonymous_id_user_id_and_email(
    events: list[Event], records: pl.DataFrame, persons: pl.DataFrame
) -> None:
    identifies = [e for e in events if e["type"] == "identify"]
    logged_in = [e for e in identifies if "userId" in e]
    assert len(logged_in) > 50
    assert any("userId" not in e for e in identifies)  # newsletter sign-ups
    assert any("traits" in e["context"] for e in identifies)
    person_of = dict(
        records.filter(pl.col("source") == SOURCE_WEB).select("record_key", "person_id").iter_rows()
    )
    truth = {row["person_id"]: row for row in persons.iter_rows(named=True)}
    for event in logged_in:
        person = truth[person_of[event["messageId"]]]
        assert event["userId"] in (person["customer_id"], person["duplicate_customer_id"])
        email = event["traits"]["email"]
        assert email in ("test@test.com", "N/A") or email.strip().lower() == person["email"]
        assert event["traits"]["first_name"] == person["first_name"]


def test_web_has_shared_devices_and_people_who_never_log_in(
    events: list[Event], records: pl.DataFrame, persons: pl.DataFrame
) -> None:
    web = pl.DataFrame(
        {
            "record_key": [e["messageId"] for e in events],
            "anonymous_id": [e["anonymousId"] for e in events],
            "user_id": [e.get("userId") for e in events],
        }
    ).join(records.filter(pl.col("source") == SOURCE_WEB), on="record_key")
    per_device = web.group_by("anonymous_id").agg(pl.col("person_id").n_unique())
    assert (per_device["person_id"] == 2).any()
    assert (per_device["person_id"] <= 2).all()
    per_person = web.group_by("person_id").agg(pl.col("user_id").is_not_null().any())
    assert (~per_person["user_id"]).sum() > 50
    assert persons.filter(pl.col("uses_web") & ~pl.col("has_web_account")).height > 0


def test_ground_truth_maps_every_source_record_to_a_person(
    sample: Path,
    events: list[Event],
    crm: pl.DataFrame,
    till: pl.DataFrame,
    records: pl.DataFrame,
    persons: pl.DataFrame,
) -> None:
    assert records.columns == ["source", "record_key", "person_id"]
    assert records.select(pl.struct("source", "record_key").is_unique().all()).item()
    by_source = {
        source: set(group["record_key"].to_list())
        for (source,), group in records.group_by("source")
    }
    assert by_source[SOURCE_CRM] == set(crm["customer_id"].to_list())
    assert by_source[SOURCE_TILL] == set(till["transaction_id"].to_list())
    assert by_source[SOURCE_WEB] == {e["messageId"] for e in events}
    assert set(records["person_id"].to_list()) <= set(persons["person_id"].to_list())
    assert persons.height == CUSTOMERS
    assert persons["email"].is_unique().all()
    assert persons["phone"].drop_nulls().str.contains(r"^\+33[67]\d{8}$").all()
    devices = pl.read_parquet(sample / DEVICES_FILE)
    assert devices["anonymous_id"].is_unique().all()
    used = {e["anonymousId"] for e in events}
    assert used <= set(devices["anonymous_id"].to_list())


def test_ground_truth_agrees_with_the_identifiers_in_the_sources(
    till: pl.DataFrame, crm: pl.DataFrame, records: pl.DataFrame, persons: pl.DataFrame
) -> None:
    crm_truth = crm.join(
        records.filter(pl.col("source") == SOURCE_CRM),
        left_on="customer_id",
        right_on="record_key",
    ).join(persons, on="person_id", suffix="_true")
    own_id = (pl.col("customer_id") == pl.col("customer_id_true")) | (
        pl.col("customer_id") == pl.col("duplicate_customer_id")
    )
    assert crm_truth.select(own_id.all()).item()
    clean = crm_truth.filter(
        pl.col("email").str.contains("@") & (pl.col("email") != "test@test.com")
    )
    assert (clean["email"].str.strip_chars().str.to_lowercase() == clean["email_true"]).all()
    carded = till.filter(pl.col("loyalty_card").is_not_null()).join(
        records.filter(pl.col("source") == SOURCE_TILL),
        left_on="transaction_id",
        right_on="record_key",
    )
    carded = carded.join(persons, on="person_id", suffix="_true")
    assert (carded["loyalty_card"] == carded["loyalty_card_true"]).all()


def test_is_generated_recognises_a_complete_matching_data_set(tmp_path: Path) -> None:
    out = tmp_path / "sample"
    assert not is_generated(out, customers=100, seed=1)
    generate(customers=100, seed=1, out=out)
    assert is_generated(out, customers=100, seed=1)
    assert not is_generated(out, customers=101, seed=1)
    assert not is_generated(out, customers=100, seed=2)
    (out / WEB_FILE).write_text("")
    assert not is_generated(out, customers=100, seed=1)
    generate(customers=100, seed=1, out=out)
    (out / TILL_FILE).unlink()
    assert not is_generated(out, customers=100, seed=1)
    (out / MANIFEST).write_text("{not json")
    assert not is_generated(out, customers=100, seed=1)


def test_generate_handles_a_single_customer(tmp_path: Path) -> None:
    summary = generate(customers=1, seed=9, out=tmp_path)
    assert summary["customers"] == 1
    assert pl.read_parquet(tmp_path / PERSONS_FILE).height == 1
    assert is_generated(tmp_path, customers=1, seed=9)


def test_generate_rejects_fewer_than_one_customer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="customers"):
        generate(customers=0, seed=1, out=tmp_path)


def test_benchmark_runs_at_tiny_scale(tmp_path: Path) -> None:
    result = run_benchmark(500, tmp_path)
    assert isinstance(result, Result)
    assert result.benchmark == "sample_data"
    measure = result.measures[0]
    assert measure.project > 0
    assert measure.ratio is not None
    assert result.details["rows"] > 500
