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
    const payload = Buffer.from(JSON.stringify({ order_id: Number(orderId), total_cents: 4200 })); // bytes, published as is
    const res = await client.query(
      'SELECT id, message_id, inserted FROM outbox.enqueue($1, $2::bytea, $3, $4::jsonb)',
      ['order.created', payload, String(orderId), JSON.stringify({ 'content-type': 'application/json' })],
    );
    await client.query('COMMIT');
    const row = res.rows[0];
    console.log(`enqueued ${row.message_id} as outbox row ${row.id} (inserted=${row.inserted})`);
  } catch (e) {
    await client.query('ROLLBACK');
    throw e;
  } finally {
    await client.end();
  }
}

main().catch((e) => { console.error(e); process.exit(1); });
