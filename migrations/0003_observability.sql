-- outbox-relay schema: observability (live relay instances).
--
-- Every running relay upserts one row here every relay.heartbeat_interval_secs and deletes rows
-- whose heartbeat is older than relay.relay_expiry_secs (relays that died without saying so).
-- A relay that stops cleanly deletes its own row. The row carries what an operator's
-- `outbox-relay status` needs without reaching each relay over HTTP: the health of the relay's
-- sinks and its recent publish rate per topic.
--
-- Unlogged: heartbeats are rewritten every few seconds and worthless after a crash (the relays
-- write them again), so they need not go through the WAL.

CREATE UNLOGGED TABLE IF NOT EXISTS outbox.relays (
    relay_id     text        PRIMARY KEY,
    hostname     text        NOT NULL,
    pid          integer     NOT NULL,
    version      text        NOT NULL,
    started_at   timestamptz NOT NULL,
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    -- How often this relay beats, so readers can tell a late heartbeat from a fresh one.
    heartbeat_interval_ms integer NOT NULL,
    -- [{"sink": "nats", "kind": "nats", "up": true, "error": null}, ...]
    sinks        jsonb       NOT NULL DEFAULT '[]'::jsonb,
    -- Rows this relay marked delivered per topic per second over its last heartbeat interval:
    -- {"orders": 812.5, ...}
    publish_rates jsonb      NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS relays_heartbeat_at_idx ON outbox.relays (heartbeat_at);
