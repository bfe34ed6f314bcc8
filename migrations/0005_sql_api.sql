-- no-transaction
-- outbox-relay schema: the SQL enqueue API for services in any language (docs/enqueue-sql.md).
--
--   messages_topic_length        1-249 bytes (octet_length); 0001 counted characters
--   messages_message_id_length   1-200 bytes (octet_length); 0001 counted characters
--   outbox.enqueue(text, jsonb, ...)        a JSON document as the payload
--   outbox.enqueue_many(text, bytea[] | text[] | jsonb[], ...)   many messages, one INSERT
--
-- The broker limits are in bytes (a Kafka topic name, an AMQP short string), so the checks
-- count bytes: a 249-character topic of two-byte characters is 498 bytes and no broker takes it.
--
-- Applied outside one enclosing transaction (the first line of this file): the new checks are
-- added NOT VALID in a short transaction of their own, which takes the table's exclusive lock
-- only for a catalog change, and are then validated by a separate statement, which scans the
-- table under a SHARE UPDATE EXCLUSIVE lock: enqueues and the relay keep going while a large
-- outbox.messages is checked. Should a waiting row break a new limit (a topic or message id of
-- multi-byte characters), the validation fails and names the constraint; the row can be found
-- with `SELECT id, topic, message_id FROM outbox.messages WHERE octet_length(topic) > 249 OR
-- octet_length(message_id) > 200`, then `outbox-relay migrate` runs again. Every statement is
-- safe to run twice.

BEGIN;

ALTER TABLE outbox.messages
  DROP CONSTRAINT IF EXISTS messages_message_id_length,
  ADD CONSTRAINT messages_message_id_length CHECK (octet_length(message_id) BETWEEN 1 AND 200) NOT VALID,
  DROP CONSTRAINT IF EXISTS messages_topic_length,
  ADD CONSTRAINT messages_topic_length CHECK (octet_length(topic) BETWEEN 1 AND 249) NOT VALID;

-- A JSON document as the payload: published as its text (UTF-8), with the header
-- `content-type: application/json` unless p_headers sets its own content-type.
CREATE OR REPLACE FUNCTION outbox.enqueue(
    p_topic        text,
    p_payload      jsonb,
    p_key          text        DEFAULT NULL,
    p_headers      jsonb       DEFAULT '{}'::jsonb,
    p_message_id   text        DEFAULT NULL,
    p_available_at timestamptz DEFAULT NULL
) RETURNS TABLE (id bigint, message_id text, inserted boolean)
LANGUAGE sql AS $$
  SELECT * FROM outbox.enqueue(p_topic, convert_to(p_payload::text, 'UTF8'), p_key,
                               '{"content-type": "application/json"}'::jsonb || coalesce(p_headers, '{}'::jsonb),
                               p_message_id, p_available_at)
$$;

-- Enqueue many messages of one topic with one INSERT, inside the caller's transaction.
--
-- p_payloads holds one element per message; p_keys, p_headers and p_message_ids are either NULL
-- or hold exactly one element per payload (an element may be NULL: no key, no headers, a
-- generated UUIDv7). Rows are written in array order, so their ids (the relay's publishing
-- order) follow it. Returns one row per payload: its 1-based position `ord`, the row's id and
-- message id, and whether this call wrote it.
--
-- Idempotent per message id, like outbox.enqueue: a message id already waiting (or, with
-- relay.retention_secs, already sent) is not written again and returns the existing row with
-- inserted = false; a message id repeated inside the call is written once, for its first
-- element, and its later elements return that row with inserted = false.
--
-- A conflicting row can be deleted between the INSERT and the lookup of the existing rows (the
-- relay published it in that instant); such message ids are inserted again, as if enqueued a
-- moment later. Should that repeat four times, the call fails with SQLSTATE 40001
-- (serialization_failure), which transaction-retry loops already retry.
CREATE OR REPLACE FUNCTION outbox.enqueue_many(
    p_topic        text,
    p_payloads     bytea[],
    p_keys         text[]      DEFAULT NULL,
    p_headers      jsonb[]     DEFAULT NULL,
    p_message_ids  text[]      DEFAULT NULL,
    p_available_at timestamptz DEFAULT NULL
) RETURNS TABLE (ord integer, id bigint, message_id text, inserted boolean)
LANGUAGE plpgsql AS $$
DECLARE
  n       integer := coalesce(cardinality(p_payloads), 0);
  v_ids   text[];                  -- each element's message id
  v_todo  text[];                  -- distinct message ids neither written nor found yet
  r_mid   text[]    := '{}';       -- message ids written or found ...
  r_id    bigint[]  := '{}';       -- ... their row ids
  r_new   boolean[] := '{}';       -- ... written by this call
