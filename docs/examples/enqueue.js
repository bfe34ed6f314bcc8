// Enqueue from Node.js with node-postgres (pg), in the same transaction as the business row.
// Run: npm install pg && DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres node docs/examples/enqueue.js
const { Client } = require('pg');

async function main() {
  const client = new Client({ connectionString: process.env.DATABASE_URL || 'postgres://postgres@127.0.0.1:5432/postgres' });
  await client.connect();
  try {
    await client.query('BEGIN');
    await client.query('CREATE TABLE IF NOT EXISTS example_orders (id bigserial PRIMARY KEY, total_cents bigint NOT NULL)');
    const order = await client.query('INSERT INTO example_orders (total_cents) VALUES ($1) RETURNING id', [4200]);
    const orderId = order.rows[0].id;
    const json = { 'content-type': 'application/json' };

    // One message, bytes payload: published as is.
    const payload = Buffer.from(JSON.stringify({ order_id: Number(orderId), total_cents: 4200 }));
    const res = await client.query(
      'SELECT id, message_id, inserted FROM outbox.enqueue($1, $2::bytea, $3, $4::jsonb)',
      ['order.created', payload, String(orderId), JSON.stringify(json)],
    );
    const row = res.rows[0];
    console.log(`enqueued ${row.message_id} as outbox row ${row.id} (inserted=${row.inserted})`);

    // One message, jsonb payload: content-type: application/json is added.
    await client.query('SELECT * FROM outbox.enqueue($1, $2::jsonb, $3)',
      ['order.paid', JSON.stringify({ order_id: Number(orderId), paid_cents: 4200 }), String(orderId)]);

    // Many messages of one topic, one INSERT; ordered, idempotent per message id. Buffers in an
    // array are sent as bytea[].
    const lines = [{ line: 1, sku: 'A-1' }, { line: 2, sku: 'B-2' }, { line: 3, sku: 'C-3' }];
    for (let i = 0; i < 2; i += 1) { // the second call writes nothing: inserted=false
      const many = await client.query(
        'SELECT ord, id, message_id, inserted FROM outbox.enqueue_many($1, $2::bytea[], $3::text[], $4::jsonb[], $5::text[])',
        ['order.line_added',
          lines.map((l) => Buffer.from(JSON.stringify(l))),
          lines.map(() => String(orderId)),
          lines.map(() => JSON.stringify(json)),
          lines.map((l) => `example-line-${l.line}`)],
      );
      console.log('enqueue_many:', many.rows.map((r) => `${r.message_id} row ${r.id} inserted=${r.inserted}`).join(', '));
    }

    // A plain INSERT (the columns topic and payload, optionally key, headers, message_id, available_at).
    await client.query(
      `INSERT INTO outbox.messages (topic, key, payload, headers, message_id) VALUES ($1, $2, $3, $4::jsonb, $5)
       ON CONFLICT (message_id) DO NOTHING`,
      ['order.archived', String(orderId), Buffer.from(JSON.stringify({ order_id: Number(orderId) })),
        JSON.stringify(json), 'example-archived-1'],
    );
    await client.query('COMMIT');
  } catch (e) {
    await client.query('ROLLBACK');
    throw e;
  } finally {
    await client.end();
  }
}

main().catch((e) => { console.error(e); process.exit(1); });
