//! The relay loop: claim a batch, publish it to its sinks, await the acknowledgements, mark.
//!
//! Each of `relay.workers` workers runs one claim transaction at a time:
//!
//! 1. `BEGIN`; claim up to `batch_size` rows with `FOR UPDATE SKIP LOCKED` (one statement);
//! 2. route every row to its sink; publish each sink's share concurrently, every message of a
//!    share in flight at once, and await the acknowledgements;
//! 3. in the same transaction: delete (or retain) the confirmed rows in one statement, schedule
//!    retriable failures with backoff, dead-letter permanent ones; `COMMIT`.
//!
//! The relay MUST NOT mark a row sent before the broker acknowledged it: only
//! [`Outcome::Delivered`] and [`Outcome::Duplicate`] rows reach [`db::mark_sent`]. A crash at
//! any point aborts the transaction and releases the rows; they are published again with the
//! same idempotency key.
//!
//! A sink that reports [`ErrorKind::Unavailable`] opens its circuit breaker: its rows are
//! released untouched (no attempt counted), its topics are excluded from claims, and a probe
//! task checks the broker with backoff until it answers, while the other sinks keep flowing.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backoff::backoff::Backoff;
use chrono::Utc;
use futures::future::join_all;
use rand::Rng;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, RelayConfig};
use crate::db::{self, Retry};
use crate::metrics::Metrics;
use crate::routing::Router;
use crate::sinks::{Envelope, ErrorKind, OutboxRow, Outcome, Sink, SinkError};
use crate::wakeup::Wakeup;

/// A sink with its circuit breaker.
pub struct SinkHandle {
    pub name: String,
    pub sink: Arc<dyn Sink>,
    open: AtomicBool,
    probing: AtomicBool,
    /// Topics seen routed to this sink while its circuit is open: excluded from claims.
    blocked_topics: Mutex<BTreeSet<String>>,
    last_error: Mutex<Option<String>>,
}

impl SinkHandle {
    pub fn new(name: String, sink: Arc<dyn Sink>) -> Self {
        Self {
            name,
            sink,
            open: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            blocked_topics: Mutex::new(BTreeSet::new()),
            last_error: Mutex::new(None),
        }
    }

