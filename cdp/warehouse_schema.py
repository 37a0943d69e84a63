"""Versioned DDL of the warehouse, applied in order by `Warehouse.migrate()`.

Never edit an applied migration: add a new version. Timestamps are `TIMESTAMP` holding
UTC. Every table here is owned by one domain package, named in the migration. Each package
numbers its steps in its own range, applied in version order: 1-9 ingestion, 10-19 identity,
20-29 segments, 30-39 loyalty, 40-49 dashboards.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WarehouseMigration:
    """One step of the warehouse schema."""

    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS: list[WarehouseMigration] = [
    WarehouseMigration(
        1,
        "ingestion: events, identifiers and load batches",
        (
            # One row per accepted message. event_id is assigned by the loader from a
            # monotonic counter, so `event_id > mark` is the high-water mark that identity
            # and loyalty use to process only new events.
            """
            CREATE TABLE events (
                event_id BIGINT NOT NULL,
                message_id VARCHAR NOT NULL,
                source_id VARCHAR NOT NULL,
                batch_id BIGINT NOT NULL,
                type VARCHAR NOT NULL,
                event VARCHAR,
                user_id VARCHAR,
                anonymous_id VARCHAR,
                timestamp TIMESTAMP NOT NULL,
                received_at TIMESTAMP NOT NULL,
                properties JSON,
                traits JSON,
                context JSON
            )
            """,
            # Normalised identifiers of each event (kind, value), written with the events.
            """
            CREATE TABLE event_identifiers (
                event_id BIGINT NOT NULL,
                kind VARCHAR NOT NULL,
                value VARCHAR NOT NULL
            )
            """,
            # One row per committed load; published so later layers can work incrementally.
            """
            CREATE TABLE ingest_batches (
                batch_id BIGINT PRIMARY KEY,
                source_id VARCHAR NOT NULL,
                channel VARCHAR NOT NULL,
                first_event_id BIGINT,
                last_event_id BIGINT,
                events BIGINT NOT NULL,
                committed_at TIMESTAMP NOT NULL
            )
            """,
        ),
    ),
    WarehouseMigration(
        2,
        "ingestion: dedupe keys, rejections, load counters, Segment fields",
        (
            # One row per stored message: md5 of (source id, message id) as a 128-bit number.
            # Narrow on purpose: dedupe anti-joins scan it on every load.
            "CREATE TABLE ingest_message_keys (message_key UHUGEINT NOT NULL)",
            # Every rejected message or row, with its position in the request or file.
            """
            CREATE TABLE ingest_rejections (
                source_id VARCHAR NOT NULL,
                channel VARCHAR NOT NULL,
                batch_id BIGINT,
                import_id VARCHAR,
                position BIGINT,
                message_id VARCHAR,
                reason VARCHAR NOT NULL,
                rejected_at TIMESTAMP NOT NULL
            )
            """,
            # Counters of each load per source, beside the published ingest_batches row
            # (kept apart so the version-1 tables keep their exact columns).
            """
            CREATE TABLE ingest_batch_stats (
                batch_id BIGINT PRIMARY KEY,
                source_id VARCHAR NOT NULL,
                received BIGINT NOT NULL,
                duplicates BIGINT NOT NULL,
                rejected BIGINT NOT NULL,
                identifiers_dropped BIGINT NOT NULL
            )
            """,
            # Segment fields of tracking messages that are not `events` columns.
            """
            CREATE TABLE event_segment_fields (
                event_id BIGINT NOT NULL,
                sent_at TIMESTAMP,
                original_timestamp TIMESTAMP,
                previous_id VARCHAR,
                group_id VARCHAR
            )
            """,
        ),
    ),
    WarehouseMigration(
        3,
        "ingestion: the tracking spool's load mark",
        (
            # The highest sequence number of the tracking API's spool whose records are
            # loaded; updated in the same transaction as the load (one row).
            "CREATE TABLE ingest_spool_mark (drained_lsn BIGINT NOT NULL)",
            "INSERT INTO ingest_spool_mark VALUES (0)",
        ),
    ),
    WarehouseMigration(
        10,
        "identity: identifier graph, profile ids, merges, decisions and profiles",
        (
            # One row per normalised identifier (a node of the graph). node_id is a hash of
            # (kind, value), not a first-seen counter, so labelling never meets ordered chains.
            # component_id is the raw connected component (all links), profile_id the profile
            # after rules; both NULL-free for active nodes, profile_id NULL when blocked.
            """
            CREATE TABLE identity_nodes (
                node_id BIGINT NOT NULL,
                kind VARCHAR NOT NULL,
                value VARCHAR NOT NULL,
                rank INTEGER NOT NULL,
                status VARCHAR NOT NULL,
                component_id BIGINT NOT NULL,
                profile_id VARCHAR,
                first_event_id BIGINT NOT NULL,
                first_seen TIMESTAMP NOT NULL,
                last_seen TIMESTAMP NOT NULL
            )
            """,
            # The append-only link log: one row per distinct pair (src < dst), with the first
            # event that linked them.
            """
            CREATE TABLE identity_edges (
                src BIGINT NOT NULL,
                dst BIGINT NOT NULL,
                first_event_id BIGINT NOT NULL,
                first_at TIMESTAMP NOT NULL
            )
            """,
            # Which identifiers each event carries, as node ids (integer joins from events to
            # profiles: the profile of an event is that of its most trusted identifier).
            """
            CREATE TABLE identity_event_nodes (
                event_id BIGINT NOT NULL,
                node_id BIGINT NOT NULL
            )
            """,
            # Every profile id ever issued; merged-away ids point at their survivor.
            """
            CREATE TABLE identity_profile_ids (
                profile_id VARCHAR NOT NULL,
                born_event_id BIGINT NOT NULL,
                created_at TIMESTAMP NOT NULL,
                merged_into VARCHAR,
                merged_at TIMESTAMP
            )
            """,
            # The publication of merges and splits, read by loyalty and segments by seq.
            """
            CREATE TABLE profile_merges (
                seq BIGINT NOT NULL,
                kind VARCHAR NOT NULL,
                from_profile_id VARCHAR NOT NULL,
                to_profile_id VARCHAR NOT NULL,
                occurred_at TIMESTAMP NOT NULL,
                reason VARCHAR NOT NULL,
                event_id BIGINT,
                src_node BIGINT,
                dst_node BIGINT
            )
            """,
            # Rule decisions of the current state: links not used and identifiers blocked.
            """
            CREATE TABLE identity_decisions (
                component_id BIGINT NOT NULL,
                decision VARCHAR NOT NULL,
                node_id BIGINT NOT NULL,
                other_node_id BIGINT,
                event_id BIGINT,
                detail VARCHAR NOT NULL,
                decided_at TIMESTAMP NOT NULL
            )
            """,
            # Marks and counters of the resolver (last event processed, merge seq, rules hash).
            """
            CREATE TABLE identity_state (
                name VARCHAR PRIMARY KEY,
                number BIGINT,
                text VARCHAR
            )
            """,
            # Unmerge decisions of admins: an identifier detached from every link, or one link
            # removed, until lifted. `version` grows on every change so the resolver sees it.
            """
            CREATE TABLE identity_link_overrides (
                override_id BIGINT NOT NULL,
                version BIGINT NOT NULL,
                action VARCHAR NOT NULL,
                src BIGINT NOT NULL,
                dst BIGINT,
                profile_id VARCHAR,
                reason VARCHAR,
                created_at TIMESTAMP NOT NULL,
                created_by VARCHAR,
                lifted_at TIMESTAMP,
                lifted_by VARCHAR
            )
            """,
            # SHA-256 of erased identifiers (`kind` + US + `value`): never resolved again until
            # the person comes back with a new consent (`lifted_at`).
            """
            CREATE TABLE identity_suppressions (
                identifier_hash VARCHAR NOT NULL,
                kind VARCHAR NOT NULL,
                profile_id VARCHAR,
                created_at TIMESTAMP NOT NULL,
                lifted_at TIMESTAMP
            )
            """,
            # The publication of erased profiles, read by seq: loyalty anonymises its records.
            """
            CREATE TABLE profile_erasures (
                seq BIGINT NOT NULL,
                profile_id VARCHAR NOT NULL,
                erased_at TIMESTAMP NOT NULL
            )
            """,
            # One row per live profile, rebuilt for the profiles each resolution touches.
            """
            CREATE TABLE profiles (
                profile_id VARCHAR NOT NULL,
                created_at TIMESTAMP NOT NULL,
                updated_at TIMESTAMP NOT NULL,
                first_seen TIMESTAMP,
                last_seen TIMESTAMP,
                event_count BIGINT NOT NULL,
                identifiers JSON NOT NULL,
                traits JSON NOT NULL
            )
            """,
        ),
    ),
    WarehouseMigration(
        20,
        "segments: computed attributes, field catalogue, membership and its history",
        (
            # One row per live profile; the refresh replaces the whole table with one column
            # per attribute definition (names from the validated definitions).
            """
            CREATE TABLE profile_attributes (
                profile_id VARCHAR NOT NULL,
                computed_at TIMESTAMP NOT NULL
            )
            """,
            # Trait keys seen in profiles and event names / top-level property keys seen in
            # events, with their inferred types: the catalogue rules are checked against.
            """
            CREATE TABLE segment_trait_catalog (
                trait VARCHAR NOT NULL,
                type VARCHAR NOT NULL,
                profiles BIGINT NOT NULL
            )
            """,
            """
            CREATE TABLE segment_event_catalog (
                event VARCHAR NOT NULL,
                property VARCHAR,
                type VARCHAR,
                events BIGINT NOT NULL
            )
            """,
            # The event -> profile map as of the last attribute refresh, with the profiles
            # watermark it was built at (segment_state); event conditions use it while current.
            """
            CREATE TABLE segment_event_profiles (
                event_id BIGINT NOT NULL,
                profile_id VARCHAR NOT NULL
            )
            """,
            # Current members of each saved segment.
            """
            CREATE TABLE segment_membership (
                segment_id VARCHAR NOT NULL,
                profile_id VARCHAR NOT NULL,
                entered_at TIMESTAMP NOT NULL,
                PRIMARY KEY (segment_id, profile_id)
            )
            """,
            # Entries and exits of every refresh, numbered by seq: the publication read by
            # activation and loyalty (`seq > mark`).
            """
            CREATE TABLE segment_events (
                seq BIGINT NOT NULL,
                segment_id VARCHAR NOT NULL,
                profile_id VARCHAR NOT NULL,
                kind VARCHAR NOT NULL,
                occurred_at TIMESTAMP NOT NULL,
                refresh_id BIGINT NOT NULL,
                segment_version INTEGER NOT NULL
            )
            """,
            # One row per refresh of a segment: its size over time.
            """
            CREATE TABLE segment_refreshes (
                refresh_id BIGINT NOT NULL,
                segment_id VARCHAR NOT NULL,
                segment_version INTEGER NOT NULL,
                refreshed_at TIMESTAMP NOT NULL,
                size BIGINT NOT NULL,
                entries BIGINT NOT NULL,
                exits BIGINT NOT NULL
            )
            """,
            # Marks of the segments package (what the last attribute refresh saw).
            """
            CREATE TABLE segment_state (
                name VARCHAR PRIMARY KEY,
                text VARCHAR,
                updated_at TIMESTAMP
            )
            """,
        ),
    ),
    WarehouseMigration(
        21,
        "segments: nested paths in the catalogue (incremental), incremental membership refresh",
        (
            # Value counts per JSON path (nested: `address.city`, list elements:
            # `products[].category`) by JSON type; the field type is derived when read. The
            # event catalogue accumulates over new events (mark in segment_state); path '' is
            # the event name itself (events = how many).
            "DROP TABLE segment_trait_catalog",
            """
            CREATE TABLE segment_trait_catalog (
                path VARCHAR NOT NULL,
                profiles BIGINT NOT NULL,
                numbers BIGINT NOT NULL,
                booleans BIGINT NOT NULL,
                strings BIGINT NOT NULL,
                timestamps BIGINT NOT NULL,
                objects BIGINT NOT NULL,
                arrays BIGINT NOT NULL
            )
            """,
            "DROP TABLE segment_event_catalog",
            """
            CREATE TABLE segment_event_catalog (
                event VARCHAR NOT NULL,
                path VARCHAR NOT NULL,
                events BIGINT NOT NULL,
                numbers BIGINT NOT NULL,
                booleans BIGINT NOT NULL,
                strings BIGINT NOT NULL,
                timestamps BIGINT NOT NULL,
                objects BIGINT NOT NULL,
                arrays BIGINT NOT NULL
            )
            """,
            "DELETE FROM segment_state WHERE name = 'catalog_refreshed'",
            # The event map gains each event's name and time, and is sorted by them: an event
            # condition scans its event's rows in its window only.
            "DROP TABLE segment_event_profiles",
            """
            CREATE TABLE segment_event_profiles (
                event VARCHAR NOT NULL,
                timestamp TIMESTAMP NOT NULL,
                event_id BIGINT NOT NULL,
                profile_id VARCHAR NOT NULL
            )
            """,
            "DELETE FROM segment_state WHERE name = 'event_profiles_watermark'",
            # How each refresh evaluated the rule: 'full' or 'incremental', and how many
            # profiles it evaluated.
            "ALTER TABLE segment_refreshes ADD COLUMN mode VARCHAR DEFAULT 'full'",
            "ALTER TABLE segment_refreshes ADD COLUMN evaluated BIGINT",
            # What the last refresh of each segment saw, so the next one can evaluate only the
            # profiles changed since: the compiled condition's fingerprint and the marks
            # (max `profiles.updated_at`, and the one the attributes were computed at).
            """
            CREATE TABLE segment_refresh_marks (
                segment_id VARCHAR PRIMARY KEY,
                fingerprint VARCHAR NOT NULL,
                profiles_mark TIMESTAMP,
                attributes_mark TIMESTAMP,
                attributes_digest VARCHAR
            )
            """,
        ),
    ),
    WarehouseMigration(
        22,
        "segments: materialised property values of order events",
        (
            # The value(s) at each catalogued field path of the purchase and refund events'
            # properties, as `json_extract_string` gives them (one row per list element,
            # NULLs left out), for the events up to a mark (segment_state
            # `property_values_mark`): event conditions read them instead of parsing JSON.
            """
            CREATE TABLE segment_property_values (
                event VARCHAR NOT NULL,
                path VARCHAR NOT NULL,
                timestamp TIMESTAMP,
                event_id BIGINT NOT NULL,
                value VARCHAR NOT NULL
            )
            """,
            # The (event, path) pairs held there, each complete up to the mark (per path
            # since version 23).
            """
            CREATE TABLE segment_property_paths (
                event VARCHAR NOT NULL,
                path VARCHAR NOT NULL,
                PRIMARY KEY (event, path)
            )
            """,
        ),
    ),
    WarehouseMigration(
        23,
        "segments: each materialised property path keeps its own mark",
        (
            # `upto`: the path's values are complete for the events up to this id. A path of an
            # event that stops being the purchase or refund event keeps its rows and its mark
            # (never deleted under a compiled rule that reads them); paths of events still
            # wanted move on together. Existing paths start at the package's mark.
            """
            CREATE TABLE segment_property_paths_v23 (
                event VARCHAR NOT NULL,
                path VARCHAR NOT NULL,
                upto BIGINT NOT NULL,
                PRIMARY KEY (event, path)
            )
            """,
            """
            INSERT INTO segment_property_paths_v23
            SELECT event, path, coalesce((
                SELECT max(TRY_CAST(text AS BIGINT)) FROM segment_state
                WHERE name = 'property_values_mark'
            ), 0)
            FROM segment_property_paths
            """,
            "DROP TABLE segment_property_paths",
            "ALTER TABLE segment_property_paths_v23 RENAME TO segment_property_paths",
        ),
    ),
    WarehouseMigration(
        30,
        "loyalty: member snapshot for the segment field catalogue",
        (
            # One row per (programme, profile) membership that is not merged away, rewritten
            # by `loyalty.service.publish_member_snapshot` (job `loyalty.publish_snapshot` and
            # after each sync). `balance` is the spendable (active) balance at `refreshed_at`;
            # `enrolled` is true while the membership is active.
            """
            CREATE TABLE loyalty_member_snapshot (
                program_id VARCHAR NOT NULL,
                program_created_at TIMESTAMP NOT NULL,
                profile_id VARCHAR NOT NULL,
                member_id VARCHAR NOT NULL,
                status VARCHAR NOT NULL,
                enrolled BOOLEAN NOT NULL,
                enrolled_at TIMESTAMP NOT NULL,
                tier VARCHAR,
                balance BIGINT NOT NULL,
                refreshed_at TIMESTAMP NOT NULL
            )
            """,
        ),
    ),
    WarehouseMigration(
        40,
        "dashboards: daily KPI snapshots",
        (
            # One row per metric, day, breakdown value and programme, written by the
            # `dashboards.kpi_snapshots` job; the KPI API reads it for days whose raw data is
            # gone. breakdown = '' means no breakdown (key is NULL); program_id = '' means all
            # programmes.
            """
            CREATE TABLE kpi_snapshots (
                metric VARCHAR NOT NULL,
                day DATE NOT NULL,
                breakdown VARCHAR NOT NULL,
                key VARCHAR,
                program_id VARCHAR NOT NULL,
                value DOUBLE NOT NULL,
                taken_at TIMESTAMP NOT NULL
            )
            """,
        ),
    ),
    WarehouseMigration(
        41,
        "dashboards: order facts",
        (
            # One row per `Order Completed` event with its amount parsed once from the
            # properties (`total`, else `revenue`, else 0), appended by
            # `dashboards.order_facts.refresh` for the events after the high-water mark below.
            # No profile is stored: readers resolve the buyer through identity's event ->
            # profile relation at query time, so merges and unmerges need no rewrite.
            """
            CREATE TABLE dashboards_order_facts (
                event_id BIGINT NOT NULL,
                ordered_at TIMESTAMP NOT NULL,
                amount DOUBLE NOT NULL
            )
            """,
            # One row: the highest event id the order facts have looked at (events above it
            # are read from `events` directly).
            """
            CREATE TABLE dashboards_order_facts_state (
                mark BIGINT NOT NULL,
                refreshed_at TIMESTAMP NOT NULL
            )
            """,
        ),
    ),
]
