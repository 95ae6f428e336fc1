//! sled-backed `EventStore` for tracktrace (embedded default). Not implemented yet: see issue 3.
