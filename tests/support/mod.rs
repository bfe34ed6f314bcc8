//! The test kit (`crates/outbox-testkit`) for the relay crate's integration tests, plus what
//! only they know: where Cargo built the `outbox-relay` binary ([`relay_bin`]), and
//! [`StartRelay`], which starts a [`RelayProcess`] of that binary.
//!
//! `use support::*;` brings the kit's modules and its everyday items (databases, names, waits,
//! relay processes, NATS); broker-specific items come from `support::amqp`, `support::kafka`.
#![allow(dead_code, unused_imports)]

use std::path::PathBuf;

pub use outbox_testkit::amqp::amqp_url;
pub use outbox_testkit::names::*;
pub use outbox_testkit::nats::*;
pub use outbox_testkit::pg::{claimable, database_url, wait_for_open_claim, OwnedPostgres, TestDb};
pub use outbox_testkit::relay::RelayProcess;
pub use outbox_testkit::wait::*;
pub use outbox_testkit::{amqp, http, kafka, nats, observability, ordering, pg, relay, skip, wait};

/// The `outbox-relay` binary Cargo built for these tests.
pub fn relay_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_outbox-relay"))
}

/// Starts [`relay_bin`] as a [`RelayProcess`] (see [`RelayProcess::spawn`]).
pub trait StartRelay: Sized {
    /// `outbox-relay run` with `config_toml` as its config file.
    fn start(config_toml: &str) -> Self {
        Self::start_with_env(config_toml, &[])
    }
    /// [`StartRelay::start`] with `env` added to the relay's environment.
    fn start_with_env(config_toml: &str, env: &[(&str, &str)]) -> Self;
}

impl StartRelay for RelayProcess {
    fn start_with_env(config_toml: &str, env: &[(&str, &str)]) -> Self {
        RelayProcess::spawn(&relay_bin(), config_toml, env)
    }
}

/// Locks the rows of `outbox.messages` with these ids (`FOR UPDATE`, in `conn`'s transaction), as
/// a claim does, and returns them as the completion statements address them, in id order: for
/// completing rows the test did not claim.
pub async fn lock_rows(
    conn: &mut sqlx::PgConnection,
    ids: &[i64],
) -> Vec<outbox_relay::message::Locked> {
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "SELECT id, ctid::text FROM outbox.messages WHERE id = ANY($1) ORDER BY id FOR UPDATE",
    )
    .bind(ids)
    .fetch_all(conn)
    .await
    .expect("lock the rows");
    rows.into_iter()
        .map(|(id, ctid)| outbox_relay::message::Locked { id, ctid })
        .collect()
}
