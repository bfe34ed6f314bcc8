//! Routing and publishing: each row is routed once to its sink, each sink's share of a batch is
//! published concurrently with every message of a share in flight at once, and each sink has a
//! circuit breaker.
//!
//! A sink that reports [`ErrorKind::Unavailable`] (or does not answer within
//! `relay.publish_timeout_secs`) opens its circuit: its rows are released untouched (no attempt
//! counted), its topics are excluded from claims, and a probe task checks the broker with
//! backoff until it answers, while the other sinks keep flowing.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backoff::backoff::Backoff;
use futures::future::join_all;
use rand::Rng;
use tokio_util::sync::CancellationToken;

use super::outcome::RowOutcome;
use crate::config::Config;
use crate::message::OutboxRow;
use crate::metrics::Metrics;
use crate::routing::{Router, Target};
use crate::sinks::{Envelope, ErrorKind, Outcome, Sink, SinkError};
use crate::store::cluster::SinkHealth;
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
    fn new(name: String, sink: Arc<dyn Sink>) -> Self {
        Self {
            name,
            sink,
            open: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            blocked_topics: Mutex::new(BTreeSet::new()),
            last_error: Mutex::new(None),
        }
    }

    /// Whether the circuit is closed.
    pub fn is_up(&self) -> bool {
        !self.open.load(Ordering::Acquire)
    }

    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    fn block(&self, topic: &str) {
        let mut blocked = lock(&self.blocked_topics);
        if !blocked.contains(topic) {
            blocked.insert(topic.to_owned());
        }
    }
}

/// Builds every sink at once, in the order given. Each build gives its broker a moment for the
/// first connection (so that a healthy broker is not reported down at start); one after the
/// other, those moments would add up while a broker is down, and the relay's heartbeat and
/// `status` would wait for their sum.
async fn build_all<I, F, Fut, T>(items: I, build: F) -> Vec<T>
where
    I: IntoIterator,
    F: Fn(I::Item) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    join_all(items.into_iter().map(build)).await
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The sinks, the router and the breakers, shared by the workers.
pub struct Dispatcher {
    router: Router,
    sinks: Vec<SinkHandle>,
    publish_timeout: Duration,
    fault_injection_rate: f64,
    metrics: Arc<Metrics>,
    wakeup: Arc<Wakeup>,
    shutdown: CancellationToken,
    /// Topics an operator paused (`outbox.topic_pauses`, read by the heartbeat).
    paused: Mutex<BTreeSet<String>>,
}

impl Dispatcher {
    /// Builds every sink (without waiting for its broker) and the router.
    pub async fn build(
        config: &Config,
        metrics: Arc<Metrics>,
        wakeup: Arc<Wakeup>,
        shutdown: CancellationToken,
    ) -> crate::Result<Arc<Self>> {
        let router = Router::new(&config.sinks).map_err(crate::Error::Config)?;
        let built = build_all(config.sinks.iter(), |(name, sink_config)| async move {
            (name.clone(), sink_config.build(name).await)
        })
        .await;
        let mut sinks = Vec::new();
        for (name, sink) in built {
            let sink = sink.map_err(|source| crate::Error::Sink {
                name: name.clone(),
                source,
            })?;
            metrics.sink_up.with_label_values(&[&name]).set(1);
            sinks.push(SinkHandle::new(name, sink));
        }
        Ok(Arc::new(Self {
            router,
            sinks,
            publish_timeout: config.relay.publish_timeout(),
            fault_injection_rate: config.relay.fault_injection_rate,
            metrics,
            wakeup,
            shutdown,
            paused: Mutex::new(BTreeSet::new()),
        }))
    }

    pub fn sinks(&self) -> &[SinkHandle] {
        &self.sinks
    }

    /// The sink a target names, as a metric label; `none` for unrouted rows.
    pub fn sink_name(&self, target: Option<Target>) -> &str {
        target.map_or("none", |t| self.sinks[t.sink].name.as_str())
    }

    /// Every sink's health, for the heartbeat and `status`.
    pub fn health(&self) -> Vec<SinkHealth> {
        self.sinks
            .iter()
            .map(|s| SinkHealth {
                sink: s.name.clone(),
                kind: s.sink.kind().to_string(),
                up: s.is_up(),
                error: s.last_error(),
            })
            .collect()
    }

    /// Checks every sink at once; unreachable ones get an open circuit (and a probe).
    pub async fn check_all(self: &Arc<Self>) {
        let checks = self.sinks.iter().map(|h| h.sink.check());
        for (i, result) in join_all(checks).await.into_iter().enumerate() {
            if let Err(e) = result {
                self.trip(i, &e);
            }
        }
    }

    /// Topics routed to sinks whose circuit is open, and paused topics: claims and idle polls
    /// skip them.
    pub fn excluded_topics(&self) -> Vec<String> {
        let mut excluded: Vec<String> = lock(&self.paused).iter().cloned().collect();
        excluded.extend(
            self.sinks
                .iter()
                .filter(|s| !s.is_up())
                .flat_map(|s| lock(&s.blocked_topics).iter().cloned().collect::<Vec<_>>()),
        );
        excluded
    }

    /// Takes the paused topics the heartbeat read; returns the topics newly paused and the
    /// topics resumed since the last call (for the log and the gauge). A resumed topic wakes
    /// the workers.
    pub fn set_paused(&self, topics: Vec<String>) -> (Vec<String>, Vec<String>) {
        let now: BTreeSet<String> = topics.into_iter().collect();
        let mut paused = lock(&self.paused);
        let added = now.difference(&paused).cloned().collect();
        let removed: Vec<String> = paused.difference(&now).cloned().collect();
        *paused = now;
        drop(paused);
        if !removed.is_empty() {
            self.wakeup.bump();
        }
        (added, removed)
    }

