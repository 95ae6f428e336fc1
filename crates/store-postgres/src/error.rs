//! Mapping of sqlx / PostgreSQL failures onto the kernel's error kinds.

use tracktrace_core::Error;

/// SQLSTATE classes and codes that mean "the database is (temporarily) not there": connection
/// exceptions (class 08), operator intervention (57P01 admin shutdown, 57P02 crash shutdown,
/// 57P03 cannot connect now, 57014 query canceled e.g. by statement_timeout), insufficient
/// resources (class 53: too many connections, out of memory, disk full), serialization failures
/// and deadlocks (class 40: retrying the whole operation is the documented remedy).
fn is_transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("40")
        || matches!(code, "57P01" | "57P02" | "57P03" | "57014")
}

/// Maps a sqlx error into the kernel error; `what` says which operation failed.
pub(crate) fn map_err(what: &str, e: sqlx::Error) -> Error {
    match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => {
            Error::unavailable(format!("{what}: PostgreSQL is unreachable ({e})"), e)
        }
        sqlx::Error::Database(db) if is_transient_sqlstate(db.code().as_deref().unwrap_or("")) => {
            Error::unavailable(format!("{what}: PostgreSQL is unavailable ({e})"), e)
        }
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
            Error::corruption(None, format!("{what}: undecodable value ({e})"))
        }
        _ => Error::backend(format!("{what} failed"), e),
    }
}

/// Whether `e` is a unique violation (SQLSTATE 23505).
pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_codes() {
        for c in [
            "08006", "08001", "57P01", "57P03", "53300", "40001", "40P01", "57014",
        ] {
            assert!(is_transient_sqlstate(c), "{c}");
        }
        for c in ["23505", "42P01", "22001", ""] {
            assert!(!is_transient_sqlstate(c), "{c}");
        }
    }

    #[test]
    fn io_and_pool_errors_are_retryable() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(map_err("x", sqlx::Error::Io(io)).is_retryable());
        assert!(map_err("x", sqlx::Error::PoolTimedOut).is_retryable());
        assert!(!map_err("x", sqlx::Error::RowNotFound).is_retryable());
        assert!(matches!(
            map_err("x", sqlx::Error::Decode("bad".into())),
            Error::Corruption { .. }
        ));
    }
}
