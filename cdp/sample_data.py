"""Deterministic, vectorised sample data: a French retail brand's CRM, tills and website.

`generate()` invents `customers` persons and writes what three source systems know about them,
plus the ground truth that identity resolution is measured against:

    out/manifest.json                        version, customers, seed, files and row counts
    out/sources/crm_customers.csv            CRM export: ~70% of persons, ~2% of them twice
    out/sources/till_transactions.parquet    one row per till transaction (see below)
    out/sources/web_events.ndjson            Segment-spec messages, in timestamp order
    out/ground_truth/persons.parquet         one row per person with its true identifiers
    out/ground_truth/devices.parquet         each anonymousId / device id and its owner
    out/ground_truth/record_person.parquet   (source, record_key) -> person_id, every record

The platform must never read `ground_truth/`.

Till transactions: one row per transaction; `lines` is a list of structs
(sku, category, brand, quantity, unit_price) and `total` their sum. A return is a separate row
with kind "refund", negative quantities and total, and `original_transaction_id` naming the
sale. Members scan their card (`loyalty_card`) most of the time; `email` and `phone` are
sometimes typed in at the till, noisily.

Web events follow the Segment spec: identify (traits email, phone, first_name, last_name),
page (web), screen (app), and track events `Product Viewed`, `Product Added`,
`Order Completed`, `Order Refunded` and `Review Submitted`. `userId` is present only when the
person is logged in and equals a CRM `customer_id`; app events carry `context.device.id`.

Noise on purpose: emails in upper, title or padded case; phones in ten national and
international formats; placeholders (`test@test.com`, `0000000000`, `N/A`); duplicate CRM
accounts; households whose members share a surname, a postcode and one device; people who never
log in; members who forget their card.

Everything derives from `seed` and REFERENCE_DATE (never the clock): the same seed and size
give byte-identical files (the manifest's `created_at` aside), and so does any `chunk_rows`.
Randomness is drawn with NumPy over whole arrays; strings are assembled with Polars expressions
(NDJSON lines with `concat_str` from ready-made JSON fragments, written as one text column) or,
for UUIDs and timestamps, as NumPy byte matrices; Parquet goes through Arrow with
dictionary-encoded columns. Files are written in chunks, built on two threads, so memory stays
bounded. No Python loop runs per person, record or event.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Final, TypeAlias, TypeVar

import numpy as np
import numpy.typing as npt
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console

logger = logging.getLogger(__name__)

GENERATOR_VERSION: Final = "1.0"
REFERENCE_DATE: Final = datetime(2026, 11, 1, tzinfo=UTC)
HISTORY_DAYS: Final = 730
CHUNK_ROWS: Final = 500_000

MANIFEST: Final = "manifest.json"
CRM_FILE: Final = "sources/crm_customers.csv"
TILL_FILE: Final = "sources/till_transactions.parquet"
WEB_FILE: Final = "sources/web_events.ndjson"
PERSONS_FILE: Final = "ground_truth/persons.parquet"
DEVICES_FILE: Final = "ground_truth/devices.parquet"
RECORDS_FILE: Final = "ground_truth/record_person.parquet"
FILES: Final = (CRM_FILE, TILL_FILE, WEB_FILE, PERSONS_FILE, DEVICES_FILE, RECORDS_FILE)

SOURCE_CRM: Final = "crm_customers"
SOURCE_TILL: Final = "till_transactions"
SOURCE_WEB: Final = "web_events"

I64: TypeAlias = npt.NDArray[np.int64]
I32: TypeAlias = npt.NDArray[np.int32]
Ints: TypeAlias = npt.NDArray[np.integer[Any]]  # Any: int8 to int64, as narrow as the data allows
F64: TypeAlias = npt.NDArray[np.float64]
Bool: TypeAlias = npt.NDArray[np.bool_]
U8: TypeAlias = npt.NDArray[np.uint8]
_T = TypeVar("_T")
_Q: Final = 1 << 16  # resolution of table-based categorical draws

_EPOCH_DAY0: Final = (REFERENCE_DATE.date() - date(1970, 1, 1)).days - HISTORY_DAYS
_REF_MS: Final = (_EPOCH_DAY0 + HISTORY_DAYS) * 86_400_000
_DAY_MS: Final = 86_400_000
_SITE: Final = "https://www.maison-demo.fr"

# Shares and rates, tuned for about 20 source records per customer over the two years.
_CRM_SHARE = 0.70
_CRM_DUPLICATE_SHARE = 0.02
_MEMBER_SHARE_CRM = 0.60
_MEMBER_SHARE_OTHER = 0.12
_HOUSEHOLD_SHARE = 0.04
_PHONE_SHARE = 0.85
_STORE_VISITS = 7.8
_WEB_SESSIONS = 10.0
_CARD_SCANNED = 0.88
_TILL_REFUND = 0.03
_WEB_REFUND = 0.07


def _words(text: str) -> tuple[str, ...]:
    """Names from a space-separated list; an underscore stands for a space inside a name."""
    return tuple(word.replace("_", " ") for word in text.split())


FIRST_NAMES_F: Final = _words(
    "Marie Camille Léa Manon Chloé Emma Inès Sarah Julie Laura Pauline Céline Nathalie Isabelle "
    "Sophie Sandrine Valérie Christine Catherine Anne Aurélie Émilie Claire Lucie Juliette Zoé "
    "Louise Alice Jade Clara Margaux Océane Anaïs Mathilde Charlotte Élodie Hélène Françoise "
    "Monique Sylvie Martine Nadia Fatima Yasmine Amandine Justine Noémie Agathe Lina Eva"
)
FIRST_NAMES_M: Final = _words(
    "Jean Pierre Nicolas Thomas Julien Alexandre Maxime Antoine Lucas Hugo Louis Gabriel Arthur "
    "Jules Paul Théo Nathan Mathieu Sébastien Christophe Laurent Philippe Michel Éric Olivier "
    "David Stéphane Frédéric Patrick Alain Jérôme François Guillaume Romain Benjamin Adrien "
    "Vincent Kevin Mehdi Karim Mohamed Yanis Raphaël Léo Adam Ethan Noah Baptiste Quentin "
    "Jean-Pierre"
)
LAST_NAMES: Final = _words(
    "Martin Bernard Thomas Petit Robert Richard Durand Dubois Moreau Laurent Simon Michel "
    "Lefebvre Leroy Roux David Bertrand Morel Fournier Girard Bonnet Dupont Lambert Fontaine "
    "Rousseau Vincent Muller Lefèvre Faure André Mercier Blanc Guérin Boyer Garnier Chevalier "
    "François Legrand Gauthier Garcia Perrin Robin Clément Morin Nicolas Henry Roussel Mathieu "
    "Gautier Masson Marchand Duval Denis Dumont Marie Lemaire Noël Meyer Dufour Meunier Brun "
    "Blanchard Giraud Joly Rivière Lucas Brunet Gaillard Barbier Arnaud Martinez Gérard Roche "
    "Renard Schmitt Roy Leroux Colin Vidal Caron Picard Roger Fabre Aubert Lemoine Renaud "
    "Dumas Lacroix Olivier Philippe Bourgeois Pierre Benoît Rey Leclerc Payet Rolland "
    "Leclercq Guillaume Lecomte Le_Gall Da_Silva"
)

_ACCENTS: Final = ("é", "è", "ê", "ë", "à", "â", "ï", "î", "ô", "ö", "ç", "ü", "û", "ù")
_PLAIN: Final = ("e", "e", "e", "e", "a", "a", "i", "i", "o", "o", "c", "u", "u", "u")

EMAIL_DOMAINS: Final = (
    ("gmail.com", 0.34),
    ("hotmail.fr", 0.11),
    ("orange.fr", 0.11),
    ("yahoo.fr", 0.08),
    ("free.fr", 0.08),
    ("outlook.fr", 0.07),
    ("sfr.fr", 0.05),
    ("laposte.net", 0.05),
    ("icloud.com", 0.06),
    ("wanadoo.fr", 0.05),
)

# name, share of the catalogue, median price (EUR), price spread, till share, web share, brands
CATEGORIES: Final = (
    (
        "beauty",
        0.22,
        19.0,
        0.55,
        0.22,
        0.28,
        ("Lumière Paris", "Nuance", "Belle Rive", "Aqua Flore"),
    ),
    ("fashion", 0.28, 35.0, 0.65, 0.20, 0.30, ("Atelier 9", "Rive Gauche", "Denim & Co")),
    ("home", 0.16, 24.0, 0.85, 0.14, 0.18, ("Casa Nova", "Lin & Bois", "Maison Demo Home")),
    ("food", 0.18, 5.0, 0.55, 0.30, 0.06, ("Épicerie Fine", "Terroir", "Bio Village")),
    ("kids", 0.09, 18.0, 0.60, 0.08, 0.10, ("Petit Pas", "Mini Monde")),
    ("sport", 0.07, 29.0, 0.75, 0.06, 0.08, ("Élan", "Cap Sport")),
)
_FOOD: Final = [c[0] for c in CATEGORIES].index("food")
N_SKUS: Final = 4_000
N_STORES: Final = 60
DEPARTMENTS: Final = (
    (75, 10),
    (92, 5),
    (93, 4),
    (94, 4),
    (78, 3),
    (91, 3),
    (95, 3),
    (77, 3),
    (69, 5),
    (13, 5),
    (59, 5),
    (33, 4),
    (31, 4),
    (44, 3),
    (67, 3),
    (6, 3),
    (34, 3),
    (35, 2),
    (38, 3),
    (76, 3),
    (62, 3),
    (57, 2),
    (83, 2),
    (45, 1),
    (21, 1),
    (29, 2),
    (63, 1),
    (64, 2),
    (74, 2),
    (37, 1),
)

USER_AGENTS: Final = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/129.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_6) AppleWebKit/605.1.15 Version/18.0 Safari",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_0 like Mac OS X) AppleWebKit/605.1.15 Mobile",
    "Mozilla/5.0 (Linux; Android 14; SM-S921B) AppleWebKit/537.36 Chrome/129.0 Mobile",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:131.0) Gecko/20100101 Firefox/131.0",
)
PAGES: Final = ("Home", "Category", "Product", "Search", "Offers", "Stores", "Account", "Loyalty")
_PAGE_PATHS: Final = ("/", "", "", "/search", "/offers", "/stores", "/account", "/loyalty")
_PAGE_P: Final = (0.22, 0.22, 0.30, 0.08, 0.07, 0.04, 0.04, 0.03)

# Web event kinds (the codes in `_Events.kind`).
K_PAGE, K_SCREEN, K_IDENTIFY, K_VIEWED, K_ADDED, K_ORDER, K_REFUND, K_REVIEW = range(8)

# Email noise codes: as is, UPPER, Title, padded, upper domain, test@test.com, N/A, missing.
_EMAIL_NOISE_CRM: Final = (0.83, 0.04, 0.03, 0.03, 0.02, 0.01, 0.01, 0.03)
_EMAIL_NOISE_TILL: Final = (0.78, 0.06, 0.03, 0.05, 0.02, 0.03, 0.03, 0.0)
_EMAIL_NOISE_WEB: Final = (0.88, 0.03, 0.03, 0.02, 0.02, 0.02, 0.0, 0.0)
# Phone formats: ten ways to write the same French mobile, then placeholders and missing.
_PHONE_PREFIX: Final = ("0", "0", "+33", "+33 ", "0033 ", "(0", "0", "0", "+33 (0)", "")
_PHONE_SEP1: Final = (" ", "", "", " ", " ", ")", ".", "-", " ", "")
_PHONE_SEP: Final = (" ", "", "", " ", " ", "", ".", "-", " ", "")
_PHONE_FORMAT_P: Final = (0.30, 0.22, 0.15, 0.06, 0.04, 0.04, 0.08, 0.04, 0.03, 0.04)
PHONE_PLACEHOLDERS: Final = ("0000000000", "N/A")
EMAIL_PLACEHOLDERS: Final = ("test@test.com", "N/A")


def _stage_key(name: str) -> int:
    return zlib.crc32(name.encode())


def _rng(seed: int, stage: str) -> np.random.Generator:
    """An independent random stream per stage, so that stages never shift each other."""
    return np.random.default_rng([seed % 2**64, _stage_key(stage)])


def _p(weights: Sequence[float]) -> F64:
    w = np.asarray(weights, dtype=np.float64)
    out: F64 = w / w.sum()
    return out


def _offsets(lengths: Ints) -> I64:
    """Start offsets of consecutive runs of the given lengths, plus the total at the end."""
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _ranges(starts: Ints, lengths: Ints) -> I64:
    """Concatenated `arange(start, start + length)` for every pair, without a Python loop."""
    ends = _offsets(lengths)
    shift = np.repeat(starts - ends[:-1], lengths)
    out: I64 = np.arange(int(ends[-1]), dtype=np.int64) + shift
    return out


def _table(p: Sequence[float]) -> I32:
    """Inverse-CDF lookup table: entry u of 2^16 is the category that uniform u falls in."""
    cdf = np.cumsum(_p(p))
    u = (np.arange(_Q) + 0.5) / _Q
    out: I32 = np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1).astype(np.int32)
    return out


def _choice(rng: np.random.Generator, n: int, p: Sequence[float]) -> I32:
    """n categorical draws with probabilities p (to 1/65536), by table lookup."""
    out: I32 = _table(p)[_uniform16(rng, n)]
    return out


def _uniform16(rng: np.random.Generator, n: int) -> npt.NDArray[np.uint16]:
    return rng.integers(0, _Q, n, dtype=np.uint16)


def _splitmix(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """SplitMix64: a counter-based hash, so ids do not depend on how the work is chunked."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    out: npt.NDArray[np.uint64] = z ^ (z >> np.uint64(31))
    return out


