"""DuckDB SQL of the identity package, as `Query` objects.

The resolver runs these on one cursor inside one transaction; names starting with `id_` are
temporary tables of that run. Each statement is one set-based step.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from cdp.warehouse import Cursor, Query, with_ctes

# Node ids are a stable 60-bit hash of (kind, value), the same in every engine with md5:
#   ('0x' || left(md5(kind || chr(31) || value), 15))::BIGINT
# The suppression list stores sha256(kind || chr(31) || value). Kinds missing from the
# priority list rank 1000000. These are spelt out in each statement (no SQL is assembled).
NO_RANK = 1_000_000

_PARAM = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


def run_script(cur: Cursor, query: Query) -> tuple[Any, ...] | None:  # Any: SQL values
    """Run the `;`-separated statements of a query in order, each with the parameters it names.

    DuckDB binds parameters only to the last statement of a multi-statement string, so the
    steps of one logical operation are sent one by one. Returns the first row of the last one.
    """
    row: tuple[Any, ...] | None = None  # Any: SQL values
    for statement in query.sql.split(";\n"):
        if not statement.strip():
            continue
        names = set(_PARAM.findall(statement))
        params = {k: v for k, v in query.params.items() if k in names}
        rows = cur.execute(statement, params or None).fetchall()
        row = rows[0] if rows else None
    return row


STATE_MARK = "last_event_id"
STATE_SEQ = "merge_seq"
STATE_RULES = "rules_fingerprint"
STATE_OVERRIDES = "override_version"
# The highest override id ever issued, recorded by an erasure before it deletes overrides:
# an id is never reused, so an admin lifting an old (erased) decision by its id cannot hit a
# newer one.
STATE_OVERRIDE_IDS = "override_id"
# Bumped in the same transaction as every write to `profiles` (resolution, erasure): later
# layers compare it instead of scanning the table to know whether profiles changed.
STATE_PROFILES_VERSION = "profiles_version"


def read_state() -> Query:
    """Every counter of the resolver."""
    return Query("SELECT name, number, text FROM identity_state")


def write_state(name: str, *, number: int | None = None, text: str | None = None) -> Query:
    """Set one counter of the resolver."""
    return Query(
        "INSERT OR REPLACE INTO identity_state VALUES ($name, $number, $text)",
        {"name": name, "number": number, "text": text},
    )


PROFILES_VERSION_SQL = (
    "SELECT coalesce(max(number), 0) FROM identity_state WHERE name = 'profiles_version'"
)

BUMP_PROFILES_VERSION = Query(
    "INSERT OR REPLACE INTO identity_state "
    "SELECT 'profiles_version', (" + PROFILES_VERSION_SQL + ") + 1, NULL"
)


def pattern_runs(pattern: str) -> Query:
    """Whether the warehouse's regular expressions (RE2) accept a pattern: `try` turns the
    compile error of a pattern RE2 rejects (look-arounds, backreferences) into NULL."""
    return Query("SELECT try(regexp_full_match('', $pattern)) IS NOT NULL", {"pattern": pattern})


MAX_EVENT_ID = Query("SELECT coalesce(max(event_id), 0) FROM event_identifiers")
MAX_OVERRIDE_VERSION = Query("SELECT coalesce(max(version), 0) FROM identity_link_overrides")
# The version of an override created or lifted now: above every stored version and above the
# last one the resolver saw. An erasure deletes the overrides naming the person's identifiers,
# so the stored maximum can go back; a version at or below the resolver's mark would be
# taken for one it already applied, and the decision would be ignored.
_NEXT_OVERRIDE_VERSION = """
    greatest(
        (SELECT coalesce(max(version), 0) FROM identity_link_overrides),
        (SELECT coalesce(max(number), 0) FROM identity_state WHERE name = 'override_version')
    ) + 1
"""


# Copies of Arrow/Polars frames registered as `<name>_frame` into temp tables of the run.
FRAME_COPIES = {
    "id_kind_rank": Query(
        "CREATE OR REPLACE TEMP TABLE id_kind_rank AS SELECT * FROM id_kind_rank_frame"
    ),
    "id_block_values": Query(
        "CREATE OR REPLACE TEMP TABLE id_block_values AS SELECT * FROM id_block_values_frame"
    ),
    "id_block_patterns": Query(
        "CREATE OR REPLACE TEMP TABLE id_block_patterns AS SELECT * FROM id_block_patterns_frame"
    ),
    "id_trait_sources": Query(
        "CREATE OR REPLACE TEMP TABLE id_trait_sources AS SELECT * FROM id_trait_sources_frame"
    ),
    "id_labels": Query("CREATE OR REPLACE TEMP TABLE id_labels AS SELECT * FROM id_labels_frame"),
    "id_refusals": Query(
        "CREATE OR REPLACE TEMP TABLE id_refusals AS SELECT * FROM id_refusals_frame"
    ),
    "id_used_links": Query(
        "CREATE OR REPLACE TEMP TABLE id_used_links AS SELECT * FROM id_used_links_frame"
    ),
    "sql_edges": Query("CREATE OR REPLACE TEMP TABLE sql_edges AS SELECT * FROM sql_edges_frame"),
}


ACTIVE_SUPPRESSIONS = Query("SELECT count(*) FROM identity_suppressions WHERE lifted_at IS NULL")


def new_event_identifiers(
    mark: int, up_to: int, *, suppressions: bool = True, node_ids: bool = False
) -> Query:
    """Identifiers of the events after the mark; re-sent data of erased people is deleted
    (only looked for when some suppression is active). With `node_ids` (a full rebuild)
    each row also carries its node id and its kind's rank, hashed once here."""
    drop_suppressed = """
        CREATE OR REPLACE TEMP TABLE id_suppressed_ei AS
        SELECT ei.event_id, ei.kind, ei.value FROM event_identifiers ei
        WHERE ei.event_id > $mark AND ei.event_id <= $up_to
          AND sha256(ei.kind || chr(31) || ei.value)
              IN (SELECT identifier_hash FROM identity_suppressions WHERE lifted_at IS NULL);
        DELETE FROM events WHERE event_id IN (
            SELECT event_id FROM id_suppressed_ei
            EXCEPT
            SELECT ei.event_id FROM event_identifiers ei
            ANTI JOIN id_suppressed_ei s
                ON s.event_id = ei.event_id AND s.kind = ei.kind AND s.value = ei.value
            WHERE ei.event_id > $mark AND ei.event_id <= $up_to
        );
        DELETE FROM event_identifiers ei USING id_suppressed_ei s
        WHERE ei.event_id = s.event_id AND ei.kind = s.kind AND ei.value = s.value;
        """
    collect = """
        CREATE OR REPLACE TEMP TABLE id_new_ei AS
        SELECT ei.event_id, ei.kind, ei.value, e.timestamp AS ts
        FROM event_identifiers ei
        JOIN events e ON e.event_id = ei.event_id
        WHERE ei.event_id > $mark AND ei.event_id <= $up_to
        """
    if node_ids:
        collect = """
        CREATE OR REPLACE TEMP TABLE id_new_ei AS
        SELECT ei.event_id, ei.kind, ei.value, e.timestamp AS ts,
               ('0x' || left(md5(ei.kind || chr(31) || ei.value), 15))::BIGINT AS node_id,
               coalesce(r.rank, 1000000) AS rank
        FROM event_identifiers ei
        JOIN events e ON e.event_id = ei.event_id
        LEFT JOIN id_kind_rank r ON r.kind = ei.kind
        WHERE ei.event_id > $mark AND ei.event_id <= $up_to
        """
    return Query(
        (drop_suppressed if suppressions else "") + collect, {"mark": mark, "up_to": up_to}
    )


# Node ids are the hash of (kind, value), so new identifiers are matched with the graph on
# the integer id, never by joining strings.
def insert_new_nodes(pattern: str) -> Query:
    """Identifiers of the run's events not yet in the graph become nodes, blocked (listed
    value, or the rules' combined pattern) or active."""
    return Query(
        """
        CREATE OR REPLACE TEMP TABLE id_new_seen AS
        SELECT ('0x' || left(md5(kind || chr(31) || value), 15))::BIGINT AS node_id, kind,
               value,
               coalesce((SELECT rank FROM id_kind_rank r WHERE r.kind = g.kind), 1000000) AS rank,
               first_event_id, first_seen, last_seen
        FROM (
            SELECT kind, value, min(event_id) AS first_event_id, min(ts) AS first_seen,
                   max(ts) AS last_seen
            FROM id_new_ei GROUP BY kind, value
        ) g;
        CREATE OR REPLACE TEMP TABLE id_new_nodes AS
        SELECT * FROM id_new_seen g
        WHERE NOT EXISTS (SELECT 1 FROM identity_nodes n WHERE n.node_id = g.node_id);
        INSERT INTO identity_nodes
        SELECT node_id, kind, value, rank,
               CASE WHEN lower(value) IN (SELECT lower(value) FROM id_block_values)
                         OR ($pattern <> '' AND regexp_full_match(value, $pattern))
                    THEN 'blocked' ELSE 'active' END,
               node_id, NULL, first_event_id, first_seen, last_seen
        FROM id_new_nodes
        ORDER BY kind, value;
        """,
        {"pattern": pattern},
    )


TOUCH_SEEN_NODES = Query(
    """
    UPDATE identity_nodes n
    SET first_seen = least(n.first_seen, g.first_seen),
        last_seen = greatest(n.last_seen, g.last_seen)
    FROM id_new_seen g
    WHERE n.node_id = g.node_id
      AND (g.first_seen < n.first_seen OR g.last_seen > n.last_seen)
    """
)

# The events' identifier nodes (`id_new_ein`) of an incremental run, written as event nodes.
NEW_EVENT_NODES = Query(
    """
    CREATE OR REPLACE TEMP TABLE id_new_ein AS
    SELECT DISTINCT x.event_id,
           ('0x' || left(md5(x.kind || chr(31) || x.value), 15))::BIGINT AS node_id,
           coalesce((SELECT rank FROM id_kind_rank r WHERE r.kind = x.kind), 1000000) AS rank,
           x.ts
    FROM id_new_ei x;
    INSERT INTO identity_event_nodes SELECT DISTINCT event_id, node_id FROM id_new_ein;
    DROP TABLE id_new_ei;
    DROP TABLE id_new_seen;
    """
)

