"""The SQL statements of :class:`safepool.PostgresBudget` (see :mod:`safepool.pgbudget` for
the state they keep). ``{name}``: constants of the budget and process, rendered once per budget
object (psycopg then prepares the statement on the server); ``%(name)s``: each call's parameters.
"""

from __future__ import annotations

SETUP_LOCK = 0x5AFE_5AFE  # the one-key advisory lock that serialises creating the tables


def channel(budget_id: int) -> str:
    """The NOTIFY channel on which a release of budget ``budget_id`` wakes its waiters."""
    return f"safepool_budget_{budget_id}"


# Takes the first free slot from a random start, skipping the slots this process holds (locks
# are re-entrant within a session), draws a token and records the holder.
ACQUIRE_SQL = """
WITH slot AS (
    SELECT (s %% {limit})::int4 AS n
    FROM generate_series(%(start)s::int4, %(start)s::int4 + {limit} - 1) AS s
    WHERE CASE WHEN (s %% {limit}) = ANY(%(held)s::int4[]) THEN false
          ELSE pg_try_advisory_lock({key}::int4, (s %% {limit})::int4) END
    LIMIT 1
), granted AS (
    SELECT n, nextval({sequence}) AS token FROM slot
)
INSERT INTO {permits} AS p (budget, slot, token, host, pid, since, backend)
SELECT {id}, n, token, {host}, {pid}, %(since)s, pg_backend_pid() FROM granted
ON CONFLICT (budget, slot) DO UPDATE SET token = excluded.token, host = excluded.host,
    pid = excluded.pid, since = excluded.since, backend = excluded.backend
RETURNING slot, token, backend
"""

# A waiter whose process holds nothing on its budget session waits in the server: it looks at
# every slot as ACQUIRE_SQL does and, finding none free, queues for one slot's lock (PostgreSQL
# grants a freed lock to the first in its queue, before any try-lock can take it) for at most
# lock_timeout, set for this statement's transaction only. No notification, no polling, no
# other statement while it waits. (No slot to skip: the process holds none on the session.)
# ``waited``: the permit came from the queue, not from a free slot.
WAIT_SQL = """
WITH free AS (
    SELECT (s %% {limit})::int4 AS n
    FROM generate_series(%(start)s::int4, %(start)s::int4 + {limit} - 1) AS s
    WHERE pg_try_advisory_lock({key}::int4, (s %% {limit})::int4)
    LIMIT 1
), bound AS (
    SELECT set_config('lock_timeout', %(wait)s, true) AS timeout
), queued AS (
    SELECT %(slot)s::int4 AS n FROM bound
    WHERE CASE WHEN EXISTS (SELECT FROM free) THEN false
          ELSE pg_advisory_lock({key}::int4, %(slot)s::int4) IS NOT NULL END
), granted AS (
    SELECT n, nextval({sequence}) AS token
    FROM (SELECT n FROM free UNION ALL SELECT n FROM queued) AS got
), recorded AS (
    INSERT INTO {permits} AS p (budget, slot, token, host, pid, since, backend)
    SELECT {id}, n, token, {host}, {pid}, %(since)s, pg_backend_pid() FROM granted
    ON CONFLICT (budget, slot) DO UPDATE SET token = excluded.token, host = excluded.host,
        pid = excluded.pid, since = excluded.since, backend = excluded.backend
    RETURNING slot, token, backend
)
SELECT slot, token, backend, EXISTS (SELECT FROM queued) AS waited FROM recorded
"""

# NOTIFY takes a database-wide lock at commit, so a release notifies only when a listener slot
# is held (a waiter listens): trying the slots' locks for this transaction says so, no writes.
RELEASE_SQL = """
SELECT pg_advisory_unlock({key}::int4, %(slot)s::int4),
       CASE WHEN NOT pg_try_advisory_xact_lock(-{key}::int4, 1)
              OR NOT pg_try_advisory_xact_lock(-{key}::int4, 2)
            THEN pg_notify({channel}, '') END
"""

# The same release for the budget session, which sends it without waiting for its reply (see
# safepool._pgsession): prepared once per connection, for every budget (a statement parsed and
# planned at each release costs about a third of a round trip on the server). $1: the budget's
# lock class (KEY_BASE + its id), $2: the slot, $3: its channel.
PREPARE_RELEASE_SQL = """
PREPARE safepool_release (int4, int4, text) AS
SELECT pg_advisory_unlock($1, $2),
       CASE WHEN NOT pg_try_advisory_xact_lock(-$1, 1) OR NOT pg_try_advisory_xact_lock(-$1, 2)
            THEN pg_notify($3, '') END
"""
RELEASE_STATEMENT = b"safepool_release"

HOLDERS_SQL = """
SELECT p.pid, p.since, p.token, p.host FROM {permits} p
JOIN pg_locks l ON l.locktype = 'advisory' AND l.classid = %(key)s::int4::oid
    AND l.objid = p.slot::oid AND l.objsubid = 2 AND l.pid = p.backend AND l.granted
    AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
WHERE p.budget = %(id)s ORDER BY p.token
"""

STATS_SQL = """
SELECT (SELECT count(*) FROM pg_locks l WHERE l.locktype = 'advisory' AND l.objsubid = 2
        AND l.classid = %(key)s::int4::oid AND l.granted
        AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())),
       (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {sequence})
"""

TABLES_SQL = """
CREATE TABLE IF NOT EXISTS {budgets} (
    id serial PRIMARY KEY,
    name text NOT NULL UNIQUE,
    "limit" integer NOT NULL CHECK ("limit" >= 1),
    created timestamptz NOT NULL DEFAULT now()
);
CREATE UNLOGGED TABLE IF NOT EXISTS {permits} (
    budget integer NOT NULL,
    slot integer NOT NULL,
    token bigint NOT NULL,
    host text NOT NULL,
    pid integer NOT NULL,
    since double precision NOT NULL,
    backend integer NOT NULL,
    PRIMARY KEY (budget, slot)
)
"""