BEGIN
  IF p_payloads IS NULL THEN
    RAISE EXCEPTION 'outbox.enqueue_many: p_payloads is NULL'
      USING ERRCODE = 'invalid_parameter_value', HINT = 'pass an array of payloads (an empty array enqueues nothing)';
  END IF;
  IF array_position(p_payloads, NULL) IS NOT NULL THEN
    RAISE EXCEPTION 'outbox.enqueue_many: element % of p_payloads is NULL', array_position(p_payloads, NULL)
      USING ERRCODE = 'invalid_parameter_value', HINT = 'pass an empty payload instead of NULL, or leave the message out';
  END IF;
  IF cardinality(p_keys) <> n OR cardinality(p_headers) <> n OR cardinality(p_message_ids) <> n THEN
    RAISE EXCEPTION 'outbox.enqueue_many: % payloads but % keys, % headers, % message ids',
                    n, coalesce(cardinality(p_keys)::text, 'NULL'), coalesce(cardinality(p_headers)::text, 'NULL'),
                    coalesce(cardinality(p_message_ids)::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'give p_keys, p_headers and p_message_ids one element per payload (NULL elements allowed), or pass NULL for the whole array';
  END IF;
  IF n = 0 THEN
    RETURN;
  END IF;

  SELECT array_agg(coalesce(i.mid, outbox.uuid_v7()::text) ORDER BY i.ord) INTO v_ids
    FROM unnest(p_payloads, p_message_ids) WITH ORDINALITY AS i(payload, mid, ord);
  v_todo := ARRAY(SELECT DISTINCT u FROM unnest(v_ids) AS u);

  FOR v_round IN 1..4 LOOP
    WITH ins AS (
      INSERT INTO outbox.messages AS m (message_id, topic, key, payload, headers, available_at)
      SELECT i.mid, p_topic, i.key, i.payload, coalesce(i.headers, '{}'::jsonb),
             coalesce(p_available_at, now())
        FROM unnest(v_ids, p_payloads, p_keys, p_headers) WITH ORDINALITY AS i(mid, payload, key, headers, ord)
       WHERE (v_round = 1 OR i.mid = ANY (v_todo))
         AND NOT EXISTS (SELECT 1 FROM outbox.sent s WHERE s.message_id = i.mid)
       ORDER BY i.ord
      ON CONFLICT ON CONSTRAINT messages_message_id_key DO NOTHING
      RETURNING m.id, m.message_id
    )
    SELECT r_mid || array_agg(ins.message_id), r_id || array_agg(ins.id),
           r_new || array_agg(true)
      INTO r_mid, r_id, r_new
      FROM ins;
    v_todo := ARRAY(SELECT unnest(v_todo) EXCEPT SELECT unnest(r_mid));
    EXIT WHEN cardinality(v_todo) = 0;

    SELECT r_mid || array_agg(e.message_id), r_id || array_agg(e.id), r_new || array_agg(false)
      INTO r_mid, r_id, r_new
      FROM (SELECT DISTINCT ON (x.message_id) x.id, x.message_id
              FROM (SELECT m.id, m.message_id FROM outbox.messages m WHERE m.message_id = ANY (v_todo)
                    UNION ALL
                    SELECT s.id, s.message_id FROM outbox.sent s WHERE s.message_id = ANY (v_todo)) x
             ORDER BY x.message_id, x.id) e;
    v_todo := ARRAY(SELECT unnest(v_todo) EXCEPT SELECT unnest(r_mid));
    EXIT WHEN cardinality(v_todo) = 0;
  END LOOP;

  IF cardinality(v_todo) > 0 THEN
    RAISE EXCEPTION 'outbox.enqueue_many: message id % conflicted with a row that was gone before it could be read, four times', v_todo[1]
      USING ERRCODE = 'serialization_failure',
            HINT = 'retry the transaction: the message is then written anew or found';
  END IF;

  RETURN QUERY
    SELECT i.ord::integer, r.id, i.mid,
           r.fresh AND i.ord = min(i.ord) OVER (PARTITION BY i.mid)
      FROM unnest(v_ids) WITH ORDINALITY AS i(mid, ord)
      JOIN unnest(r_mid, r_id, r_new) AS r(mid, id, fresh) ON r.mid = i.mid
     ORDER BY i.ord;
END $$;

-- Text payloads (JSON documents, strings): stored as their UTF-8 bytes.
CREATE OR REPLACE FUNCTION outbox.enqueue_many(
    p_topic        text,
    p_payloads     text[],
    p_keys         text[]      DEFAULT NULL,
    p_headers      jsonb[]     DEFAULT NULL,
    p_message_ids  text[]      DEFAULT NULL,
    p_available_at timestamptz DEFAULT NULL
) RETURNS TABLE (ord integer, id bigint, message_id text, inserted boolean)
LANGUAGE sql AS $$
  SELECT * FROM outbox.enqueue_many(
    p_topic,
    CASE WHEN p_payloads IS NOT NULL THEN
      ARRAY(SELECT convert_to(t.p, 'UTF8') FROM unnest(p_payloads) WITH ORDINALITY AS t(p, o) ORDER BY t.o)
    END,
    p_keys, p_headers, p_message_ids, p_available_at)
$$;

-- JSON documents: each published as its text (UTF-8), with `content-type: application/json`
-- unless its headers set their own content-type.
CREATE OR REPLACE FUNCTION outbox.enqueue_many(
    p_topic        text,
    p_payloads     jsonb[],
    p_keys         text[]      DEFAULT NULL,
    p_headers      jsonb[]     DEFAULT NULL,
    p_message_ids  text[]      DEFAULT NULL,
    p_available_at timestamptz DEFAULT NULL
) RETURNS TABLE (ord integer, id bigint, message_id text, inserted boolean)
LANGUAGE sql AS $$
  SELECT * FROM outbox.enqueue_many(
    p_topic,
    CASE WHEN p_payloads IS NOT NULL THEN
      ARRAY(SELECT convert_to(t.p::text, 'UTF8') FROM unnest(p_payloads) WITH ORDINALITY AS t(p, o) ORDER BY t.o)
    END,
    p_keys,
    CASE WHEN p_payloads IS NOT NULL AND (p_headers IS NULL OR cardinality(p_headers) = cardinality(p_payloads)) THEN
      ARRAY(SELECT '{"content-type": "application/json"}'::jsonb || coalesce(p_headers[t.o], '{}'::jsonb)
              FROM generate_series(1, cardinality(p_payloads)) AS t(o) ORDER BY t.o)
      ELSE p_headers
    END,
    p_message_ids, p_available_at)
$$;

COMMIT;

-- Outside the transaction above: a scan that blocks no enqueue (SHARE UPDATE EXCLUSIVE).
ALTER TABLE outbox.messages VALIDATE CONSTRAINT messages_message_id_length;
ALTER TABLE outbox.messages VALIDATE CONSTRAINT messages_topic_length;