# Each event links every pair of its identifiers; an event with more than 8 identifiers
# links them as a star around its most trusted one instead (k - 1 links). Both paths build
# the links of `id_new_ein` (event, node, rank, ts) into `id_new_edges` with these steps;
# the incremental one leaves out the links already stored, a full rebuild starts with none.
_LINK_STEPS = (
    (
        "sized",
        """
        SELECT event_id, count(*) AS k, arg_min(node_id, (rank, node_id)) AS centre_id
        FROM id_new_ein GROUP BY event_id HAVING count(*) > 1
        """,
    ),
    (
        "links",
        """
        SELECT a.node_id AS src, b.node_id AS dst, a.event_id, a.ts, a.rank AS src_rank,
               b.rank AS dst_rank
        FROM id_new_ein a
        JOIN sized s ON s.event_id = a.event_id
        JOIN id_new_ein b ON b.event_id = a.event_id AND b.node_id > a.node_id
        WHERE s.k <= 8 OR s.centre_id IN (a.node_id, b.node_id)
        """,
    ),
)
# A full rebuild keeps each link's end ranks (a node's rank is its kind's): the status and the
# labelling's links then need no join with the nodes, only with the few inactive ones.
_ALL_LINKS = """
SELECT src, dst, min(event_id) AS first_event_id, arg_min(ts, event_id) AS first_at,
       min(src_rank) AS src_rank, min(dst_rank) AS dst_rank
FROM links l
GROUP BY src, dst
"""
_UNSTORED_LINKS = """
SELECT src, dst, min(event_id) AS first_event_id, arg_min(ts, event_id) AS first_at
FROM links l
WHERE NOT EXISTS (SELECT 1 FROM identity_edges e WHERE e.src = l.src AND e.dst = l.dst)
GROUP BY src, dst
"""


def _links(final: str) -> Query:
    return Query("CREATE OR REPLACE TEMP TABLE id_new_edges AS\n" + with_ctes(_LINK_STEPS, final))


NEW_LINKS = _links(_UNSTORED_LINKS)
FULL_LINKS = _links(_ALL_LINKS)
STORE_LINKS = Query(
    "INSERT INTO identity_edges SELECT src, dst, first_event_id, first_at FROM id_new_edges"
)


# A full rebuild builds the graph in temp tables and writes `identity_nodes` once, after
# labelling, with status, component and profile (inserting then updating millions of rows
# inside one transaction costs three sorts and an undo log). Node ids come from the same
# hash; the graph tables were emptied by SNAPSHOT_FOR_FULL. Each identifier row is hashed
# once (`new_event_identifiers(node_ids=True)`) and nodes are grouped on that integer: a node
# id is the identity of (kind, value) everywhere in the graph.
def full_graph(pattern: str) -> Query:
    """Nodes (with their blocked flag) and event nodes of every event up to the run's mark,
    from `id_new_ei` with node ids (`FULL_LINKS` then links them)."""
    return Query(
        """
        CREATE OR REPLACE TEMP TABLE id_new_nodes AS
        SELECT node_id, kind, value, rank,
               CASE WHEN lower(value) IN (SELECT lower(value) FROM id_block_values)
                         OR ($pattern <> '' AND regexp_full_match(value, $pattern))
                    THEN 'blocked' ELSE 'active' END AS status,
               first_event_id, first_seen, last_seen
        FROM (
            SELECT node_id, any_value(kind) AS kind, any_value(value) AS value,
                   any_value(rank) AS rank, min(event_id) AS first_event_id,
                   min(ts) AS first_seen, max(ts) AS last_seen
            FROM id_new_ei GROUP BY node_id
        ) g;
        CREATE OR REPLACE TEMP TABLE id_new_ein AS
        SELECT DISTINCT event_id, node_id, rank, ts FROM id_new_ei;
        DROP TABLE id_new_ei;
        INSERT INTO identity_event_nodes SELECT event_id, node_id FROM id_new_ein;
        """,
        {"pattern": pattern},
    )


def full_status(auto_cap: int) -> Query:
    """Status of every node of a full rebuild, and the affected set (all nodes).

    Each link is counted once for its less trusted end when the other end is more trusted
    and not blocked (links are distinct pairs, so no DISTINCT is needed).
    """
    return Query(
        """
        CREATE OR REPLACE TEMP TABLE id_status_new AS
        WITH higher AS (
            SELECT CASE WHEN e.src_rank < e.dst_rank THEN e.dst ELSE e.src END AS node_id,
                   count(*) AS links
            FROM id_new_edges e
            ANTI JOIN (SELECT node_id FROM id_new_nodes WHERE status = 'blocked') b
                ON b.node_id = CASE WHEN e.src_rank < e.dst_rank THEN e.src ELSE e.dst END
            WHERE e.src_rank <> e.dst_rank
            GROUP BY 1
        )
        SELECT n.node_id, n.status AS old_status,
            CASE
                WHEN n.status = 'blocked' THEN 'blocked'
                WHEN coalesce(h.links, 0) > $cap THEN 'capped'
                ELSE 'active'
            END AS status,
            coalesce(h.links, 0) AS higher_links
        FROM id_new_nodes n LEFT JOIN higher h ON h.node_id = n.node_id;
        CREATE OR REPLACE TEMP TABLE id_aff AS
        SELECT n.node_id, n.kind, n.rank, s.status, n.first_event_id,
               NULL::BIGINT AS old_component_id, NULL::VARCHAR AS old_profile_id,
               n.value, n.first_seen, n.last_seen
        FROM id_new_nodes n JOIN id_status_new s ON s.node_id = n.node_id;
        """,
        {"cap": auto_cap},
    )


# The nodes of a full rebuild, written once with their labels, sorted by kind and value (zone
# maps serve the lookups). `id_aff` of a full rebuild carries every column of a node, so only
# the labels and their profile ids are joined.
WRITE_NODES_FULL = Query(
    """
    INSERT INTO identity_nodes
    SELECT n.node_id, n.kind, n.value, n.rank, n.status,
           CASE WHEN n.status = 'active' THEN l.component_id ELSE n.node_id END,
           CASE WHEN n.status = 'active' THEN lp.profile_id END,
           n.first_event_id, n.first_seen, n.last_seen
    FROM id_aff n
    LEFT JOIN id_labels l ON l.node_id = n.node_id
    LEFT JOIN id_label_pid lp ON lp.label = l.label
    ORDER BY n.kind, n.value
    """
)


# (Nodes are appended sorted by kind and value so zone maps serve point lookups.)
# Nodes whose status may change: new ones, endpoints of new links, nodes of changed overrides.
STATUS_CANDIDATES_INCREMENTAL = Query(
    """
    CREATE OR REPLACE TEMP TABLE id_status_cands AS
    SELECT node_id FROM id_new_nodes
    UNION SELECT src FROM id_new_edges
    UNION SELECT dst FROM id_new_edges
    UNION SELECT node_id FROM id_override_nodes
    """
)


def changed_overrides(after_version: int, *, repair: bool = False) -> Query:
    """Nodes named by overrides created or lifted since the version the resolver last saw;
    with `repair`, also the nodes an erasure in the same transaction left in `er_repair`
    (their links changed the same way: statuses and neighbouring components to recompute)."""
    return Query(
        """
        CREATE OR REPLACE TEMP TABLE id_override_nodes AS
        SELECT src AS node_id FROM identity_link_overrides WHERE version > $v
        UNION SELECT dst FROM identity_link_overrides WHERE version > $v AND dst IS NOT NULL
        {repair}
        """.replace("{repair}", "UNION SELECT node_id FROM er_repair" if repair else ""),
        {"v": after_version},
    )


# Links ignored by admins' decisions: removed links, and every link of a detached identifier
# (which stays a profile of its own). Taken after the run's new links are in the log.
ACTIVE_REMOVED_LINKS = Query(
    """
    CREATE OR REPLACE TEMP TABLE id_detached AS
    SELECT DISTINCT src AS node_id FROM identity_link_overrides
    WHERE action = 'remove_identifier' AND lifted_at IS NULL;
    CREATE OR REPLACE TEMP TABLE id_removed_links AS
    SELECT least(src, dst) AS src, greatest(src, dst) AS dst FROM identity_link_overrides
    WHERE action = 'remove_link' AND lifted_at IS NULL
    UNION SELECT e.src, e.dst FROM identity_edges e SEMI JOIN id_detached d ON d.node_id = e.src
    UNION SELECT e.src, e.dst FROM identity_edges e SEMI JOIN id_detached d ON d.node_id = e.dst;
    """
)


def compute_status(auto_cap: int) -> Query:
    """New status of the candidates: blocked value (static), over the cap, or active."""
    return Query(
        """
        CREATE OR REPLACE TEMP TABLE id_status_new AS
        WITH nbr AS (
            SELECT e.src AS node_id, e.dst AS other
            FROM identity_edges e SEMI JOIN id_status_cands c ON c.node_id = e.src
            UNION ALL
            SELECT e.dst, e.src FROM identity_edges e SEMI JOIN id_status_cands c
            ON c.node_id = e.dst
        ),
        -- The candidates and their neighbours, read in one pass over the nodes.
        pts AS (
            SELECT n.node_id, n.rank, n.status
            FROM identity_nodes n
            SEMI JOIN (SELECT node_id FROM id_status_cands UNION SELECT other FROM nbr) k
                ON k.node_id = n.node_id
        ),
        cand AS (SELECT p.* FROM pts p SEMI JOIN id_status_cands c ON c.node_id = p.node_id),
        higher AS (
            SELECT x.node_id, count(DISTINCT nbr.other) AS links
            FROM nbr
            JOIN cand x ON x.node_id = nbr.node_id
            JOIN pts o ON o.node_id = nbr.other
            WHERE o.rank < x.rank AND o.status <> 'blocked'
            GROUP BY x.node_id
        )
        SELECT c.node_id, c.status AS old_status,
            CASE
                WHEN c.status = 'blocked' THEN 'blocked'
                WHEN coalesce(h.links, 0) > $cap THEN 'capped'
                ELSE 'active'
            END AS status,
            coalesce(h.links, 0) AS higher_links
        FROM cand c LEFT JOIN higher h ON h.node_id = c.node_id
        """,
        {"cap": auto_cap},
    )


APPLY_STATUS = Query(
    """
    UPDATE identity_nodes n SET status = s.status
    FROM id_status_new s
    WHERE n.node_id = s.node_id AND n.status <> s.status
    """
)

