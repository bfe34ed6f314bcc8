//! When to look for work: adaptive polling while busy, LISTEN/NOTIFY while idle, and a slow
//! fallback poll so that nothing depends on a notification arriving.
//!
//! NOTIFY serialises the commits of the transactions that send it (measured: 16 enqueuing
//! clients fell from 6,830 to 591 tps). So enqueuers notify only while a relay has registered
//! itself in `outbox.relay_sleepers`, which it does only after `relay.sleep_after_ms` without
//! work. Under load every relay is busy or polling every `relay.idle_poll_ms`, the table is
//! empty, and no enqueuer pays for NOTIFY.
//!
//! The lost-wake-up race (an enqueuer checks the table just before the relay registers, and
//! commits just after the relay's last look) is closed by an advisory lock handshake: the
//! insert trigger holds `pg_advisory_xact_lock_shared(k)` until its transaction ends, and the
//! relay, after registering, must take `pg_try_advisory_lock(k)` exclusively before its final
//! look. If it gets it, every enqueuer that read the table before the registration has
//! committed (its row is visible to the final look) and every later one sees the registration
//! and notifies. If it does not, an enqueue is in flight and the relay keeps polling.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::RelayConfig;
use crate::store;

pub const CHANNEL: &str = "outbox_wakeup";

/// The topics the workers skip right now (see [`crate::relay::Relay`]'s circuit breakers).
pub type Excluded = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// What the idle poll asks about: the claimable rows of the topics not excluded, from the claim
/// floor on (as the workers' claims).
#[derive(Clone)]
pub struct PollScope {
    pub excluded: Excluded,
    pub floor: Arc<store::floor::Shared>,
}

impl PollScope {
    async fn any_available(&self, listener: &mut PgListener) -> Result<bool, sqlx::Error> {
        store::any_available(&mut *listener, &(self.excluded)(), self.floor.get()).await
    }
}

#[derive(Clone, Copy)]
struct Timing {
    idle_poll: Duration,
    sleep_after: Duration,
    fallback: Duration,
    workers: usize,
}

/// Shared between the workers and the listener task.
pub struct Wakeup {
    generation: watch::Sender<u64>,
    started: Instant,
    last_activity_ms: AtomicU64,
    /// Bumped on every activity, so that "did anything happen since" is exact.
    activity_count: AtomicU64,
    idle_workers: AtomicUsize,
    batches_done: AtomicU64,
}

impl Wakeup {
    pub fn new() -> Arc<Self> {
        let (generation, _) = watch::channel(0);
        Arc::new(Self {
            generation,
            started: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            activity_count: AtomicU64::new(0),
            idle_workers: AtomicUsize::new(0),
            batches_done: AtomicU64::new(0),
        })
    }

