//! `tracktrace-server`: see the crate docs.
fn main() {}
