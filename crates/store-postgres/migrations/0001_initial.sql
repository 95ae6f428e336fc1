-- tracktrace PostgreSQL schema, version 1.
-- Runs inside the store's own schema (the migration runner sets search_path), so names are
-- unqualified. Every statement runs in one transaction together with the version bookkeeping.

-- One-row table. `xid_offset` keeps positions increasing when a logical dump is restored into a
-- cluster whose transaction ids are lower than those the positions were derived from
-- (see `PgStore::migrate`).
CREATE TABLE log_meta (
    id         boolean PRIMARY KEY DEFAULT true CHECK (id),
    xid_offset bigint  NOT NULL DEFAULT 0
);
INSERT INTO log_meta DEFAULT VALUES;

-- The global log. `position` = (transaction id + xid_offset) * 1024 + index in the batch: see
-- the crate docs ("gap-free global log").
CREATE TABLE events (
    position       bigint      NOT NULL,
    tenant         text        NOT NULL,
    stream         text        NOT NULL,
    version        bigint      NOT NULL,
    event_id       uuid        NOT NULL,
    dedup_key      text,
    event_type     text        NOT NULL,
    schema_version integer     NOT NULL,
    content_type   text        NOT NULL,
    payload        bytea       NOT NULL,
    correlation_id text,
    causation_id   text,
    headers        jsonb,
    recorded_at    timestamptz NOT NULL,
    CONSTRAINT events_pkey PRIMARY KEY (position),
    -- stream reads (forwards and backwards) and the last line of defence for versions
    CONSTRAINT events_stream_version_key UNIQUE (tenant, stream, version),
    -- idempotency: event ids are unique per tenant
    CONSTRAINT events_event_id_key UNIQUE (tenant, event_id)
);
-- idempotency: business dedup keys are unique per tenant
CREATE UNIQUE INDEX events_dedup_key_idx ON events (tenant, dedup_key) WHERE dedup_key IS NOT NULL;
-- Time-range scans (per tenant: plus a filter on tenant; exact once partitioned by tenant).
-- BRIN because recorded_at follows the physical order of an append-only table: a few pages of
-- index for the whole log and next to no cost per append (a B-tree on (tenant, recorded_at)
-- costs every append another index insertion).
CREATE INDEX events_recorded_at_brin ON events USING brin (recorded_at);

CREATE TABLE snapshots (
    tenant         text    NOT NULL,
    stream         text    NOT NULL,
    version        bigint  NOT NULL,
    schema_version integer NOT NULL,
    payload        bytea   NOT NULL,
    PRIMARY KEY (tenant, stream)
);

CREATE TABLE checkpoints (
    name     text   PRIMARY KEY,
    position bigint NOT NULL
);

CREATE TABLE read_models (
    ns    text  NOT NULL,
    key   bytea NOT NULL,
    value bytea NOT NULL,
    PRIMARY KEY (ns, key)
);

-- Appends a batch to one stream: the careful path. The store's first attempt is a plain
-- statement (FAST_APPEND_SQL in store.rs) with the same effect when nothing goes wrong; this
-- function runs after that attempt reports a failed precondition or hits a unique violation.
--
-- p_lock: the store's advisory-lock key. It is taken (shared) *before* the transaction gets an
-- id, so a reader that sees no holder knows that every append that may still commit has a
-- transaction id at or above its snapshot's xmax (see HORIZON_SQL in store.rs).
-- p_expected_kind: 0 any, 1 no stream, 2 stream exists, 3 exact (p_expected).
-- p_retry: this call follows a unique violation (a concurrent duplicate, or a concurrent append
-- to the same stream that took the same versions): look duplicates up first, and serialise with
-- other retrying appenders of the stream through an exclusive per-stream advisory lock.
-- Otherwise the unique indexes detect both cases and the caller retries with p_retry = true.
--
-- Result rows (o_kind):
--   0  appended: o_version = first version, o_position = first position, o_recorded_us
--   1  duplicate lookup: one row per event (o_idx, 1-based), o_* null when not stored
--   2  conflict: o_version = actual version
CREATE FUNCTION tt_append(
    p_lock            integer,
    p_tenant          text,
    p_stream          text,
    p_expected_kind   smallint,
    p_expected        bigint,
    p_retry           boolean,
    p_ids             uuid[],
    p_dedup           text[],
    p_types           text[],
    p_schema_versions integer[],
    p_content_types   text[],
    p_payloads        bytea[],
    p_correlation     text[],
    p_causation       text[],
    p_headers         text[]
) RETURNS TABLE (
    o_kind        smallint,
    o_idx         integer,
    o_event_id    uuid,
    o_stream      text,
    o_version     bigint,
    o_position    bigint,
    o_recorded_us bigint
) LANGUAGE plpgsql AS $fn$
DECLARE
    n        integer     := cardinality(p_ids);
    v_actual bigint;
    v_now    timestamptz := now();
    v_ok     boolean;
    v_dup    boolean     := false;
