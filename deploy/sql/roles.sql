-- Least-privilege roles for one outbox database (docs/security.md, "Roles: least privilege").
--
-- Run by a DBA with psql, after `outbox-relay migrate`, in the database that holds the outbox
-- schema, as the role that owns the outbox tables (the one `migrate` ran as) or a superuser:
--
--   psql "postgres://owner@db.example.com/orders" -f deploy/sql/roles.sql \
--        -v enqueue_role=orders_outbox_enqueue -v relay_role=orders_outbox_relay
--
-- It makes sure two group roles exist (NOLOGIN; created when missing, which needs CREATEROLE)
-- and sets their privileges on the outbox schema of this database, from a clean slate:
--
--   enqueue_role (default outbox_enqueue): for applications. USAGE on the schema, INSERT of the
--     columns an application sets on outbox.messages (message_id, topic, key, payload, headers,
--     available_at), SELECT of id and message_id on outbox.messages and outbox.sent (what
--     INSERT ... RETURNING id, ON CONFLICT (message_id) and the client crate's idempotency check
--     read), and the enqueue functions. No payload, topic, key or header of any row can be read;
--     nothing can be updated or deleted; the other outbox tables are out of reach.
--   relay_role (default outbox_relay): for `outbox-relay run`, `status`, `dead` and `keys`.
--     What the relay's statements need on each outbox table (the table below), SELECT on the
--     id sequence (the claim floor reads its last value), no DDL: it owns nothing and may create
--     nothing in the outbox schema nor (see the end) in the public schema.
--
-- Login roles are the DBA's, with their passwords or certificates, each a member of one group:
--
--   CREATE ROLE orders_api LOGIN PASSWORD '...' IN ROLE orders_outbox_enqueue;
--   CREATE ROLE orders_relay LOGIN PASSWORD '...' IN ROLE orders_outbox_relay;
--
-- Roles are cluster-wide, privileges are per database: use different role names for the outbox
-- databases of different services in one cluster, or one service's relay can reach another's
-- outbox. The script is idempotent: run it again after every `outbox-relay migrate` of a new
-- version (`outbox-relay run` names any privilege missing), and it takes back any privilege on the
-- outbox tables granted to the two roles by hand since.

\set ON_ERROR_STOP on
\if :{?enqueue_role}
\else
  \set enqueue_role outbox_enqueue
\endif
\if :{?relay_role}
\else
  \set relay_role outbox_relay
\endif

-- psql does not substitute its variables inside the DO block's body: the names go through
-- two session settings.
SET outbox_roles.enqueue = :'enqueue_role';
SET outbox_roles.relay = :'relay_role';

BEGIN;

DO $roles$
DECLARE
  r_enqueue text := current_setting('outbox_roles.enqueue');
  r_relay   text := current_setting('outbox_roles.relay');
  v_owner   text;
  v_role    text;
  v_table   text;
  v_privs   text;
