//! A batch's metrics, updated once per batch: claim and mark durations, batch size, rows in
//! flight, outcomes, errors, retries and delivery latency per sink.

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
        // A batch has a handful of (topic, sink, outcome) combinations, usually one: counted in
        // small lists, each looked up from its last entry, instead of hashing every row's labels.
        let mut counts: Vec<((&str, &str, &'static str), u64)> = Vec::new();
        let mut errors: Vec<((&str, &str, &'static str), u64)> = Vec::new();
        let mut retries: Vec<((&str, &str), u64)> = Vec::new();
        let mut latency: Vec<(&str, Vec<f64>)> = Vec::new();
        let now = Utc::now();
        for (((row, sink), outcome), action) in rows
            .iter()
            .zip(sinks)
            .zip(outcomes)
            .zip(&completion.actions)
        {
            let (topic, sink) = (row.topic.as_str(), *sink);
            *entry(&mut counts, (topic, sink, action.label())) += 1;
            if let Some(error_type) = outcome.error_type() {
                *entry(&mut errors, (topic, sink, error_type)) += 1;
            }
            match action {
                Action::Delivered | Action::Duplicate => {
                    let secs = (now - row.created_at).num_microseconds().unwrap_or(0) as f64 / 1e6;
                    entry(&mut latency, sink).push(secs.max(0.0));
                }
                Action::Retry => *entry(&mut retries, (topic, sink)) += 1,
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

/// The value kept for `key` in `list`, added (default) when missing; searched from the end, where
/// the rows of a batch, in id order and mostly of one topic, find their entry at once.
fn entry<K: PartialEq, V: Default>(list: &mut Vec<(K, V)>, key: K) -> &mut V {
    let at = match list.iter().rposition(|(k, _)| *k == key) {
        Some(at) => at,
        None => {
            list.push((key, V::default()));
            list.len() - 1
        }
    };
    &mut list[at].1
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
