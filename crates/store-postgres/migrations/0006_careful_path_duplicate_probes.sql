-- The careful path (`tt_append`) again, with two changes:
--
-- * Its duplicate check asked for `tenant = $1 AND (event_id = ANY (…) OR dedup_key = ANY (…))`.
--   No single index serves that OR, and a generic plan (PL/pgSQL caches one per session) made
--   while the table was small chose an index scan on `tenant` alone with the OR as a filter
--   (`EXPLAIN` under `plan_cache_mode = force_generic_plan`, 0–500 events: `Index Cond: (tenant
--   = $1)`), i.e. a scan of the tenant's whole log for every duplicate or conflict, for as long
--   as the connection lives. Split into `event_id = ANY` and `dedup_key = ANY` it still scanned
--   by tenant, and correlated EXISTS per id were turned into hashed subplans that read the
--   tenant's events once per call. Now each id and key is probed on its own unique index
--   through a LATERAL subquery with LIMIT (which the planner cannot flatten or hash), the shape
--   the per-event lookup at the end of the function already had: `EXPLAIN` with 0, 50 and
--   5,000 events shows `Index Cond: ((event_id = u.id) AND (tenant = $1))` and
--   `((tenant = $1) AND (dedup_key = u.dk))`.
-- * The xid offset is read from `tt_xid_offset()` (migration 4) rather than joined from
--   `log_meta`, as in the fast path.
--
-- Everything else is unchanged (see migration 1 for the function's contract).
CREATE OR REPLACE FUNCTION tt_append(
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
        v_dup := EXISTS (
            SELECT 1
            FROM unnest(p_ids, p_dedup) AS u(id, dk),
                 LATERAL ((SELECT 1 FROM events e WHERE e.tenant = p_tenant AND e.event_id = u.id)
                          UNION ALL
                          (SELECT 1 FROM events e WHERE e.tenant = p_tenant AND e.dedup_key = u.dk)
                          LIMIT 1) x);
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
                    SELECT (pg_current_xact_id()::text::bigint + tt_xid_offset()) * 1024 + u.i - 1,
                           p_tenant, p_stream, v_actual + u.i, u.id, u.dk, u.ty, u.sv, u.ct,
                           u.pl, u.co, u.ca, u.hd::jsonb, v_now
                    FROM unnest(p_ids, p_dedup, p_types, p_schema_versions, p_content_types,
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
            v_dup := EXISTS (
                SELECT 1
                FROM unnest(p_ids, p_dedup) AS u(id, dk),
                     LATERAL ((SELECT 1 FROM events e
                               WHERE e.tenant = p_tenant AND e.event_id = u.id)
                              UNION ALL
                              (SELECT 1 FROM events e
                               WHERE e.tenant = p_tenant AND e.dedup_key = u.dk)
                              LIMIT 1) x);
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
