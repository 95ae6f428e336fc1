-- Time-range reads (`EventStore::position_at`) use the BRIN index on recorded_at. A block range
-- filled after the index was built stays unsummarized, and an unsummarized range matches every
-- query, until a VACUUM summarizes it: without this setting a young or busy table is scanned
-- whole. `autosummarize` asks autovacuum to summarize each range as soon as the next one starts
-- being filled (a work item, no cost on the append path).
ALTER INDEX events_recorded_at_brin SET (autosummarize = on);
