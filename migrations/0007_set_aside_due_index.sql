-- no-transaction
-- outbox-relay schema: delayed and retried rows by due time (see 0006_claim_floor.sql).
--
-- Built CONCURRENTLY (outside a transaction: this file holds one statement) so that enqueuers
-- and claims are never blocked; it waits for transactions that hold an older snapshot (a long
-- REPEATABLE READ report, pg_dump) to end. Insert-free for
-- ordinary rows: a row enters the index only when it is enqueued with a later available_at or
-- scheduled for a retry.
CREATE INDEX CONCURRENTLY IF NOT EXISTS messages_set_aside_due_idx
    ON outbox.messages (available_at, id) WHERE available_at > created_at;