_HEX_LOWER: Final = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_HEX_UPPER: Final = np.frombuffer(b"0123456789ABCDEF", dtype=np.uint8)


def _uuid_bytes(seed: int, stream: str, first: int, count: int, *, upper: bool = False) -> U8:
    """Random-looking UUID v4 texts (count x 36 ASCII bytes) for counters first, first+1..."""
    key = np.uint64((seed * 0x2545F4914F6CDD1D + _stage_key(stream)) % 2**64)
    counter = np.arange(first, first + count, dtype=np.uint64) * np.uint64(2)
    halves = np.empty((count, 2), dtype=np.uint64)
    halves[:, 0] = _splitmix(counter ^ key)
    halves[:, 1] = _splitmix((counter + np.uint64(1)) ^ key)
    raw = halves.view(np.uint8).reshape(count, 16)
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    nibbles = np.empty((count, 32), dtype=np.uint8)
    nibbles[:, 0::2] = raw >> 4
    nibbles[:, 1::2] = raw & 0x0F
    chars = (_HEX_UPPER if upper else _HEX_LOWER)[nibbles]
    text = np.full((count, 36), ord("-"), dtype=np.uint8)
    for lo, hi, src in ((0, 8, 0), (9, 13, 8), (14, 18, 12), (19, 23, 16), (24, 36, 20)):
        text[:, lo:hi] = chars[:, src : src + hi - lo]
    return text


def _uuids(seed: int, stream: str, first: int, count: int, *, upper: bool = False) -> pl.Series:
    """Random-looking UUID v4 strings for the counters first..first+count-1 of a stream."""
    return _text(_uuid_bytes(seed, stream, first, count, upper=upper))


def _text(rows: U8) -> pl.Series:
    """The rows of an (n, width) matrix of ASCII bytes, as strings."""
    width = rows.shape[1]
    return pl.Series(np.ascontiguousarray(rows).reshape(-1).view(f"S{width}")).cast(pl.String)


_DATE_BYTES: Final = (
    np.datetime_as_string(
        np.datetime64(date(1970, 1, 1), "D")
        + np.arange(_EPOCH_DAY0 - 7, _EPOCH_DAY0 + HISTORY_DAYS + 7)
    )
    .astype("S10")
    .view(np.uint8)
    .reshape(-1, 10)
)


