-- outbox-relay schema, part 5: no end-of-table truncation by VACUUM on the outbox.
--
-- A queue table's last pages are often empty for a moment (every row there already sent).
-- VACUUM then truncates them, which takes an ACCESS EXCLUSIVE lock on the table: every enqueuing
-- transaction and every claim queues behind it, and behind the lock request itself while it
-- waits. In the benchmark's steady state with autovacuum on (docs/benchmarks.md, 2026-12-02) the
-- flow stalled for 30-60 s at exactly the autovacuum runs that truncated, and at no other. The
-- space of empty pages is reused by the next inserts, so little is lost by keeping them;
-- `VACUUM (TRUNCATE) outbox.messages` shrinks the table on demand (docs/operations.md).
ALTER TABLE outbox.messages SET (vacuum_truncate = false);