# The raw components to recompute: those of every node whose links or status changed, and
# those of the neighbours of nodes whose status or overrides changed (links may reopen).
# The same two scans of `identity_nodes` also copy every node of the components of the run's
# events into `id_comp_nodes` (flag `affected`: recomputed). A profile lies inside one raw
# component, so the nodes of every profile the run writes are there: the later steps read
# them from this small table instead of scanning `identity_nodes` again.
AFFECTED_INCREMENTAL = Query(
    """
    CREATE OR REPLACE TEMP TABLE id_reopened AS
    SELECT node_id FROM id_status_new WHERE status <> old_status
    UNION SELECT node_id FROM id_override_nodes;
    CREATE OR REPLACE TEMP TABLE id_seed AS
    SELECT node_id FROM id_status_cands
    UNION SELECT e.dst FROM identity_edges e SEMI JOIN id_reopened r ON r.node_id = e.src
    UNION SELECT e.src FROM identity_edges e SEMI JOIN id_reopened r ON r.node_id = e.dst;
    CREATE OR REPLACE TEMP TABLE id_comp_sel AS
    SELECT n.component_id, bool_or(k.seed) AS affected
    FROM identity_nodes n
    JOIN (
        SELECT node_id, bool_or(seed) AS seed FROM (
            SELECT node_id, true AS seed FROM id_seed
            UNION ALL SELECT node_id, false FROM id_new_ein
        ) GROUP BY node_id
    ) k ON k.node_id = n.node_id
    GROUP BY n.component_id;
    CREATE OR REPLACE TEMP TABLE id_comp_nodes AS
    SELECT n.node_id, n.kind, n.value, n.rank, n.status, n.first_event_id, n.component_id,
           n.profile_id, c.affected
    FROM identity_nodes n JOIN id_comp_sel c ON c.component_id = n.component_id;
    CREATE OR REPLACE TEMP TABLE id_aff AS
    SELECT node_id, kind, rank, status, first_event_id,
           component_id AS old_component_id, profile_id AS old_profile_id
    FROM id_comp_nodes WHERE affected;
    DROP TABLE id_comp_sel;
    """
)

OLD_ASSIGNMENT_INCREMENTAL = Query(
    """
    CREATE OR REPLACE TEMP TABLE id_old AS
    SELECT node_id, old_profile_id AS profile_id FROM id_aff WHERE old_profile_id IS NOT NULL
    """
)
SNAPSHOT_FOR_FULL = Query(
    """
    CREATE OR REPLACE TEMP TABLE id_old AS
    SELECT node_id, profile_id FROM identity_nodes WHERE profile_id IS NOT NULL;
    CREATE OR REPLACE TEMP TABLE id_old_profiles AS
    SELECT DISTINCT profile_id FROM profiles;
    DELETE FROM identity_nodes;
    DELETE FROM identity_edges;
    DELETE FROM identity_event_nodes;
    DELETE FROM identity_decisions;
    """
)

AFFECTED_ACTIVE_NODES = Query(
    "SELECT node_id, kind, first_event_id FROM id_aff WHERE status = 'active' ORDER BY node_id"
)
# With the ranks of their ends: inside one event, links of trusted identifiers apply first.
# A full rebuild reads them from its link copy (every node is affected; the few inactive ones
# are left out with anti joins).
AFFECTED_LINKS_FULL = Query(
    """
    SELECT e.src, e.dst, e.first_event_id,
           least(e.src_rank, e.dst_rank) AS high_rank,
           greatest(e.src_rank, e.dst_rank) AS low_rank
    FROM id_new_edges e
    ANTI JOIN (SELECT node_id FROM id_status_new WHERE status <> 'active') a
        ON a.node_id = e.src
    ANTI JOIN (SELECT node_id FROM id_status_new WHERE status <> 'active') b
        ON b.node_id = e.dst
    ANTI JOIN id_removed_links r ON r.src = e.src AND r.dst = e.dst
    """
)
AFFECTED_LINKS = Query(
    """
    SELECT e.src, e.dst, e.first_event_id,
           least(a.rank, b.rank) AS high_rank, greatest(a.rank, b.rank) AS low_rank
    FROM identity_edges e
    JOIN id_aff a ON a.node_id = e.src AND a.status = 'active'
    JOIN id_aff b ON b.node_id = e.dst AND b.status = 'active'
    ANTI JOIN id_removed_links r ON r.src = e.src AND r.dst = e.dst
    """
)

# Stable ids: per old profile, the new label holding its birth identifiers (those first seen
# in the event it was born from) keeps it ("stays"), else the label holding most of its
# nodes; per label, the oldest staying profile (created first, then born from the earlier
# event) survives and the other stayers merge into it; a label nobody stays in takes back a
# vanished id whose birth identifiers it holds (`id_revive`, below), else gets a new id.
# Births are looked up only for the profiles that split (claims in several labels).
RECONCILE = Query(
    """
    CREATE OR REPLACE TEMP TABLE id_claims AS
    SELECT l.label, o.profile_id, count(*) AS nodes
    FROM id_labels l JOIN id_old o ON o.node_id = l.node_id
    GROUP BY l.label, o.profile_id;
    CREATE OR REPLACE TEMP TABLE id_births AS
    WITH split AS (SELECT profile_id FROM id_claims GROUP BY profile_id HAVING count(*) > 1)
    SELECT DISTINCT l.label, o.profile_id
    FROM id_old o
    JOIN split s ON s.profile_id = o.profile_id
    JOIN identity_profile_ids r ON r.profile_id = o.profile_id
    JOIN id_labels l ON l.node_id = o.node_id AND l.first_event_id = r.born_event_id;
    CREATE OR REPLACE TEMP TABLE id_stay AS
    SELECT c.profile_id, arg_min(c.label, (b.label IS NULL, -c.nodes, c.label)) AS label
    FROM id_claims c
    LEFT JOIN id_births b ON b.label = c.label AND b.profile_id = c.profile_id
    GROUP BY c.profile_id;
    CREATE OR REPLACE TEMP TABLE id_surv AS
    SELECT s.label,
           arg_min(s.profile_id, (r.created_at, r.born_event_id, s.profile_id)) AS profile_id
    FROM id_stay s JOIN identity_profile_ids r ON r.profile_id = s.profile_id
    GROUP BY s.label;
    CREATE OR REPLACE TEMP TABLE id_revive AS
    WITH fresh AS (
        SELECT l.label, l.first_event_id FROM id_labels l ANTI JOIN id_surv s ON s.label = l.label
    )
    SELECT f.label, r.profile_id, r.created_at, r.born_event_id, count(*) AS birth_nodes
    FROM fresh f
    JOIN identity_profile_ids r
        ON r.born_event_id = f.first_event_id AND r.merged_into IS NULL
    ANTI JOIN id_claims c ON c.profile_id = r.profile_id
    GROUP BY f.label, r.profile_id, r.created_at, r.born_event_id;
    """
)
# Vanished ids come back: a profile whose identifiers all left the graph (blocked or capped
# by the rules, or known only from erased events) keeps its id in `identity_profile_ids` with
# no identifier and no row. When a label nobody stays in holds identifiers first seen in such
# an id's birth event (the rules changed back, a shared value fell under the cap), it takes
# that id back, so the person keeps their id, their loyalty membership and their history
# instead of being born again under a new one. A candidate that still holds identifiers in
# the graph (outside this run's components, e.g. a detached identifier of a live profile's
# birth event) is not vanished: `REVIVE_LIVE` drops it (incremental runs only, when there are
# candidates; a full rebuild has every live id among its claims). Each id comes back on one
# label (most birth identifiers, then the lowest label), each label takes back the oldest.
REVIVE_COUNT = Query("SELECT count(*) FROM id_revive")
REVIVE_LIVE = Query(
    """
    DELETE FROM id_revive v
    WHERE v.profile_id IN (
        SELECT n.profile_id FROM identity_nodes n
        SEMI JOIN id_revive c ON c.profile_id = n.profile_id
    )
    """
)
LABEL_IDS = Query(
    """
    CREATE OR REPLACE TEMP TABLE id_label_pid AS
    WITH per_id AS (
        SELECT profile_id, created_at, born_event_id,
               arg_min(label, (-birth_nodes, label)) AS label
        FROM id_revive GROUP BY profile_id, created_at, born_event_id
    ),
    revived AS (
        SELECT label, arg_min(profile_id, (created_at, born_event_id, profile_id)) AS profile_id
        FROM per_id GROUP BY label
    ),
    labels AS (
        SELECT label, min(first_event_id) AS born_event_id FROM id_labels GROUP BY label
    )
    SELECT labels.label,
           coalesce(surv.profile_id, revived.profile_id, gen_random_uuid()::VARCHAR) AS profile_id,
           surv.profile_id IS NULL AND revived.profile_id IS NULL AS is_new, labels.born_event_id
    FROM labels
    LEFT JOIN id_surv surv ON surv.label = labels.label
    LEFT JOIN revived ON revived.label = labels.label;
    DROP TABLE id_surv;
    DROP TABLE id_revive;
    """
)

# Merged-away ids that follow a split: an id merged into a profile that splits now points at
# the profile of the part holding its birth identifiers (an undone merge: the old id of the
# person split off names that person, not the profile it had been merged into). Only the
# parts that leave a profile are looked at (splits are rare).
REDIRECTS = Query(
    """
    CREATE OR REPLACE TEMP TABLE id_redirects AS
    WITH moved AS (
        SELECT c.label, c.profile_id FROM id_claims c
        JOIN id_stay s ON s.profile_id = c.profile_id
        WHERE s.label <> c.label
    ),
    cand AS (
        SELECT DISTINCT r.profile_id, l.label
        FROM moved m
        JOIN id_old o ON o.profile_id = m.profile_id
        JOIN id_labels l ON l.node_id = o.node_id AND l.label = m.label
        JOIN identity_profile_ids r
            ON r.merged_into = m.profile_id AND r.born_event_id = l.first_event_id
    )
    SELECT c.profile_id, arg_min(lp.profile_id, c.label) AS to_pid
    FROM cand c JOIN id_label_pid lp ON lp.label = c.label
    GROUP BY c.profile_id
    """
)

# Merges (a staying profile that is not its label's survivor) and splits (part of an old
# profile now in another label), each with the newest used link touching the moved nodes.
CHANGES = Query(
    """
    CREATE OR REPLACE TEMP TABLE id_changes AS
    WITH moves AS (
        SELECT 'merge' AS kind, s.profile_id AS from_pid, lp.profile_id AS to_pid, s.label
        FROM id_stay s JOIN id_label_pid lp ON lp.label = s.label
        WHERE s.profile_id <> lp.profile_id
        UNION ALL
        SELECT 'split', c.profile_id, lp.profile_id, c.label
        FROM id_claims c
        JOIN id_stay s ON s.profile_id = c.profile_id
        JOIN id_label_pid lp ON lp.label = c.label
        WHERE s.label <> c.label
    ),
    moved_nodes AS (
        SELECT m.kind, m.from_pid, m.to_pid, o.node_id
        FROM moves m
        JOIN id_old o ON o.profile_id = m.from_pid
        JOIN id_labels l ON l.node_id = o.node_id AND l.label = m.label
    ),
    touching AS (
        SELECT mn.kind, mn.from_pid, mn.to_pid, u.src, u.dst, u.first_event_id
        FROM moved_nodes mn JOIN id_used_links u ON u.src = mn.node_id
        UNION ALL
        SELECT mn.kind, mn.from_pid, mn.to_pid, u.src, u.dst, u.first_event_id
        FROM moved_nodes mn JOIN id_used_links u ON u.dst = mn.node_id
    ),
    cause AS (
        SELECT kind, from_pid, to_pid,
               arg_max({'src': src, 'dst': dst, 'event_id': first_event_id},
                       (first_event_id, src, dst)) AS link
        FROM touching GROUP BY kind, from_pid, to_pid
    )
    SELECT m.kind, m.from_pid, m.to_pid, struct_extract(c.link, 'src') AS src,
           struct_extract(c.link, 'dst') AS dst, struct_extract(c.link, 'event_id') AS event_id
    FROM (SELECT DISTINCT kind, from_pid, to_pid FROM moves) m
    LEFT JOIN cause c ON c.kind = m.kind AND c.from_pid = m.from_pid AND c.to_pid = m.to_pid
    """
)


