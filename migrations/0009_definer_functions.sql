-- outbox-relay schema: enqueueing with INSERT on outbox.messages and nothing else
-- (docs/security.md, "Roles: least privilege").
--
-- An application role that may only enqueue holds INSERT on outbox.messages (and may call the
-- enqueue functions), but no privilege on the outbox's other tables. What runs on its behalf
-- and needs more runs with the rights of the functions' owner, the role that ran the migrations:
--
--   outbox.after_insert()    the insert trigger: appends to outbox.topic_counts, reads
--                            outbox.relay_sleepers, sends the wake-up NOTIFY
--   outbox.after_delete()    the delete trigger (the relay's deletes): outbox.topic_counts
--   outbox.after_truncate()  the truncate trigger: outbox.topic_counts
--   outbox.enqueue(text, bytea, ...)         reads outbox.sent and outbox.messages to find the
--   outbox.enqueue_many(text, bytea[], ...)  existing row of a message id (idempotency)
--
-- The text and jsonb overloads of enqueue and enqueue_many call these two, so they need nothing
-- of their own. Each function pins its search_path to pg_catalog (every outbox name in them is
-- schema-qualified), so that no object a caller creates elsewhere can stand in for a built-in
-- while the function runs with its owner's rights. The cost is a save and restore of one
-- setting per call (per statement for the triggers).

ALTER FUNCTION outbox.after_insert()
  SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION outbox.after_delete()
  SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION outbox.after_truncate()
  SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION outbox.enqueue(text, bytea, text, jsonb, text, timestamptz)
  SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION outbox.enqueue_many(text, bytea[], text[], jsonb[], text[], timestamptz)
  SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
