-- no-transaction
-- outbox-relay schema: drops `messages_topic_id_idx`, replaced by the partial
-- `messages_by_topic_idx` of 0010 (see there why).
--
-- DROP INDEX CONCURRENTLY (outside a transaction) waits for the transactions using the table
-- instead of taking a lock that would queue enqueuers behind them.
DROP INDEX CONCURRENTLY IF EXISTS outbox.messages_topic_id_idx;