# Where the publication reads the ends of its links: every node (full rebuild), or the
# nodes of the run's components (incremental: a cause link joins two affected nodes).
NODE_SOURCES = {"full": "identity_nodes", "incremental": "id_comp_nodes"}


def publish_changes(*, seq: int, at: datetime, nodes: str = "full") -> Query:
    """Append the run's merges and splits to `profile_merges`, numbered after `seq`.

    Splits come first: one run can split a profile and merge it away (the part holding its
    birth identifiers joins an older profile), and a layer applying the rows in order must
    meet the split while the id is still live, not after the merge took it away.
    """
    table = NODE_SOURCES[nodes]
    return Query(
        """
        INSERT INTO profile_merges
        SELECT $seq + row_number() OVER (ORDER BY c.kind = 'merge', c.event_id NULLS LAST,
                                                  c.from_pid, c.to_pid),
               c.kind, c.from_pid, c.to_pid, $at,
               CASE WHEN c.event_id IS NULL THEN c.kind || ' after a change of rules or links'
                    ELSE 'link ' || a.kind || ':' || a.value || ' - ' || b.kind || ':' || b.value
                         || ' from event ' || c.event_id::VARCHAR
               END,
               c.event_id, c.src, c.dst
        FROM id_changes c
        LEFT JOIN {table} a ON a.node_id = c.src
        LEFT JOIN {table} b ON b.node_id = c.dst
        """.replace("{table}", table),
        {"seq": seq, "at": at},
    )


def register_profiles(at: datetime) -> Query:
    """Record new profile ids, point merged-away ids (and theirs) at the survivor, and the
    ids that follow a split (`REDIRECTS`) at their part's profile."""
    return Query(
        """
        INSERT INTO identity_profile_ids
        SELECT profile_id, born_event_id, $at, NULL, NULL FROM id_label_pid WHERE is_new
        ORDER BY profile_id;
        UPDATE identity_profile_ids r SET merged_into = c.to_pid, merged_at = $at
        FROM id_changes c WHERE c.kind = 'merge' AND r.profile_id = c.from_pid;
        UPDATE identity_profile_ids r SET merged_into = c.to_pid
        FROM id_changes c WHERE c.kind = 'merge' AND r.merged_into = c.from_pid;
        UPDATE identity_profile_ids r SET merged_into = d.to_pid
        FROM id_redirects d WHERE r.profile_id = d.profile_id;
        """,
        {"at": at},
    )


APPLY_ASSIGNMENT = Query(
    """
    UPDATE identity_nodes n
    SET component_id = l.component_id, profile_id = lp.profile_id
    FROM id_labels l JOIN id_label_pid lp ON lp.label = l.label
    WHERE n.node_id = l.node_id;
    UPDATE identity_nodes n SET component_id = n.node_id, profile_id = NULL
    FROM id_aff a WHERE a.node_id = n.node_id AND n.status <> 'active';
    """
)


def record_decisions(at: datetime) -> Query:
    """Replace the decisions of the affected nodes: refused links and blocked identifiers."""
    return Query(
        """
        DELETE FROM identity_decisions d USING id_aff a WHERE d.node_id = a.node_id;
        INSERT INTO identity_decisions
        SELECT l.component_id, 'limit', r.src, r.dst, r.event_id,
               'link not used: the profile would hold more than ' || r.lim::VARCHAR || ' '
               || r.kind || ' identifier(s)', $at
        FROM id_refusals r JOIN id_labels l ON l.node_id = r.src;
        INSERT INTO identity_decisions
        SELECT n.node_id, n.status, n.node_id, NULL, NULL,
               CASE n.status
                   WHEN 'blocked' THEN 'blocked value or pattern: never links'
                   ELSE 'linked to ' || coalesce(s.higher_links::VARCHAR, 'too many')
                        || ' higher-priority identifiers (over the cap): treated as blocked'
               END, $at
        FROM identity_nodes n
        SEMI JOIN id_aff a ON a.node_id = n.node_id
        LEFT JOIN id_status_new s ON s.node_id = n.node_id
        WHERE n.status <> 'active';
        INSERT INTO identity_decisions
        SELECT l.component_id, 'removed', d.node_id, NULL, NULL,
               'identifier detached by an admin: its links are ignored until allowed again', $at
        FROM id_detached d JOIN id_labels l ON l.node_id = d.node_id;
        INSERT INTO identity_decisions
        SELECT l.component_id, 'removed', r.src, r.dst, e.first_event_id,
               'link removed by an admin: not used until allowed again', $at
        FROM identity_link_overrides o
        JOIN id_removed_links r ON r.src = least(o.src, o.dst) AND r.dst = greatest(o.src, o.dst)
        JOIN id_labels l ON l.node_id = r.src
        LEFT JOIN identity_edges e ON e.src = r.src AND e.dst = r.dst
        WHERE o.action = 'remove_link' AND o.lifted_at IS NULL;
        """,
        {"at": at},
    )


# Profiles to rebuild: every profile id the run assigned or took away, and the profiles of
# identifiers seen in the new events (their traits and last_seen moved). `id_touch_nodes`:
# the nodes of the run's components with their profile after APPLY_ASSIGNMENT (which set
# the label's profile on active affected nodes and NULL on the other affected ones).
DIRTY_PROFILES = Query(
    """
    CREATE OR REPLACE TEMP TABLE id_touch_nodes AS
    SELECT c.node_id, c.kind, c.value, c.rank,
           CASE WHEN NOT c.affected THEN c.profile_id
                WHEN c.status = 'active' THEN lp.profile_id END AS profile_id
    FROM id_comp_nodes c
    LEFT JOIN id_labels l ON l.node_id = c.node_id
    LEFT JOIN id_label_pid lp ON lp.label = l.label;
    CREATE OR REPLACE TEMP TABLE id_dirty AS
    SELECT profile_id FROM id_label_pid
    UNION SELECT profile_id FROM id_old
    UNION SELECT t.profile_id FROM id_touch_nodes t
          SEMI JOIN id_new_ein x ON x.node_id = t.node_id
          WHERE t.profile_id IS NOT NULL
    """
)
COUNT_DIRTY = Query("SELECT count(*) FROM id_dirty")
# The run's events and new links, counted once their tables are used (a full rebuild drops
# them then: the event nodes are the largest working table).
GRAPH_COUNTS = Query(
    """
    CREATE OR REPLACE TEMP TABLE id_graph_counts AS
    SELECT (SELECT count(DISTINCT event_id) FROM id_new_ein) AS events,
           (SELECT count(*) FROM id_new_edges) AS links
    """
)
DROP_FULL_LINK_COPIES = Query("DROP TABLE id_new_edges")
# What a run did, read before the profile rows are built (a full rebuild then drops the
# tables counted here); the affected count is by the statuses after the run.
RUN_COUNTS = Query(
    """
    SELECT (SELECT events FROM id_graph_counts),
           (SELECT count(*) FROM id_new_nodes),
           (SELECT links FROM id_graph_counts),
           (SELECT count(*) FROM id_aff),
           (SELECT count(*) FROM id_label_pid WHERE is_new),
           (SELECT count(*) FILTER (WHERE kind = 'merge') FROM id_changes),
           (SELECT count(*) FILTER (WHERE kind = 'split') FROM id_changes),
           (SELECT count(*) FROM id_aff WHERE status <> 'active')
    """
)
# The working copies of a full rebuild's graph, once nodes, links, decisions and the
# publication are written (the profile rows need `id_label_pid` and `id_old_profiles`).
DROP_FULL_GRAPH_COPIES = Query(
    """
    DROP TABLE IF EXISTS id_new_nodes;
    DROP TABLE IF EXISTS id_status_new;
    DROP TABLE IF EXISTS id_aff;
    DROP TABLE IF EXISTS id_used_links;
    DROP TABLE IF EXISTS id_refusals;
    DROP TABLE IF EXISTS id_old;
    DROP TABLE IF EXISTS id_claims;
    DROP TABLE IF EXISTS id_births;
    DROP TABLE IF EXISTS id_surv;
    DROP TABLE IF EXISTS id_revive;
    DROP TABLE IF EXISTS id_redirects;
    DROP TABLE IF EXISTS id_stay;
    DROP TABLE IF EXISTS id_changes;
    """
)
DIRTY_PROFILES_FULL = Query(
    """
    CREATE OR REPLACE TEMP TABLE id_dirty AS
    SELECT profile_id FROM id_label_pid
    UNION SELECT profile_id FROM id_old_profiles
    """
)


