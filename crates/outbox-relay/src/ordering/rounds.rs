//! Publishing an ordered batch: a key's messages reach the broker in order, and a later one is
//! never sent once an earlier one failed.
//!
//! Round `r` publishes the `r`-th message of every key of the batch at once (all keys in
//! flight together, each sink's share concurrently), then awaits the acknowledgements. A key
//! whose message failed (any failure) drops out: its later messages are released untouched
//! ([`HELD_BACK`], no attempt counted) and will come back behind the failed one. Unkeyed rows
//! go in the first round. A key whose rows all go to one sink that preserves per-key order
//! under retries ([`crate::sinks::Sink::preserves_key_order`], e.g. Kafka's idempotent
//! producer) is sent in one round; a failure there still holds back the key's later rows.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::HELD_BACK;
use crate::relay::Relay;
use crate::sinks::{OutboxRow, Outcome, SinkError};

fn held_back() -> Outcome {
    Outcome::Failed(SinkError::unavailable(
        HELD_BACK,
        "an earlier message of this key failed in the same batch; released untouched",
    ))
}

/// The round of each row (rows are in id order).
pub fn plan(
    rows: &[OutboxRow],
    preserves_order: impl Fn(&OutboxRow) -> Option<usize>,
) -> Vec<usize> {
    let mut by_key: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, row) in rows.iter().enumerate() {
        if let Some(k) = &row.key {
            by_key.entry(k.as_str()).or_default().push(i);
        }
    }
    let mut round = vec![0; rows.len()];
    for idxs in by_key.values() {
        // `preserves_order` answers the sink index for rows whose sink keeps per-key order.
        let first = preserves_order(&rows[idxs[0]]);
        let one_round = first.is_some() && idxs.iter().all(|&i| preserves_order(&rows[i]) == first);
        if !one_round {
            for (r, &i) in idxs.iter().enumerate() {
                round[i] = r;
            }
        }
    }
    round
}

/// Publishes `rows` (one ordered claim, in id order); one outcome and sink per row.
pub async fn publish(
    relay: &Arc<Relay>,
    rows: &[OutboxRow],
    shutdown: &CancellationToken,
) -> (Vec<Outcome>, Vec<Option<usize>>) {
    let round = plan(rows, |row| {
        relay
            .router
            .route(&row.topic)
            .map(|t| t.sink)
            .filter(|&s| relay.sinks[s].sink.preserves_key_order())
    });
    let rounds = round.iter().copied().max().map_or(0, |m| m + 1);
    if let Some(o) = &relay.ordering {
        o.metrics.rounds.set(rounds as i64);
    }
    let (mut outcomes, sink_of) = if rounds <= 1 {
        relay.publish(rows, shutdown).await
    } else {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; rows.len()];
        let mut sink_of: Vec<Option<usize>> = rows
            .iter()
            .map(|r| relay.router.route(&r.topic).map(|t| t.sink))
            .collect();
        let mut stopped: HashSet<&str> = HashSet::new();
        for r in 0..rounds {
            let mut idx = Vec::new();
            for (i, row) in rows.iter().enumerate().filter(|(i, _)| round[*i] == r) {
                match row.key.as_deref() {
                    Some(k) if stopped.contains(k) => outcomes[i] = Some(held_back()),
                    _ => idx.push(i),
                }
            }
            if idx.is_empty() {
                continue;
            }
            let batch: Vec<OutboxRow> = idx.iter().map(|&i| rows[i].clone()).collect();
            let (o, s) = relay.publish(&batch, shutdown).await;
            for ((&i, outcome), sink) in idx.iter().zip(o).zip(s) {
                if let (Outcome::Failed(_), Some(k)) = (&outcome, rows[i].key.as_deref()) {
                    stopped.insert(k);
                }
                outcomes[i] = Some(outcome);
                sink_of[i] = sink;
            }
        }
        let outcomes = outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(held_back))
            .collect();
        (outcomes, sink_of)
    };
    hold_back_after_failures(rows, &mut outcomes);
    (outcomes, sink_of)
}

/// After a key's first failure, its later failures become [`HELD_BACK`] (released untouched,
/// no attempt burned: they were not the cause). A later success there means a sink broke its
/// `preserves_key_order` promise: logged, and kept (the broker has it).
pub fn hold_back_after_failures(rows: &[OutboxRow], outcomes: &mut [Outcome]) {
    let mut failed: HashSet<&str> = HashSet::new();
    for (row, outcome) in rows.iter().zip(outcomes.iter_mut()) {
        let Some(k) = row.key.as_deref() else {
            continue;
        };
        if failed.contains(k) {
            match outcome {
                Outcome::Failed(_) => *outcome = held_back(),
                Outcome::Delivered | Outcome::Duplicate => {
                    tracing::error!(key = k, id = row.id, topic = %row.topic,
                        "a message was delivered after an earlier one of its key failed: the sink broke its per-key order promise");
                }
            }
        } else if matches!(outcome, Outcome::Failed(_)) {
            failed.insert(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn row(id: i64, key: Option<&str>) -> OutboxRow {
        OutboxRow {
            id,
            message_id: id.to_string(),
            topic: "t".into(),
            key: key.map(str::to_string),
            payload: vec![],
            headers: BTreeMap::new(),
            created_at: chrono::Utc::now(),
            attempts: 0,
        }
    }

    #[test]
    fn rounds_follow_each_keys_order_and_unkeyed_rows_go_first() {
        let rows = vec![
            row(1, Some("a")),
            row(2, None),
            row(3, Some("a")),
            row(4, Some("b")),
            row(5, Some("a")),
        ];
        assert_eq!(plan(&rows, |_| None), vec![0, 0, 1, 0, 2]);
        // A sink that keeps per-key order: one round.
        assert_eq!(plan(&rows, |_| Some(0)), vec![0; 5]);
    }

    #[test]
    fn a_failure_holds_back_the_later_rows_of_its_key_only() {
        let rows = vec![
            row(1, Some("a")),
            row(2, Some("b")),
            row(3, Some("a")),
            row(4, Some("b")),
        ];
        let fail = Outcome::Failed(SinkError::retriable("x", "boom"));
        let mut outcomes = vec![fail.clone(), Outcome::Delivered, fail, Outcome::Delivered];
        hold_back_after_failures(&rows, &mut outcomes);
        assert!(matches!(&outcomes[0], Outcome::Failed(e) if e.error_type == "x"));
        assert!(matches!(&outcomes[2], Outcome::Failed(e) if e.error_type == HELD_BACK));
        assert_eq!(outcomes[1], Outcome::Delivered);
        assert_eq!(outcomes[3], Outcome::Delivered);
    }
}