    /// Wakes every waiting worker.
    pub fn bump(&self) {
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// A worker found rows: stay in the polling regime.
    /// A worker finished a claim transaction (with or without rows).
    pub fn batch_done(&self) {
        self.batches_done.fetch_add(1, Ordering::SeqCst);
    }

    fn activity_stamp(&self) -> u64 {
        self.activity_count.load(Ordering::SeqCst)
    }

    pub fn activity(&self) {
        self.activity_count.fetch_add(1, Ordering::SeqCst);
        self.last_activity_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_activity_ms.load(Ordering::Relaxed)))
    }

    /// Waits until someone bumps, or the token is cancelled. Counts the worker as idle meanwhile.
    pub async fn wait(&self, rx: &mut watch::Receiver<u64>, shutdown: &CancellationToken) {
        self.idle_workers.fetch_add(1, Ordering::SeqCst);
        tokio::select! {
            _ = rx.changed() => {}
            _ = shutdown.cancelled() => {}
        }
        self.idle_workers.fetch_sub(1, Ordering::SeqCst);
    }

    /// The listener task. Runs until `shutdown`.
    /// `scope.excluded` returns the topics the workers currently skip (sinks with an open
    /// circuit).
    pub async fn run(
        self: Arc<Self>,
        pool: PgPool,
        config: RelayConfig,
        workers: usize,
        scope: PollScope,
        shutdown: CancellationToken,
    ) {
        let idle_poll = Duration::from_millis(config.idle_poll_ms);
        let sleep_after = Duration::from_millis(config.sleep_after_ms);
        let fallback = Duration::from_millis(config.poll_interval_ms);
        let mut retry_delay = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            let mut listener = match PgListener::connect_with(&pool).await {
                Ok(mut l) => match l.listen(CHANNEL).await {
                    Ok(()) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN failed; polling meanwhile");
                        self.poll_until(retry_delay, &shutdown).await;
                        retry_delay = (retry_delay * 2).min(Duration::from_secs(10));
                        continue;
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open the LISTEN connection; polling meanwhile");
                    self.poll_until(retry_delay, &shutdown).await;
                    retry_delay = (retry_delay * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            retry_delay = Duration::from_millis(100);
            // Whatever happened while we were not listening: look now.
            self.bump();
            let timing = Timing {
                idle_poll,
                sleep_after,
                fallback,
                workers,
            };
            if let Err(e) = self
                .listen_loop(&mut listener, &timing, &scope, &shutdown)
                .await
            {
                tracing::warn!(error = %e, "wake-up listener lost its connection; reconnecting");
            }
            let _ = store::sleepers::unregister(&mut listener).await;
        }
    }

    /// Without a listener: bump every `idle_poll` for `total`.
    async fn poll_until(&self, total: Duration, shutdown: &CancellationToken) {
        tokio::select! {
            _ = tokio::time::sleep(total) => {}
            _ = shutdown.cancelled() => {}
        }
        self.bump();
    }

    async fn listen_loop(
        &self,
        listener: &mut PgListener,
        timing: &Timing,
        scope: &PollScope,
        shutdown: &CancellationToken,
    ) -> Result<(), sqlx::Error> {
        let Timing {
            idle_poll,
            sleep_after,
            fallback,
            workers,
        } = *timing;
        let mut registered = false;
        // The activity stamp at which the workers last found nothing although the idle poll saw
        // available rows (rows they may not claim: held back behind an earlier row of their key,
        // parked, or in another relay's slots). While it is current, the poll's answer is
        // useless and the relay relies on NOTIFY and the fallback poll instead of spinning.
        let mut stale_at: Option<u64> = None;
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let stale = stale_at == Some(self.activity_stamp());
            let all_idle = self.idle_workers.load(Ordering::SeqCst) >= workers;
            if !all_idle || (self.idle_for() < sleep_after && !stale) {
                // Busy regime: poll, and only when every worker waits (a busy worker claims
                // again by itself).
                if registered {
                    store::sleepers::unregister(&mut *listener).await?;
                    registered = false;
                }
                tokio::select! {
                    _ = tokio::time::sleep(idle_poll) => {}
                    _ = shutdown.cancelled() => return Ok(()),
                }
                if self.idle_workers.load(Ordering::SeqCst) >= workers
                    && scope.any_available(listener).await?
                    && !self.workers_found_rows(workers, shutdown).await
                {
                    stale_at = Some(self.activity_stamp());
                }
                continue;
            }
            if !registered {
                store::sleepers::register(&mut *listener).await?;
                registered = true;
            }
            if !store::sleepers::no_enqueue_in_flight(&mut *listener).await? {
                // An enqueue that may not have seen our registration is in flight: look again
                // once it has committed.
                tokio::select! {
                    _ = tokio::time::sleep(idle_poll) => {}
                    _ = shutdown.cancelled() => return Ok(()),
                }
                continue;
            }
            // The final look. When the poll is known to see rows nobody may claim, let the
            // workers look instead (one claim).
            let look = if stale {
                true
            } else {
                scope.any_available(listener).await?
            };
            if look {
                if self.workers_found_rows(workers, shutdown).await {
                    continue;
                }
                stale_at = Some(self.activity_stamp());
            }
            tokio::select! {
                n = listener.try_recv() => match n? {
                    Some(_) => {
                        stale_at = None;
                        self.activity();
                        self.bump();
                    }
                    None => {
                        // The connection dropped and was re-established: registrations and
                        // notifications of the old session are gone.
                        registered = false;
                        listener.listen(CHANNEL).await?;
                        self.bump();
                    }
                },
                _ = tokio::time::sleep(fallback) => {
                    // The fallback: the workers look once (cheap at this rate, and right even
                    // when the poll would be fooled by rows they may not claim).
                    self.bump();
                }
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    /// Wakes the workers and waits (bounded) until they have all claimed and gone idle again;
    /// true when they found rows.
    async fn workers_found_rows(&self, workers: usize, shutdown: &CancellationToken) -> bool {
        let stamp = self.activity_stamp();
        let batches = self.batches_done.load(Ordering::SeqCst);
        self.bump();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            if self.activity_stamp() != stamp {
                return true;
            }
            let done = self.batches_done.load(Ordering::SeqCst) > batches
                && self.idle_workers.load(Ordering::SeqCst) >= workers;
            if done || shutdown.is_cancelled() || tokio::time::Instant::now() >= deadline {
                return self.activity_stamp() != stamp;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}
