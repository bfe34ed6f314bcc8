-- outbox-relay schema, part 5: no end-of-table truncation by VACUUM on the outbox.
--
-- A queue table's last pages are often empty for a moment (every row there already sent).
-- VACUUM then truncates them, which takes an ACCESS EXCLUSIVE lock on the table: every enqueuing
-- transaction and every claim queues behind it, and behind the lock request itself while it
-- waits. The benchmark's steady state with autovacuum on (docs/benchmarks.md) stalled for tens
-- of seconds at some of the autovacuum runs. The space of empty pages is reused by the next
-- inserts anyway, so nothing is lost by keeping them.
ALTER TABLE outbox.messages SET (vacuum_truncate = false);
