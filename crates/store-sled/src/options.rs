//! [`SledOptions`] and [`Durability`] modes, and the errors of opening a store.

use std::path::{Path, PathBuf};

/// When an acknowledged write is safe, and against what.
///
/// Whatever the mode, a crash never exposes half an append (an append left without its
/// stream-index run is removed on open, see [`crate::layout`]) and never reorders the global
/// log: a crash can only lose a *suffix* of what was written, never a write while keeping a
/// later one. The modes differ in how long that suffix may be for writes that were already
/// acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Durability {
    /// **Default.** A write is acknowledged only after a real barrier: sled's `flush()` (which on
    /// Linux ends in `sync_file_range(2)`: data written, but neither device cache nor file
    /// metadata flushed) followed by `fdatasync(2)` of sled's `db` file. (Keys and values are
    /// kept small enough that sled writes no `blobs/` file, which it would never fsync; as a
    /// safety net the barrier looks for one at most once a second and syncs it, see
    /// [`crate::layout`].) An acknowledged write survives `kill -9`, a
    /// kernel crash and power loss, provided the device honours flushes. Concurrent writers share
    /// barriers (group commit), so throughput grows with concurrency.
    #[default]
    Fsync,
    /// Opt-in, **process-crash-safe only**: a write is acknowledged after sled's `flush()`, which
    /// hands the data to the operating system. It survives `kill -9` or a panic of the process,
    /// but a kernel crash or power loss may lose acknowledged writes (a suffix of the log).
    Flush,
    /// Opt-in, **not crash-safe**: a write is acknowledged once it is in sled's in-memory log;
    /// sled's background flusher writes it to the OS every `flush_every_ms` milliseconds. Any
    /// crash (even of the process) may lose the writes of roughly the last interval. For tests,
    /// caches and data that can be rebuilt.
    Buffered {
        /// Interval of sled's background flusher, in milliseconds (at least 1).
        flush_every_ms: u64,
    },
}

/// Default size of sled's page cache: 256 MiB.
pub const DEFAULT_CACHE_CAPACITY: u64 = 256 * 1024 * 1024;

/// How to open a [`crate::SledStore`]: `SledOptions::new(path)` plus the builder methods.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SledOptions {
    /// Directory of the store (created if missing). One process at a time may hold it.
    pub path: PathBuf,
    /// When writes are acknowledged (default [`Durability::Fsync`]).
    pub durability: Durability,
    /// sled's page cache size in bytes (default [`DEFAULT_CACHE_CAPACITY`]).
    pub cache_capacity: u64,
    /// Writes waiting for the writer thread at most (default [`DEFAULT_MAX_PENDING`]); a write
    /// beyond it fails at once with `Error::Overloaded` (nothing written) instead of queueing
    /// without bound.
    pub max_pending: usize,
    /// Free bytes the file system of the store's directory must keep (default
    /// [`DEFAULT_MIN_FREE_BYTES`]; 0: no reserve). Below it every write fails at once with
    /// `Error::StorageFull` (nothing written; reads keep working) and succeeds again once space
    /// is freed, so sled never meets a full disk (a failed sled write poisons the store until it
    /// is reopened). Checked on Unix only (`statvfs`); elsewhere there is no reserve.
    pub min_free_bytes: u64,
}

/// Default of [`SledOptions::min_free_bytes`]: 64 MiB (sled writes segments of a few MiB and
/// a write group is at most a few MiB: the reserve keeps them all from meeting a full disk).
pub const DEFAULT_MIN_FREE_BYTES: u64 = 64 * 1024 * 1024;

/// Default of [`SledOptions::max_pending`].
pub const DEFAULT_MAX_PENDING: usize = 4096;

impl SledOptions {
    /// Options for a store in `path` with the defaults: [`Durability::Fsync`], 256 MiB cache.
    pub fn new(path: impl AsRef<Path>) -> Self {
        Self {
            path: path.as_ref().to_path_buf(),
            durability: Durability::default(),
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            max_pending: DEFAULT_MAX_PENDING,
            min_free_bytes: DEFAULT_MIN_FREE_BYTES,
        }
    }

    /// Sets the durability mode (builder style).
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Sets the page cache size in bytes (builder style).
    pub fn cache_capacity(mut self, bytes: u64) -> Self {
        self.cache_capacity = bytes;
        self
    }

    /// Sets the free-space reserve of the store's file system in bytes (builder style; 0
    /// disables it).
    pub fn min_free_bytes(mut self, bytes: u64) -> Self {
        self.min_free_bytes = bytes;
        self
    }

    /// Sets the bound of writes waiting for the writer thread (builder style; at least 1).
    pub fn max_pending(mut self, n: usize) -> Self {
        self.max_pending = n.max(1);
        self
    }
}

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Another process (or another open store in this process) holds the directory.
    #[error(
        "the event store directory {} is in use by another process (or is already open in this one): \
         sled holds an exclusive lock on its `db` file; close the other user first",
        path.display()
    )]
    Locked {
        /// The store directory.
        path: PathBuf,
        /// sled's error.
        #[source]
        source: sled::Error,
    },
    /// A file-system operation failed.
    #[error("cannot open the event store at {}: {what}", path.display())]
    Io {
        /// The store directory.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// sled failed to open or recover the database.
    #[error("sled could not open the event store at {}", path.display())]
    Sled {
        /// The store directory.
        path: PathBuf,
        /// sled's error.
        #[source]
        source: sled::Error,
    },
    /// The last page of the log is damaged, so the next position cannot be known safely.
    /// (Damage elsewhere is reported by the reads that meet it.)
    #[error("the event store at {} is damaged: the last page of the log (position {position}) {detail}", path.display())]
    Corruption {
        /// The store directory.
        path: PathBuf,
        /// First position of the damaged page.
        position: u64,
        /// What is wrong.
        detail: String,
    },
    /// The directory holds a database this version does not understand.
    #[error("{} is not a tracktrace sled store of format 1: {detail}", path.display())]
    Format {
        /// The store directory.
        path: PathBuf,
        /// What was found.
        detail: String,
    },
}

impl From<OpenError> for tracktrace_core::Error {
    fn from(e: OpenError) -> Self {
        tracktrace_core::Error::backend(e.to_string(), e)
    }
}
