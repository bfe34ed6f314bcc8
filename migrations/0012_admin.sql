-- outbox-relay schema: operator actions (docs/admin.md).
--
--   outbox.topic_pauses  topics an operator paused: no relay claims their rows until resumed.
--                        Read by every relay's heartbeat (a few rows, once a second).
--   outbox.admin_audit   who did what and when: every action of the CLI and the admin API
--                        (dead retry/purge, keys release/skip, topics pause/resume, replay).
--                        Insert-only; the relay never deletes from it.

CREATE TABLE IF NOT EXISTS outbox.topic_pauses (
    topic      text        PRIMARY KEY,
    paused_at  timestamptz NOT NULL DEFAULT now(),
    paused_by  text        NOT NULL,
    reason     text
);

CREATE TABLE IF NOT EXISTS outbox.admin_audit (
    id        bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT now(),
    -- Who: an admin user or token name, or the operating-system user of a CLI command.
    actor     text        NOT NULL,
    -- Through what: cli or http.
    via       text        NOT NULL,
    -- What: dead.retry, dead.purge, keys.release, keys.skip, topics.pause, topics.resume, replay.
    action    text        NOT NULL,
    -- On what: the selection as given (ids, filter, key, topic, range).
    target    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- How many rows or keys it changed.
    affected  bigint      NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS admin_audit_at_idx ON outbox.admin_audit (at);
