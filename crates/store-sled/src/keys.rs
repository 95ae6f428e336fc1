//! Read-model keys: the namespace and key length limits and the sled key of a read-model entry,
//! checked against them. Used by the store's reads (`store.rs`) and by the writer's commits.

use tracktrace_core::{Error, Result};

use crate::layout;

/// Longest read-model namespace, in bytes.
pub const MAX_NAMESPACE_LEN: usize = 256;
/// Longest read-model key, in bytes (long keys would push sled index pages out of the `db`
/// file into unsynced blob files; see [`crate::layout`]).
pub const MAX_READ_MODEL_KEY_LEN: usize = 1024;

pub(crate) fn check_namespace(i: usize, ns: &str) -> Result<()> {
    if ns.len() > MAX_NAMESPACE_LEN {
        return Err(Error::invalid(
            format!("writes[{i}].ns"),
            format!(
                "is {} bytes long; at most {MAX_NAMESPACE_LEN} are allowed",
                ns.len()
            ),
        ));
    }
    Ok(())
}

pub(crate) fn read_model_key(i: usize, ns: &str, key: &[u8]) -> Result<Vec<u8>> {
    check_namespace(i, ns)?;
    if key.len() > MAX_READ_MODEL_KEY_LEN {
        return Err(Error::invalid(
            format!("writes[{i}].key"),
            format!(
                "is {} bytes long; at most {MAX_READ_MODEL_KEY_LEN} are allowed",
                key.len()
            ),
        ));
    }
    let mut k = layout::namespace_prefix(ns);
    k.extend_from_slice(key);
    Ok(k)
}
