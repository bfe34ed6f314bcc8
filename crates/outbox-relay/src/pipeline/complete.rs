//! Outcomes → what happens to each row, and the retry policy.
//!
//! Delivered and duplicate rows are marked sent (deleted, or moved to `outbox.sent` with
//! retention); retriable failures are scheduled again after a backoff until `relay.max_attempts`,
//! then dead-lettered; permanent failures are dead-lettered at once; released rows (the sink's
//! circuit is open, held back behind their key, out of time) are left untouched. All of it in the
//! claim transaction, which this module commits.
//!
//! The relay MUST NOT mark a row sent before the broker acknowledged it: only
//! [`Outcome::Delivered`] and [`Outcome::Duplicate`] rows reach [`store::mark_sent`].
//!
//! Each row gets exactly one action, so the completion touches each row with one statement at
//! most: the statements address the rows by `ctid` ([`crate::store::complete`]), and a row that
//! one of them updated has another `ctid` for the next.

use std::time::Duration;

use rand::Rng;
use sqlx::{PgConnection, Postgres, Transaction};

use super::outcome::RowOutcome;
use crate::config::RelayConfig;
use crate::message::{Locked, OutboxRow};
use crate::sinks::{ErrorKind, Outcome};
use crate::store::{self, Retry};

/// The backoff between attempts and when to give up.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial: Duration,
    pub max: Duration,
}

impl RetryPolicy {
    pub fn from_config(c: &RelayConfig) -> Self {
        Self {
            max_attempts: c.max_attempts,
            initial: Duration::from_millis(c.retry_initial_ms),
            max: Duration::from_secs(c.retry_max_secs),
        }
    }

    /// The backoff before attempt `attempts + 1`: exponential from `initial`, capped at `max`,
    /// with equal jitter (half fixed, half random) so retries spread out.
    pub fn delay(&self, attempts: i32) -> Duration {
        let base = self.initial.as_millis() as f64 * 2f64.powi(attempts.clamp(0, 30));
        let capped = base.min(self.max.as_millis() as f64);
        let jitter = rand::rng().random_range(0.0..=capped / 2.0);
        Duration::from_millis((capped / 2.0 + jitter) as u64)
    }

    /// Whether a row that failed now, after `attempts` earlier failures, gets another attempt.
    fn retries(&self, attempts: i32) -> bool {
        attempts + 1 < self.max_attempts as i32
    }
}

/// What happens to one row; its name is the `outcome` label of `outbox_published_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Delivered,
    Duplicate,
    /// The sink could not take the row (circuit open, unreachable): left untouched.
    Released,
    /// Ordered mode: an earlier row of the key failed in this batch, or the batch ran out of
    /// time before the row's round: left untouched, the sink being up.
    HeldBack,
    Retry,
    Dead,
}

impl Action {
    pub fn label(self) -> &'static str {
        match self {
            Action::Delivered => "delivered",
            Action::Duplicate => "duplicate",
            Action::Released => "released",
            Action::HeldBack => "held_back",
            Action::Retry => "retry",
            Action::Dead => "dead",
        }
    }
}

/// A batch's decisions, ready to be written in its claim transaction.
#[derive(Debug, Default)]
pub struct Completion {
    /// One per row, in the batch's order.
    pub actions: Vec<Action>,
    pub delivered: Vec<Locked>,
    pub retries: Vec<Retry>,
    /// The rows to dead-letter, each with its final error in `dead_errors`.
    pub dead: Vec<Locked>,
    pub dead_errors: Vec<String>,
}

impl Completion {
    /// Decides every row of the batch from its outcome; `locked[i]` addresses `rows[i]`.
    pub fn new(
        rows: &[OutboxRow],
        locked: &[Locked],
        outcomes: &[RowOutcome],
        policy: &RetryPolicy,
    ) -> Self {
        debug_assert_eq!(rows.len(), locked.len());
        let mut c = Completion {
            actions: Vec::with_capacity(rows.len()),
            ..Completion::default()
        };
        for ((row, locked), outcome) in rows.iter().zip(locked).zip(outcomes) {
            let action = match outcome {
                RowOutcome::Sink(Outcome::Delivered) => {
                    c.delivered.push(locked.clone());
                    Action::Delivered
                }
                RowOutcome::Sink(Outcome::Duplicate) => {
                    c.delivered.push(locked.clone());
                    Action::Duplicate
                }
                RowOutcome::HeldBack | RowOutcome::OutOfTime => Action::HeldBack,
                failed => {
                    let failure = failed.failure(row);
                    match failure.kind {
                        ErrorKind::Unavailable => Action::Released,
                        ErrorKind::Retriable if policy.retries(row.attempts) => {
                            c.retries.push(Retry {
                                row: locked.clone(),
                                delay: policy.delay(row.attempts),
                                error: failure.message.into_owned(),
                            });
                            Action::Retry
                        }
                        ErrorKind::Retriable => {
                            c.dead.push(locked.clone());
                            c.dead_errors.push(format!(
                                "{} (gave up after {} attempts)",
                                failure.message,
                                row.attempts + 1
                            ));
                            Action::Dead
                        }
                        ErrorKind::Permanent => {
                            c.dead.push(locked.clone());
                            c.dead_errors.push(failure.message.into_owned());
                            Action::Dead
                        }
                    }
                }
            };
            c.actions.push(action);
        }
        c
    }