BEGIN
    -- The shared lock first (before this transaction has an id), then the stream's version
    -- (ORDER BY/LIMIT rather than max(): one backward index probe whatever the planner
    -- believes about the table's size).
    SELECT COALESCE((SELECT e.version FROM events e
                     WHERE e.tenant = p_tenant AND e.stream = p_stream
                     ORDER BY e.version DESC LIMIT 1), 0)
    INTO v_actual
    FROM pg_advisory_xact_lock_shared(p_lock, 1953759233);

    IF p_retry THEN
        PERFORM pg_advisory_xact_lock(p_lock, hashtext(p_tenant || '/' || p_stream));
        v_dup := EXISTS (SELECT 1 FROM events e
                         WHERE e.tenant = p_tenant
                           AND (e.event_id = ANY (p_ids) OR e.dedup_key = ANY (p_dedup)));
        -- Re-read under the per-stream lock.
        v_actual := COALESCE((SELECT e.version FROM events e
                              WHERE e.tenant = p_tenant AND e.stream = p_stream
                              ORDER BY e.version DESC LIMIT 1), 0);
    END IF;

    IF NOT v_dup THEN
        v_ok := CASE p_expected_kind
                    WHEN 0 THEN true
                    WHEN 1 THEN v_actual = 0
                    WHEN 2 THEN v_actual > 0
                    ELSE v_actual = p_expected
                END;
        IF v_ok THEN
            -- pg_current_xact_id() gives this transaction its id, after the lock above.
            RETURN QUERY
                WITH ins AS (
                    INSERT INTO events (position, tenant, stream, version, event_id, dedup_key,
                                        event_type, schema_version, content_type, payload,
                                        correlation_id, causation_id, headers, recorded_at)
                    SELECT (pg_current_xact_id()::text::bigint + m.xid_offset) * 1024 + u.i - 1,
                           p_tenant, p_stream, v_actual + u.i, u.id, u.dk, u.ty, u.sv, u.ct,
                           u.pl, u.co, u.ca, u.hd::jsonb, v_now
                    FROM log_meta m,
                         unnest(p_ids, p_dedup, p_types, p_schema_versions, p_content_types,
                                p_payloads, p_correlation, p_causation, p_headers)
                         WITH ORDINALITY AS u(id, dk, ty, sv, ct, pl, co, ca, hd, i)
                    RETURNING position
                )
                SELECT 0::smallint, n, NULL::uuid, NULL::text, v_actual + 1, min(ins.position),
                       (extract(epoch FROM v_now) * 1000000)::bigint
                FROM ins;
            RETURN;
        END IF;
        -- Precondition failed: duplicates take precedence over the conflict.
        IF NOT p_retry THEN
            v_dup := EXISTS (SELECT 1 FROM events e
                             WHERE e.tenant = p_tenant
                               AND (e.event_id = ANY (p_ids) OR e.dedup_key = ANY (p_dedup)));
        END IF;
        IF NOT v_dup THEN
            RETURN QUERY SELECT 2::smallint, 0, NULL::uuid, NULL::text, v_actual, NULL::bigint,
                                NULL::bigint;
            RETURN;
        END IF;
    END IF;

    -- Some events are already stored: report, per event, the original (by id, then dedup key).
    RETURN QUERY
        SELECT 1::smallint, u.i::integer, x.event_id, x.stream, x.version, x.position,
               NULL::bigint
        FROM unnest(p_ids, p_dedup) WITH ORDINALITY AS u(id, dk, i)
        LEFT JOIN LATERAL (
            (SELECT e.event_id, e.stream, e.version, e.position FROM events e
             WHERE e.tenant = p_tenant AND e.event_id = u.id)
            UNION ALL
            (SELECT e.event_id, e.stream, e.version, e.position FROM events e
             WHERE e.tenant = p_tenant AND e.dedup_key = u.dk)
            LIMIT 1
        ) x ON true
        ORDER BY u.i;
END
$fn$;
