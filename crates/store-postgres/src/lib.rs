//! PostgreSQL-backed `EventStore` for tracktrace. Not implemented yet: see issue 4.