# The profile of an event: that of its most trusted identifier that belongs to a profile.
# `id_ep(event_id, profile_id)`: the events of the dirty profiles (incremental: candidates
# share an identifier with a dirty profile) or of every profile (full rebuild), and
# `id_dirty_nodes`: the identifiers of those profiles (a table of the few dirty ones, or a
# view of every node with a profile), read again for the profile rows.
# Incremental: the nodes of the candidate events come from `id_touch_nodes`; an event's other
# identifiers are in the same raw component unless inactive (no profile, so not needed) or
# cut off by an admin's unmerge, so the lookup in `identity_nodes` is usually of nothing,
# and DuckDB skips the scan of a join whose build side is empty.
EVENT_PROFILES_DIRTY = Query(
    """
    CREATE OR REPLACE TEMP TABLE id_dirty_nodes AS
    SELECT n.node_id, n.kind, n.value, n.profile_id FROM id_touch_nodes n
    SEMI JOIN id_dirty d ON d.profile_id = n.profile_id;
    CREATE OR REPLACE TEMP TABLE id_pev_cand AS
    SELECT DISTINCT ei.event_id FROM identity_event_nodes ei
    SEMI JOIN id_dirty_nodes p ON p.node_id = ei.node_id;
    CREATE OR REPLACE TEMP TABLE id_pev_en AS
    SELECT ei.event_id, ei.node_id FROM identity_event_nodes ei
    SEMI JOIN id_pev_cand c ON c.event_id = ei.event_id;
    CREATE OR REPLACE TEMP TABLE id_pev_nodes AS
    SELECT t.node_id, t.rank, t.profile_id FROM id_touch_nodes t
    SEMI JOIN id_pev_en x ON x.node_id = t.node_id;
    INSERT INTO id_pev_nodes
    SELECT n.node_id, n.rank, n.profile_id FROM identity_nodes n
    SEMI JOIN (
        SELECT node_id FROM id_pev_en
        EXCEPT SELECT node_id FROM id_touch_nodes
        EXCEPT SELECT node_id FROM identity_nodes WHERE status <> 'active'
    ) r ON r.node_id = n.node_id;
    CREATE OR REPLACE TEMP TABLE id_ep AS
    SELECT ep.* FROM (
        SELECT x.event_id, arg_min(
            n.profile_id, (n.rank::HUGEINT << 60) + n.node_id
        ) AS profile_id
        FROM id_pev_en x
        JOIN id_pev_nodes n ON n.node_id = x.node_id
        WHERE n.profile_id IS NOT NULL
        GROUP BY x.event_id
    ) ep
    SEMI JOIN id_dirty d ON d.profile_id = ep.profile_id;
    DROP TABLE id_pev_cand;
    DROP TABLE id_pev_en;
    DROP TABLE id_pev_nodes;
    """
)
# The winning identifier of each event of a full rebuild (its most trusted active one: every
# active node gets a profile; NULL when none is active), taken from the run's event nodes once
# statuses are known, so the profile rows need not read the stored event nodes and nodes
# again. Few nodes are inactive: they are marked by a join with that small set. The same
# group-by counts the run's events (GRAPH_COUNTS of the incremental path).
EVENT_WINNERS_FULL = Query(
    """
    CREATE OR REPLACE TEMP TABLE id_event_winner AS
    SELECT x.event_id,
           arg_min(x.node_id, (x.rank::HUGEINT << 60) + x.node_id)
               FILTER (WHERE s.node_id IS NULL) AS node_id
    FROM id_new_ein x
    LEFT JOIN (SELECT node_id FROM id_status_new WHERE status <> 'active') s
        ON s.node_id = x.node_id
    GROUP BY x.event_id;
    CREATE OR REPLACE TEMP TABLE id_graph_counts AS
    SELECT (SELECT count(*) FROM id_event_winner) AS events,
           (SELECT count(*) FROM id_new_edges) AS links;
    DROP TABLE id_new_ein;
    """
)
# Full rebuild: every profile is rebuilt, keyed by `id_pkey.pk`, a dense integer in the order
# of the profile ids (the label of each profile comes from the labelling's `id_labels`, so
# events and identifiers reach their key through integer joins only). The aggregation
# carries the winning node id, an integer, rather than the 36-character profile id. The
# identifier lists of every profile are built in one pass over the nodes (`id_idents`; a
# statement per key range re-read every node's strings for each range).
EVENT_PROFILES_FULL = Query(
    """
    CREATE OR REPLACE TEMP TABLE id_pkey AS
    SELECT row_number() OVER (ORDER BY lp.profile_id) AS pk, lp.label, lp.profile_id,
           r.created_at
    FROM id_label_pid lp JOIN identity_profile_ids r ON r.profile_id = lp.profile_id;
    CREATE OR REPLACE TEMP TABLE id_node_pk AS
    SELECT l.node_id, k.pk FROM id_labels l JOIN id_pkey k ON k.label = l.label;
    DROP TABLE id_labels;
    CREATE OR REPLACE TEMP TABLE id_ep AS
    SELECT w.event_id, p.pk AS profile_id
    FROM id_event_winner w JOIN id_node_pk p ON p.node_id = w.node_id;
    DROP TABLE id_event_winner;
    DELETE FROM profiles;
    CREATE OR REPLACE TEMP TABLE id_idents AS
    SELECT profile_id, json_group_object(kind, vals) AS identifiers
    FROM (
        SELECT p.pk AS profile_id, n.kind, list(n.value ORDER BY n.value) AS vals
        FROM identity_nodes n JOIN id_node_pk p ON p.node_id = n.node_id
        GROUP BY p.pk, n.kind
    )
    GROUP BY profile_id;
    """
)
COUNT_PROFILE_KEYS = Query("SELECT count(*) FROM id_pkey")


# The aggregations of a profile row, from `id_pev` (a profile's events) and `id_pn` (its
# identifiers), both keyed by `profile_id`: the profile id (incremental) or the dense integer
# key of a full rebuild (`id_pkey`), which groups faster than the 36-character id. Survivorship:
# per trait, the configured source priority first, then the most recent non-null value.
# `json_each` parses each event's traits once (json_keys then json_extract per key parsed them
# once per key, twice with the null filter). Without source priorities the order (latest time,
# then highest event id) is one HUGEINT, `epoch_us << 64` plus the event id shifted to be
# non-negative, which compares several times faster than a struct.
_PROFILE_ROW_CTES = """
        WITH stats AS (
            SELECT profile_id, min(timestamp) AS first_seen, max(timestamp) AS last_seen,
                   count(*) AS event_count
            FROM id_pev GROUP BY profile_id
        ),
        kv AS (
            SELECT p.profile_id, p.source_id, p.timestamp, p.event_id, j.key, j.value AS val
            FROM id_pev p, json_each(p.traits) j
            WHERE p.traits IS NOT NULL AND json_type(p.traits) = 'OBJECT' AND j.type <> 'NULL'
        ),
        survivor AS (
{survivor}
        ),
        traits AS (
            SELECT profile_id, json_group_object(key, val) AS traits
            FROM survivor GROUP BY profile_id
        ){idents}
"""
_IDENTS_CTE = """,
        idents AS (
            SELECT profile_id, json_group_object(kind, vals) AS identifiers
            FROM (
                SELECT profile_id, kind, list(value ORDER BY value) AS vals
                FROM id_pn GROUP BY profile_id, kind
            )
            GROUP BY profile_id
        )
"""
_SURVIVOR = {
    # Per trait, a value from the first listed source wins over recency.
    True: """
            SELECT kv.profile_id, kv.key,
                   arg_min(kv.val, (coalesce(ts.prio, 1000000), -epoch_us(kv.timestamp),
                                    -kv.event_id)) AS val
            FROM kv LEFT JOIN id_trait_sources ts
                ON ts.trait = kv.key AND ts.source_id = kv.source_id
            GROUP BY kv.profile_id, kv.key""",
    False: """
            SELECT profile_id, key,
                   arg_max(val, (epoch_us(timestamp)::HUGEINT << 64)
                                + (event_id::HUGEINT + 9223372036854775808)) AS val
            FROM kv
            GROUP BY profile_id, key""",
}


def _profile_row_ctes(prioritised: bool, *, idents: bool = True) -> str:
    return _PROFILE_ROW_CTES.replace("{survivor}", _SURVIVOR[prioritised]).replace(
        "{idents}", _IDENTS_CTE if idents else "\n"
    )


def refresh_profiles(
    at: datetime,
    *,
    low: str | None = None,
    high: str | None = None,
    prioritised: bool = True,
) -> Query:
    """Rebuild the `profiles` rows of the dirty profiles in `[low, high)` (None: unbounded),
    with trait survivorship, from `id_ep` (`prioritised`: some trait has source priorities).

    A full rebuild writes the profiles in a few id ranges, one statement each, so no single
    aggregation holds every event's traits; ranges in ascending order keep the table sorted
    by id (zone maps serve the point lookups).
    """
    return Query(
        """
        CREATE OR REPLACE TEMP TABLE id_pn AS
        SELECT n.node_id, n.kind, n.value, n.profile_id FROM id_dirty_nodes n
        WHERE ($low::VARCHAR IS NULL OR n.profile_id >= $low)
          AND ($high::VARCHAR IS NULL OR n.profile_id < $high);
        CREATE OR REPLACE TEMP TABLE id_pev AS
        SELECT ep.profile_id, e.event_id, e.source_id, e.timestamp, e.traits
        FROM id_ep ep
        JOIN events e ON e.event_id = ep.event_id
        WHERE ($low::VARCHAR IS NULL OR ep.profile_id >= $low)
          AND ($high::VARCHAR IS NULL OR ep.profile_id < $high);
        DELETE FROM profiles p USING id_dirty d
        WHERE p.profile_id = d.profile_id
          AND ($low::VARCHAR IS NULL OR d.profile_id >= $low)
          AND ($high::VARCHAR IS NULL OR d.profile_id < $high);
        INSERT INTO profiles
{survivorship}        SELECT i.profile_id, r.created_at, $at, s.first_seen, s.last_seen,
               coalesce(s.event_count, 0), i.identifiers, coalesce(t.traits, '{}')::JSON
        FROM idents i
        JOIN identity_profile_ids r ON r.profile_id = i.profile_id
        LEFT JOIN stats s ON s.profile_id = i.profile_id
        LEFT JOIN traits t ON t.profile_id = i.profile_id
        ORDER BY i.profile_id;
        DROP TABLE id_pev;
        """.replace("{survivorship}", _profile_row_ctes(prioritised)),
        {"at": at, "low": low, "high": high},
    )


def refresh_profiles_full(at: datetime, *, low: int, high: int, prioritised: bool = True) -> Query:
    """Write the `profiles` rows of a full rebuild with keys `[low, high)` of `id_pkey`.

    Keys follow the profile ids' order, so ranges written in ascending order keep the table
    sorted by id (zone maps serve the point lookups); a few ranges, one statement each, so
    no single aggregation holds every event's traits.
    """
    return Query(
        """
        CREATE OR REPLACE TEMP TABLE id_pev AS
        SELECT ep.profile_id, e.event_id, e.source_id, e.timestamp, e.traits
        FROM id_ep ep
        JOIN events e ON e.event_id = ep.event_id
        WHERE ep.profile_id >= $low AND ep.profile_id < $high;
        INSERT INTO profiles
        {survivorship}
        SELECT k.profile_id, k.created_at, $at, s.first_seen, s.last_seen,
               coalesce(s.event_count, 0), i.identifiers, coalesce(t.traits, '{}')::JSON
        FROM id_idents i
        JOIN id_pkey k ON k.pk = i.profile_id
        LEFT JOIN stats s ON s.profile_id = i.profile_id
        LEFT JOIN traits t ON t.profile_id = i.profile_id
        WHERE i.profile_id >= $low AND i.profile_id < $high
        ORDER BY i.profile_id;
        DROP TABLE id_pev;
        """.replace("{survivorship}", _profile_row_ctes(prioritised, idents=False)),
        {"at": at, "low": low, "high": high},
    )


# Public reads.


def lookup(kind: str, value: str) -> Query:
    """The profile of one identifier."""
    return Query(
        "SELECT profile_id FROM identity_nodes WHERE kind = $kind AND value = $value",
        {"kind": kind, "value": value},
    )


# Bulk forms of the two lookups above, over a frame the caller registers as `id_lookup_frame`
# (columns `row`, `kind`, `value` for identifiers; `row`, `profile_id` for profile ids).
LOOKUP_MANY = """
SELECT f.row, n.profile_id
FROM id_lookup_frame f LEFT JOIN identity_nodes n ON n.kind = f.kind AND n.value = f.value
ORDER BY f.row
"""

