//! What the admin's handlers share: its accounts, its lag history and, once the relay is
//! connected, the relay's pool.

use std::sync::{Arc, OnceLock};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::auth::Accounts;
use super::lag::LagHistory;
use crate::config::AdminConfig;

pub struct AdminState {
    /// Where the admin is mounted (`admin.path_prefix`): the pages' links start with it.
    pub(crate) prefix: String,
    pub(crate) accounts: Arc<Accounts>,
    pub(crate) lag: LagHistory,
    interval: std::time::Duration,
    pool: OnceLock<PgPool>,
}

impl AdminState {
    pub fn new(config: &AdminConfig) -> Arc<Self> {
        Arc::new(Self {
            prefix: config.path_prefix.clone(),
            accounts: Arc::new(Accounts::new(&config.users)),
            lag: LagHistory::new(config.sample_interval()),
            interval: config.sample_interval(),
            pool: OnceLock::new(),
        })
    }

    /// The relay is connected: the admin answers from now on and samples lag until `shutdown`.
    pub fn set_running(self: &Arc<Self>, pool: PgPool, shutdown: CancellationToken) {
        if self.pool.set(pool.clone()).is_ok() {
            let state = Arc::clone(self);
            tokio::spawn(async move { state.lag.run(pool, state.interval, shutdown).await });
        }
    }

    pub(crate) fn pool(&self) -> Option<&PgPool> {
        self.pool.get()
    }
}
