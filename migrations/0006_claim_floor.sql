-- outbox-relay schema: the claim floor (docs/architecture.md, "Storage under a held xmin horizon").
--
-- Every row the relay delivers is deleted, and while any transaction of the database holds the
-- xmin horizon back (a long report, pg_dump, an idle session in a transaction, a replication
-- slot) vacuum cannot remove those rows: an index scan from the start of outbox.messages walks
-- every one of them. The claim therefore starts its scan of fresh rows at a floor, an id below
-- which no row can ever be claimed by that scan:
--
--   outbox.claim_floor   one row: the floor. Only ever raised (greatest()), by any relay.
--
-- The relays raise it to the oldest live row that is neither delayed nor retried, once every
-- transaction that could still insert a row below it has ended (docs/architecture.md). Rows that
-- are delayed or retried (available_at > created_at, the "set-aside" rows) are found through the
-- partial indexes of migrations 0007 and 0008 whatever their id, so they never hold the floor
-- down, and rows re-inserted with their original id (`dead retry`) are such rows.

CREATE TABLE IF NOT EXISTS outbox.claim_floor (
    single     boolean     PRIMARY KEY DEFAULT true CHECK (single),
    floor      bigint      NOT NULL DEFAULT 0,
    raised_at  timestamptz NOT NULL DEFAULT now()
);
-- Updated a few times a second: keep its versions on one page (HOT updates).
ALTER TABLE outbox.claim_floor SET (fillfactor = 50);
INSERT INTO outbox.claim_floor (single) VALUES (true) ON CONFLICT DO NOTHING;

-- A queue table empties its last pages all the time, and a VACUUM that finds them empty cuts
-- them off under an ACCESS EXCLUSIVE lock, which every enqueue and claim then waits for (seen as
-- stalls of seconds in the steady state with autovacuum on). The pages are reused soon anyway.
ALTER TABLE outbox.messages SET (vacuum_truncate = false);