LIVE_PROFILE_IDS = """
SELECT f.row, CASE WHEN r.profile_id IS NULL THEN NULL ELSE coalesce(r.merged_into, r.profile_id)
    END AS profile_id
FROM id_lookup_frame f LEFT JOIN identity_profile_ids r ON r.profile_id = f.profile_id
ORDER BY f.row
"""


def profile_id_record(profile_id: str) -> Query:
    """The registry row of a profile id."""
    return Query(
        "SELECT profile_id, merged_into FROM identity_profile_ids WHERE profile_id = $pid",
        {"pid": profile_id},
    )


# The profile of every resolved event: its most trusted identifier that has a profile.
EVENT_PROFILE_RELATION = """
SELECT ei.event_id, arg_min(n.profile_id, (n.rank::HUGEINT << 60) + n.node_id) AS profile_id
FROM identity_event_nodes ei
JOIN identity_nodes n ON n.node_id = ei.node_id
WHERE n.profile_id IS NOT NULL
GROUP BY ei.event_id
"""


def event_profiles(after_event_id: int, up_to_event_id: int | None) -> Query:
    """The profile of each resolved event in a range of event ids."""
    return Query(
        """
        SELECT ei.event_id, arg_min(
            n.profile_id, (n.rank::HUGEINT << 60) + n.node_id
        ) AS profile_id
        FROM identity_event_nodes ei
        JOIN identity_nodes n ON n.node_id = ei.node_id
        WHERE n.profile_id IS NOT NULL
          AND ei.event_id > $after AND ($up_to IS NULL OR ei.event_id <= $up_to)
        GROUP BY ei.event_id
        ORDER BY ei.event_id
        """,
        {"after": after_event_id, "up_to": up_to_event_id},
    )


def merges_since(after_seq: int) -> Query:
    """Published merges and splits after a sequence number."""
    return Query(
        """
        SELECT seq, kind, from_profile_id, to_profile_id, occurred_at AS "at", reason
        FROM profile_merges WHERE seq > $after ORDER BY seq
        """,
        {"after": after_seq},
    )


PARTITION = Query(
    """
    SELECT kind, value, profile_id FROM identity_nodes
    WHERE profile_id IS NOT NULL ORDER BY kind, value
    """
)


# Set-based labelling of temp table sql_edges(src, dst) into sql_labels(node_id, label).
SQL_LABELS_INIT = Query(
    """
    CREATE OR REPLACE TEMP TABLE sql_labels AS
    SELECT src AS node_id, src AS label FROM sql_edges UNION SELECT dst, dst FROM sql_edges
    """
)
# One hooking round: each root takes the smallest root it is linked to; returns the count.
SQL_LABELS_HOOK = Query(
    """
    CREATE OR REPLACE TEMP TABLE sql_hook AS
    SELECT greatest(a.label, b.label) AS node_id, min(least(a.label, b.label)) AS label
    FROM sql_edges e
    JOIN sql_labels a ON a.node_id = e.src
    JOIN sql_labels b ON b.node_id = e.dst
    WHERE a.label <> b.label
    GROUP BY greatest(a.label, b.label);
    SELECT count(*) FROM sql_hook;
    """
)
SQL_LABELS_APPLY_HOOK = Query(
    """
    CREATE OR REPLACE TEMP TABLE sql_labels AS
    SELECT l.node_id, least(l.label, coalesce(h.label, l.label)) AS label
    FROM sql_labels l LEFT JOIN sql_hook h ON h.node_id = l.node_id
    """
)
SQL_LABELS_JUMP = Query(
    """
    CREATE OR REPLACE TEMP TABLE sql_jump AS
    SELECT l.node_id, p.label FROM sql_labels l JOIN sql_labels p ON p.node_id = l.label;
    SELECT count(*) FROM sql_jump j JOIN sql_labels l ON l.node_id = j.node_id
    WHERE j.label <> l.label;
    """
)
SQL_LABELS_APPLY_JUMP = Query("CREATE OR REPLACE TEMP TABLE sql_labels AS SELECT * FROM sql_jump")


PROFILE_ROW_COLUMNS = (
    "profile_id",
    "created_at",
    "updated_at",
    "first_seen",
    "last_seen",
    "event_count",
    "identifiers",
    "traits",
)


def profile_row(profile_id: str) -> Query:
    """One row of `profiles`, columns PROFILE_ROW_COLUMNS."""
    return Query(
        """
        SELECT profile_id, created_at, updated_at, first_seen, last_seen, event_count,
               identifiers, traits
        FROM profiles WHERE profile_id = $pid
        """,
        {"pid": profile_id},
    )


# Events whose profile is $pid: candidates share an identifier with it, then the event's
# most trusted identifier decides. Filters: event name, [since, until). Each step is
# materialised so the joins run smallest first: left to the optimiser, the candidates' nodes
# were found by joining every event node with every node (9.3M x 4.75M at 1M customers)
# before keeping the candidates, 1.1 s per query for a profile of 40 events; now 0.1 s.
_PROFILE_EVENTS = """
    WITH pn AS (SELECT node_id FROM identity_nodes WHERE profile_id = $pid),
    cand AS MATERIALIZED (
        SELECT DISTINCT ei.event_id FROM identity_event_nodes ei
        JOIN pn ON pn.node_id = ei.node_id
    ),
    cand_nodes AS MATERIALIZED (
        SELECT ei.event_id, ei.node_id FROM identity_event_nodes ei
        SEMI JOIN cand c ON c.event_id = ei.event_id
    ),
    ep AS MATERIALIZED (
        SELECT cn.event_id, arg_min(
            n.profile_id, (n.rank::HUGEINT << 60) + n.node_id
        ) AS profile_id
        FROM cand_nodes cn
        JOIN identity_nodes n ON n.node_id = cn.node_id
        WHERE n.profile_id IS NOT NULL
        GROUP BY cn.event_id
    ),
    pe AS (
        SELECT e.event_id, e.message_id, e.source_id, e.type, e.event, e.timestamp,
               e.received_at, e.properties, e.traits, e.context
        FROM events e
        SEMI JOIN (SELECT event_id FROM ep WHERE profile_id = $pid) own
            ON own.event_id = e.event_id
        WHERE ($event::VARCHAR IS NULL OR e.event = $event)
          AND ($since::TIMESTAMP IS NULL OR e.timestamp >= $since)
          AND ($until::TIMESTAMP IS NULL OR e.timestamp < $until)
    )
"""
_PROFILE_EVENTS_PAGE = """{steps}
    SELECT * FROM pe ORDER BY timestamp DESC, event_id DESC LIMIT $limit OFFSET $offset
""".replace("{steps}", _PROFILE_EVENTS)
_PROFILE_EVENTS_COUNT = """{steps}
    SELECT count(*) FROM pe
""".replace("{steps}", _PROFILE_EVENTS)


def profile_events(
    profile_id: str,
    *,
    event: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    offset: int,
) -> tuple[Query, Query]:
    """A page of a profile's events, newest first, and their total count."""
    params: dict[str, object] = {
        "pid": profile_id,
        "event": event,
        "since": since,
        "until": until,
    }
    page = Query(_PROFILE_EVENTS_PAGE, {**params, "limit": limit, "offset": offset})
    return page, Query(_PROFILE_EVENTS_COUNT, params)


def profile_nodes(profile_id: str) -> Query:
    """The identifiers of a profile, with their first and last sighting."""
    return Query(
        """
        SELECT node_id, kind, value, status, first_event_id, first_seen, last_seen
        FROM identity_nodes WHERE profile_id = $pid ORDER BY rank, kind, value
        """,
        {"pid": profile_id},
    )


def profile_links(profile_id: str) -> Query:
    """Links touching a profile's identifiers, with the event that created them and whether
    they are in use (both ends in the profile) or not (refused, removed, other profile, or
    an end blocked or capped: such an identifier belongs to no profile)."""
    return Query(
        """
        WITH pn AS (SELECT node_id FROM identity_nodes WHERE profile_id = $pid),
        l AS (
            SELECT e.* FROM identity_edges e SEMI JOIN pn ON pn.node_id = e.src
            UNION
            SELECT e.* FROM identity_edges e SEMI JOIN pn ON pn.node_id = e.dst
        )
        SELECT a.kind AS from_kind, a.value AS from_value, b.kind AS to_kind,
               b.value AS to_value, l.first_event_id AS event_id, l.first_at AS linked_at,
               (coalesce(a.profile_id = $pid AND b.profile_id = $pid, false)
                AND NOT EXISTS (
                    SELECT 1 FROM identity_link_overrides o
                    WHERE o.action = 'remove_link' AND o.lifted_at IS NULL
                      AND least(o.src, o.dst) = l.src AND greatest(o.src, o.dst) = l.dst
                )
                AND NOT EXISTS (
                    SELECT 1 FROM identity_decisions d
                    WHERE d.decision = 'limit' AND d.node_id = l.src AND d.other_node_id = l.dst
                )
                AND NOT EXISTS (
                    SELECT 1 FROM identity_link_overrides o
                    WHERE o.action = 'remove_identifier' AND o.lifted_at IS NULL
                      AND o.src IN (l.src, l.dst)
                )) AS used
        FROM l
        JOIN identity_nodes a ON a.node_id = l.src
        JOIN identity_nodes b ON b.node_id = l.dst
        ORDER BY l.first_event_id, a.kind, a.value, b.kind, b.value
        """,
        {"pid": profile_id},
    )


def profile_history(profile_id: str) -> Query:
    """Merges and splits involving a profile or ids merged into it."""
    return Query(
        """
        WITH ids AS (
            SELECT $pid AS profile_id
            UNION SELECT profile_id FROM identity_profile_ids WHERE merged_into = $pid
        )
        SELECT seq, kind, from_profile_id, to_profile_id, occurred_at AS "at", reason,
               event_id
        FROM profile_merges
        WHERE from_profile_id IN (SELECT profile_id FROM ids)
           OR to_profile_id IN (SELECT profile_id FROM ids)
        ORDER BY seq
        """,
        {"pid": profile_id},
    )


def profile_decisions(profile_id: str) -> Query:
    """Rule decisions about a profile's identifiers, the links touching them, and the
    blocked or capped identifiers linked to them (why those links are not used)."""
    return Query(
        """
        WITH pn AS (SELECT node_id FROM identity_nodes WHERE profile_id = $pid),
        nbr AS (
            SELECT e.dst AS node_id FROM identity_edges e SEMI JOIN pn ON pn.node_id = e.src
            UNION
            SELECT e.src FROM identity_edges e SEMI JOIN pn ON pn.node_id = e.dst
        ),
        inactive AS (
            SELECT n.node_id FROM identity_nodes n SEMI JOIN nbr ON nbr.node_id = n.node_id
            WHERE n.status <> 'active'
        )
        SELECT d.decision, a.kind, a.value, b.kind AS other_kind, b.value AS other_value,
               d.event_id, d.detail, d.decided_at
        FROM identity_decisions d
        JOIN identity_nodes a ON a.node_id = d.node_id
        LEFT JOIN identity_nodes b ON b.node_id = d.other_node_id
        WHERE d.node_id IN (SELECT node_id FROM pn) OR d.other_node_id IN (SELECT node_id FROM pn)
           OR (d.decision IN ('blocked', 'capped')
               AND d.node_id IN (SELECT node_id FROM inactive))
        ORDER BY d.event_id NULLS LAST, a.kind, a.value
        """,
        {"pid": profile_id},
    )


