"""Day boundaries in a programme's time zone: local dates, pending ends and expiry instants."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import polars as pl

from loyalty.errors import InvalidProgram


@lru_cache(maxsize=64)
def zone(name: str) -> ZoneInfo:
    """The time zone of this IANA name, or InvalidProgram."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidProgram(f"unknown time zone {name!r}") from None


def local_date(at: datetime, tz: str) -> date:
    """The calendar date of an instant in the zone."""
    return at.astimezone(zone(tz)).date()


def start_of_day(day: date, tz: str) -> datetime:
    """The UTC instant at which a local calendar day starts."""
    return datetime.combine(day, time(0), tzinfo=zone(tz)).astimezone(UTC)


def add_months(day: date, months: int) -> date:
    """The same day `months` later, clamped to the end of a shorter month."""
    index = day.year * 12 + day.month - 1 + months
    year, month = divmod(index, 12)
    for candidate in (day.day, 30, 29, 28):
        try:
            return date(year, month + 1, min(day.day, candidate))
        except ValueError:
            continue
    raise AssertionError("unreachable")


def pending_until(day: date, tz: str, pending_days: int) -> datetime | None:
    """When points earned on a local day become spendable: the start of day + N, or None."""
    if pending_days <= 0:
        return None
    return start_of_day(day + timedelta(days=pending_days), tz)


def expires_at(day: date, tz: str, policy: str, months: int | None) -> datetime | None:
    """When points earned on a local day expire under the programme's policy.

    `rolling`: valid through the same day `months` later (they expire when the next local
    day starts). `end_of_period`: valid until the end of the calendar period of `months`
    months (12 = calendar year, 3 = quarter) that contains the earning day.
    """
    if policy == "none" or not months:
        return None
    if policy == "rolling":
        return start_of_day(add_months(day, months) + timedelta(days=1), tz)
    if policy == "end_of_period":
        period_start_month = ((day.month - 1) // months) * months
        first = date(day.year, 1, 1)
        return start_of_day(add_months(first, period_start_month + months), tz)
    raise InvalidProgram(f"unknown expiry policy {policy!r}")


def expiry_problem(policy: str, months: int | None) -> str | None:
    """What is wrong with an expiry policy and its months, or None.

    Calendar periods start on 1 January, so an `end_of_period` length must divide the year
    (1, 2, 3, 4, 6, 12) or be whole years (24, 36...): with 5 months the periods would
    restart every January and their lengths would differ from one year to the next.
    """
    if policy != "none" and months is None:
        return "expiry_months is required with an expiry policy"
    if policy == "end_of_period" and months is not None and 12 % months and months % 12:
        return (
            f"an end_of_period of {months} months does not tile the calendar year:"
            " use 1, 2, 3, 4, 6 or a multiple of 12"
        )
    return None


def month_start(day: date) -> date:
    """The first day of the day's month."""
    return day.replace(day=1)


def with_local_dates(
    frame: pl.DataFrame,
    *,
    at: str,
    tz: str,
    pending_days: int,
    policy: str,
    months: int | None,
) -> pl.DataFrame:
    """Add `local_date`, `pending_until` and `expires_at` to a frame of UTC instants.

    The instants are computed once per distinct local date (a handful of rows), so every
    path (one event, a batch, a backfill) derives exactly the same boundaries.
    """
    dated = frame.with_columns(pl.col(at).dt.convert_time_zone(tz).dt.date().alias("local_date"))
    days = dated.select(pl.col("local_date").unique()).to_series().to_list()
    lookup = pl.DataFrame(
        {
            "local_date": days,
            "pending_until": [pending_until(d, tz, pending_days) for d in days],
            "expires_at": [expires_at(d, tz, policy, months) for d in days],
        },
        schema={
            "local_date": pl.Date,
            "pending_until": pl.Datetime("us", "UTC"),
            "expires_at": pl.Datetime("us", "UTC"),
        },
    )
    return dated.join(lookup, on="local_date", how="left")
