//! Helpers shared by the `kill -9` crash tests (child processes re-executing the test binary).
#![allow(dead_code, unreachable_pub)]

use std::path::Path;
use std::time::Duration;

use tracktrace_store_sled::SledStore;

/// A two-worker multi-threaded runtime for a parent or child process.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Opens the sled store in `dir`, retrying briefly while the kernel releases the file lock of a
/// child that was just killed.
pub fn open_sled(dir: &Path) -> SledStore {
    let mut last = None;
    for _ in 0..100 {
        match SledStore::open_path(dir) {
            Ok(s) => return s,
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("cannot open {}: {last:?}", dir.display());
}
