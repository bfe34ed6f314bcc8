//! The pipeline: claim a batch, route and publish it, complete it, count it.
//!
//! Each of `relay.workers` workers ([`worker`]) runs one claim transaction at a time:
//!
//! 1. [`claim`]: `BEGIN`; claim up to `batch_size` rows with `FOR UPDATE SKIP LOCKED`, unordered
//!    or ordered (one statement, in [`crate::store::claim`]);
//! 2. [`dispatch`]: route every row once; publish each sink's share concurrently, every message
//!    of a share in flight at once, and await the acknowledgements; in ordered mode
//!    [`rounds`] publishes a key's messages one round each, in order;
//! 3. [`complete`]: in the same transaction, delete (or retain) the confirmed rows, schedule
//!    retriable failures with backoff, dead-letter permanent ones; `COMMIT`;
//! 4. [`tally`]: the batch's metrics.
//!
//! A crash at any point aborts the transaction and releases the rows; they are published again
//! with the same idempotency key.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::config::{Config, OnDead};
use crate::message::{Claimed, Locked, OutboxRow};
use crate::metrics::Metrics;
use crate::store;
use crate::wakeup::Wakeup;

pub mod claim;
pub mod complete;
pub mod dispatch;
pub mod outcome;
pub mod rounds;
pub mod tally;
pub mod worker;

use claim::{Claimer, Slots};
use complete::{Completion, RetryPolicy};
use dispatch::Dispatcher;
pub use outcome::{Failure, RowOutcome};
use tally::Tally;

/// What one batch did, for the worker's scheduling.
#[derive(Debug, Default, Clone, Copy)]
pub struct BatchReport {
    pub claimed: usize,
    pub delivered: usize,
}

/// Everything a worker needs, shared by the workers of one relay.
pub struct Pipeline {
    pool: PgPool,
    claimer: Claimer,
    dispatcher: Arc<Dispatcher>,
    policy: RetryPolicy,
    retain: bool,
    park_dead: bool,
    /// How long after the claim a later publish round may still start.
    round_budget: Duration,
    batch_size: usize,
    tally: Tally,
    metrics: Arc<Metrics>,
    wakeup: Arc<Wakeup>,
}

impl Pipeline {
    /// `slots` is `Some` in ordered mode: the slots the cluster heartbeat keeps; `floor` is the
    /// claim floor the maintenance task keeps.
    pub fn new(
        config: &Config,
        pool: PgPool,
        dispatcher: Arc<Dispatcher>,
        slots: Option<Arc<Slots>>,
        floor: Arc<store::floor::Shared>,
        metrics: Arc<Metrics>,
        wakeup: Arc<Wakeup>,
    ) -> Self {
        let r = &config.relay;
        let claimer = Claimer::new(r.batch_size, r.workers as usize, slots, floor);
        Self {
            pool,
            claimer,
            dispatcher,
            policy: RetryPolicy::from_config(r),
            retain: r.retention().is_some(),
            park_dead: config.ordering.enabled && config.ordering.on_dead == OnDead::Park,
            round_budget: r.round_budget(),
            batch_size: r.batch_size as usize,
            tally: Tally::new(Arc::clone(&metrics)),
            metrics,
            wakeup,
        }
    }

    pub fn dispatcher(&self) -> &Arc<Dispatcher> {
        &self.dispatcher
    }

    /// One claim transaction of worker `worker`. Errors are database errors; sink failures are
    /// outcomes.
    pub async fn run_batch(&self, worker: usize) -> Result<BatchReport, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let excluded = self.dispatcher.excluded_topics();
        let (claimed, took) = self.claimer.claim(&mut tx, worker, &excluded).await?;
        self.tally.claimed(took, claimed.len());
        let (rows, locked): (Vec<OutboxRow>, Vec<Locked>) =
            claimed.into_iter().map(Claimed::into_parts).unzip();
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(BatchReport::default());
        }
        let _in_flight = self.tally.in_flight(rows.len());
        let targets = self.dispatcher.route(&rows);
        let outcomes = if self.claimer.is_ordered() {
            let last_round_start = Instant::now() + self.round_budget;
            let (outcomes, rounds) =
                rounds::publish(&self.dispatcher, &rows, &targets, last_round_start).await;
            self.tally.rounds(rounds);
            outcomes
        } else {
            let all: Vec<&OutboxRow> = rows.iter().collect();
            self.dispatcher.publish(&all, &targets).await
        };
        let completion = Completion::new(&rows, &locked, &outcomes, &self.policy);
        let mark_started = Instant::now();
        if let Err(e) = completion.apply(tx, self.retain, self.park_dead).await {
            self.tally.unmarked(completion.delivered.len());
            return Err(e);
        }
        self.tally.marked(mark_started.elapsed());
        let sinks: Vec<&str> = targets
            .iter()
            .map(|t| self.dispatcher.sink_name(*t))
            .collect();
        self.tally.completed(&rows, &sinks, &outcomes, &completion);
        Ok(BatchReport {
            claimed: rows.len(),
            delivered: completion.delivered.len(),
        })
    }
}
