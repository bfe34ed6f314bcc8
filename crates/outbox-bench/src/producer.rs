//! An open-loop producer: sends follow a fixed timeline whatever the system does, so a slow
//! system cannot slow the load down and hide its own latency (coordinated omission).
//!
//! The timeline is `slots` slots `interval` apart starting at `start`; slot `s` carries
//! `per_slot` messages in one transaction (one for latency runs), with message ids `"{s}-{j}"`
//! so a consumer can find each message's intended send time from its id alone. Workers (one
//! pooled connection each) take due slots from a shared queue and enqueue them with the client
//! crate; the commit time of every slot is recorded as its lag behind the intended time.
//!
//! [`closed_loop`] is the opposite, for measuring the end-to-end maximum rate: every connection
//! enqueues its next transaction as soon as the previous one committed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_client::{enqueue_many, Message};
use sqlx::PgPool;
use tokio::sync::{mpsc, Mutex};

use crate::brokers::TOPIC;

/// Marks a slot whose commit failed or never happened.
pub const NOT_COMMITTED: u64 = u64::MAX;

#[derive(Debug, Clone)]
pub struct Schedule {
    pub start: Instant,
    pub interval: Duration,
    pub per_slot: usize,
    pub slots: u64,
}

impl Schedule {
    /// `rate` messages/s for `secs`, `per_slot` messages per transaction, starting `lead` from
    /// now.
    pub fn new(rate: f64, secs: f64, per_slot: usize, lead: Duration) -> Self {
        let per_slot = per_slot.max(1);
        let slots_per_sec = rate / per_slot as f64;
        Self {
            start: Instant::now() + lead,
            interval: Duration::from_secs_f64(1.0 / slots_per_sec),
            per_slot,
            slots: (slots_per_sec * secs).round().max(1.0) as u64,
        }
    }

    pub fn intended(&self, slot: u64) -> Instant {
        self.start + self.interval.mul_f64(slot as f64)
    }

    pub fn messages(&self) -> u64 {
        self.slots * self.per_slot as u64
    }

    pub fn rate(&self) -> f64 {
        self.per_slot as f64 / self.interval.as_secs_f64()
    }

    /// The slot of a message id `"{slot}-{j}"`.
    pub fn slot_of(id: &str) -> Option<u64> {
        id.split('-').next()?.parse().ok()
    }
}

/// Per slot, microseconds from the intended send time to the moment COMMIT returned.
pub struct Commits {
    pub lag_us: Vec<AtomicU64>,
    pub errors: AtomicU64,
}

impl Commits {
    pub fn commit_lag_us(&self, slot: u64) -> Option<u64> {
        let v = self.lag_us.get(slot as usize)?.load(Ordering::Relaxed);
        (v != NOT_COMMITTED).then_some(v)
    }
}

/// Runs the timeline to its end with `conns` connections of `pool`.
pub async fn run(
    pool: PgPool,
    schedule: Arc<Schedule>,
    payload: Arc<Vec<u8>>,
    conns: usize,
    commits: Arc<Commits>,
) {
    let (tx, rx) = mpsc::unbounded_channel::<u64>();
    let rx = Arc::new(Mutex::new(rx));
    let workers: Vec<_> = (0..conns.max(1))
        .map(|_| {
            let (rx, pool, schedule, payload, commits) = (
                Arc::clone(&rx),
                pool.clone(),
                Arc::clone(&schedule),
                Arc::clone(&payload),
                Arc::clone(&commits),
            );
            tokio::spawn(async move {
                loop {
                    let Some(slot) = rx.lock().await.recv().await else {
                        break;
                    };
                    let messages: Vec<Message> = (0..schedule.per_slot)
                        .map(|j| {
                            Message::bytes(TOPIC, payload.as_slice())
                                .message_id(format!("{slot}-{j}"))
                        })
                        .collect();
                    let mut conn = match pool.acquire().await {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(error = %e, "producer could not get a connection");
                            continue;
                        }
                    };
                    match enqueue_many(&mut conn, &messages).await {
                        Ok(_) => {
                            let lag =
                                Instant::now().saturating_duration_since(schedule.intended(slot));
                            commits.lag_us[slot as usize]
                                .store(lag.as_micros() as u64, Ordering::Relaxed);
                        }
                        Err(e) => {
                            if commits.errors.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!("warning: enqueue failed (slot {slot}): {e}");
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for slot in 0..schedule.slots {
        tokio::time::sleep_until(tokio::time::Instant::from_std(schedule.intended(slot))).await;
        if tx.send(slot).is_err() {
            break;
        }
    }
    drop(tx);
    futures::future::join_all(workers).await;
}

/// Enqueues `per_tx` messages per transaction on each of `conns` connections of `pool`, back
/// to back, until `until`; adds every committed message to `committed`.
pub async fn closed_loop(
    pool: PgPool,
    payload: Arc<Vec<u8>>,
    conns: usize,
    per_tx: usize,
    until: Instant,
    committed: Arc<AtomicU64>,
) {
    let workers: Vec<_> = (0..conns.max(1))
        .map(|c| {
            let (pool, payload, committed) =
                (pool.clone(), Arc::clone(&payload), Arc::clone(&committed));
            tokio::spawn(async move {
                let mut n = 0u64;
                let mut errors = 0u64;
                while Instant::now() < until {
                    let messages: Vec<Message> = (0..per_tx.max(1))
                        .map(|j| {
                            Message::bytes(TOPIC, payload.as_slice())
                                .message_id(format!("c{c}-{n}-{j}"))
                        })
                        .collect();
                    n += 1;
                    let result = match pool.acquire().await {
                        Ok(mut conn) => enqueue_many(&mut conn, &messages)
                            .await
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    match result {
                        Ok(_) => {
                            committed.fetch_add(messages.len() as u64, Ordering::Relaxed);
                        }
                        Err(e) => {
                            errors += 1;
                            if errors == 1 {
                                eprintln!("warning: enqueue failed (closed loop): {e}");
                            }
                        }
                    }
                }
            })
        })
        .collect();
    futures::future::join_all(workers).await;
}

pub fn new_commits(schedule: &Schedule) -> Arc<Commits> {
    Arc::new(Commits {
        lag_us: (0..schedule.slots)
            .map(|_| AtomicU64::new(NOT_COMMITTED))
            .collect(),
        errors: AtomicU64::new(0),
    })
}

/// One message as the independent consumer saw it.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    pub slot: u64,
    /// Intended send time → arrival at the consumer.
    pub from_intended_us: u64,
    /// Arrival, as microseconds since the schedule's start.
    pub at_us: u64,
}

/// Reads the consumer's channel until `expected` distinct messages arrived or `deadline`.
pub async fn collect_arrivals(
    rx: &mut mpsc::UnboundedReceiver<(String, Instant)>,
    schedule: &Schedule,
    expected: u64,
    deadline: tokio::time::Instant,
    seen: &mut std::collections::HashSet<String>,
) -> Vec<Arrival> {
    let mut out = Vec::with_capacity(expected as usize);
    while (out.len() as u64) < expected {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((id, at))) => {
                let Some(slot) = Schedule::slot_of(&id) else {
                    continue;
                };
                if !seen.insert(id) {
                    continue;
                }
                out.push(Arrival {
                    slot,
                    from_intended_us: at
                        .saturating_duration_since(schedule.intended(slot))
                        .as_micros() as u64,
                    at_us: at.saturating_duration_since(schedule.start).as_micros() as u64,
                });
            }
            Ok(None) | Err(_) => break,
        }
    }
    out
}
