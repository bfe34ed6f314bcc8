-- Enqueue from psql (or any SQL client), inside the same transaction as the business row.
-- Run: psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f docs/examples/enqueue.sql
BEGIN;

CREATE TABLE IF NOT EXISTS example_orders (id bigserial PRIMARY KEY, total_cents bigint NOT NULL);

-- One message: outbox.enqueue with a text payload (stored as its UTF-8 bytes).
WITH o AS (INSERT INTO example_orders (total_cents) VALUES (4200) RETURNING id)
SELECT e.id AS outbox_id, e.message_id, e.inserted
  FROM o,
       outbox.enqueue(
         p_topic   => 'order.created',
         p_payload => json_build_object('order_id', o.id, 'total_cents', 4200)::text,
         p_key     => o.id::text,                          -- ordering key: the aggregate id
         p_headers => '{"content-type": "application/json"}'::jsonb
       ) AS e;

-- A jsonb payload: published as its JSON text, with content-type: application/json added.
SELECT * FROM outbox.enqueue(
  'order.paid',
  jsonb_build_object('order_id', currval(pg_get_serial_sequence('example_orders', 'id')), 'paid_cents', 4200),
  p_key => currval(pg_get_serial_sequence('example_orders', 'id'))::text);

-- Many messages of one topic with one INSERT: one array element per message, in order.
-- Idempotent per message id: the second call writes nothing and returns inserted = false.
SELECT ord, id, message_id, inserted
  FROM outbox.enqueue_many(
         'order.line_added',
         ARRAY['{"line": 1, "sku": "A-1"}', '{"line": 2, "sku": "B-2"}', '{"line": 3, "sku": "C-3"}']::jsonb[],
         p_keys        => array_fill(currval(pg_get_serial_sequence('example_orders', 'id'))::text, ARRAY[3]),
         p_message_ids => ARRAY['example-line-1', 'example-line-2', 'example-line-3']);
SELECT ord, id, message_id, inserted
  FROM outbox.enqueue_many(
         'order.line_added',
         ARRAY['{"line": 1, "sku": "A-1"}', '{"line": 2, "sku": "B-2"}', '{"line": 3, "sku": "C-3"}']::jsonb[],
         p_keys        => array_fill(currval(pg_get_serial_sequence('example_orders', 'id'))::text, ARRAY[3]),
         p_message_ids => ARRAY['example-line-1', 'example-line-2', 'example-line-3']);

-- Idempotent: the same message id twice writes one row; the second call returns inserted = false.
SELECT * FROM outbox.enqueue('order.audit', 'hello'::text, p_message_id => 'example-audit-1');
SELECT * FROM outbox.enqueue('order.audit', 'hello'::text, p_message_id => 'example-audit-1');

-- A plain INSERT works too (docs/enqueue-sql.md, "Ways to write a message"): the columns
-- topic and payload, optionally key, headers, message_id, available_at; nothing else.
INSERT INTO outbox.messages (topic, key, payload, headers, message_id)
VALUES ('order.archived',
        currval(pg_get_serial_sequence('example_orders', 'id'))::text,
        convert_to(json_build_object('order_id', currval(pg_get_serial_sequence('example_orders', 'id')))::text, 'UTF8'),
        '{"content-type": "application/json"}',
        'example-archived-1')
ON CONFLICT (message_id) DO NOTHING;

COMMIT;
