//! The database privileges the commands need, checked before they start so that a role that
//! lacks one is told which (and where the grants are: `deploy/sql/roles.sql`, docs/security.md)
//! instead of failing later, statement by statement.
//!
//! - [`check_relay`]: what `outbox-relay run` (and `status`, `dead`, `keys`) do on each outbox
//!   table: the list [`RELAY_TABLES`], which `deploy/sql/roles.sql` grants to the relay role.
//! - [`check_migrate`]: `outbox-relay migrate` changes the schema, which only its owner can.
//!
//! Which tables the role may VACUUM is [`super::vacuum::not_vacuumable`]'s.

use sqlx::PgPool;

/// Each outbox table with the privileges the relay's statements use on it (this module's
/// siblings). `deploy/sql/roles.sql` grants exactly these to the relay role; a test compares.
pub const RELAY_TABLES: &[(&str, &[&str])] = &[
    // claim (SELECT … FOR UPDATE), retries, mark sent, `dead retry` re-inserts
    ("outbox.messages", &["SELECT", "INSERT", "UPDATE", "DELETE"]),
    // retention: sent rows kept, then cleaned
    ("outbox.sent", &["SELECT", "INSERT", "DELETE"]),
    // dead-lettering (ON CONFLICT DO UPDATE), `dead list|show|retry|purge`
    (
        "outbox.dead_letters",
        &["SELECT", "INSERT", "UPDATE", "DELETE"],
    ),
    // lag, count compaction
    ("outbox.topic_counts", &["SELECT", "INSERT", "DELETE"]),
    // wake-up registrations
    ("outbox.relay_sleepers", &["SELECT", "INSERT", "DELETE"]),
    // heartbeats, `status`
    ("outbox.relays", &["SELECT", "INSERT", "UPDATE", "DELETE"]),
    // ordered-mode membership
    (
        "outbox.ordering_members",
        &["SELECT", "INSERT", "UPDATE", "DELETE"],
    ),
    // slot leases
    ("outbox.partition_leases", &["SELECT", "UPDATE"]),
    // parked keys, `keys list|release|skip`
    ("outbox.parked_keys", &["SELECT", "INSERT", "DELETE"]),
    // the claim floor
    ("outbox.claim_floor", &["SELECT", "UPDATE"]),
    // paused topics (read by the heartbeat), `topics pause|resume|list`
    ("outbox.topic_pauses", &["SELECT", "INSERT", "DELETE"]),
    // the audit trail of `dead`, `keys`, `topics` and `replay` actions, `audit`
    ("outbox.admin_audit", &["SELECT", "INSERT"]),
];

/// Fails with [`crate::Error::Privileges`] naming every privilege of [`RELAY_TABLES`] (and
/// USAGE on the schema, SELECT on the id sequence) that the connected role lacks.
pub async fn check_relay(pool: &PgPool, command: &str) -> crate::Result<()> {
    let (tables, privileges): (Vec<&str>, Vec<String>) = RELAY_TABLES
        .iter()
        .flat_map(|(t, ps)| ps.iter().map(move |p| (*t, p.to_string())))
        .unzip();
    let (role, missing): (String, Vec<String>) = sqlx::query_as(
        "WITH wanted AS (
           SELECT 'USAGE on schema outbox' AS what, has_schema_privilege('outbox', 'USAGE') AS ok, 0 AS ord
           UNION ALL
           SELECT 'SELECT on sequence ' || s.seq,
                  has_sequence_privilege(s.seq, 'SELECT'), 1
             FROM (SELECT pg_get_serial_sequence('outbox.messages', 'id') AS seq) s
            WHERE s.seq IS NOT NULL
           UNION ALL
           SELECT w.privilege || ' on ' || w.tbl, has_table_privilege(to_regclass(w.tbl), w.privilege), 1 + w.ord
             FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS w(tbl, privilege, ord)
            WHERE to_regclass(w.tbl) IS NOT NULL
         )
         SELECT current_user::text, coalesce(array_agg(what ORDER BY ord) FILTER (WHERE NOT ok), '{}')
           FROM wanted",
    )
    .bind(&tables)
    .bind(&privileges)
    .fetch_one(pool)
    .await?;
    if missing.is_empty() {
        return Ok(());
    }
    Err(crate::Error::Privileges {
        role,
        problem: format!(
            "lacks privileges that `{command}` needs: {}; grant them (deploy/sql/roles.sql grants \
             the relay role everything it needs)",
            missing.join(", ")
        ),
    })
}

/// Fails with [`crate::Error::Privileges`] unless the connected role may change the outbox
/// schema: it owns the outbox tables (or has their owner's privileges, a superuser included),
/// or, in a database without the outbox schema yet, may create schemas.
pub async fn check_migrate(pool: &PgPool) -> crate::Result<()> {
    #[derive(sqlx::FromRow)]
    struct Standing {
        role: String,
        database: String,
        schema_owner: Option<String>,
        table_owner: Option<String>,
        owns_tables: Option<bool>,
        may_create_schema: bool,
        may_create_in_schema: Option<bool>,
    }
    let Standing {
        role,
        database,
        schema_owner,
        table_owner,
        owns_tables,
        may_create_schema,
        may_create_in_schema,
    } = sqlx::query_as(
        "SELECT current_user::text AS role, current_database()::text AS database,
                (SELECT pg_get_userbyid(n.nspowner)::text FROM pg_namespace n
                  WHERE n.nspname = 'outbox') AS schema_owner,
                (SELECT pg_get_userbyid(c.relowner)::text FROM pg_class c
                  WHERE c.oid = to_regclass('outbox.messages')) AS table_owner,
                (SELECT pg_has_role(c.relowner, 'USAGE') FROM pg_class c
                  WHERE c.oid = to_regclass('outbox.messages')) AS owns_tables,
                has_database_privilege(current_database(), 'CREATE') AS may_create_schema,
                (SELECT has_schema_privilege(n.oid, 'CREATE') FROM pg_namespace n
                  WHERE n.nspname = 'outbox') AS may_create_in_schema",
    )
    .fetch_one(pool)
    .await?;
    let problem = match (schema_owner, table_owner, owns_tables) {
        (_, Some(owner), Some(false)) => format!(
            "may not change the outbox schema of database {database:?}: its tables belong to role \
             {owner:?}, and `migrate` (ALTER TABLE, CREATE INDEX, …) needs their owner; run \
             `outbox-relay migrate` with a database.url that connects as {owner:?} (or a member \
             of it), and `run` with the relay role"
        ),
        (Some(owner), None, _) if may_create_in_schema != Some(true) => format!(
            "may not create tables in schema outbox of database {database:?} (owned by \
             {owner:?}): run `outbox-relay migrate` as {owner:?}, or GRANT CREATE ON SCHEMA outbox \
             to this role"
        ),
        (None, _, _) if !may_create_schema => format!(
            "may not create the outbox schema in database {database:?} (that needs CREATE on the \
             database): run the first `outbox-relay migrate` as the database owner or as the role \
             that is to own the outbox tables, after GRANT CREATE ON DATABASE {database} TO it"
        ),
        _ => return Ok(()),
    };
    Err(crate::Error::Privileges { role, problem })
}
