-- The number of events in the log, for `EventStore::store_stats` (metrics read it at every
-- scrape).
--
-- Positions derive from transaction ids, so the head position is no event count (a fresh
-- schema in a busy cluster starts in the millions). A counter updated by every append would
-- serialise all commits on one row, the cost the gap-free log was designed to avoid (see
-- "Gap-free global log" in the crate docs). Appends do not touch this table. The reader keeps it
-- up to date instead: `store_stats` computes the read horizon, counts the events between
-- `below` and that horizon (a range of the primary key: whatever was appended since the last
-- call, by any process), and moves `below` up to the horizon with the new total. No event ever
-- commits below a horizon and events are never deleted, so `events`, the number of events
-- whose position is below `below`, stays exact.
--
-- One row, written by `migrate` when the table is empty (the events below the read horizon at
-- that moment, counted once: on an existing log this is the only full count).
CREATE TABLE event_count (
    id     boolean PRIMARY KEY DEFAULT true CHECK (id),
    below  bigint  NOT NULL,
    events bigint  NOT NULL
);
