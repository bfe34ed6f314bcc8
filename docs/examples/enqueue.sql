-- Enqueue from psql (or any SQL client), inside the same transaction as the business row.
-- Run: psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f docs/examples/enqueue.sql
BEGIN;

CREATE TABLE IF NOT EXISTS example_orders (id bigserial PRIMARY KEY, total_cents bigint NOT NULL);

WITH o AS (INSERT INTO example_orders (total_cents) VALUES (4200) RETURNING id)
SELECT e.id AS outbox_id, e.message_id, e.inserted
  FROM o,
       outbox.enqueue(
         p_topic   => 'order.created',
         p_payload => json_build_object('order_id', o.id, 'total_cents', 4200)::text,
         p_key     => o.id::text,                          -- ordering key: the aggregate id
         p_headers => '{"content-type": "application/json"}'::jsonb
       ) AS e;

-- Idempotent: the same message id twice writes one row; the second call returns inserted = false.
SELECT * FROM outbox.enqueue('order.audit', 'hello'::text, p_message_id => 'example-audit-1');
SELECT * FROM outbox.enqueue('order.audit', 'hello'::text, p_message_id => 'example-audit-1');

COMMIT;
