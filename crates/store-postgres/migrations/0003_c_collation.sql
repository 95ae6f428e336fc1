-- Identifiers (tenant, stream, dedup key) compare as bytes. Every append probes two unique
-- indexes that lead with them and every stream read one; under a locale collation (even
-- C.UTF-8 before PostgreSQL 17) each comparison copies both strings and calls strcoll. Byte
-- order is also the right meaning: ids are case-sensitive and locale-independent, and
-- `starts_with(stream, …)` stays index-friendly.
--
-- Only a collation change: the table is not rewritten, its indexes on these columns are
-- rebuilt (under an exclusive lock: on a large existing store, run this migration in a
-- maintenance window).
ALTER TABLE events
    ALTER COLUMN tenant TYPE text COLLATE "C",
    ALTER COLUMN stream TYPE text COLLATE "C",
    ALTER COLUMN dedup_key TYPE text COLLATE "C";
ALTER TABLE snapshots
    ALTER COLUMN tenant TYPE text COLLATE "C",
    ALTER COLUMN stream TYPE text COLLATE "C";
