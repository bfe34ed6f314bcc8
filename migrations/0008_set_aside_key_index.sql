-- no-transaction
-- outbox-relay schema: delayed and retried rows by key (see 0006_claim_floor.sql). The ordered
-- claim asks, per key of a batch, whether a set-aside row of the key precedes it; this index
-- answers without reading the key's deleted rows. Built CONCURRENTLY, as 0007.
CREATE INDEX CONCURRENTLY IF NOT EXISTS messages_set_aside_key_idx
    ON outbox.messages (key, id) WHERE key IS NOT NULL AND available_at > created_at;