BEGIN
  IF to_regclass('outbox.messages') IS NULL THEN
    RAISE EXCEPTION 'database % has no outbox schema', current_database()
      USING ERRCODE = 'undefined_table',
            HINT = 'run `outbox-relay migrate` on this database first (as the role that is to own the outbox tables), then this script';
  END IF;
  SELECT pg_get_userbyid(c.relowner) INTO v_owner FROM pg_class c WHERE c.oid = 'outbox.messages'::regclass;
  IF NOT pg_has_role(v_owner, 'USAGE') THEN
    RAISE EXCEPTION 'connected as role %, which may not grant privileges on the outbox tables of database %', current_user, current_database()
      USING ERRCODE = 'insufficient_privilege',
            HINT = format('run this script as %I, the owner of the outbox tables (the role `outbox-relay migrate` ran as), or as a superuser', v_owner);
  END IF;
  IF r_enqueue = r_relay OR v_owner IN (r_enqueue, r_relay) THEN
    RAISE EXCEPTION 'enqueue_role (%) and relay_role (%) must be two different roles, neither the owner of the outbox tables (%)', r_enqueue, r_relay, v_owner
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'pass other names with -v enqueue_role=NAME -v relay_role=NAME';
  END IF;

  -- The group roles, created when missing. Another session may create the same role at the
  -- same moment (duplicate_object, or unique_violation from pg_authid's index): it exists then.
  FOREACH v_role IN ARRAY ARRAY[r_enqueue, r_relay] LOOP
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = v_role) THEN
      BEGIN
        EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
        RAISE NOTICE 'created role % (NOLOGIN): grant it to the login role that uses it', v_role;
      EXCEPTION
        WHEN duplicate_object OR unique_violation THEN
          NULL;
        WHEN insufficient_privilege THEN
          RAISE EXCEPTION 'role % does not exist, and role % may not create roles', v_role, current_user
            USING ERRCODE = 'insufficient_privilege',
                  HINT = format('have a role with CREATEROLE run CREATE ROLE %I NOLOGIN; then run this script again', v_role);
      END;
    END IF;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = v_role AND (rolsuper OR rolbypassrls)) THEN
      RAISE EXCEPTION 'role % is a superuser or bypasses row-level security: no privilege can be taken from it', v_role
        USING ERRCODE = 'invalid_parameter_value', HINT = 'use a role without SUPERUSER and BYPASSRLS';
    END IF;
    IF pg_has_role(v_role, v_owner, 'USAGE') THEN
      RAISE EXCEPTION 'role % has the privileges of role %, the owner of the outbox tables: it could change or drop them', v_role, v_owner
        USING ERRCODE = 'invalid_parameter_value',
              HINT = format('REVOKE %I FROM %I (or use another role)', v_owner, v_role);
    END IF;
  END LOOP;

  -- A clean slate: whatever either role held on the outbox schema goes (column privileges
  -- with their table's).
  EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA outbox FROM %I, %I', r_enqueue, r_relay);
  EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA outbox FROM %I, %I', r_enqueue, r_relay);
  EXECUTE format('REVOKE ALL ON SCHEMA outbox FROM %I, %I', r_enqueue, r_relay);

  EXECUTE format('GRANT USAGE ON SCHEMA outbox TO %I, %I', r_enqueue, r_relay);
  -- CONNECT is PUBLIC's by default; granted explicitly only where that default was revoked
  -- (which needs the database's owner).
  FOREACH v_role IN ARRAY ARRAY[r_enqueue, r_relay] LOOP
    IF NOT has_database_privilege(v_role, current_database(), 'CONNECT') THEN
      EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), v_role);
      IF NOT has_database_privilege(v_role, current_database(), 'CONNECT') THEN
        RAISE WARNING 'role % may not connect to database %', v_role, current_database()
          USING HINT = format('the database owner runs GRANT CONNECT ON DATABASE %I TO %I', current_database(), v_role);
      END IF;
    END IF;
  END LOOP;

  -- Applications: INSERT of the columns they set; the id and message id back (RETURNING,
  -- ON CONFLICT (message_id), the idempotency lookup). EXECUTE on the enqueue functions is
  -- PUBLIC's, as for every function; without USAGE on the schema nobody else reaches them.
  EXECUTE format('GRANT INSERT (message_id, topic, key, payload, headers, available_at) ON outbox.messages TO %I', r_enqueue);
  EXECUTE format('GRANT SELECT (id, message_id) ON outbox.messages, outbox.sent TO %I', r_enqueue);

  -- The relay: each table with what its statements do there (crates/outbox-relay/src/store/;
  -- `outbox-relay run` checks this list at start, store/privileges.rs).
  FOR v_table, v_privs IN VALUES
      ('messages',         'SELECT, INSERT, UPDATE, DELETE'),  -- claim, mark, retry, dead retry
      ('sent',             'SELECT, INSERT, DELETE'),          -- retention
      ('dead_letters',     'SELECT, INSERT, UPDATE, DELETE'),  -- dead-lettering, `dead` commands
      ('topic_counts',     'SELECT, INSERT, DELETE'),          -- lag, count compaction
      ('relay_sleepers',   'SELECT, INSERT, DELETE'),          -- wake-up registrations
      ('relays',           'SELECT, INSERT, UPDATE, DELETE'),  -- heartbeats, `status`
      ('ordering_members', 'SELECT, INSERT, UPDATE, DELETE'),  -- ordered-mode membership
      ('partition_leases', 'SELECT, UPDATE'),                  -- slot leases
      ('parked_keys',      'SELECT, INSERT, DELETE'),          -- parked keys, `keys` commands
      ('claim_floor',      'SELECT, UPDATE'),                  -- the claim floor
      ('topic_pauses',     'SELECT, INSERT, DELETE'),          -- paused topics, `topics` commands
      ('admin_audit',      'SELECT, INSERT')                   -- the audit trail of operator actions
  LOOP
    EXECUTE format('GRANT %s ON outbox.%I TO %I', v_privs, v_table, r_relay);
  END LOOP;
  EXECUTE format('GRANT SELECT ON SEQUENCE %s TO %I',
                 pg_get_serial_sequence('outbox.messages', 'id'), r_relay);

  -- The public schema: PostgreSQL 15 and later create it without CREATE for PUBLIC, but a
  -- database created by an earlier version (pg_upgrade, a restored dump) still lets every role
  -- create tables there. Taken from PUBLIC as PostgreSQL 15 does (this needs the schema's
  -- owner); roles that create tables there on purpose need their own grant.
  IF to_regnamespace('public') IS NOT NULL AND has_schema_privilege('public', 'public', 'CREATE') THEN
    REVOKE CREATE ON SCHEMA public FROM PUBLIC;
    RAISE NOTICE 'revoked CREATE on schema public from PUBLIC (the PostgreSQL 15 default)';
  END IF;
  FOREACH v_role IN ARRAY ARRAY[r_enqueue, r_relay] LOOP
    IF to_regnamespace('public') IS NOT NULL AND has_schema_privilege(v_role, 'public', 'CREATE') THEN
      RAISE WARNING 'role % may create tables in schema public', v_role
        USING HINT = 'the owner of schema public runs REVOKE CREATE ON SCHEMA public FROM PUBLIC (and from the role, if granted to it)';
    END IF;
  END LOOP;
END
$roles$;

COMMIT;

RESET outbox_roles.enqueue;
RESET outbox_roles.relay;