    /// Writes the decisions and commits the claim transaction. With `park`, the keys of the
    /// dead-lettered rows are parked in the same transaction.
    pub async fn apply(
        &self,
        mut tx: Transaction<'static, Postgres>,
        retain: bool,
        park: bool,
    ) -> Result<(), sqlx::Error> {
        self.write(&mut tx, retain, park).await?;
        tx.commit().await
    }

    async fn write(
        &self,
        conn: &mut PgConnection,
        retain: bool,
        park: bool,
    ) -> Result<(), sqlx::Error> {
        store::mark_sent(conn, &self.delivered, retain).await?;
        store::schedule_retries(conn, &self.retries).await?;
        store::dead_letter(conn, &self.dead, &self.dead_errors).await?;
        if park {
            let dead_ids: Vec<i64> = self.dead.iter().map(|r| r.id).collect();
            let parked = store::park_dead(conn, &dead_ids).await?;
            if parked > 0 {
                tracing::warn!(
                    keys = parked,
                    "keys parked after a dead letter: `outbox-relay keys list`"
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::SinkError;

    fn row(id: i64, attempts: i32) -> OutboxRow {
        OutboxRow {
            id,
            message_id: id.to_string(),
            topic: "t".into(),
            key: None,
            payload: vec![],
            headers: Default::default(),
            created_at: chrono::Utc::now(),
            attempts,
        }
    }

    #[test]
    fn each_outcome_gets_its_action() {
        let policy = RetryPolicy {
            max_attempts: 3,
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let rows = [
            row(1, 0),
            row(2, 0),
            row(3, 0),
            row(4, 2),
            row(5, 0),
            row(6, 0),
            row(7, 0),
        ];
        let outcomes = [
            RowOutcome::Sink(Outcome::Delivered),
            RowOutcome::Sink(Outcome::Duplicate),
            RowOutcome::Sink(Outcome::Failed(SinkError::retriable("nack", "nacked"))),
            RowOutcome::Sink(Outcome::Failed(SinkError::retriable("nack", "nacked"))),
            RowOutcome::NoRoute,
            RowOutcome::CircuitOpen,
            RowOutcome::HeldBack,
        ];
        let locked: Vec<Locked> = rows
            .iter()
            .map(|r| Locked {
                id: r.id,
                ctid: format!("(0,{})", r.id),
            })
            .collect();
        let c = Completion::new(&rows, &locked, &outcomes, &policy);
        let ids = |rows: &[Locked]| rows.iter().map(|r| r.id).collect::<Vec<_>>();
        use Action::*;
        assert_eq!(
            c.actions,
            [Delivered, Duplicate, Retry, Dead, Dead, Released, HeldBack]
        );
        assert_eq!(ids(&c.delivered), [1, 2]);
        assert_eq!(c.delivered[1].ctid, "(0,2)");
        assert_eq!(c.retries.len(), 1);
        assert_eq!(c.retries[0].row, locked[2]);
        assert_eq!(ids(&c.dead), [4, 5]);
        assert_eq!(c.dead_errors[0], "nacked (gave up after 3 attempts)");
        assert!(c.dead_errors[1].contains("no route matches topic \"t\""));
    }

    #[test]
    fn retry_delays_grow_exponentially_with_jitter_and_stop_at_the_cap() {
        let policy = RetryPolicy {
            max_attempts: 10,
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        for attempts in 0..12 {
            let d = policy.delay(attempts).as_millis() as f64;
            let full = (100.0 * 2f64.powi(attempts)).min(1000.0);
            assert!(
                d >= full / 2.0 - 1.0 && d <= full,
                "{attempts}: {d} vs {full}"
            );
        }
    }
}