    pub fn is_up(&self) -> bool {
        !self.open.load(Ordering::Acquire)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Everything the workers share.
pub struct Relay {
    pub config: RelayConfig,
    pub pool: PgPool,
    pub sinks: Vec<SinkHandle>,
    pub router: Router,
    pub metrics: Arc<Metrics>,
    pub wakeup: Arc<Wakeup>,
    pub database_up: AtomicBool,
    /// ordering (issue 6): `Some` with `[ordering] enabled = true`.
    pub ordering: Option<Arc<crate::ordering::Ordering>>,
}

/// What one batch did, for the worker's scheduling.
#[derive(Debug, Default, Clone, Copy)]
pub struct BatchReport {
    pub claimed: usize,
    pub delivered: usize,
}

impl Relay {
    /// Builds the sinks (without waiting for brokers) and the router.
    pub async fn new(
        config: &Config,
        pool: PgPool,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Self>> {
        let router = Router::new(&config.sinks)?;
        let mut sinks = Vec::new();
        for (name, sink_config) in &config.sinks {
            let sink = sink_config
                .build(name)
                .await
                .map_err(|e| anyhow::anyhow!("sinks.{name}: {e}"))?;
            metrics.sink_up.with_label_values(&[name]).set(1);
            sinks.push(SinkHandle::new(name.clone(), sink));
        }
        // ordering (issue 6)
        let ordering = if config.ordering.enabled {
            Some(crate::ordering::Ordering::new(
                config.ordering.clone(),
                &metrics.registry,
            )?)
        } else {
            None
        };
        Ok(Arc::new(Self {
            ordering,
            config: config.relay.clone(),
            pool,
            sinks,
            router,
            metrics,
            wakeup: Wakeup::new(),
            database_up: AtomicBool::new(true),
        }))
    }

    /// Checks every sink once at start; unreachable ones start with an open circuit.
    pub async fn check_sinks(self: &Arc<Self>, shutdown: &CancellationToken) {
        for (i, handle) in self.sinks.iter().enumerate() {
            if let Err(e) = handle.sink.check().await {
                self.trip(i, &e, shutdown);
            }
        }
    }

    /// Topics routed to sinks whose circuit is open: claims and idle polls skip them.
    pub fn excluded_topics(&self) -> Vec<String> {
        self.sinks
            .iter()
            .filter(|s| !s.is_up())
            .flat_map(|s| {
                s.blocked_topics
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Opens sink `i`'s circuit and starts its probe (once).
    fn trip(self: &Arc<Self>, i: usize, error: &SinkError, shutdown: &CancellationToken) {
        let handle = &self.sinks[i];
        *handle.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.message.clone());
        if !handle.open.swap(true, Ordering::AcqRel) {
            tracing::warn!(sink = %handle.name, error = %error, "sink unavailable; circuit open, its rows wait untouched");
            self.metrics
                .sink_up
                .with_label_values(&[&handle.name])
                .set(0);
        }
        if handle.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let relay = Arc::clone(self);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut backoff = backoff::ExponentialBackoff {
                initial_interval: Duration::from_millis(200),
                max_interval: Duration::from_secs(10),
                max_elapsed_time: None,
                ..Default::default()
            };
            loop {
                let delay = backoff.next_backoff().unwrap_or(Duration::from_secs(10));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => break,
                }
                let handle = &relay.sinks[i];
                match handle.sink.check().await {
                    Ok(()) => {
                        handle
                            .blocked_topics
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .clear();
                        *handle.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
                        handle.open.store(false, Ordering::Release);
                        relay
                            .metrics
                            .sink_up
                            .with_label_values(&[&handle.name])
                            .set(1);
                        tracing::info!(sink = %handle.name, "sink reachable again; circuit closed");
                        relay.wakeup.bump();
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(sink = %handle.name, error = %e, "sink probe failed");
                        *handle.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(e.message);
                    }
                }
            }
            relay.sinks[i].probing.store(false, Ordering::Release);
        });
    }

    /// The backoff before attempt `attempts + 1`: exponential from `retry_initial_ms`, capped at
    /// `retry_max_secs`, with equal jitter (half fixed, half random) so retries spread out.
    pub fn retry_delay(&self, attempts: i32) -> Duration {
        let base = self.config.retry_initial_ms as f64 * 2f64.powi(attempts.clamp(0, 30));
        let capped = base.min(self.config.retry_max_secs as f64 * 1000.0);
        let jitter = rand::rng().random_range(0.0..=capped / 2.0);
        Duration::from_millis((capped / 2.0 + jitter) as u64)
    }

    /// Runs one worker until `shutdown`; a batch in progress is always finished.
    /// Worker `worker` (0-based, of `relay.workers`): in ordered mode it claims keyed rows only
    /// from its share of the relay's slots (see [`Relay::run_batch`]).
    pub async fn run_worker(self: Arc<Self>, worker: usize, shutdown: CancellationToken) {
        let mut rx = self.wakeup.subscribe();
        let mut db_backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            rx.borrow_and_update();
            match self.run_batch(worker, &shutdown).await {
                Ok(report) => {
                    self.wakeup.batch_done();
                    if !self.database_up.swap(true, Ordering::AcqRel) {
                        tracing::info!("database reachable again");
                    }
                    self.metrics.database_up.set(1);
                    db_backoff = Duration::from_millis(100);
                    if report.claimed > 0 {
                        self.wakeup.activity();
                        if report.claimed >= self.config.batch_size as usize {
                            // More is likely waiting: let idle workers help.
                            self.wakeup.bump();
                        }
                        continue;
                    }
                    self.wakeup.wait(&mut rx, &shutdown).await;
                }
                Err(e) => {
                    if self.database_up.swap(false, Ordering::AcqRel) {
                        tracing::error!(error = %e, retry_in_ms = db_backoff.as_millis() as u64,
                            "database unavailable; retrying with backoff");
                    } else {
                        tracing::debug!(error = %e, "database still unavailable");
                    }
                    self.metrics.database_up.set(0);
                    tokio::select! {
                        _ = tokio::time::sleep(db_backoff) => {}
                        _ = shutdown.cancelled() => {}
                    }
                    db_backoff = (db_backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// One claim transaction of worker `worker`. Errors are database errors; sink failures are
    /// outcomes.
    ///
    /// In ordered mode the worker claims keyed rows only from the owned slots with
    /// `slot % workers == worker`, so the workers of one relay never claim the same key at once.
    /// Without that split, with keys interleaved in the table (the common case), the next worker
    /// claims the second row of the keys whose first rows the previous worker holds, and the
    /// ordered claim must drop them all: only about as many workers as there are "layers" of
    /// keys in a batch did useful work, the others locked rows for nothing. The split is stable
    /// across rebalancing (it depends on the slot, not on which slots are owned); the claim's
    /// per-key rule stays the guarantee either way.
    pub async fn run_batch(
        self: &Arc<Self>,
        worker: usize,
        shutdown: &CancellationToken,
    ) -> Result<BatchReport, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let excluded = self.excluded_topics();
        let started = Instant::now();
        // ordering (issue 6): the ordered claim, or the unordered one.
        let rows = match &self.ordering {
            Some(o) => {
                let workers = self.config.workers.max(1) as usize;
                let slots: Vec<i16> = o
                    .owned_slots()
                    .iter()
                    .copied()
                    .filter(|s| *s as usize % workers == worker % workers)
                    .collect();
                let limit = self.config.batch_size as i64;
                crate::ordering::sql::claim(&mut tx, limit, &excluded, &slots).await?
            }
            None => db::claim(&mut tx, self.config.batch_size as i64, &excluded).await?,
        };
        self.metrics
            .claim_duration_seconds
            .observe(started.elapsed().as_secs_f64());
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(BatchReport::default());
        }
        let n = rows.len();
        self.metrics.batch_size.observe(n as f64);
        let _in_flight = InFlight::new(&self.metrics, n as i64);

        // ordering (issue 6): keyed rows in rounds, in key order.
        let (outcomes, sink_of) = match &self.ordering {
            Some(_) => {
                let last_round_start = Instant::now() + self.config.round_budget();
                crate::ordering::rounds::publish(self, &rows, shutdown, last_round_start).await
            }
            None => self.publish(&rows, shutdown).await,
        };

        let mut delivered = Vec::new();
        let mut retries = Vec::new();
        let (mut dead_ids, mut dead_errors) = (Vec::new(), Vec::new());
        let mut counts: HashMap<(&str, &str, &'static str), u64> = HashMap::new();
        let mut errors: HashMap<(&str, &str, &'static str), u64> = HashMap::new();
        let mut latency: HashMap<&str, Vec<f64>> = HashMap::new();
        let now = Utc::now();
        for ((row, outcome), sink) in rows.iter().zip(&outcomes).zip(&sink_of) {
            let sink_name = sink.map(|s| self.sinks[s].name.as_str()).unwrap_or("none");
            let label = match outcome {
                Outcome::Delivered | Outcome::Duplicate => {
                    delivered.push(row.id);
                    let secs = (now - row.created_at).num_microseconds().unwrap_or(0) as f64 / 1e6;
                    latency.entry(sink_name).or_default().push(secs.max(0.0));
                    if matches!(outcome, Outcome::Delivered) {
                        "delivered"
                    } else {
                        "duplicate"
                    }
                }
                Outcome::Failed(e) => {
                    // ordering (issue 6): rows held back behind a failure are not errors.
                    if e.error_type != crate::ordering::HELD_BACK {
                        *errors
                            .entry((&row.topic, sink_name, e.error_type))
                            .or_default() += 1;
                    }
                    match e.kind {
                        ErrorKind::Unavailable => "released",
                        ErrorKind::Retriable
                            if row.attempts + 1 < self.config.max_attempts as i32 =>
                        {
                            retries.push(Retry {
                                id: row.id,
                                delay: self.retry_delay(row.attempts),
                                error: e.message.clone(),
                            });
                            "retry"
                        }
                        ErrorKind::Retriable => {
                            dead_ids.push(row.id);
                            dead_errors.push(format!(
                                "{} (gave up after {} attempts)",
                                e.message,
                                row.attempts + 1
                            ));
                            "dead"
                        }
                        ErrorKind::Permanent => {
                            dead_ids.push(row.id);
                            dead_errors.push(e.message.clone());
                            "dead"
                        }
                    }
                }
            };
            *counts.entry((&row.topic, sink_name, label)).or_default() += 1;
        }

        let mark_started = Instant::now();
        let marked = async {
            db::mark_sent(&mut tx, &delivered, self.config.retention().is_some()).await?;
            db::schedule_retries(&mut tx, &retries).await?;
            db::dead_letter(&mut tx, &dead_ids, &dead_errors).await?;
            // ordering (issue 6): on_dead = "park" parks the dead rows' keys, same transaction.
            let park = crate::ordering::OnDead::Park;
            if self
                .ordering
                .as_ref()
                .is_some_and(|o| o.config.on_dead == park)
            {
                let parked = crate::ordering::sql::park_dead(&mut tx, &dead_ids).await?;
                if parked > 0 {
                    tracing::warn!(
                        keys = parked,
                        "keys parked after a dead letter: `outbox-relay keys list`"
                    );
                }
            }
            tx.commit().await
        }
        .await;
        if let Err(e) = marked {
            // The broker has these rows; they will be published again (same idempotency key).
            self.metrics
                .unmarked_published_total
                .inc_by(delivered.len() as u64);
            return Err(e);
        }
        self.metrics
            .mark_duration_seconds
            .observe(mark_started.elapsed().as_secs_f64());

        for ((topic, sink, outcome), c) in counts {
            self.metrics
                .published_total
                .with_label_values(&[topic, sink, outcome])
                .inc_by(c);
        }
        for ((topic, sink, error_type), c) in errors {
            self.metrics
                .publish_errors_total
                .with_label_values(&[topic, sink, error_type])
                .inc_by(c);
        }
        for r in &retries {
            if let Some(row) = rows.iter().find(|row| row.id == r.id) {
                let sink = self
                    .router
                    .route(&row.topic)
                    .map(|t| self.sinks[t.sink].name.as_str())
                    .unwrap_or("none");
                self.metrics
                    .retries_total
                    .with_label_values(&[&row.topic, sink])
                    .inc();
            }
        }
        for (sink, values) in latency {
            let h = self
                .metrics
                .delivery_latency_seconds
                .with_label_values(&[sink]);
            values.into_iter().for_each(|v| h.observe(v));
        }
        if !dead_ids.is_empty() {
            tracing::warn!(count = dead_ids.len(), first_error = %dead_errors[0], "messages dead-lettered");
        }
        Ok(BatchReport {
            claimed: n,
            delivered: delivered.len(),
        })
    }

    /// Routes and publishes; returns one outcome per row and the sink index each row went to.
    pub(crate) async fn publish(
        self: &Arc<Self>,
        rows: &[OutboxRow],
        shutdown: &CancellationToken,
    ) -> (Vec<Outcome>, Vec<Option<usize>>) {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; rows.len()];
        let mut sink_of = vec![None; rows.len()];
        let mut shares: Vec<Vec<(usize, Envelope<'_>)>> =
            (0..self.sinks.len()).map(|_| Vec::new()).collect();
        for (i, row) in rows.iter().enumerate() {
            // Testing only (relay.fault_injection_rate): fail before publishing.
            let rate = self.config.fault_injection_rate;
            if rate > 0.0 && rand::rng().random_bool(rate) {
                sink_of[i] = self.router.route(&row.topic).map(|t| t.sink);
                outcomes[i] = Some(Outcome::Failed(SinkError::retriable(
                    "injected_fault",
                    "fault injected (relay.fault_injection_rate)",
                )));
                continue;
            }
            match self.router.route(&row.topic) {
                None => {
                    outcomes[i] = Some(Outcome::Failed(SinkError::permanent(
                        "no_route",
                        format!(
                            "no route matches topic {:?}: add it (or a pattern) to a sink's routes",
                            row.topic
                        ),
                    )));
                }
                Some(target) => {
                    sink_of[i] = Some(target.sink);
                    let handle = &self.sinks[target.sink];
                    if handle.is_up() {
                        shares[target.sink].push((
                            i,
                            Envelope {
                                row,
                                route: target.route,
                            },
                        ));
                    } else {
                        handle
                            .blocked_topics
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(row.topic.clone());
                        outcomes[i] = Some(Outcome::Failed(SinkError::unavailable(
                            "circuit_open",
                            "sink circuit open",
                        )));
                    }
                }
            }
        }
        let timeout = self.config.publish_timeout();
        let calls = shares.iter().enumerate().filter(|(_, s)| !s.is_empty()).map(|(s, share)| async move {
            let envelopes: Vec<Envelope<'_>> = share.iter().map(|(_, e)| *e).collect();
            let started = Instant::now();
            let mut result = match tokio::time::timeout(timeout, self.sinks[s].sink.publish(&envelopes)).await {
                Ok(r) => r,
                Err(_) => vec![
                    Outcome::Failed(SinkError::unavailable(
                        "timeout",
                        format!("no acknowledgements within relay.publish_timeout_secs ({}s)", timeout.as_secs()),
                    ));
                    envelopes.len()
                ],
            };
            if result.len() != envelopes.len() {
                tracing::error!(sink = %self.sinks[s].name, expected = envelopes.len(), got = result.len(),
                    "sink returned the wrong number of outcomes; releasing the batch");
                result = vec![Outcome::Failed(SinkError::unavailable("internal", "sink outcome count mismatch")); envelopes.len()];
            }
            self.metrics
                .publish_duration_seconds
                .with_label_values(&[&self.sinks[s].name])
                .observe(started.elapsed().as_secs_f64());
            (s, result)
        });
        for (s, result) in join_all(calls).await {
            let mut first_unavailable = None;
            for ((i, _), outcome) in shares[s].iter().zip(result) {
                if let Outcome::Failed(e) = &outcome {
                    if e.kind == ErrorKind::Unavailable && first_unavailable.is_none() {
                        first_unavailable = Some(e.clone());
                    }
                }
                outcomes[*i] = Some(outcome);
            }
            if let Some(e) = first_unavailable {
                for (_, env) in &shares[s] {
                    self.sinks[s]
                        .blocked_topics
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(env.row.topic.clone());
                }
                self.trip(s, &e, shutdown);
            }
        }
        let outcomes = outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    Outcome::Failed(SinkError::unavailable("internal", "no outcome"))
                })
            })
            .collect();
        (outcomes, sink_of)
    }
}

/// Keeps `outbox_in_flight_messages` right on every exit path.
struct InFlight<'a> {
    metrics: &'a Metrics,
    n: i64,
}

impl<'a> InFlight<'a> {
    fn new(metrics: &'a Metrics, n: i64) -> Self {
        metrics.in_flight_messages.add(n);
        Self { metrics, n }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.metrics.in_flight_messages.sub(self.n);
    }
}
