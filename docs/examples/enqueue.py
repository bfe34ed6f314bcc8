"""Enqueue from Python with psycopg 3, in the same transaction as the business row.

Run: pip install 'psycopg[binary]' && DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres python3 docs/examples/enqueue.py
"""
import json
import os

import psycopg
from psycopg.types.json import Jsonb

url = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")

with psycopg.connect(url) as conn:  # the block commits on success, rolls back on error
    conn.execute("CREATE TABLE IF NOT EXISTS example_orders (id bigserial PRIMARY KEY, total_cents bigint NOT NULL)")
    order_id = conn.execute("INSERT INTO example_orders (total_cents) VALUES (%s) RETURNING id", (4200,)).fetchone()[0]

    # One message, bytes payload: published as is.
    payload = json.dumps({"order_id": order_id, "total_cents": 4200}).encode()
    outbox_id, message_id, inserted = conn.execute(
        "SELECT id, message_id, inserted FROM outbox.enqueue(%s, %s::bytea, %s, %s::jsonb)",
        ("order.created", payload, str(order_id), json.dumps({"content-type": "application/json"})),
    ).fetchone()
    print(f"enqueued {message_id} as outbox row {outbox_id} (inserted={inserted})")

    # One message, jsonb payload: content-type: application/json is added.
    conn.execute(
        "SELECT * FROM outbox.enqueue(%s, %s, %s)",
        ("order.paid", Jsonb({"order_id": order_id, "paid_cents": 4200}), str(order_id)),
    )

    # Many messages of one topic, one INSERT; ordered, idempotent per message id.
    lines = [{"line": n, "sku": sku} for n, sku in ((1, "A-1"), (2, "B-2"), (3, "C-3"))]
    for _ in range(2):  # the second call writes nothing: inserted=False
        rows = conn.execute(
            "SELECT ord, id, message_id, inserted FROM outbox.enqueue_many(%s, %s::jsonb[], %s::text[], NULL, %s::text[])",
            ("order.line_added", [json.dumps(line) for line in lines], [str(order_id)] * len(lines),
             [f"example-line-{line['line']}" for line in lines]),
        ).fetchall()
        print("enqueue_many:", ", ".join(f"{mid} row {id} inserted={new}" for _, id, mid, new in rows))

    # A plain INSERT (the columns topic and payload, optionally key, headers, message_id, available_at).
    conn.execute(
        "INSERT INTO outbox.messages (topic, key, payload, headers, message_id) VALUES (%s, %s, %s, %s::jsonb, %s)"
        " ON CONFLICT (message_id) DO NOTHING",
        ("order.archived", str(order_id), json.dumps({"order_id": order_id}).encode(),
         json.dumps({"content-type": "application/json"}), "example-archived-1"),
    )
