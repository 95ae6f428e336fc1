-- The xid offset (see `log_meta`) as a constant the planner folds into every append statement.
--
-- An append joined `log_meta` to read it: one more relation to lock, scan and check for
-- visibility per append (about a tenth of the single-event append statement's own execution
-- time), for a value that changes only when `migrate` raises it after a restore. An IMMUTABLE
-- SQL function with a constant body is inlined at plan time; replacing it invalidates every
-- cached plan that inlined it, in every session (PostgreSQL records the dependency), so the next
-- execution of a prepared append plans again with the new value. `migrate` keeps the function
-- equal to `log_meta.xid_offset` (it replaces it whenever it raises the offset, or finds the two
-- different). `log_meta` stays the record of the offset and the careful path (`tt_append`)
-- still reads it.
DO $$
BEGIN
    EXECUTE format(
        'CREATE FUNCTION tt_xid_offset() RETURNS bigint LANGUAGE sql IMMUTABLE PARALLEL SAFE AS %L',
        format('SELECT %s::bigint', (SELECT xid_offset FROM log_meta)));
END
$$;
