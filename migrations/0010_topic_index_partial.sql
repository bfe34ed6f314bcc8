-- no-transaction
-- outbox-relay schema: the per-topic index again, as a partial index that only statements
-- naming a topic can use.
--
-- `messages_topic_id_idx (topic, id)` could also serve a condition on `id` alone, as a scan of
-- the whole index with the id checked on its second column. Once vacuum records the drained
-- table as empty (`reltuples` 0), the planner costs that scan the same as a primary-key lookup
-- and may pick it for the relay's statements by id; under a held xmin horizon the index still
-- holds an entry for every deleted row, and each such statement read all of them
-- (docs/architecture.md, "Storage under a held xmin horizon"). `topic` is NOT NULL, so the
-- predicate excludes no row, but a partial index is only used where the query implies its
-- predicate: every condition on `topic` (`topic = $1`, `topic <= $1`) does, a condition on
-- `id` alone does not.
--
-- Built CONCURRENTLY (one statement per file, outside a transaction): enqueuers and claims are
-- not blocked; it waits for transactions holding an older snapshot to end. 0011 drops the old
-- index once this one is valid.
CREATE INDEX CONCURRENTLY IF NOT EXISTS messages_by_topic_idx
    ON outbox.messages (topic, id) WHERE topic IS NOT NULL;
