"""Enqueue from Python with psycopg 3, in the same transaction as the business row.

Run: pip install 'psycopg[binary]' && DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres python3 docs/examples/enqueue.py
"""
import json
import os

import psycopg

url = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")

with psycopg.connect(url) as conn:  # the block commits on success, rolls back on error
    conn.execute("CREATE TABLE IF NOT EXISTS example_orders (id bigserial PRIMARY KEY, total_cents bigint NOT NULL)")
    order_id = conn.execute("INSERT INTO example_orders (total_cents) VALUES (%s) RETURNING id", (4200,)).fetchone()[0]
    payload = json.dumps({"order_id": order_id, "total_cents": 4200}).encode()  # bytes: published as is
    outbox_id, message_id, inserted = conn.execute(
        "SELECT id, message_id, inserted FROM outbox.enqueue(%s, %s::bytea, %s, %s::jsonb)",
        ("order.created", payload, str(order_id), json.dumps({"content-type": "application/json"})),
    ).fetchone()
    print(f"enqueued {message_id} as outbox row {outbox_id} (inserted={inserted})")
