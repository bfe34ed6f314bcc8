-- no-transaction
-- outbox-relay schema: sent rows by key (replay of a key's messages, `outbox-relay replay --key`).
--
-- Retention (relay.retention_secs) keeps published rows in outbox.sent for a while; replaying a
-- key reads its rows in id order from this index instead of the whole table. Built CONCURRENTLY
-- (outside a transaction: this file holds one statement) so that the relay's inserts into
-- outbox.sent are never blocked while it builds.
CREATE INDEX CONCURRENTLY IF NOT EXISTS sent_key_id_idx
    ON outbox.sent (key, id) WHERE key IS NOT NULL;