    /// Each row's route, resolved once per batch.
    pub fn route(&self, rows: &[OutboxRow]) -> Vec<Option<Target>> {
        rows.iter().map(|r| self.router.route(&r.topic)).collect()
    }

    /// Publishes `rows` (with their `targets`, from [`Dispatcher::route`]); one outcome per row,
    /// in order.
    pub async fn publish(
        self: &Arc<Self>,
        rows: &[&OutboxRow],
        targets: &[Option<Target>],
    ) -> Vec<RowOutcome> {
        let mut outcomes: Vec<Option<RowOutcome>> = (0..rows.len()).map(|_| None).collect();
        let mut shares: Vec<Vec<(usize, Envelope<'_>)>> =
            (0..self.sinks.len()).map(|_| Vec::new()).collect();
        for (i, (&row, target)) in rows.iter().zip(targets).enumerate() {
            // Testing only (relay.fault_injection_rate): fail before publishing.
            let rate = self.fault_injection_rate;
            if rate > 0.0 && rand::rng().random_bool(rate) {
                outcomes[i] = Some(RowOutcome::InjectedFault);
                continue;
            }
            let Some(target) = target else {
                outcomes[i] = Some(RowOutcome::NoRoute);
                continue;
            };
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
                handle.block(&row.topic);
                outcomes[i] = Some(RowOutcome::CircuitOpen);
            }
        }
        let calls = shares
            .iter()
            .enumerate()
            .filter(|(_, share)| !share.is_empty())
            .map(|(s, share)| self.publish_share(s, share));
        for (s, result) in join_all(calls).await {
            let mut first_unavailable = None;
            for ((i, _), outcome) in shares[s].iter().zip(result) {
                if let Outcome::Failed(e) = &outcome {
                    if e.kind == ErrorKind::Unavailable && first_unavailable.is_none() {
                        first_unavailable = Some(e.clone());
                    }
                }
                outcomes[*i] = Some(RowOutcome::Sink(outcome));
            }
            if let Some(e) = first_unavailable {
                for (_, env) in &shares[s] {
                    self.sinks[s].block(&env.row.topic);
                }
                self.trip(s, &e);
            }
        }
        outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    RowOutcome::Sink(Outcome::Failed(SinkError::unavailable(
                        "internal",
                        "no outcome",
                    )))
                })
            })
            .collect()
    }

    /// One sink's share, bounded by `relay.publish_timeout_secs`; exactly one outcome per
    /// envelope whatever the sink returns.
    async fn publish_share(
        &self,
        s: usize,
        share: &[(usize, Envelope<'_>)],
    ) -> (usize, Vec<Outcome>) {
        let envelopes: Vec<Envelope<'_>> = share.iter().map(|(_, e)| *e).collect();
        let handle = &self.sinks[s];
        let started = Instant::now();
        let timeout = self.publish_timeout;
        let mut result = match tokio::time::timeout(timeout, handle.sink.publish(&envelopes)).await
        {
            Ok(r) => r,
            Err(_) => vec![
                Outcome::Failed(SinkError::unavailable(
                    "timeout",
                    format!(
                        "no acknowledgements within relay.publish_timeout_secs ({}s)",
                        timeout.as_secs()
                    ),
                ));
                envelopes.len()
            ],
        };
        if result.len() != envelopes.len() {
            tracing::error!(sink = %handle.name, expected = envelopes.len(), got = result.len(),
                "sink returned the wrong number of outcomes; releasing the batch");
            result = vec![
                Outcome::Failed(SinkError::unavailable(
                    "internal",
                    "sink outcome count mismatch"
                ));
                envelopes.len()
            ];
        }
        self.metrics
            .publish_duration_seconds
            .with_label_values(&[&handle.name])
            .observe(started.elapsed().as_secs_f64());
        (s, result)
    }

    /// Opens sink `i`'s circuit and starts its probe (once).
    fn trip(self: &Arc<Self>, i: usize, error: &SinkError) {
        let handle = &self.sinks[i];
        *lock(&handle.last_error) = Some(error.message.clone());
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
        let this = Arc::clone(self);
        tokio::spawn(async move {
            this.probe(i).await;
            this.sinks[i].probing.store(false, Ordering::Release);
        });
    }

    /// Checks sink `i` with exponential backoff until it answers (then closes its circuit and
    /// wakes the workers) or the relay shuts down.
    async fn probe(&self, i: usize) {
        let handle = &self.sinks[i];
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
                _ = self.shutdown.cancelled() => return,
            }
            match handle.sink.check().await {
                Ok(()) => {
                    lock(&handle.blocked_topics).clear();
                    *lock(&handle.last_error) = None;
                    handle.open.store(false, Ordering::Release);
                    self.metrics
                        .sink_up
                        .with_label_values(&[&handle.name])
                        .set(1);
                    tracing::info!(sink = %handle.name, "sink reachable again; circuit closed");
                    self.wakeup.bump();
                    return;
                }
                Err(e) => {
                    tracing::debug!(sink = %handle.name, error = %e, "sink probe failed");
                    *lock(&handle.last_error) = Some(e.message);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two builds that each wait for the other: one after the other, the first would wait for
    /// ever.
    #[tokio::test]
    async fn sinks_are_built_at_once() {
        let barrier = tokio::sync::Barrier::new(2);
        let built = tokio::time::timeout(
            Duration::from_secs(10),
            build_all(["a", "b"], |name| {
                let barrier = &barrier;
                async move {
                    barrier.wait().await;
                    name
                }
            }),
        )
        .await
        .expect("both builds ran at once");
        assert_eq!(built, ["a", "b"]);
    }
}
