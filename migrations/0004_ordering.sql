-- outbox-relay schema: per-key ordering across many relays (docs/ordering.md).
--
--   outbox.messages.slot      hash(key) mod 256, NULL for unordered rows (stored, generated)
--   messages_key_id_idx       (key, id) for rows with a key: the head-of-key checks in the claim
--   messages_key_retry_idx    keyed rows waiting for a retry: held-back keys, cheaply
--   outbox.ordering_members   live relays in ordered mode, with heartbeats
--   outbox.partition_leases   one row per slot: which relay owns it, until when
--   outbox.parked_keys        keys parked after a dead letter (ordering.on_dead = "park")
--
-- The slot count (256) is fixed here: it bounds how many relays share the ordered key space.
-- Ownership of slots is an optimisation only (keys are not split between relays); the claim
-- itself enforces the order by key, so even a wrong slot (a hash function that changed across a
-- major-version upgrade) cannot reorder a key.

-- Adding a stored column rewrites outbox.messages once (it is a queue table: normally small).
ALTER TABLE outbox.messages
  ADD COLUMN IF NOT EXISTS slot smallint GENERATED ALWAYS AS ((hashtext(key) & 255)::smallint) STORED;

CREATE INDEX IF NOT EXISTS messages_key_id_idx ON outbox.messages (key, id) WHERE key IS NOT NULL;

-- Insert-free: new rows have attempts = 0, so enqueueing never touches this index.
CREATE INDEX IF NOT EXISTS messages_key_retry_idx ON outbox.messages (topic, key)
  WHERE key IS NOT NULL AND attempts > 0;

CREATE TABLE IF NOT EXISTS outbox.ordering_members (
    relay_id     text        PRIMARY KEY,
    hostname     text        NOT NULL,
    pid          integer     NOT NULL,
    joined_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);

CREATE TABLE IF NOT EXISTS outbox.partition_leases (
    slot       smallint    PRIMARY KEY CHECK (slot BETWEEN 0 AND 255),
    relay_id   text,
    expires_at timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO outbox.partition_leases (slot)
  SELECT s FROM generate_series(0, 255) AS s
  ON CONFLICT DO NOTHING;

CREATE TABLE IF NOT EXISTS outbox.parked_keys (
    key        text        PRIMARY KEY,
    topic      text        NOT NULL,
    -- The dead letter that parked the key (outbox.dead_letters.id).
    dead_id    bigint      NOT NULL,
    message_id text        NOT NULL,
    reason     text        NOT NULL,
    parked_at  timestamptz NOT NULL DEFAULT now()
);