def _iso_bytes(ms: I64) -> U8:
    """UTC epoch milliseconds within the history window as 2026-03-01T10:22:31.512Z bytes."""
    out = np.empty((len(ms), 24), dtype=np.uint8)
    day = ms // _DAY_MS
    out[:, :10] = _DATE_BYTES[day - (_EPOCH_DAY0 - 7)]
    rest = ms - day * _DAY_MS
    fields = (
        (11, rest // 3_600_000),
        (14, rest // 60_000 % 60),
        (17, rest // 1000 % 60),
    )
    for at, value in fields:
        out[:, at] = value // 10 + 48
        out[:, at + 1] = value % 10 + 48
    milli = rest % 1000
    out[:, 20] = milli // 100 + 48
    out[:, 21] = milli // 10 % 10 + 48
    out[:, 22] = milli % 10 + 48
    out[:, [10, 13, 16, 19, 23]] = np.frombuffer(b"T::.Z", dtype=np.uint8)
    return out


def _message_pieces(seed: int, first: int, ms: I64) -> tuple[pl.Series, pl.Series]:
    """`,"messageId":"<uuid>","timestamp":"<ISO 8601>",` per event, and the bare messageIds."""
    uuid = _uuid_bytes(seed, "message_id", first, len(ms))

    def fixed(text: bytes) -> U8:
        return np.broadcast_to(np.frombuffer(text, np.uint8), (len(ms), len(text)))

    parts = [
        fixed(b',"messageId":"'),
        uuid,
        fixed(b'","timestamp":"'),
        _iso_bytes(ms),
        fixed(b'",'),
    ]
    return _text(np.concatenate(parts, axis=1)), _text(uuid)


def _ids(prefix: str, numbers: Ints, width: int) -> pl.Series:
    """Identifiers like C0000042: a prefix and a zero-padded number."""
    digits = pl.Series(numbers, dtype=pl.Int64).cast(pl.String).str.zfill(width)
    return pl.select(pl.concat_str([pl.lit(prefix), pl.lit(digits)])).to_series()


def _take(lookup: pl.Series, index: Ints) -> pl.Series:
    """lookup[index], null where index is negative."""
    if len(lookup) == 0:  # then every index is negative
        nulls = pl.repeat(None, len(index), dtype=lookup.dtype, eager=True)
        return nulls.alias(lookup.name)
    values = lookup.gather(np.maximum(index, 0))
    return _mask(values, index >= 0)


def _mask(values: pl.Series, keep: Bool) -> pl.Series:
    """values where keep is true, null elsewhere."""
    if len(values) == 0:
        return values
    mask = pl.Series(keep, dtype=pl.Boolean)
    return pl.select(pl.when(pl.lit(mask)).then(pl.lit(values))).to_series().alias(values.name)


def _cat(*parts: str | pl.Expr) -> pl.Expr:
    """Concatenate text and string expressions; null when any expression is null."""
    return pl.concat_str([pl.lit(p) if isinstance(p, str) else p for p in parts])


def _money(cents: pl.Expr) -> pl.Expr:
    """Non-negative cents as a JSON number with two decimals (12.90), exactly."""
    return _cat((cents // 100).cast(pl.String), ".", (cents % 100).cast(pl.String).str.zfill(2))


@dataclass(slots=True)
class _Calendar:
    """Per-day weights and UTC offsets over the history window."""

    store_cdf: F64
    web_cdf: F64
    utc_offset_h: I64
    store_hours: tuple[float, ...]
    web_hours: tuple[float, ...]


def _calendar() -> _Calendar:
    days = np.arange(HISTORY_DAYS, dtype=np.int64)
    dates = np.datetime64(date(1970, 1, 1), "D") + _EPOCH_DAY0 + days
    month = dates.astype("datetime64[M]").astype(np.int64) % 12 + 1
    dom = (dates - dates.astype("datetime64[M]")).astype(np.int64) + 1
    weekday = (_EPOCH_DAY0 + days + 3) % 7  # 1970-01-01 was a Thursday; Monday is 0
    month_f = np.array([0, 1.05, 0.8, 0.85, 0.9, 0.95, 1.05, 1.05, 0.75, 0.9, 0.95, 1.2, 1.6])
    season = month_f[month]
    season *= np.where((month == 11) & (weekday == 4) & (dom >= 24), 3.0, 1.0)  # Black Friday
    season *= np.where((month == 12) & (dom >= 10) & (dom <= 24), 1.5, 1.0)
    sales = ((month == 1) & (dom >= 8)) | ((month == 7) & (dom <= 20))
    season *= np.where(sales, 1.25, 1.0)
    trend = 1.0 + 0.12 * days / 365.0
    store_day = np.array([0.75, 0.85, 1.0, 0.9, 1.1, 1.5, 0.3])[weekday]
    web_day = np.array([1.05, 1.0, 1.0, 0.95, 0.9, 0.9, 1.2])[weekday]
    closed = (
        ((month == 12) & (dom == 25)) | ((month == 1) & (dom == 1)) | ((month == 5) & (dom == 1))
    )

    def cdf(weights: F64) -> F64:
        out = np.zeros(len(weights) + 1)
        np.cumsum(weights, out=out[1:])
        normed: F64 = out / out[-1]
        return normed

    # Paris summer time runs from the last Sunday of March to the last Sunday of October.
    weekday_31st = (weekday + (31 - dom)) % 7
    last_sunday = 31 - (weekday_31st - 6) % 7
    summer = ((month > 3) & (month < 10)) | ((month == 3) & (dom >= last_sunday))
    summer |= (month == 10) & (dom < last_sunday)
    store_hours = [0.0] * 9 + [0.5, 0.8, 1.1, 1.3, 1.0, 0.8, 0.9, 1.1, 1.3, 1.2, 0.7] + [0.0] * 4
    web_hours = [0.3, 0.15, 0.08, 0.05, 0.05, 0.1, 0.3, 0.6, 0.8, 0.9, 1.0, 1.0]
    web_hours += [1.2, 1.3, 1.0, 0.9, 0.9, 1.0, 1.2, 1.4, 1.7, 1.8, 1.5, 0.8]
    return _Calendar(
        store_cdf=cdf(season * trend * store_day * np.where(closed, 0.0, 1.0)),
        web_cdf=cdf(season * trend * web_day),
        utc_offset_h=np.where(summer, 2, 1).astype(np.int64),
        store_hours=tuple(store_hours),
        web_hours=tuple(web_hours),
    )


def _sample_ms(
    rng: np.random.Generator, cal: _Calendar, start: Ints, end: Ints, *, web: bool
) -> I64:
    """UTC epoch milliseconds within each [start, end) day window, following the seasons."""
    cdf = cal.web_cdf if web else cal.store_cdf
    n = len(start)
    lo, hi = cdf[start], cdf[end]
    x = lo + rng.random(n) * (hi - lo)
    day = np.clip(np.searchsorted(cdf, x, side="right") - 1, start, end - 1)
    hour = _choice(rng, n, cal.web_hours if web else cal.store_hours)
    local_s = (_EPOCH_DAY0 + day) * 86_400 + (hour - cal.utc_offset_h[day]) * 3_600
    out: I64 = (local_s + rng.integers(0, 3600, n)) * 1000 + rng.integers(0, 1000, n)
    return out


@dataclass(slots=True)
class _Catalog:
    """Products: category, brand, price and popularity, plus ready-made JSON fragments."""

    category: I32
    price_cents: I64
    sku: pl.Series
    category_name: pl.Series
    brand: pl.Series
    product: pl.Series  # {"sku":..,"category":..,"brand":..  (object left open)
    json: pl.Series  # the same with the list price
    page_json: pl.Series  # properties of the product's page view
    pick: I32  # per category, 2^16 products drawn in proportion to their popularity
    brand_index: I64  # per product, its brand in `brands`
    brands: list[str]


def _catalog(seed: int) -> _Catalog:
    rng = _rng(seed, "catalog")
    shares = _p([c[1] for c in CATEGORIES])
    counts = np.floor(shares * N_SKUS).astype(np.int64)
    counts[0] += N_SKUS - counts.sum()
    bounds = _offsets(counts)
    category = np.repeat(np.arange(len(CATEGORIES), dtype=np.int32), counts)
    median = np.array([c[2] for c in CATEGORIES])[category]
    spread = np.array([c[3] for c in CATEGORIES])[category]
    euros = np.exp(np.log(median) + spread * rng.standard_normal(N_SKUS))
    endings = np.array([99, 49, 95, 90, 0])[_choice(rng, N_SKUS, (0.55, 0.15, 0.12, 0.1, 0.08))]
    price = np.maximum(np.floor(euros).astype(np.int64) * 100 + endings, 99)
    n_brands = np.array([len(c[6]) for c in CATEGORIES])
    brand_idx = _offsets(n_brands)[category] + rng.integers(0, 1 << 30, N_SKUS) % n_brands[category]
    brands = pl.Series([b for c in CATEGORIES for b in c[6]])
    # Zipf-like popularity inside each category, in a random order.
    popularity = 1.0 / (rng.permutation(N_SKUS) % 500 + 3.0) ** 1.1
    u = (np.arange(_Q) + 0.5) / _Q
    pick = np.empty((len(CATEGORIES), _Q), dtype=np.int32)
    for c in range(len(CATEGORIES)):  # six categories
        lo, hi = int(bounds[c]), int(bounds[c + 1])
        cdf = np.cumsum(popularity[lo:hi]) / popularity[lo:hi].sum()
        pick[c] = lo + np.minimum(np.searchsorted(cdf, u, side="right"), hi - lo - 1)
    frame = pl.DataFrame(
        {
            "sku": _ids("SKU", rng.permutation(900_000)[:N_SKUS] + 100_000, 6),
            "category": pl.Series([c[0] for c in CATEGORIES]).gather(category),
            "brand": brands.gather(brand_idx),
            "price": price,
        }
    )
    sku_path = pl.col("sku").str.to_lowercase()
    frame = frame.with_columns(
        product=_cat(
            '{"sku":"',
            pl.col("sku"),
            '","category":"',
            pl.col("category"),
            '","brand":"',
            pl.col("brand"),
            '"',
        ),
        page_json=_cat(
            '{"path":"/p/',
            sku_path,
            f'","url":"{_SITE}/p/',
            sku_path,
            '","title":"',
            pl.col("brand"),
            " ",
            pl.col("category"),
            ' | Maison Demo"}',
        ),
    )
    return _Catalog(
        category=category,
        price_cents=price,
        sku=frame["sku"],
        category_name=frame["category"],
        brand=frame["brand"],
        product=frame["product"],
        json=frame.select(
            _cat(pl.col("product"), ',"price":', _money(pl.col("price")))
        ).to_series(),
        page_json=frame["page_json"],
        pick=pick.reshape(-1),
        brand_index=brand_idx,
        brands=[b for c in CATEGORIES for b in c[6]],
    )


def _pick_skus(rng: np.random.Generator, cat: _Catalog, category: Ints) -> I32:
    """A product of each given category, popular ones more often."""
    out: I32 = cat.pick[category.astype(np.int64) * _Q + _uniform16(rng, len(category))]
    return out


@dataclass(slots=True)
class _People:
    """Every person, with what is true about them."""

    n: int
    birth_day: I64
    store: I64
    postcode: pl.Series
    partner: I64  # the household member whose surname, address and device this person shares
    in_crm: Bool
    member: Bool
    shops_store: Bool
    uses_web: Bool
    has_account: Bool
    has_phone: Bool
    engagement: F64
    favourite: I32
    start_day: I64
    end_day: I64
    person_id: pl.Series
    email: pl.Series
    phone_national: pl.Series  # the nine digits after the leading 0
    card: pl.Series
    first_name: pl.Series
    last_name: pl.Series


def _coprime_multiplier(rng: np.random.Generator, modulus: int) -> int:
    # modulus is 2^a * 5^b: an odd multiplier that is not a multiple of 5 makes a bijection.
    a = int(rng.integers(modulus // 3, modulus)) | 1
    return a + 2 if a % 5 == 0 else a


def _luhn(payload: I64) -> I64:
    """Luhn check digit of nine-digit numbers, as printed on loyalty cards."""
    digits = (payload[:, None] // 10 ** np.arange(9, dtype=np.int64)) % 10  # rightmost first
    digits[:, 0::2] *= 2
    digits = np.where(digits > 9, digits - 9, digits)
    out: I64 = (10 - digits.sum(axis=1) % 10) % 10
    return out


def _people(seed: int, n: int, store_dept: I64) -> _People:
    rng = _rng(seed, "persons")
    female = rng.random(n) < 0.52
    n_f, n_m = len(FIRST_NAMES_F), len(FIRST_NAMES_M)
    first = np.where(
        female,
        _choice(rng, n, (1.0 / (np.arange(n_f) + 8.0) ** 0.9).tolist()),
        n_f + _choice(rng, n, (1.0 / (np.arange(n_m) + 8.0)).tolist()),
    )
    last = _choice(rng, n, (1.0 / (np.arange(len(LAST_NAMES)) + 10.0) ** 0.8).tolist())
    age_days = np.clip(rng.normal(44, 15, n), 18, 88) * 365.25
    birth_day = (_EPOCH_DAY0 + HISTORY_DAYS - age_days).astype(np.int64)
    store = rng.integers(0, N_STORES, n)
    district = rng.integers(0, 100, n)
    # Households: the partner takes the owner's surname, store and address (and later a device).
    pairs = int(n * _HOUSEHOLD_SHARE)
    order = rng.permutation(n)
    owners, partners = order[:pairs], order[pairs : 2 * pairs]
    partner = np.full(n, -1, dtype=np.int64)
    partner[partners] = owners
    last[partners] = last[owners]
    store[partners] = store[owners]
    district[partners] = district[owners]
    dept = store_dept[store]
    postcode = np.where(dept == 75, 75_001 + district % 20, dept * 1000 + district * 10)
    in_crm = rng.random(n) < _CRM_SHARE
    member_p = np.where(in_crm, _MEMBER_SHARE_CRM, _MEMBER_SHARE_OTHER)
    member = rng.random(n) < member_p
    channel = _choice(rng, n, (0.35, 0.2, 0.45))  # shops only, web only, both
    uses_web = channel != 0
    existing = rng.random(n) < 0.55
    start_day = np.where(existing, 0, rng.integers(0, HISTORY_DAYS - 30, n))
    churned = rng.random(n) < 0.2
    stay = (rng.random(n) * (HISTORY_DAYS - 30 - start_day)).astype(np.int64)
    end_day = np.where(churned, start_day + 30 + stay, HISTORY_DAYS)

    phone_mult = _coprime_multiplier(rng, 200_000_000)
    phone_add = int(rng.integers(0, 200_000_000))
    national = 600_000_000 + (np.arange(n, dtype=np.int64) * phone_mult + phone_add) % 200_000_000

    members = np.flatnonzero(member)
    card_mult = _coprime_multiplier(rng, 10**9)
    card_add = int(rng.integers(0, 10**9))
    payload = (np.arange(len(members), dtype=np.int64) * card_mult + card_add) % 10**9
    card_index = np.full(n, -1, dtype=np.int64)
    card_index[members] = np.arange(len(members))
    card = _take(_ids("LC", payload * 10 + _luhn(payload), 10), card_index)

    names = pl.Series([*FIRST_NAMES_F, *FIRST_NAMES_M])
    surnames = pl.Series(LAST_NAMES)

    def plain(s: pl.Series) -> pl.Series:
        return (
            s.str.to_lowercase().str.replace_many(list(_ACCENTS), list(_PLAIN)).str.replace(" ", "")
        )

    frame = pl.DataFrame(
        {
            "f": plain(names).gather(first),
            "l": plain(surnames).gather(last),
            "p": _choice(rng, n, (0.34, 0.14, 0.12, 0.14, 0.06, 0.08, 0.07, 0.05)),
            "nn": rng.integers(1, 100, n),
            "yy": (birth_day / 365.25 + 70).astype(np.int64) % 100,
            "d": pl.Series([d[0] for d in EMAIL_DOMAINS]).gather(
                _choice(rng, n, [d[1] for d in EMAIL_DOMAINS])
            ),
            "i": np.arange(1, n + 1),
        }
    )
    # Local-part patterns: marie.dupont, mariedupont, m.dupont, marie.dupont42, marie_dupont,
    # dupont.marie, marie84, mdupont42.
    p, f, lname = pl.col("p"), pl.col("f"), pl.col("l")
    initial = f.str.slice(0, 1)
    part1 = pl.when(p == 5).then(lname).when(p.is_in([2, 7])).then(initial).otherwise(f)
    part2 = pl.when(p == 5).then(f).when(p == 6).then(pl.lit("")).otherwise(lname)
    suffix = (
        pl.when(p.is_in([3, 7]))
        .then(pl.col("nn").cast(pl.String))
        .when(p == 6)
        .then(pl.col("yy").cast(pl.String).str.zfill(2))
        .otherwise(pl.lit(""))
    )
    sep = pl.lit(pl.Series([".", "", ".", ".", "_", ".", "", ""])).gather(p)
    frame = frame.with_columns(local=pl.concat_str([part1, sep, part2, suffix]))
    frame = frame.with_columns(email=_cat(pl.col("local"), "@", pl.col("d")))
    # Two persons never share an address: later duplicates get the person's number appended.
    frame = frame.with_columns(
        email=pl.when(pl.col("email").is_first_distinct())
        .then(pl.col("email"))
        .otherwise(_cat(pl.col("local"), ".", pl.col("i").cast(pl.String), "@", pl.col("d")))
    )
    return _People(
        n=n,
        birth_day=birth_day,
        store=store.astype(np.int64),
        postcode=pl.Series(postcode).cast(pl.String).str.zfill(5),
        partner=partner,
        in_crm=in_crm,
        member=member,
        shops_store=channel != 1,
        uses_web=uses_web,
        has_account=uses_web & in_crm & (rng.random(n) < 0.8),
        has_phone=rng.random(n) < _PHONE_SHARE,
        engagement=rng.gamma(1.3, 1 / 1.3, n),
        favourite=_choice(rng, n, [c[4] + c[5] for c in CATEGORIES]),
        start_day=start_day.astype(np.int64),
        end_day=end_day.astype(np.int64),
        person_id=_ids("P", np.arange(1, n + 1), max(7, len(str(n)))),
        email=frame["email"],
        phone_national=pl.Series(national).cast(pl.String),
        card=card,
        first_name=names.gather(first),
        last_name=surnames.gather(last),
    )


def _noisy_email(email: pl.Expr, code: pl.Expr) -> pl.Expr:
    """An email as people and clerks type it (codes as in `_EMAIL_NOISE_*`)."""
    parts = email.str.split_exact("@", 1)
    return (
        pl.when(code == 0)
        .then(email)
        .when(code == 1)
        .then(email.str.to_uppercase())
        .when(code == 2)
        .then(email.str.to_titlecase())
        .when(code == 3)
        .then(_cat(" ", email, " "))
        .when(code == 4)
        .then(
            _cat(
                parts.struct.field("field_0"), "@", parts.struct.field("field_1").str.to_uppercase()
            )
        )
        .when(code == 5)
        .then(pl.lit(EMAIL_PLACEHOLDERS[0]))
        .when(code == 6)
        .then(pl.lit(EMAIL_PLACEHOLDERS[1]))
        .otherwise(pl.lit(None, dtype=pl.String))
    )


def _noisy_phone(national: pl.Expr, code: pl.Expr) -> pl.Expr:
    """A phone number in format `code` (0-9), a placeholder (10, 11) or missing (12)."""
    fmt = code.clip(0, 9)
    pieces = [
        pl.lit(pl.Series(_PHONE_PREFIX)).gather(fmt),
        national.str.slice(0, 1),
        pl.lit(pl.Series(_PHONE_SEP1)).gather(fmt),
    ]
    for i in (1, 3, 5, 7):
        if i > 1:
            pieces.append(pl.lit(pl.Series(_PHONE_SEP)).gather(fmt))
        pieces.append(national.str.slice(i, 2))
    return (
        pl.when(code < 10)
        .then(pl.concat_str(pieces))
        .when(code == 10)
        .then(pl.lit(PHONE_PLACEHOLDERS[0]))
        .when(code == 11)
        .then(pl.lit(PHONE_PLACEHOLDERS[1]))
        .otherwise(pl.lit(None, dtype=pl.String))
    )


def _typed_emails(email: pl.Series, person: Ints, code: Ints) -> pl.Series:
    """The emails of `person` as typed; only the rows with noise are rewritten."""
    noisy = np.flatnonzero((code > 0) & (code < 7))
    rewritten = (
        pl.DataFrame({"e": email.gather(person[noisy]), "c": code[noisy]})
        .select(_noisy_email(pl.col("e"), pl.col("c")))
        .to_series()
    )
    index = np.where(code == 0, person, -1)
    index[noisy] = len(email) + np.arange(len(noisy))
    return _take(pl.concat([email, rewritten]), index).alias("email")


def _typed_phones(national: pl.Series, person: Ints, code: Ints) -> pl.Series:
    """The phones of `person` in format `code`; only the rows with a phone are formatted."""
    present = np.flatnonzero(code < 12)
    values = (
        pl.DataFrame({"n": national.gather(person[present]), "c": code[present]})
        .select(_noisy_phone(pl.col("n"), pl.col("c")))
        .to_series()
    )
    index = np.full(len(code), -1, dtype=np.int64)
    index[present] = np.arange(len(present))
    return _take(values, index).alias("phone")


def _phone_codes(rng: np.random.Generator, present: Bool, placeholder_share: float) -> I32:
    """Phone format codes: a format when present, sometimes a placeholder, else 12 (missing)."""
    n = len(present)
    code = _choice(rng, n, _PHONE_FORMAT_P)
    junk = rng.random(n) < placeholder_share
    code = np.where(junk, 10 + (rng.random(n) < 0.3), code)
    out: I32 = np.where(present | junk, code, 12).astype(np.int32)
    return out


class _Progress:
    """Prints one line per finished stage on the console (or logs it when there is none)."""

    def __init__(self, console: Console | None) -> None:
        self.console = console
        self.started = time.perf_counter()
        self.last = self.started

    def done(self, stage: str, rows: int) -> None:
        now = time.perf_counter()
        line = f"{stage:<34} {rows:>12,} rows {now - self.last:6.1f} s"
        line += f"  (total {now - self.started:.1f} s)"
        self.last = now
        # On a console the line is shown already; the log keeps it at debug level then.
        logger.log(logging.DEBUG if self.console else logging.INFO, "sample data: %s", line)
        if self.console is not None:
            self.console.print(line, highlight=False)


class _ParquetSink:
    """Appends Arrow tables to one Parquet file, chunk by chunk.

    Dictionary-encoded columns are written as such, and read back as plain strings because
    the Arrow schema is not stored.
    """

    def __init__(self, path: Path, **options: object) -> None:
        self.path = path
        self.options = options
        self.writer: pq.ParquetWriter | None = None
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(
                self.path, table.schema, compression="zstd", store_schema=False, **self.options
            )
        self.writer.write_table(table)
        self.rows += table.num_rows

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@contextmanager
def _parquet_sink(path: Path, **options: object) -> Iterator[_ParquetSink]:
    """A `_ParquetSink` that is closed on exit; options go to `pyarrow.parquet.ParquetWriter`."""
    sink = _ParquetSink(path, **options)
    try:
        yield sink
    finally:
        sink.close()


def _pipelined(
    starts: range, build: Callable[[int], _T], write: Callable[[_T], None], ahead: int = 2
) -> None:
    """Build chunks on worker threads and write them in order on this one.

    NumPy, Polars and Arrow release the GIL in their kernels, so on two cores the next chunks
    are assembled while the current one is written.
    """
    with ThreadPoolExecutor(max_workers=ahead) as pool:
        pending: deque[Future[_T]] = deque()
        for start in starts:
            pending.append(pool.submit(build, start))
            if len(pending) > ahead:
                write(pending.popleft().result())
        while pending:
            write(pending.popleft().result())


def _dictionary(indices: Ints, values: Sequence[str] | pl.Series) -> pa.Array:
    """A dictionary-encoded string column: no string is copied per row."""
    words = values.to_arrow() if isinstance(values, pl.Series) else pa.array(values, pa.string())
    return pa.DictionaryArray.from_arrays(pa.array(indices.astype(np.int32)), words)


def _records(source: str, keys: pl.Series, person: Ints, people: _People) -> pa.Table:
    """Ground-truth rows: which person each source record belongs to."""
    return pa.table(
        {
            "source": _dictionary(np.zeros(len(keys), dtype=np.int32), [source]),
            "record_key": keys.to_arrow(),
            "person_id": people.person_id.gather(person).to_arrow(),
        }
    )


@dataclass(slots=True)
class _Crm:
    """The CRM records: who they belong to and their customer ids."""

    person: I64
    customer_id: pl.Series
    primary: I64  # per person: index of the main record, -1 when not in the CRM
    duplicate: I64  # per person: index of the duplicate account, -1 when none


def _write_crm(seed: int, people: _People, out: Path, records: _ParquetSink) -> _Crm:
    rng = _rng(seed, "crm")
    crm_people = np.flatnonzero(people.in_crm)
    dup_people = crm_people[rng.random(len(crm_people)) < _CRM_DUPLICATE_SHARE]
    person = np.concatenate([crm_people, dup_people])
    is_dup = np.arange(len(person)) >= len(crm_people)
    n = len(person)
    start_ms = (_EPOCH_DAY0 + people.start_day[crm_people]) * _DAY_MS
    before = rng.integers(0, 8 * 365 * _DAY_MS, len(crm_people))
    recent = rng.integers(0, 3 * _DAY_MS, len(crm_people))
    signup = np.where(people.start_day[crm_people] == 0, start_ms - before, start_ms - recent)
    # A duplicate account is opened later, by someone who forgot the first one.
    dup_of = np.searchsorted(crm_people, dup_people)
    later = rng.random(len(dup_people)) * (_REF_MS - signup[dup_of])
    signup = np.concatenate([signup, signup[dup_of] + later.astype(np.int64)])
    updated = signup + ((_REF_MS - signup) * rng.beta(2.0, 1.0, n)).astype(np.int64)
    # Customer numbers follow signup order, as in a real CRM.
    order = np.lexsort((person, signup))
    number = np.empty(n, dtype=np.int64)
    number[order] = np.arange(1, n + 1)
    customer_id = _ids("C", number, max(7, len(str(n))))
    primary = np.full(people.n, -1, dtype=np.int64)
    primary[crm_people] = np.arange(len(crm_people))
    duplicate = np.full(people.n, -1, dtype=np.int64)
    duplicate[dup_people] = np.arange(len(crm_people), n)

    has_phone = people.has_phone[person] & (rng.random(n) < 0.92)
    frame = pl.DataFrame(
        {
            "customer_id": customer_id,
            "email": _typed_emails(people.email, person, _choice(rng, n, _EMAIL_NOISE_CRM)),
            "phone": _typed_phones(
                people.phone_national, person, _phone_codes(rng, has_phone, 0.015)
            ),
            "first": people.first_name.gather(person),
            "last": people.last_name.gather(person),
            "name_noise": _choice(rng, n, (0.85, 0.08, 0.05, 0.02)),
            "last_noise": _choice(rng, n, (0.6, 0.35, 0.05)),
            "birth": people.birth_day[person],
            "birth_noise": _choice(rng, n, (0.955, 0.04, 0.005)),
            "postcode_true": people.postcode.gather(person),
            "postcode_noise": rng.random(n),
            "loyalty_card": _take(people.card, np.where(is_dup, -1, person)),
            "email_opt_in": rng.random(n) < 0.55,
            "sms_opt_in": has_phone & (rng.random(n) < 0.35),
            "signup": signup,
            "updated": updated,
        }
    )
    first, last, postcode = pl.col("first"), pl.col("last"), pl.col("postcode_true")
    frame = frame.select(
        "customer_id",
        "email",
        "phone",
        first_name=pl.when(pl.col("name_noise") == 1)
        .then(first.str.to_uppercase())
        .when(pl.col("name_noise") == 2)
        .then(first.str.to_lowercase())
        .when(pl.col("name_noise") == 3)
        .then(_cat(first, " "))
        .otherwise(first),
        last_name=pl.when(pl.col("last_noise") == 1)
        .then(last.str.to_uppercase())
        .when(pl.col("last_noise") == 2)
        .then(last.str.to_lowercase())
        .otherwise(last),
        birth_date=pl.when(pl.col("birth_noise") == 0)
        .then(pl.col("birth").cast(pl.Int32).cast(pl.Date).dt.strftime("%Y-%m-%d"))
        .when(pl.col("birth_noise") == 2)
        .then(pl.lit("1900-01-01")),
        postcode=pl.when(pl.col("postcode_noise") < 0.01)
        .then(pl.lit(None, dtype=pl.String))
        .when((pl.col("postcode_noise") < 0.2) & postcode.str.starts_with("0"))
        .then(postcode.str.slice(1))  # lost its leading zero in a spreadsheet
        .otherwise(postcode),
        loyalty_card="loyalty_card",
        email_opt_in="email_opt_in",
        sms_opt_in="sms_opt_in",
        signup_date=pl.from_epoch(pl.col("signup"), "ms").dt.strftime("%Y-%m-%d"),
        updated_at=pl.from_epoch(pl.col("updated"), "ms").dt.strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    frame.sort("customer_id").write_csv(out / CRM_FILE)
    records.write(_records(SOURCE_CRM, customer_id, person, people))
    return _Crm(person=person, customer_id=customer_id, primary=primary, duplicate=duplicate)


def _write_till(
    seed: int,
    people: _People,
    cat: _Catalog,
    cal: _Calendar,
    store_ids: pl.Series,
    out: Path,
    records: _ParquetSink,
    chunk_rows: int,
) -> int:
    rng = _rng(seed, "till")
    active = (people.end_day - people.start_day) / HISTORY_DAYS
    visits = rng.poisson(_STORE_VISITS * people.engagement * active * people.shops_store)
    person = np.repeat(np.arange(people.n, dtype=np.int32), visits)
    ts = _sample_ms(rng, cal, people.start_day[person], people.end_day[person], web=False)
    # Visits in time order: lines come out in order and the final sort only places returns.
    by_time = np.argsort(ts, kind="stable")
    person, ts = person[by_time], ts[by_time]
    n_sales = len(person)
    away = rng.random(n_sales) < 0.15
    store = np.where(away, rng.integers(0, N_STORES, n_sales), people.store[person])
    card = people.member[person] & (rng.random(n_sales) < _CARD_SCANNED)
    gives_email = rng.random(n_sales) < 0.10  # an e-receipt
    email_code = np.where(gives_email, _choice(rng, n_sales, _EMAIL_NOISE_TILL), 7)
    gives_phone = people.has_phone[person] & (rng.random(n_sales) < 0.05)
    phone_code = _phone_codes(rng, gives_phone, 0.008)
    n_lines = 1 + np.minimum(rng.poisson(1.7, n_sales), 19)
    line_tx = np.repeat(np.arange(n_sales, dtype=np.int32), n_lines)
    n_line = len(line_tx)
    line_cat = np.where(
        rng.random(n_line, dtype=np.float32) < 0.35,
        people.favourite[person[line_tx]],
        _choice(rng, n_line, [c[4] for c in CATEGORIES]),
    )
    del line_tx
    sku = _pick_skus(rng, cat, line_cat)
    u = _uniform16(rng, n_line)
    extra = (u < 0.12 * _Q).astype(np.int32) + (u < 0.03 * _Q)
    food = line_cat == _FOOD  # several of the same item is common only for food
    qty = np.where(food, 1 + rng.poisson(0.6, n_line), 1 + extra).astype(np.int32)
    price = cat.price_cents[sku]
    price = np.where(rng.random(n_line, dtype=np.float32) < 0.1, (price * 8 + 5) // 10, price)

    # Returns: a new transaction naming the sale, with all its lines or only the first one,
    # back at a shop one to thirty days later, during opening hours.
    refunded = np.flatnonzero(rng.random(n_sales) < _TILL_REFUND)
    sale_day = ts[refunded] // _DAY_MS - _EPOCH_DAY0
    refund_day = sale_day + rng.integers(1, 31, len(refunded))
    refunded, refund_day = (
        refunded[refund_day < HISTORY_DAYS],
        refund_day[refund_day < HISTORY_DAYS],
    )
    refund_ts = _sample_ms(rng, cal, refund_day, refund_day + 1, web=False)
    n_ref = len(refunded)
    sale_offsets = _offsets(n_lines)
    refund_len = np.where(rng.random(n_ref) < 0.4, n_lines[refunded], 1)
    refund_lines = _ranges(sale_offsets[refunded], refund_len)
    home = people.store[person[refunded]]
    refund_store = np.where(rng.random(n_ref) < 0.8, store[refunded], home)

    order = np.argsort(np.concatenate([ts, refund_ts]), kind="stable")
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    orig = np.concatenate([np.full(n_sales, -1), refunded])[order]
    orig_pos = np.where(orig >= 0, position[np.maximum(orig, 0)], -1)
    lengths = np.concatenate([n_lines, refund_len])[order]
    starts = np.concatenate([sale_offsets[:-1], n_line + _offsets(refund_len)[:-1]])[order]
    line_index = _ranges(starts, lengths)
    line_sku = np.concatenate([sku, sku[refund_lines]])[line_index]
    line_qty = np.concatenate([qty, -qty[refund_lines]])[line_index]
    line_price = np.concatenate([price, price[refund_lines]])[line_index]
    offsets = _offsets(lengths)
    total = np.add.reduceat(line_qty * line_price, offsets[:-1]) if len(order) else line_qty
    t_person = np.concatenate([person, person[refunded]])[order]
    t_ts = np.concatenate([ts, refund_ts])[order]
    t_store = np.concatenate([store, refund_store])[order]
    t_card = np.concatenate([card, card[refunded]])[order]
    t_email = np.concatenate([email_code, np.full(n_ref, 7)])[order]
    t_phone = np.concatenate([phone_code, np.full(n_ref, 12)])[order]
    n_tx = len(order)
    width = max(10, len(str(n_tx)))

    def build(a: int) -> tuple[pa.Table, pa.Table]:
        b = min(a + chunk_rows, n_tx)
        pid = t_person[a:b]
        lo, hi = offsets[a], offsets[b]
        ls = line_sku[lo:hi]
        lines = pa.StructArray.from_arrays(
            [
                _dictionary(ls, cat.sku),
                _dictionary(cat.category[ls], [c[0] for c in CATEGORIES]),
                _dictionary(cat.brand_index[ls], cat.brands),
                pa.array(line_qty[lo:hi].astype(np.int32)),
                pa.array(line_price[lo:hi] / 100.0),
            ],
            names=["sku", "category", "brand", "quantity", "unit_price"],
        )
        tx_id = _ids("T", np.arange(a + 1, b + 1), width)
        table = pa.table(
            {
                "transaction_id": tx_id.to_arrow(),
                "kind": _dictionary((orig[a:b] >= 0).astype(np.int32), ["sale", "refund"]),
                "original_transaction_id": _mask(
                    _ids("T", orig_pos[a:b] + 1, width), orig_pos[a:b] >= 0
                ).to_arrow(),
                "store_id": _dictionary(t_store[a:b], store_ids),
                "timestamp": pa.array(t_ts[a:b]).cast(pa.timestamp("ms", tz="UTC")),
                "loyalty_card": _take(people.card, np.where(t_card[a:b], pid, -1)).to_arrow(),
                "email": _typed_emails(people.email, pid, t_email[a:b]).to_arrow(),
                "phone": _typed_phones(people.phone_national, pid, t_phone[a:b]).to_arrow(),
                "lines": pa.ListArray.from_arrays(
                    pa.array((offsets[a : b + 1] - lo).astype(np.int32)), lines
                ),
                "total": pa.array(total[a:b] / 100.0),
            }
        )
        return table, _records(SOURCE_TILL, tx_id, pid, people)

    with _parquet_sink(out / TILL_FILE) as sink:

        def write(chunk: tuple[pa.Table, pa.Table]) -> None:
            sink.write(chunk[0])
            records.write(chunk[1])

        _pipelined(range(0, max(n_tx, 1), chunk_rows), build, write)
    return n_tx


@dataclass(slots=True)
class _Devices:
    """Browsers and app installs: owner, platform and identifiers."""

    person: I64
    platform: I64  # 0 web, 1 ios, 2 android
    start: I64  # per person: index of the first own device
    count: I64  # per person: number of own devices
    anonymous_id: pl.Series
    device_id: pl.Series
    json: pl.Series  # "anonymousId":"..","context":{...  (context left open)


def _devices(seed: int, people: _People) -> _Devices:
    rng = _rng(seed, "devices")
    more = (rng.random(people.n) < 0.45).astype(np.int64) + (rng.random(people.n) < 0.15)
    count = np.where(people.uses_web, 1 + more, 0)
    person = np.repeat(np.arange(people.n, dtype=np.int64), count)
    n = len(person)
    app = rng.random(n) < 0.35
    platform = np.where(app, 1 + (rng.random(n) < 0.45), 0).astype(np.int64)
    anonymous_id = _uuids(seed, "anonymous_id", 0, n)
    device_id = _mask(_uuids(seed, "device_id", 0, n, upper=True), app)
    frame = pl.DataFrame(
        {
            "anon": anonymous_id,
            "dev": device_id,
            "platform": pl.Series(["web", "ios", "android"]).gather(platform),
            "ua": pl.Series(USER_AGENTS).gather(rng.integers(0, len(USER_AGENTS), n)),
            "version": pl.Series(["4.12.0", "4.13.1", "5.0.2"]).gather(rng.integers(0, 3, n)),
        }
    )
    browser = _cat(
        '"anonymousId":"', pl.col("anon"), '","context":{"userAgent":"', pl.col("ua"), '"'
    )
    app_json = _cat(
        '"anonymousId":"',
        pl.col("anon"),
        '","context":{"device":{"id":"',
        pl.col("dev"),
        '","type":"',
        pl.col("platform"),
        '"},"app":{"name":"Maison Demo","version":"',
        pl.col("version"),
        '"}',
    )
    json_ = frame.select(pl.when(pl.col("dev").is_null()).then(browser).otherwise(app_json))
    return _Devices(
        person=person,
        platform=platform,
        start=_offsets(count)[:-1],
        count=count,
        anonymous_id=anonymous_id,
        device_id=device_id,
        json=json_.to_series(),
    )


@dataclass(slots=True)
class _Events:
    """Web events in timestamp order, as plain arrays."""

    ts: I64
    kind: Ints
    person: Ints
    device: Ints
    user: Ints  # CRM record of the logged-in user, -1 when anonymous
    sku: Ints
    qty: Ints
    order: Ints  # order number (0-based, in time order), -1 when none
    amount: Ints  # cents: revenue of orders and refunds
    noise: Ints  # email noise code (identify and guest orders)
    flags: Ints  # 1: email in context.traits, 2: phone in traits, 4: newsletter sign-up
    aux: Ints  # random bits: page choice, phone format, rating


def _web_events(
    seed: int, people: _People, crm: _Crm, devices: _Devices, cat: _Catalog, cal: _Calendar
) -> tuple[_Events, pl.Series]:
    """Sessions, their events, orders and refunds; returns the events and each order's JSON."""
    rng = _rng(seed, "web")
    active = (people.end_day - people.start_day) / HISTORY_DAYS
    sessions = rng.poisson(_WEB_SESSIONS * people.engagement * active * people.uses_web)
    s_person = np.repeat(np.arange(people.n, dtype=np.int32), sessions)
    s_ts = _sample_ms(rng, cal, people.start_day[s_person], people.end_day[s_person], web=True)
    # Sessions in time order leave the events nearly sorted, so the final sort is cheap.
    by_time = np.argsort(s_ts, kind="stable")
    s_person, s_ts = s_person[by_time], s_ts[by_time]
    del by_time
    n_s = len(s_person)
    own = devices.start[s_person] + (rng.random(n_s) * devices.count[s_person]).astype(np.int64)
    partner = people.partner[s_person]
    shared = (partner >= 0) & (rng.random(n_s) < 0.3)
    shared &= people.uses_web[np.maximum(partner, 0)]
    s_device = np.where(shared, devices.start[np.maximum(partner, 0)], own).astype(np.int32)
    s_app = devices.platform[s_device] > 0
    # Each account holder has a habit of logging in; apps keep people logged in.
    habit = 0.35 + 0.55 * ((s_person.astype(np.int64) * 2654435761) % 1000) / 1000.0
    logged = people.has_account[s_person] & (rng.random(n_s) < np.where(s_app, 0.9, habit))
    use_dup = (crm.duplicate[s_person] >= 0) & (rng.random(n_s) < 0.25)
    account = np.where(use_dup, crm.duplicate[s_person], crm.primary[s_person])
    s_user = np.where(logged, account, -1).astype(np.int32)
    n_core = np.minimum(rng.geometric(0.33, n_s), 30)
    newsletter = ~logged & (rng.random(n_s) < 0.03)
    identify = (logged & (rng.random(n_s) < 0.3)) | newsletter
    ordered = rng.random(n_s) < np.where(logged, 0.09, 0.015)
    review = logged & (rng.random(n_s) < 0.015)
    n_ev = n_core + identify.astype(np.int64) + ordered + review
    first = _offsets(n_ev)[:-1]

    sess = np.repeat(np.arange(n_s, dtype=np.int32), n_ev)
    n_e = len(sess)
    r = rng.random(n_e, dtype=np.float32)
    page_kind = np.where(s_app, K_SCREEN, K_PAGE).astype(np.int8)[sess]
    kind = np.where(r < 0.45, page_kind, np.where(r < 0.85, K_VIEWED, K_ADDED)).astype(np.int8)
    del r, page_kind
    landing = first + identify
    kind[first[identify]] = K_IDENTIFY
    kind[landing] = np.where(s_app, K_SCREEN, K_PAGE)
    kind[(landing + n_core)[ordered]] = K_ORDER
    kind[(landing + n_core + ordered)[review]] = K_REVIEW
    gap = 4_000 + np.minimum(rng.standard_exponential(n_e, dtype=np.float32) * 40_000, 600_000)
    gap_ms = gap.astype(np.int64)
    gap_ms[first] = 0
    del gap
    cum = np.cumsum(gap_ms)
    del gap_ms
    ts = cum + np.repeat(s_ts - cum[first], n_ev)
    del cum
    person = s_person[sess]
    favourite = rng.random(n_e, dtype=np.float32) < 0.4
    category = np.where(
        favourite, people.favourite[person], _choice(rng, n_e, [c[5] for c in CATEGORIES])
    )
    sku = _pick_skus(rng, cat, category)
    del favourite, category
    u = _uniform16(rng, n_e)
    qty = (1 + (u < 0.12 * _Q).astype(np.int8) + (u < 0.03 * _Q)).astype(np.int8)
    noise = _choice(rng, n_e, _EMAIL_NOISE_WEB).astype(np.int8)
    ctx_traits = rng.random(n_e, dtype=np.float32) < 0.4
    with_phone = (rng.random(n_e, dtype=np.float32) < 0.4) & people.has_phone[person]
    flags = (ctx_traits * 1 + with_phone * 2 + newsletter[sess] * 4).astype(np.int8)
    del ctx_traits, with_phone
    aux = rng.integers(0, 1 << 20, n_e, dtype=np.int32)
    device, user = s_device[sess], s_user[sess]
    del sess

    keep = ts < _REF_MS
    if not keep.all():
        ts, kind, person, device, user = (
            ts[keep],
            kind[keep],
            person[keep],
            device[keep],
            user[keep],
        )
        sku, qty, noise, flags, aux = sku[keep], qty[keep], noise[keep], flags[keep], aux[keep]

    # Orders: their lines and revenue; refunds come later as events of their own.
    order_ev = np.flatnonzero(kind == K_ORDER)
    n_o = len(order_ev)
    o_lines = 1 + np.minimum(rng.poisson(1.3, n_o), 14)
    line_order = np.repeat(np.arange(n_o, dtype=np.int64), o_lines)
    n_l = len(line_order)
    l_cat = np.where(
        rng.random(n_l) < 0.5,
        people.favourite[person[order_ev][line_order]],
        _choice(rng, n_l, [c[5] for c in CATEGORIES]),
    )
    l_sku = _pick_skus(rng, cat, l_cat)
    l_qty = 1 + (rng.random(n_l) < 0.15).astype(np.int64)
    l_price = cat.price_cents[l_sku]
    l_price = np.where(rng.random(n_l) < 0.15, (l_price * 8 + 5) // 10, l_price)
    o_offsets = _offsets(o_lines)
    revenue = np.add.reduceat(l_qty * l_price, o_offsets[:-1]) if n_o else l_qty
    order = np.full(len(ts), -1, dtype=np.int32)
    order[order_ev] = np.arange(n_o)
    amount = np.zeros(len(ts), dtype=np.int32)
    amount[order_ev] = revenue
    refunded = np.flatnonzero(rng.random(n_o) < _WEB_REFUND)
    refund_ts = ts[order_ev[refunded]] + rng.integers(2 * _DAY_MS, 30 * _DAY_MS, len(refunded))
    in_window = refund_ts < _REF_MS
    refunded, refund_ts = refunded[in_window], refund_ts[in_window]
    partial = rng.random(len(refunded)) < 0.3
    share = rng.uniform(0.2, 0.8, len(refunded))
    refund_amount = np.where(
        partial, (revenue[refunded] * share).astype(np.int64), revenue[refunded]
    )
    src = order_ev[refunded]
    n_r = len(refunded)

    def add(values: Ints, extra: Ints) -> Ints:
        out: Ints = np.concatenate([values, extra.astype(values.dtype)])
        return out

    ts = np.concatenate([ts, refund_ts])
    sort = np.argsort(ts, kind="stable")
    all_kind = add(kind, np.full(n_r, K_REFUND))[sort]
    all_order = add(order, refunded)[sort]
    # Order numbers follow time: renumber the orders by when they were completed.
    number = np.empty(n_o, dtype=np.int64)
    number[all_order[all_kind == K_ORDER]] = np.arange(n_o)
    all_order = np.append(number, -1)[all_order].astype(np.int32)  # -1 stays -1
    events = _Events(
        ts=ts[sort],
        kind=all_kind,
        person=add(person, person[src])[sort],
        device=add(device, device[src])[sort],
        user=add(user, user[src])[sort],
        sku=add(sku, sku[src])[sort],
        qty=add(qty, qty[src])[sort],
        order=all_order,
        amount=add(amount, refund_amount)[sort],
        noise=add(noise, noise[src])[sort],
        flags=add(flags, np.zeros(n_r, np.int8))[sort],
        aux=add(aux, aux[src])[sort],
    )

    by_number = np.argsort(number[line_order], kind="stable")
    lines = pl.DataFrame(
        {
            "product": cat.product.gather(l_sku[by_number]),
            "price": l_price[by_number],
            "qty": l_qty[by_number],
        }
    )
    quantity = pl.col("qty").cast(pl.String)
    line_json = lines.select(
        _cat(pl.col("product"), ',"price":', _money(pl.col("price")), ',"quantity":', quantity, "}")
    )
    products = pl.Series(
        "products",
        pa.ListArray.from_arrays(
            pa.array(_offsets(o_lines[np.argsort(number, kind="stable")]), pa.int32()),
            line_json.to_series().to_arrow(),
        ),
    )
    o_revenue = np.empty(n_o, dtype=np.int64)
    o_revenue[number] = revenue
    order_json = pl.DataFrame(
        {"n": np.arange(1, n_o + 1), "rev": o_revenue, "products": products}
    ).select(
        _cat(
            '{"order_id":"W',
            pl.col("n").cast(pl.String).str.zfill(9),
            '","revenue":',
            _money(pl.col("rev")),
            ',"currency":"EUR","products":[',
            pl.col("products").list.join(","),
            "]}",
        )
    )
    return events, order_json.to_series()


_TRACK_NAMES: Final = {
    K_VIEWED: "Product Viewed",
    K_ADDED: "Product Added",
    K_ORDER: "Order Completed",
    K_REFUND: "Order Refunded",
    K_REVIEW: "Review Submitted",
}


@dataclass(slots=True)
class _WebTables:
    """Ready-made JSON fragments that web events are assembled from."""

    user: pl.Series  # per CRM record: "userId":"C0000001",  then "" for anonymous events
    names: pl.Series  # per person: "first_name":"Marie","last_name":"Dupont"
    pages: pl.Series  # per `_page_index`: page-view properties
    screens: pl.Series  # per `_page_index`: screen properties
    page_names: pl.Series  # per `_page_index`: the page or screen name


def _web_tables(people: _People, crm: _Crm, cat: _Catalog) -> _WebTables:
    static_page = [
        f'{{"path":"{path}","url":"{_SITE}{path}","title":"{name} | Maison Demo"}}'
        for name, path in zip(PAGES, _PAGE_PATHS, strict=True)
    ]
    category_page = [
        f'{{"path":"/c/{c[0]}","url":"{_SITE}/c/{c[0]}","title":"{c[0].title()} | Maison Demo"}}'
        for c in CATEGORIES
    ]
    names = [*PAGES, *(["Category"] * len(CATEGORIES)), *(["Product"] * N_SKUS)]
    user = _cat('"userId":"', pl.lit(crm.customer_id), '",')
    person_names = _cat(
        '"first_name":"',
        pl.lit(people.first_name),
        '","last_name":"',
        pl.lit(people.last_name),
        '"',
    )
    return _WebTables(
        user=pl.concat([pl.select(user).to_series(), pl.Series([""])]),
        names=pl.select(person_names).to_series(),
        pages=pl.concat([pl.Series(static_page), pl.Series(category_page), cat.page_json]),
        screens=pl.concat(
            [
                pl.Series(["{}"] * len(PAGES)),
                pl.Series([f'{{"category":"{c[0]}"}}' for c in CATEGORIES]),
                pl.select(_cat('{"sku":"', pl.lit(cat.sku), '"}')).to_series(),
            ]
        ),
        page_names=pl.Series(names),
    )


def _page_index(aux: Ints, sku: Ints, category: Ints) -> I64:
    """Which page a page or screen event shows: a static page, a category or a product."""
    page = _table(_PAGE_P)[aux % _Q]
    out: I64 = np.where(
        page == 1,
        len(PAGES) + category,
        np.where(page == 2, len(PAGES) + len(CATEGORIES) + sku, page),
    )
    return out


def _web_lines(
    seed: int,
    ev: _Events,
    a: int,
    b: int,
    people: _People,
    devices: _Devices,
    cat: _Catalog,
    order_json: pl.Series,
    tables: _WebTables,
) -> tuple[pl.Series, pl.Series]:
    """The NDJSON lines of events a..b-1, and their messageIds."""
    message, message_id = _message_pieces(seed, a, ev.ts[a:b])
    sku = ev.sku[a:b]
    frame = pl.DataFrame(
        {
            "row": np.arange(a, b),
            "kind": ev.kind[a:b],
            "message": message,
            "ts": ev.ts[a:b],
            "user": ev.user[a:b],
            "device": ev.device[a:b],
            "person": ev.person[a:b],
            "sku": sku,
            "qty": ev.qty[a:b],
            "order": ev.order[a:b],
            "amount": ev.amount[a:b],
            "noise": ev.noise[a:b],
            "flags": ev.flags[a:b],
            "aux": ev.aux[a:b],
            "page": _page_index(ev.aux[a:b], sku, cat.category[sku]),
        }
    )
    parts = [
        _kind_lines(
            int(k), frame.filter(pl.col("kind") == k), people, devices, cat, order_json, tables
        )
        for k in np.unique(ev.kind[a:b])
    ]
    if not parts:
        return pl.Series("line", [], pl.String), message_id
    done = pl.concat(pl.collect_all(parts), rechunk=False)
    order = np.empty(b - a, dtype=np.int64)
    order[done["row"].to_numpy() - a] = np.arange(b - a)
    return done["line"].gather(order), message_id


def _kind_lines(
    kind: int,
    part: pl.DataFrame,
    people: _People,
    devices: _Devices,
    cat: _Catalog,
    order_json: pl.Series,
    tables: _WebTables,
) -> pl.LazyFrame:
    """The NDJSON line of every event of one kind, by row."""
    person = part["person"].to_numpy()
    user = part["user"].to_numpy()
    cols: dict[str, pl.Series] = {
        # The last entry of tables.user is "": anonymous events have no userId.
        "user_json": tables.user.gather(np.where(user >= 0, user, len(tables.user) - 1)),
        "device_json": devices.json.gather(part["device"].to_numpy()),
    }
    if kind in (K_IDENTIFY, K_ORDER):
        cols["email"] = people.email.gather(person)
    if kind == K_IDENTIFY:
        cols["names"] = tables.names.gather(person)
        cols["national"] = people.phone_national.gather(person)
    elif kind in (K_VIEWED, K_ADDED):
        cols["product"] = cat.json.gather(part["sku"].to_numpy())
    elif kind == K_ORDER:
        cols["order_json"] = order_json.gather(part["order"].to_numpy())
    elif kind in (K_PAGE, K_SCREEN):
        page = part["page"].to_numpy()
        cols["props"] = (tables.pages if kind == K_PAGE else tables.screens).gather(page)
        cols["name"] = tables.page_names.gather(page)
    elif kind == K_REVIEW:
        cols["sku_id"] = cat.sku.gather(part["sku"].to_numpy())

    flag = pl.col("flags")
    type_ = {K_PAGE: "page", K_SCREEN: "screen", K_IDENTIFY: "identify"}.get(kind, "track")
    event = f',"event":"{_TRACK_NAMES[kind]}"' if kind in _TRACK_NAMES else ""
    pieces: list[pl.Expr] = [pl.lit(f'{{"type":"{type_}"{event}')]
    if kind in (K_PAGE, K_SCREEN):
        pieces.append(_cat(',"name":"', pl.col("name"), '"'))
    pieces += [
        pl.col("message"),
        pl.col("user_json"),
        pl.col("device_json"),
    ]
    email = _noisy_email(pl.col("email"), pl.col("noise"))
    context_traits = _cat(',"traits":{"email":"', email, '"}')
    if kind == K_ORDER:
        # Guests check out with an email; logged-in buyers are known by their userId.
        pieces.append(pl.when(pl.col("user_json") == "").then(context_traits))
    elif kind == K_IDENTIFY:
        pieces.append(pl.when(flag % 2 == 1).then(context_traits))
    pieces.append(pl.lit("}"))
    money = ',"currency":"EUR"}}'
    if kind == K_IDENTIFY:
        phone = _noisy_phone(pl.col("national"), pl.col("aux") % 10)
        signed_in = pl.concat_str(
            [
                _cat(',"traits":{"email":"', email, '",'),
                pl.col("names"),
                pl.when(flag // 2 % 2 == 1).then(_cat(',"phone":"', phone, '"')),
                pl.lit("}}"),
            ],
            ignore_nulls=True,
        )
        newsletter = _cat(',"traits":{"email":"', email, '","email_opt_in":true}}')
        pieces.append(pl.when(flag // 4 % 2 == 1).then(newsletter).otherwise(signed_in))
    elif kind in (K_PAGE, K_SCREEN):
        pieces.append(_cat(',"properties":', pl.col("props"), "}"))
    elif kind == K_VIEWED:
        pieces.append(_cat(',"properties":', pl.col("product"), money))
    elif kind == K_ADDED:
        qty = pl.col("qty").cast(pl.String)
        pieces.append(_cat(',"properties":', pl.col("product"), ',"quantity":', qty, money))
    elif kind == K_ORDER:
        pieces.append(_cat(',"properties":', pl.col("order_json"), "}"))
    elif kind == K_REFUND:
        order_id = (pl.col("order") + 1).cast(pl.String).str.zfill(9)
        revenue = _money(pl.col("amount"))
        pieces.append(
            _cat(',"properties":{"order_id":"W', order_id, '","revenue":', revenue, money)
        )
    elif kind == K_REVIEW:
        rating = (5 - (pl.col("aux") % 16).clip(0, 4) // 2).cast(pl.String)
        review_id = pl.col("row").cast(pl.String).str.zfill(10)
        pieces.append(
            _cat(
                ',"properties":{"sku":"',
                pl.col("sku_id"),
                '","review_id":"R',
                review_id,
                '","rating":',
                rating,
                "}}",
            )
        )
    # Skipping nulls costs time; only identify and order lines have optional parts.
    line = pl.concat_str(pieces, ignore_nulls=kind in (K_IDENTIFY, K_ORDER))
    return part.with_columns(**cols).lazy().select("row", line=line)


def _write_web(
    seed: int,
    people: _People,
    crm: _Crm,
    devices: _Devices,
    cat: _Catalog,
    cal: _Calendar,
    out: Path,
    records: _ParquetSink,
    chunk_rows: int,
) -> int:
    ev, order_json = _web_events(seed, people, crm, devices, cat, cal)
    tables = _web_tables(people, crm, cat)
    n = len(ev.ts)

    def build(a: int) -> tuple[pl.Series, pa.Table]:
        b = min(a + chunk_rows, n)
        lines, message_id = _web_lines(seed, ev, a, b, people, devices, cat, order_json, tables)
        return lines, _records(SOURCE_WEB, message_id, ev.person[a:b], people)

    with (out / WEB_FILE).open("wb") as fh:

        def write(chunk: tuple[pl.Series, pa.Table]) -> None:
            chunk[0].to_frame().write_csv(fh, include_header=False, quote_style="never")
            records.write(chunk[1])

        _pipelined(range(0, n, chunk_rows), build, write)
    return n


def _write_truth(
    people: _People, crm: _Crm, devices: _Devices, store_ids: pl.Series, out: Path
) -> tuple[int, int]:
    household = people.partner.copy()
    partners = np.flatnonzero(people.partner >= 0)
    household[people.partner[partners]] = partners
    e164 = pl.select(pl.lit("+33") + pl.lit(people.phone_national)).to_series()
    persons = pl.DataFrame(
        {
            "person_id": people.person_id,
            "customer_id": _take(crm.customer_id, crm.primary),
            "duplicate_customer_id": _take(crm.customer_id, crm.duplicate),
            "loyalty_card": people.card,
            "email": people.email,
            "phone": _mask(e164, people.has_phone),
            "first_name": people.first_name,
            "last_name": people.last_name,
            "birth_date": pl.Series(people.birth_day).cast(pl.Int32).cast(pl.Date),
            "postcode": people.postcode,
            "home_store_id": store_ids.gather(people.store),
            "household_partner_id": _take(people.person_id, household),
            "in_crm": people.in_crm,
            "is_member": people.member,
            "shops_in_store": people.shops_store,
            "uses_web": people.uses_web,
            "has_web_account": people.has_account,
        }
    )
    persons.write_parquet(out / PERSONS_FILE, compression="zstd")
    # A household partner who browses uses the owner's first device now and then.
    owner = np.maximum(people.partner, 0)
    borrowers = np.flatnonzero((people.partner >= 0) & people.uses_web & people.uses_web[owner])
    shared_with = np.full(len(devices.person), -1, dtype=np.int64)
    shared_with[devices.start[people.partner[borrowers]]] = borrowers
    device_frame = pl.DataFrame(
        {
            "anonymous_id": devices.anonymous_id,
            "device_id": devices.device_id,
            "platform": pl.Series(["web", "ios", "android"]).gather(devices.platform),
            "person_id": people.person_id.gather(devices.person),
            "shared_with_person_id": _take(people.person_id, shared_with),
        }
    )
    device_frame.write_parquet(out / DEVICES_FILE, compression="zstd")
    return persons.height, device_frame.height


def _stores(seed: int) -> tuple[pl.Series, I64]:
    """Store ids and the department each store is in."""
    rng = _rng(seed, "stores")
    dept = np.array([d[0] for d in DEPARTMENTS], dtype=np.int64)
    where: I64 = dept[_choice(rng, N_STORES, [d[1] for d in DEPARTMENTS])]
    return _ids("S", np.arange(1, N_STORES + 1), 3), where


def generate(
    *,
    customers: int,
    seed: int,
    out: Path,
    progress: Console | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> dict[str, object]:
    """Write the sample data set for `customers` persons under `out`; return a JSON summary."""
    if customers < 1:
        raise ValueError("customers must be at least 1")
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be at least 1")
    out = Path(out)
    (out / "sources").mkdir(parents=True, exist_ok=True)
    (out / "ground_truth").mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    steps = _Progress(progress)
    cat = _catalog(seed)
    cal = _calendar()
    store_ids, store_dept = _stores(seed)
    people = _people(seed, customers, store_dept)
    steps.done("persons", customers)
    rows: dict[str, int] = {}
    # Record keys are unique and nobody filters on them: no dictionary, no statistics.
    with _parquet_sink(
        out / RECORDS_FILE, use_dictionary=["source"], write_statistics=False
    ) as records:
        crm = _write_crm(seed, people, out, records)
        rows[CRM_FILE] = len(crm.person)
        steps.done(CRM_FILE, rows[CRM_FILE])
        rows[TILL_FILE] = _write_till(seed, people, cat, cal, store_ids, out, records, chunk_rows)
        steps.done(TILL_FILE, rows[TILL_FILE])
        devices = _devices(seed, people)
        rows[WEB_FILE] = _write_web(seed, people, crm, devices, cat, cal, out, records, chunk_rows)
        steps.done(WEB_FILE, rows[WEB_FILE])
    rows[RECORDS_FILE] = records.rows
    rows[PERSONS_FILE], rows[DEVICES_FILE] = _write_truth(people, crm, devices, store_ids, out)
    steps.done("ground_truth/", rows[RECORDS_FILE] + rows[PERSONS_FILE] + rows[DEVICES_FILE])
    seconds = time.perf_counter() - steps.started
    sizes = {name: (out / name).stat().st_size for name in FILES}
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "customers": customers,
        "seed": seed,
        "reference_date": REFERENCE_DATE.isoformat().replace("+00:00", "Z"),
        "history_days": HISTORY_DAYS,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "files": {name: {"rows": rows[name], "bytes": sizes[name]} for name in FILES},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    total = sum(rows.values())
    return {
        "out": str(out),
        "customers": customers,
        "seed": seed,
        "files": {
            name: {"path": str(out / name), "rows": rows[name], "bytes": sizes[name]}
            for name in FILES
        },
        "source_rows": rows[CRM_FILE] + rows[TILL_FILE] + rows[WEB_FILE],
        "rows": total,
        "seconds": round(seconds, 3),
        "rows_per_second": round(total / seconds) if seconds > 0 else None,
    }


def is_generated(out: Path, *, customers: int, seed: int) -> bool:
    """True when `out` holds a complete data set of this generator for customers and seed."""
    try:
        manifest = json.loads((Path(out) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict):
        return False
    expected = {"generator_version": GENERATOR_VERSION, "customers": customers, "seed": seed}
    if any(manifest.get(key) != value for key, value in expected.items()):
        return False
    files = manifest.get("files")
    if not isinstance(files, dict):
        return False
    for name in FILES:
        entry = files.get(name)
        path = Path(out) / name
        if not isinstance(entry, dict) or not path.is_file():
            return False
        if path.stat().st_size != entry.get("bytes"):
            return False
    return True
