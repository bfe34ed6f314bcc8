//! Publishing an ordered batch: a key's messages reach the broker in order, and a later one is
//! never sent once an earlier one failed.
//!
//! Round `r` publishes the `r`-th message of every key of the batch at once (all keys in
//! flight together, each sink's share concurrently), then awaits the acknowledgements. A key
//! whose message failed (any failure) drops out: its later messages are released untouched
//! ([`HELD_BACK`], no attempt counted) and will come back behind the failed one. Unkeyed rows
//! go in the first round. Every sink gets one message per key per round, Kafka included
//! (docs/ordering.md, "Per broker", says why a single round would not be safe there).
//!
//! The claim transaction sends no statement while the rounds run, so PostgreSQL's
//! `idle_in_transaction_session_timeout` (`relay.claim_timeout_secs`) counts all of them as one
//! idle period. A round is therefore started only while it can still finish (within
//! `relay.publish_timeout_secs`) before that timeout: the rows of the rounds not started are
//! released untouched, like held-back rows, and come back in the next batch. Without the bound
//! a hot key (hundreds of rows in one batch) would have its claim aborted after every batch and
//! republished forever.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

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

fn out_of_time() -> Outcome {
    Outcome::Failed(SinkError::unavailable(
        HELD_BACK,
        "the batch's time in its claim transaction ran out before this round; released untouched",
    ))
}

/// The round of each row (rows are in id order): its rank among the rows of its key.
pub fn plan(rows: &[OutboxRow]) -> Vec<usize> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    rows.iter()
        .map(|row| match row.key.as_deref() {
            Some(k) => {
                let n = seen.entry(k).or_insert(0);
                *n += 1;
                *n - 1
            }
            None => 0,
        })
        .collect()
}

/// Publishes `rows` (one ordered claim, in id order); one outcome and sink per row. Rounds after
/// the first start only before `last_round_start` (see the module docs).
pub async fn publish(
    relay: &Arc<Relay>,
    rows: &[OutboxRow],
    shutdown: &CancellationToken,
    last_round_start: Instant,
) -> (Vec<Outcome>, Vec<Option<usize>>) {
    let round = plan(rows);
    let rounds = round.iter().copied().max().map_or(0, |m| m + 1);
    if let Some(o) = &relay.ordering {
        o.metrics.rounds.set(rounds as i64);
    }
    if rounds <= 1 {
        // At most one row per key: one publish, nothing to hold back.
        return relay.publish(rows, shutdown).await;
    }
    let mut outcomes: Vec<Option<Outcome>> = vec![None; rows.len()];
    let mut sink_of: Vec<Option<usize>> = rows
        .iter()
        .map(|r| relay.router.route(&r.topic).map(|t| t.sink))
        .collect();
    let mut stopped: HashSet<&str> = HashSet::new();
    for r in 0..rounds {
        if r > 0 && Instant::now() >= last_round_start {
            tracing::debug!(
                round = r,
                rounds,
                "claim transaction near relay.claim_timeout_secs: later rounds released"
            );
            for (i, _) in round.iter().enumerate().filter(|(_, &ri)| ri >= r) {
                outcomes[i] = Some(out_of_time());
            }
            break;
        }
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
            row(6, None),
        ];
        assert_eq!(plan(&rows), vec![0, 0, 1, 0, 2, 0]);
        assert!(plan(&[]).is_empty());
    }
}
