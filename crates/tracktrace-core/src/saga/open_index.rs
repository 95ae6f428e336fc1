//! The persisted index of a saga's open work: one read-model entry per instance that has a
//! command without a result or a pending deadline, committed atomically with the runner's
//! checkpoint ([`crate::ReadModelStore::commit`]), so a restart reads the instances it names
//! and the log after the checkpoint instead of every saga record ever written.
//!
//! Namespace `"saga.{NAME}.open"`. Keys: [`FORMAT_KEY`] (written with the first commit; a
//! checkpoint without it was stored by a runner that kept no index, so recovery reads the whole
//! saga log once), and per open instance `o` + tenant length (1 byte) + tenant + instance +
//! the version (u64, big-endian) of the instance's oldest open work. The version makes an
//! entry name one stretch of open work: a runner deletes an entry only once it has seen that
//! work closed, which is final, so two runners racing (a lease lost but not yet noticed) can
//! leave a stale entry (harmless: recovery reloads the instance, finds nothing open and
//! deletes it) but never delete the entry of work that is still open.

use crate::id::{TenantId, Version};

/// Marks an index the runner maintains (value: its format, `1`).
pub(super) const FORMAT_KEY: &[u8] = b"format";
/// The format this runner writes.
pub(super) const FORMAT: &[u8] = b"1";
/// Prefix of every open-instance entry.
pub(super) const OPEN_PREFIX: &[u8] = b"o";

/// The index namespace of saga `name`.
pub(super) fn namespace(name: &str) -> String {
    format!("saga.{name}.open")
}

/// The entry of `instance` of `tenant` whose oldest open work is at `since`.
pub(super) fn entry_key(tenant: &TenantId, instance: &str, since: Version) -> Vec<u8> {
    let t = tenant.as_str().as_bytes();
    let mut k = Vec::with_capacity(2 + t.len() + instance.len() + 8);
    k.extend_from_slice(OPEN_PREFIX);
    // Tenant ids are at most 64 bytes.
    k.push(u8::try_from(t.len()).unwrap_or(u8::MAX));
    k.extend_from_slice(t);
    k.extend_from_slice(instance.as_bytes());
    k.extend_from_slice(&since.get().to_be_bytes());
    k
}

/// Decodes an entry key (`None`: not one this runner writes).
pub(super) fn parse_entry(key: &[u8]) -> Option<(TenantId, String, Version)> {
    let rest = key.strip_prefix(OPEN_PREFIX)?;
    let (&len, rest) = rest.split_first()?;
    let len = usize::from(len);
    if rest.len() < len + 8 {
        return None;
    }
    let (tenant, rest) = rest.split_at(len);
    let (instance, version) = rest.split_at(rest.len() - 8);
    let tenant = TenantId::parse(std::str::from_utf8(tenant).ok()?).ok()?;
    let instance = std::str::from_utf8(instance).ok()?.to_owned();
    let version = u64::from_be_bytes(version.try_into().ok()?);
    Some((tenant, instance, Version::new(version)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_keys_round_trip() {
        let t = TenantId::parse("acme").unwrap();
        for instance in ["", "o1", "Bag-ü-1"] {
            let k = entry_key(&t, instance, Version::new(42));
            assert_eq!(
                parse_entry(&k),
                Some((t.clone(), instance.to_owned(), Version::new(42)))
            );
        }
        assert_eq!(parse_entry(FORMAT_KEY), None);
        assert_eq!(parse_entry(b"o\x04acm"), None);
    }
}