# Profiles whose traits equal every (name, value) filter, latest activity first.
_SEARCH_PAGE = """
    WITH f AS (SELECT unnest($names::VARCHAR[]) AS n, unnest($values::VARCHAR[]) AS v),
    hits AS (
        SELECT p.* FROM profiles p
        WHERE NOT EXISTS (
            SELECT 1 FROM f WHERE json_extract_string(p.traits, f.n) IS DISTINCT FROM f.v
        )
        AND ($seen_after::TIMESTAMP IS NULL OR p.last_seen >= $seen_after)
    )
    SELECT profile_id, created_at, updated_at, first_seen, last_seen, event_count,
           identifiers, traits
    FROM hits ORDER BY last_seen DESC NULLS LAST, profile_id LIMIT $limit OFFSET $offset
"""
_SEARCH_COUNT = """
    WITH f AS (SELECT unnest($names::VARCHAR[]) AS n, unnest($values::VARCHAR[]) AS v)
    SELECT count(*) FROM profiles p
    WHERE NOT EXISTS (
        SELECT 1 FROM f WHERE json_extract_string(p.traits, f.n) IS DISTINCT FROM f.v
    )
    AND ($seen_after::TIMESTAMP IS NULL OR p.last_seen >= $seen_after)
"""


def trait_path(key: str) -> str:
    """The JSON path of one top-level key, whatever its characters (a non-empty key)."""
    return '$."' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def search_profiles(
    traits: dict[str, str], *, seen_after: datetime | None, limit: int, offset: int
) -> tuple[Query, Query]:
    """A page of profiles matching trait filters, and the total count.

    Each trait key becomes a quoted JSON path (`$."key"`): a bare key starting with `$` or
    `/` would be read as a path (an error, or a JSON pointer that matches nothing).
    """
    params: dict[str, object] = {
        "names": [trait_path(name) for name in traits],
        "values": list(traits.values()),
        "seen_after": seen_after,
    }
    page = Query(_SEARCH_PAGE, {**params, "limit": limit, "offset": offset})
    return page, Query(_SEARCH_COUNT, params)


def node_of(kind: str, value: str) -> Query:
    """The node id and profile of an identifier."""
    return Query(
        "SELECT node_id, profile_id FROM identity_nodes WHERE kind = $kind AND value = $value",
        {"kind": kind, "value": value},
    )


def link_exists(src: int, dst: int) -> Query:
    """Whether a link between two nodes is in the log."""
    return Query(
        "SELECT count(*) FROM identity_edges WHERE src = least($a, $b) AND dst = greatest($a, $b)",
        {"a": src, "b": dst},
    )


def add_override(
    *,
    action: str,
    src: int,
    dst: int | None,
    profile_id: str,
    reason: str | None,
    actor: str | None,
    at: datetime,
) -> Query:
    """Record an admin's unmerge decision; returns its id, above every id ever issued (the
    stored ones and the mark an erasure leaves when it deletes overrides)."""
    return Query(
        """
        INSERT INTO identity_link_overrides
        SELECT greatest(
                   coalesce(max(override_id), 0),
                   (SELECT coalesce(max(number), 0) FROM identity_state
                    WHERE name = 'override_id')
               ) + 1,
               {next_version}, $action, $src, $dst, $pid, $reason, $at, $actor, NULL, NULL
        FROM identity_link_overrides
        RETURNING override_id
        """.replace("{next_version}", _NEXT_OVERRIDE_VERSION),
        {
            "action": action,
            "src": src,
            "dst": dst,
            "pid": profile_id,
            "reason": reason,
            "actor": actor,
            "at": at,
        },
    )


def lift_override(override_id: int, *, actor: str | None, at: datetime) -> Query:
    """Allow a removed identifier or link again; returns the id if it was active."""
    return Query(
        """
        UPDATE identity_link_overrides
        SET lifted_at = $at, lifted_by = $actor, version = {next_version}
        WHERE override_id = $id AND lifted_at IS NULL
        RETURNING override_id
        """.replace("{next_version}", _NEXT_OVERRIDE_VERSION),
        {"id": override_id, "actor": actor, "at": at},
    )


def list_overrides(limit: int, offset: int) -> Query:
    """A page of unmerge decisions, newest first."""
    return Query(
        """
    SELECT o.override_id, o.action, a.kind AS kind, a.value AS value, b.kind AS other_kind,
           b.value AS other_value, o.profile_id, o.reason, o.created_at, o.created_by,
           o.lifted_at, o.lifted_by
    FROM identity_link_overrides o
    LEFT JOIN identity_nodes a ON a.node_id = o.src
    LEFT JOIN identity_nodes b ON b.node_id = o.dst
    ORDER BY o.override_id DESC
    LIMIT $limit OFFSET $offset
    """,
        {"limit": limit, "offset": offset},
    )


COUNT_OVERRIDES = Query("SELECT count(*) FROM identity_link_overrides")


# Identifiers the rules leave out of resolution (status `blocked` or `capped`: few nodes),
# filtered by kind and status. Their event counts are needed for the order, so they are
# counted for every filtered node (one pass over the event nodes, joined with that small
# set); the reason's details (list or pattern, higher-priority neighbours) only for the page.
_INACTIVE = """
    WITH x AS (
        SELECT node_id, kind, value, rank, status, first_seen, last_seen
        FROM identity_nodes
        WHERE status IN ('blocked', 'capped')
          AND ($kind::VARCHAR IS NULL OR kind = $kind)
          AND ($reason::VARCHAR IS NULL OR status = $reason)
    )
"""
_BLOCKED_PAGE = """{inactive},
    ev AS (
        SELECT en.node_id, count(*) AS events
        FROM identity_event_nodes en SEMI JOIN x ON x.node_id = en.node_id
        GROUP BY en.node_id
    ),
    page AS (
        SELECT x.*, coalesce(ev.events, 0) AS events
        FROM x LEFT JOIN ev ON ev.node_id = x.node_id
        ORDER BY events DESC, x.kind, x.value
        LIMIT $limit OFFSET $offset
    ),
    nbr AS (
        SELECT p.node_id, e.dst AS other FROM identity_edges e
        JOIN page p ON p.node_id = e.src WHERE p.status = 'capped'
        UNION ALL
        SELECT p.node_id, e.src FROM identity_edges e
        JOIN page p ON p.node_id = e.dst WHERE p.status = 'capped'
    ),
    -- Counted as the status step does: distinct neighbours of a more trusted kind that are
    -- not blocked themselves.
    higher AS (
        SELECT nbr.node_id, count(DISTINCT nbr.other) AS links
        FROM nbr
        JOIN page p ON p.node_id = nbr.node_id
        JOIN identity_nodes o ON o.node_id = nbr.other
        WHERE o.rank < p.rank AND o.status <> 'blocked'
        GROUP BY nbr.node_id
    ),
    pat AS (
        SELECT unnest($patterns::VARCHAR[]) AS pattern,
               generate_subscripts($patterns::VARCHAR[], 1) AS i
    ),
    matched AS (
        SELECT p.node_id, arg_min(pat.pattern, pat.i) AS pattern
        FROM page p, pat
        WHERE p.status = 'blocked' AND regexp_full_match(p.value, pat.pattern)
        GROUP BY p.node_id
    )
    SELECT p.kind, p.value, p.status AS reason,
           CASE WHEN p.status <> 'blocked' THEN NULL
                WHEN lower(p.value) IN (SELECT lower(unnest($values::VARCHAR[]))) THEN 'value'
                WHEN m.pattern IS NOT NULL THEN 'pattern'
           END AS blocked_by,
           CASE WHEN p.status = 'blocked'
                     AND lower(p.value) NOT IN (SELECT lower(unnest($values::VARCHAR[])))
                THEN m.pattern
           END AS pattern,
           CASE WHEN p.status = 'capped' THEN coalesce(h.links, 0) END AS higher_priority_ids,
           CASE WHEN p.status = 'capped' THEN $cap::BIGINT END AS cap,
           p.events, p.first_seen, p.last_seen
    FROM page p
    LEFT JOIN higher h ON h.node_id = p.node_id
    LEFT JOIN matched m ON m.node_id = p.node_id
    ORDER BY p.events DESC, p.kind, p.value
""".replace("{inactive}", _INACTIVE)
_BLOCKED_COUNT = "{inactive} SELECT count(*) FROM x".replace("{inactive}", _INACTIVE)


def blocked_identifiers(
    *,
    kind: str | None,
    reason: str | None,
    blocked_values: list[str],
    blocked_patterns: list[str],
    cap: int,
    limit: int,
    offset: int,
) -> tuple[Query, Query]:
    """A page of the identifiers the rules leave out (blocked or capped), most events first,
    with why (the blocked list, the first matching pattern, or the higher-priority
    identifiers counted against `cap`), and their total."""
    filters: dict[str, object] = {"kind": kind, "reason": reason}
    page = Query(
        _BLOCKED_PAGE,
        {
            **filters,
            "values": blocked_values,
            "patterns": blocked_patterns,
            "cap": cap,
            "limit": limit,
            "offset": offset,
        },
    )
    return page, Query(_BLOCKED_COUNT, filters)


def profiles_of_nodes(node_ids: list[int]) -> Query:
    """Live profile ids now holding the given identifiers."""
    return Query(
        """
        SELECT DISTINCT profile_id FROM identity_nodes
        WHERE node_id IN (SELECT unnest($nodes::BIGINT[])) AND profile_id IS NOT NULL
        ORDER BY profile_id
        """,
        {"nodes": node_ids},
    )


