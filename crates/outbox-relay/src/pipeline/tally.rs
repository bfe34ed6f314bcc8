//! A batch's metrics, updated once per batch: claim and mark durations, batch size, rows in
//! flight, outcomes, errors, retries and delivery latency per sink.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use super::complete::{Action, Completion};
use super::outcome::RowOutcome;
use crate::message::OutboxRow;
use crate::metrics::Metrics;

/// Writes batch results into the relay's metrics.
pub struct Tally {
    metrics: Arc<Metrics>,
}

impl Tally {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }

    pub fn claimed(&self, took: Duration, rows: usize) {
        self.metrics
            .claim_duration_seconds
            .observe(took.as_secs_f64());
        if rows > 0 {
            self.metrics.batch_size.observe(rows as f64);
        }
    }

    /// Counts `n` rows in flight until the guard drops (on every exit path).
    pub fn in_flight(&self, n: usize) -> InFlight<'_> {
        self.metrics.in_flight_messages.add(n as i64);
        InFlight {
            metrics: &self.metrics,
            n: n as i64,
        }
    }

    pub fn rounds(&self, rounds: usize) {
        self.metrics.ordering.rounds.set(rounds as i64);
    }

    /// The broker has these rows but the mark failed: they will be published again.
    pub fn unmarked(&self, rows: usize) {
        self.metrics.unmarked_published_total.inc_by(rows as u64);
    }

    pub fn marked(&self, took: Duration) {
        self.metrics
            .mark_duration_seconds
            .observe(took.as_secs_f64());
    }

    /// Outcomes, errors, retries and latency of a completed batch; `sinks` is each row's sink
    /// name (`none` when unrouted).
    pub fn completed(
        &self,
        rows: &[OutboxRow],
        sinks: &[&str],
        outcomes: &[RowOutcome],
        completion: &Completion,
    ) {
        let mut counts: HashMap<(&str, &str, &'static str), u64> = HashMap::new();
        let mut errors: HashMap<(&str, &str, &'static str), u64> = HashMap::new();
        let mut retries: HashMap<(&str, &str), u64> = HashMap::new();
        let mut latency: HashMap<&str, Vec<f64>> = HashMap::new();
        let now = Utc::now();
        for (((row, sink), outcome), action) in rows
            .iter()
            .zip(sinks)
            .zip(outcomes)
            .zip(&completion.actions)
        {
            let (topic, sink) = (row.topic.as_str(), *sink);
            *counts.entry((topic, sink, action.label())).or_default() += 1;
            if let Some(error_type) = outcome.error_type() {
                *errors.entry((topic, sink, error_type)).or_default() += 1;
            }
            match action {
                Action::Delivered | Action::Duplicate => {
                    let secs = (now - row.created_at).num_microseconds().unwrap_or(0) as f64 / 1e6;
                    latency.entry(sink).or_default().push(secs.max(0.0));
                }
                Action::Retry => *retries.entry((topic, sink)).or_default() += 1,
                Action::Released | Action::HeldBack | Action::Dead => {}
            }
        }
        let m = &self.metrics;
        for ((topic, sink, outcome), c) in counts {
            m.published_total
                .with_label_values(&[topic, sink, outcome])
                .inc_by(c);
        }
        for ((topic, sink, error_type), c) in errors {
            m.publish_errors_total
                .with_label_values(&[topic, sink, error_type])
                .inc_by(c);
        }
        for ((topic, sink), c) in retries {
            m.retries_total.with_label_values(&[topic, sink]).inc_by(c);
        }
        for (sink, values) in latency {
            let h = m.delivery_latency_seconds.with_label_values(&[sink]);
            values.into_iter().for_each(|v| h.observe(v));
        }
        if let Some(first) = completion.dead_errors.first() {
            tracing::warn!(count = completion.dead.len(), first_error = %first, "messages dead-lettered");
        }
    }
}

/// Keeps `outbox_in_flight_messages` right on every exit path.
pub struct InFlight<'a> {
    metrics: &'a Metrics,
    n: i64,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.metrics.in_flight_messages.sub(self.n);
    }
}
