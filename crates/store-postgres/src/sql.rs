//! SQL text shared by the append statements (`store.rs`, `group.rs`), as macros for `concat!`:
//! the parts that must be the same in every one of them.

/// Takes the store's shared append lock (`$1` the store's key, second half
/// `horizon::APPEND_LOCK`); see `HORIZON_SQL` for why every append takes it before its id.
macro_rules! append_lock {
    () => {
        "pg_catalog.pg_advisory_xact_lock_shared($1, 1953759233)"
    };
}

/// The column list of an insert into the log.
macro_rules! insert_events {
    () => {
        "INSERT INTO events (position, tenant, stream, version, event_id, dedup_key, event_type,
                    schema_version, content_type, payload, correlation_id, causation_id,
                    headers, recorded_at)
"
    };
}

/// The position of the transaction's first event (`(xid + offset) * 1024`); an event's is this
/// plus its index in the statement.
macro_rules! first_position {
    () => {
        "(pg_catalog.pg_current_xact_id()::text::bigint + tt_xid_offset()) * 1024"
    };
}

/// `l`: the lock taken first, for statements that need nothing else before their insert.
macro_rules! lock_cte {
    () => {
        concat!(
            "
WITH l AS MATERIALIZED (
    SELECT 1 FROM ",
            append_lock!(),
            "
)
"
        )
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_append_lock_is_the_one_readers_look_for() {
        let key = crate::horizon::APPEND_LOCK.to_string();
        assert!(
            append_lock!().contains(&format!(", {key})")),
            "{}",
            append_lock!()
        );
    }
}
