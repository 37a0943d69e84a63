"""A dozen rules on a generated sample, loaded through the platform's own connectors, agree
exactly with plain Polars over the raw sample files.

The comparison is per person, on the persons identity resolved exactly: the ground truth
(allowed here, never in the platform) says whose each record is, and a person counts when all
their loaded records are in one profile holding nobody else's. On those, a profile-level rule
has one true answer that Polars computes from the raw CRM CSV, till Parquet and web NDJSON;
on the others the answer depends on identity's errors, which are scored elsewhere. The till
export's rows without any identifier are refused by ingestion (nobody could own them), so the
oracle reads the till rows whose transaction was loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from typing import Any

import polars as pl

from cdp import demo, sample_data
from cdp.config import SegmentsSettings, Settings
from cdp.db import Database
from cdp.warehouse import Query, Warehouse
from identity import service as identity_service
from ingestion import service as ingestion_service
from segments import service

SETTINGS = SegmentsSettings()
CUSTOMERS = 1500
NOW = datetime(2026, 11, 1)


def _load(db: Database, warehouse: Warehouse, out: Path) -> demo.DemoSources:
    """What `cdp demo` does: sources, file imports (the web events as an NDJSON file), identity."""
    sample_data.generate(customers=CUSTOMERS, seed=9, out=out)
    sources = demo.ensure_sources(db)
    for source_id, path in (
        (sources.crm_id, out / sample_data.CRM_FILE),
        (sources.till_id, demo.prepare_till(out)),
        (sources.web_id, out / sample_data.WEB_FILE),
    ):
        run = ingestion_service.import_file(
            db, warehouse, source_id=source_id, path=path, region="FR"
        )
        assert run.status == "succeeded", run
    with db.begin() as session:
        rules = identity_service.get_rules(session)
    identity_service.resolve(warehouse, settings=Settings(), rules=rules)
    service.refresh_event_map(warehouse)
    service.refresh_catalog(warehouse)
    return sources


def _records(out: Path, loaded_till: set[str]) -> pl.DataFrame:
    """Every loaded record of the raw files as one frame: source, record_key, person_id,
    event, timestamp, revenue, store_id, categories (of the products), price, rating."""
    truth = pl.read_parquet(out / "ground_truth" / "record_person.parquet")
    web = pl.read_ndjson(out / sample_data.WEB_FILE, infer_schema_length=None).select(
        pl.lit("web_events").alias("source"),
        pl.col("messageId").alias("record_key"),
        pl.col("event"),
        pl.col("timestamp").str.to_datetime(time_zone="UTC").dt.replace_time_zone(None),
        pl.col("properties").struct.field("revenue"),
        pl.lit(None, pl.String).alias("store_id"),
        pl.col("properties")
        .struct.field("products")
        .list.eval(pl.element().struct.field("category"))
        .alias("categories"),
        pl.col("properties").struct.field("price"),
        pl.col("properties").struct.field("rating").cast(pl.Float64),
    )
    till = (
        pl.read_parquet(out / sample_data.TILL_FILE)
        .filter(pl.col("transaction_id").is_in(loaded_till))
        .select(
            pl.lit("till_transactions").alias("source"),
            pl.col("transaction_id").alias("record_key"),
            pl.when(pl.col("kind") == "refund")
            .then(pl.lit("Order Refunded"))
            .otherwise(pl.lit("Order Completed"))
            .alias("event"),
            pl.col("timestamp").dt.replace_time_zone(None).dt.cast_time_unit("us"),
            pl.col("total").abs().round(2).alias("revenue"),
            pl.col("store_id"),
            pl.col("lines").list.eval(pl.element().struct.field("category")).alias("categories"),
            pl.lit(None, pl.Float64).alias("price"),
            pl.lit(None, pl.Float64).alias("rating"),
        )
    )
    crm = pl.read_csv(out / sample_data.CRM_FILE, infer_schema_length=0).select(
        pl.lit("crm_customers").alias("source"),
        pl.col("customer_id").alias("record_key"),
        pl.lit(None, pl.String).alias("event"),
        pl.col("updated_at").str.to_datetime(time_zone="UTC").dt.replace_time_zone(None),
    )
    frame = pl.concat(
        [web.with_columns(pl.col("timestamp").dt.cast_time_unit("us")), till, crm],
        how="diagonal_relaxed",
    )
    return frame.join(truth, on=["source", "record_key"], how="left")


def _crm_traits(out: Path, truth: pl.DataFrame) -> pl.DataFrame:
    """Per person, the CRM-only traits of their latest CRM row (the survivorship rule)."""
    crm = pl.read_csv(out / sample_data.CRM_FILE, infer_schema_length=0)
    return (
        crm.join(
            truth.filter(pl.col("source") == "crm_customers"),
            left_on="customer_id",
            right_on="record_key",
        )
        .sort("updated_at")
        .group_by("person_id")
        .agg(pl.col("postcode", "birth_date", "sms_opt_in").drop_nulls().last())
    )


Oracle = Callable[[pl.DataFrame, pl.DataFrame], pl.Series]  # (records, traits) -> person ids


def _count(records: pl.DataFrame, condition: pl.Expr) -> pl.DataFrame:
    return records.filter(condition).group_by("person_id").len()


def _at_least(condition: pl.Expr, n: int) -> Oracle:
    def oracle(records: pl.DataFrame, traits: pl.DataFrame) -> pl.Series:
        return _count(records, condition).filter(pl.col("len") >= n)["person_id"]

    return oracle


def _at_most(condition: pl.Expr, n: int) -> Oracle:
    def oracle(records: pl.DataFrame, traits: pl.DataFrame) -> pl.Series:
        over = _count(records, condition).filter(pl.col("len") > n)["person_id"]
        everyone = records["person_id"].unique()
        return everyone.filter(~everyone.is_in(over.implode()))

    return oracle


def _traits(condition: pl.Expr) -> Oracle:
    def oracle(records: pl.DataFrame, traits: pl.DataFrame) -> pl.Series:
        return traits.filter(condition)["person_id"]

    return oracle


def _both(a: Oracle, b: Oracle) -> Oracle:
    def oracle(records: pl.DataFrame, traits: pl.DataFrame) -> pl.Series:
        right = b(records, traits)
        left = a(records, traits)
        return left.filter(left.is_in(right.implode()))

    return oracle


def _neither(a: Oracle, b: Oracle) -> Oracle:
    def oracle(records: pl.DataFrame, traits: pl.DataFrame) -> pl.Series:
        out = pl.concat([a(records, traits), b(records, traits)])
        everyone = records["person_id"].unique()
        return everyone.filter(~everyone.is_in(out.implode()))

    return oracle


ORDER = pl.col("event") == "Order Completed"
STORES = ["S001", "S002", "S003", "S004"]
WINDOW = pl.col("timestamp").is_between(datetime(2025, 6, 1), datetime(2026, 6, 1), closed="left")


def _cases() -> list[tuple[str, dict[str, Any], Oracle]]:  # Any: rule JSON
    def category(name: str) -> dict[str, Any]:  # Any: rule JSON
        return {"property": "products[].category", "op": "eq", "value": name}

    def has(name: str) -> pl.Expr:
        return pl.col("categories").list.contains(name).fill_null(False)

    return [
        (
            "three orders or more",
            {"event": "Order Completed", "count": {"op": "at_least", "value": 3}},
            _at_least(ORDER, 3),
        ),
        (
            "bought beauty",
            {"event": "Order Completed", "where": [category("beauty")]},
            _at_least(ORDER & has("beauty"), 1),
        ),
        (
            "two baskets of 100+ in a year (absolute window)",
            {
                "event": "Order Completed",
                "where": [{"property": "revenue", "op": "gte", "value": 100}],
                "count": {"op": "at_least", "value": 2},
                "since": "2025-06-01T00:00:00Z",
                "until": "2026-06-01T00:00:00Z",
            },
            _at_least(ORDER & (pl.col("revenue") >= 100) & WINDOW, 2),
        ),
        (
            "buyers who viewed no product in that year",
            {
                "all": [
                    {"event": "Order Completed"},
                    {
                        "event": "Product Viewed",
                        "performed": False,
                        "since": "2025-06-01",
                        "until": "2026-06-01",
                    },
                ]
            },
            _both(
                _at_least(ORDER, 1),
                _at_most((pl.col("event") == "Product Viewed") & WINDOW, 0),
            ),
        ),
        (
            "exactly one refund",
            {"event": "Order Refunded", "count": {"op": "exactly", "value": 1}},
            _both(
                _at_least(pl.col("event") == "Order Refunded", 1),
                _at_most(pl.col("event") == "Order Refunded", 1),
            ),
        ),
        (
            "bought in one of four stores",
            {
                "event": "Order Completed",
                "where": [{"property": "store_id", "op": "in", "value": STORES}],
            },
            _at_least(ORDER & pl.col("store_id").is_in(STORES), 1),
        ),
        (
            "a good review",
            {
                "event": "Review Submitted",
                "where": [{"property": "rating", "op": "gte", "value": 4}],
            },
            _at_least((pl.col("event") == "Review Submitted") & (pl.col("rating") >= 4), 1),
        ),
        (
            "Parisians who accept texts",
            {
                "all": [
                    {"field": "traits.postcode", "op": "starts_with", "value": "75"},
                    {"field": "traits.sms_opt_in", "op": "eq", "value": "true"},
                ]
            },
            _traits(pl.col("postcode").str.starts_with("75") & (pl.col("sms_opt_in") == "true")),
        ),
        (
            "born in the eighties",
            {
                "field": "traits.birth_date",
                "op": "between",
                "value": ["1980-01-01", "1989-12-31"],
            },
            _traits(
                pl.col("birth_date").str.to_date().is_between(date(1980, 1, 1), date(1989, 12, 31))
            ),
        ),
        (
            "between 10 and 30 records",
            {"field": "profile.event_count", "op": "between", "value": [10, 30]},
            _both(_at_least(pl.lit(True), 10), _at_most(pl.lit(True), 30)),
        ),
        (
            "never bought kids' items nor added 5 products",
            {
                "not": {
                    "any": [
                        {"event": "Order Completed", "where": [category("kids")]},
                        {"event": "Product Added", "count": {"op": "at_least", "value": 5}},
                    ]
                }
            },
            _neither(
                _at_least(ORDER & has("kids"), 1),
                _at_least(pl.col("event") == "Product Added", 5),
            ),
        ),
        (
            "at most two views of pricey products",
            {
                "event": "Product Viewed",
                "where": [{"property": "properties.price", "op": "gt", "value": 50}],
                "count": {"op": "at_most", "value": 2},
            },
            _at_most((pl.col("event") == "Product Viewed") & (pl.col("price") > 50), 2),
        ),
        (
            "no CRM postcode",
            {"field": "traits.postcode", "op": "exists", "value": False},
            lambda records, traits: records.filter(
                ~pl.col("person_id").is_in(
                    traits.filter(pl.col("postcode").is_not_null())["person_id"].implode()
                )
            )["person_id"].unique(),
        ),
    ]


def test_a_dozen_rules_agree_with_polars_on_the_sample(
    db: Database, warehouse: Warehouse, tmp_path: Path
) -> None:
    out = tmp_path / "sample"
    sources = _load(db, warehouse, out)
    # Which record each event is, and its profile (CRM rows are keyed by customer id).
    events = warehouse.run(
        Query(
            """
            SELECT event_id,
                   CASE WHEN source_id = $crm THEN 'crm_customers'
                        WHEN source_id = $till THEN 'till_transactions'
                        ELSE 'web_events' END AS source,
                   CASE WHEN source_id = $crm THEN user_id ELSE message_id END AS record_key
            FROM events
            """,
            {"crm": sources.crm_id, "till": sources.till_id},
        )
    ).join(identity_service.event_profiles(warehouse, after_event_id=0), on="event_id")
    loaded_till = set(events.filter(pl.col("source") == "till_transactions")["record_key"])
    records = _records(out, loaded_till)
    assert records["person_id"].null_count() == 0
    owners = events.join(
        records.select("source", "record_key", "person_id"), on=["source", "record_key"]
    )
    assert owners.height == events.height == records.height
    exact = (
        owners.group_by("person_id")
        .agg(pl.col("profile_id").n_unique().alias("profiles"), pl.col("profile_id").first())
        .filter(pl.col("profiles") == 1)
        .join(
            owners.group_by("profile_id").agg(pl.col("person_id").n_unique().alias("persons")),
            on="profile_id",
        )
        .filter(pl.col("persons") == 1)
        .select("person_id", "profile_id")
    )
    # Most persons are resolved exactly, so the comparison covers most of the sample.
    assert exact.height > 0.6 * records["person_id"].n_unique()
    profile_of = dict(zip(exact["person_id"], exact["profile_id"], strict=True))
    exact_records = records.filter(pl.col("person_id").is_in(exact["person_id"].implode()))
    traits = _crm_traits(out, pl.read_parquet(out / "ground_truth" / "record_person.parquet"))
    traits = traits.filter(pl.col("person_id").is_in(exact["person_id"].implode()))
    exact_profiles = set(exact["profile_id"])
    mismatches = {}
    sizes = {}
    read_values = []
    # Property filters parse the JSON, then (second pass) read the materialised values.
    for materialised in (False, True):
        if materialised:
            assert service.refresh_property_values(warehouse, settings=SETTINGS) > 0
        for name, rule, oracle in _cases():
            with db.begin() as session:
                query = service.compile_segment_rule(
                    session, warehouse, rule=service.parse_rule(rule), settings=SETTINGS, now=NOW
                )
            if "segment_property_values" in query.sql:
                read_values.append(name)
            got = set(warehouse.run(query)["profile_id"]) & exact_profiles
            want = {profile_of[p] for p in oracle(exact_records, traits)}
            sizes[name] = len(want)
            if got != want:
                mismatches[(materialised, name)] = (len(got), len(want))
    assert mismatches == {}
    assert len(read_values) >= 3, read_values
    # Every rule selects some persons and leaves some out, so each comparison means something.
    assert all(10 <= n <= len(exact_profiles) - 10 for n in sizes.values()), sizes
