//! Publishing an ordered batch: a key's messages reach the broker in order, and a later one is
//! never sent once an earlier one failed.
//!
//! Round `r` publishes the `r`-th message of every key of the batch at once (all keys in
//! flight together, each sink's share concurrently), then awaits the acknowledgements. A key
//! whose message failed (any failure) drops out: its later messages are released untouched
//! ([`RowOutcome::HeldBack`], no attempt counted) and will come back behind the failed one. Unkeyed rows
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

use super::dispatch::Dispatcher;
use super::outcome::RowOutcome;
use crate::message::OutboxRow;
use crate::routing::Target;

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

/// Publishes `rows` (one ordered claim, in id order, with their `targets`); one outcome per
/// row. Rounds after the first start only before `last_round_start` (see the module docs).
/// Returns the outcomes and the number of rounds the batch needed.
pub async fn publish(
    dispatcher: &Arc<Dispatcher>,
    rows: &[OutboxRow],
    targets: &[Option<Target>],
    last_round_start: Instant,
) -> (Vec<RowOutcome>, usize) {
    let round = plan(rows);
    let rounds = round.iter().copied().max().map_or(0, |m| m + 1);
    if rounds <= 1 {
        // At most one row per key: one publish, nothing to hold back.
        let all: Vec<&OutboxRow> = rows.iter().collect();
        return (dispatcher.publish(&all, targets).await, rounds);
    }
    let mut outcomes: Vec<Option<RowOutcome>> = (0..rows.len()).map(|_| None).collect();
    let mut stopped: HashSet<&str> = HashSet::new();
    for r in 0..rounds {
        if r > 0 && Instant::now() >= last_round_start {
            tracing::debug!(
                round = r,
                rounds,
                "claim transaction near relay.claim_timeout_secs: later rounds released"
            );
            for (i, _) in round.iter().enumerate().filter(|(_, &ri)| ri >= r) {
                outcomes[i] = Some(RowOutcome::OutOfTime);
            }
            break;
        }
        let mut idx = Vec::new();
        for (i, row) in rows.iter().enumerate().filter(|(i, _)| round[*i] == r) {
            match row.key.as_deref() {
                Some(k) if stopped.contains(k) => outcomes[i] = Some(RowOutcome::HeldBack),
                _ => idx.push(i),
            }
        }
        if idx.is_empty() {
            continue;
        }
        let batch: Vec<&OutboxRow> = idx.iter().map(|&i| &rows[i]).collect();
        let batch_targets: Vec<Option<Target>> = idx.iter().map(|&i| targets[i]).collect();
        let published = dispatcher.publish(&batch, &batch_targets).await;
        for (&i, outcome) in idx.iter().zip(published) {
            if let (true, Some(k)) = (outcome.is_failure(), rows[i].key.as_deref()) {
                stopped.insert(k);
            }
            outcomes[i] = Some(outcome);
        }
    }
    let outcomes = outcomes
        .into_iter()
        .map(|o| o.unwrap_or(RowOutcome::HeldBack))
        .collect();
    (outcomes, rounds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::OutboxRow;
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