# Erasure of one profile ($pid): its events, identifiers (wherever they appear), links,
# decisions, overrides and row; the identifiers' hashes go to the suppression list and the
# erasure is published for the layers that key data by profile id.
# The graph of the others is then repaired to what a full rebuild of the remaining events
# would hold: identifiers carried only by the erased events go (with their links, decisions
# and any profile row left without identifiers), links first made by an erased event get
# the next event that makes them (or go), and nodes seen in erased events get their first
# event and sighting times again. `er_repair` names the surviving identifiers whose links,
# neighbours or events changed: the resolution run of the same transaction recomputes their
# statuses (a value back under `auto_cap`) and components.
_RELINK_STEPS = tuple((name, sql.replace("id_new_ein", "er_ein")) for name, sql in _LINK_STEPS)
_RELINK = "CREATE OR REPLACE TEMP TABLE er_links AS\n" + with_ctes(
    _RELINK_STEPS,
    """
SELECT src, dst, min(event_id) AS first_event_id, arg_min(ts, event_id) AS first_at
FROM links GROUP BY src, dst
""",
)
_ERASE = """
    CREATE OR REPLACE TEMP TABLE er_nodes AS
    SELECT node_id, kind, value FROM identity_nodes WHERE profile_id = $pid;
    CREATE OR REPLACE TEMP TABLE er_events AS
    WITH cand AS (
        SELECT DISTINCT ei.event_id FROM identity_event_nodes ei
        JOIN er_nodes n ON n.node_id = ei.node_id
    ),
    ep AS (
        SELECT ei.event_id, arg_min(
            n.profile_id, (n.rank::HUGEINT << 60) + n.node_id
        ) AS profile_id
        FROM identity_event_nodes ei
        JOIN identity_nodes n ON n.node_id = ei.node_id
        SEMI JOIN cand c ON c.event_id = ei.event_id
        WHERE n.profile_id IS NOT NULL
        GROUP BY ei.event_id
    )
    SELECT event_id FROM ep WHERE profile_id = $pid;
    CREATE OR REPLACE TEMP TABLE er_kept_events AS
    SELECT DISTINCT ei.event_id FROM identity_event_nodes ei
    SEMI JOIN er_nodes n ON n.node_id = ei.node_id
    ANTI JOIN er_events x ON x.event_id = ei.event_id;
    CREATE OR REPLACE TEMP TABLE er_seen AS
    SELECT DISTINCT ei.node_id FROM identity_event_nodes ei
    SEMI JOIN er_events x ON x.event_id = ei.event_id
    ANTI JOIN er_nodes n ON n.node_id = ei.node_id;
    CREATE OR REPLACE TEMP TABLE er_pairs AS
    SELECT e.src, e.dst FROM identity_edges e
    SEMI JOIN er_events x ON x.event_id = e.first_event_id
    ANTI JOIN er_nodes a ON a.node_id = e.src
    ANTI JOIN er_nodes b ON b.node_id = e.dst;
    CREATE OR REPLACE TEMP TABLE er_touched AS
    SELECT node_id FROM er_seen
    UNION SELECT e.dst FROM identity_edges e SEMI JOIN er_nodes n ON n.node_id = e.src
    UNION SELECT e.src FROM identity_edges e SEMI JOIN er_nodes n ON n.node_id = e.dst
    UNION SELECT ei.node_id FROM identity_event_nodes ei
          SEMI JOIN er_kept_events k ON k.event_id = ei.event_id;
    DELETE FROM er_touched t USING er_nodes n WHERE t.node_id = n.node_id;
    INSERT INTO identity_suppressions
    SELECT DISTINCT sha256(kind || chr(31) || value), kind, $pid, $at, NULL FROM er_nodes
    WHERE sha256(kind || chr(31) || value) NOT IN (
        SELECT identifier_hash FROM identity_suppressions WHERE lifted_at IS NULL
    );
    DELETE FROM events WHERE event_id IN (SELECT event_id FROM er_events);
    DELETE FROM event_identifiers WHERE event_id IN (SELECT event_id FROM er_events);
    DELETE FROM event_identifiers ei USING er_nodes n WHERE ei.kind = n.kind AND ei.value = n.value;
    DELETE FROM identity_event_nodes WHERE event_id IN (SELECT event_id FROM er_events)
        OR node_id IN (SELECT node_id FROM er_nodes);
    DELETE FROM identity_edges WHERE src IN (SELECT node_id FROM er_nodes)
        OR dst IN (SELECT node_id FROM er_nodes);
    DELETE FROM identity_decisions WHERE node_id IN (SELECT node_id FROM er_nodes)
        OR other_node_id IN (SELECT node_id FROM er_nodes);
    INSERT OR REPLACE INTO identity_state
    SELECT 'override_id', greatest(
        (SELECT coalesce(max(override_id), 0) FROM identity_link_overrides),
        (SELECT coalesce(max(number), 0) FROM identity_state WHERE name = 'override_id')
    ), NULL;
    DELETE FROM identity_link_overrides WHERE src IN (SELECT node_id FROM er_nodes)
        OR dst IN (SELECT node_id FROM er_nodes);
    DELETE FROM identity_nodes WHERE node_id IN (SELECT node_id FROM er_nodes);
    DELETE FROM profiles WHERE profile_id = $pid;
    INSERT INTO profile_erasures
    SELECT coalesce(max(seq), 0) + 1, $pid, $at FROM profile_erasures;
    CREATE OR REPLACE TEMP TABLE er_orphans AS
    SELECT n.node_id, n.profile_id FROM identity_nodes n
    SEMI JOIN er_seen s ON s.node_id = n.node_id
    ANTI JOIN identity_event_nodes ei ON ei.node_id = n.node_id;
    INSERT INTO er_touched
    SELECT e.dst FROM identity_edges e SEMI JOIN er_orphans o ON o.node_id = e.src
    UNION SELECT e.src FROM identity_edges e SEMI JOIN er_orphans o ON o.node_id = e.dst;
    CREATE OR REPLACE TEMP TABLE er_repair AS
    SELECT DISTINCT node_id FROM er_touched t
    WHERE node_id NOT IN (SELECT node_id FROM er_orphans);
    DELETE FROM identity_edges WHERE src IN (SELECT node_id FROM er_orphans)
        OR dst IN (SELECT node_id FROM er_orphans);
    DELETE FROM identity_decisions WHERE node_id IN (SELECT node_id FROM er_orphans)
        OR other_node_id IN (SELECT node_id FROM er_orphans);
    DELETE FROM identity_nodes WHERE node_id IN (SELECT node_id FROM er_orphans);
    DELETE FROM profiles WHERE profile_id IN (
        SELECT profile_id FROM er_orphans
        EXCEPT SELECT n.profile_id FROM identity_nodes n
        SEMI JOIN er_orphans o ON o.profile_id = n.profile_id
    );
    UPDATE identity_nodes n
    SET first_event_id = s.first_event_id, first_seen = s.first_seen, last_seen = s.last_seen
    FROM (
        SELECT ei.node_id, min(ei.event_id) AS first_event_id, min(e.timestamp) AS first_seen,
               max(e.timestamp) AS last_seen
        FROM identity_event_nodes ei
        JOIN events e ON e.event_id = ei.event_id
        SEMI JOIN er_seen s ON s.node_id = ei.node_id
        GROUP BY ei.node_id
    ) s
    WHERE n.node_id = s.node_id;
    CREATE OR REPLACE TEMP TABLE er_ein AS
    WITH ev AS (
        SELECT a.event_id FROM identity_event_nodes a
        JOIN er_pairs p ON p.src = a.node_id
        JOIN identity_event_nodes b ON b.event_id = a.event_id AND b.node_id = p.dst
        UNION SELECT event_id FROM er_kept_events
    )
    SELECT ei.event_id, ei.node_id, n.rank, e.timestamp AS ts
    FROM identity_event_nodes ei
    SEMI JOIN ev ON ev.event_id = ei.event_id
    JOIN identity_nodes n ON n.node_id = ei.node_id
    JOIN events e ON e.event_id = ei.event_id;
    {relink};
    DELETE FROM identity_edges e USING er_pairs p WHERE e.src = p.src AND e.dst = p.dst;
    UPDATE identity_edges e SET first_event_id = l.first_event_id, first_at = l.first_at
    FROM er_links l
    WHERE e.src = l.src AND e.dst = l.dst AND l.first_event_id < e.first_event_id;
    INSERT INTO identity_edges
    SELECT l.src, l.dst, l.first_event_id, l.first_at FROM er_links l
    ANTI JOIN identity_edges e ON e.src = l.src AND e.dst = l.dst;
    SELECT (SELECT count(*) FROM er_events), (SELECT count(*) FROM er_nodes);
    """.replace("{relink}", _RELINK)


def erase_profile(profile_id: str, at: datetime) -> Query:
    """Erase a profile and repair the graph of the others; the last statement returns
    (events erased, identifiers erased), the run that follows reads `er_repair`."""
    return Query(_ERASE, {"pid": profile_id, "at": at})


def lift_suppression(kind: str, value: str, at: datetime) -> Query:
    """End the suppression of an identifier (the person came back with a new consent)."""
    return Query(
        """
        UPDATE identity_suppressions SET lifted_at = $at
        WHERE identifier_hash = sha256($kind || chr(31) || $value) AND lifted_at IS NULL
        RETURNING kind
        """,
        {"kind": kind, "value": value, "at": at},
    )


def erasures_since(after_seq: int) -> Query:
    """Published erasures after a sequence number."""
    return Query(
        """
        SELECT seq, profile_id, erased_at AS "at" FROM profile_erasures
        WHERE seq > $after ORDER BY seq
        """,
        {"after": after_seq},
    )


def all_profile_events(profile_id: str) -> Query:
    """Every event of a profile, oldest first (for an export)."""
    return Query(
        """
        WITH pn AS (SELECT node_id FROM identity_nodes WHERE profile_id = $pid),
        cand AS (
            SELECT DISTINCT ei.event_id FROM identity_event_nodes ei
            JOIN pn ON pn.node_id = ei.node_id
        ),
        ep AS (
            SELECT ei.event_id, arg_min(
                n.profile_id, (n.rank::HUGEINT << 60) + n.node_id
            ) AS profile_id
            FROM identity_event_nodes ei
            JOIN identity_nodes n ON n.node_id = ei.node_id
            SEMI JOIN cand c ON c.event_id = ei.event_id
            WHERE n.profile_id IS NOT NULL
            GROUP BY ei.event_id
        )
        SELECT e.event_id, e.message_id, e.source_id, e.type, e.event, e.timestamp,
               e.received_at, e.properties, e.traits, e.context
        FROM ep JOIN events e ON e.event_id = ep.event_id
        WHERE ep.profile_id = $pid
        ORDER BY e.timestamp, e.event_id
        """,
        {"pid": profile_id},
    )


# The same rule as EVENT_PROFILE_RELATION, for the events of a relation `scoped_events` that
# the caller defines (a CTE with distinct `event_id`s): a range of orders needs only their own
# identifiers, not the whole event history (a join, which DuckDB runs about 3x faster here
# than `IN (subquery)` over 32M event nodes).
SCOPED_EVENT_PROFILE_RELATION = """
SELECT ei.event_id, arg_min(n.profile_id, (n.rank::HUGEINT << 60) + n.node_id) AS profile_id
FROM scoped_events s
JOIN identity_event_nodes ei ON ei.event_id = s.event_id
JOIN identity_nodes n ON n.node_id = ei.node_id
WHERE n.profile_id IS NOT NULL
GROUP BY ei.event_id
"""
