//! What became of one row of a batch: the sink's word, or the relay's own decision (no route,
//! circuit open, held back behind its key, out of time), and how each counts.

use std::borrow::Cow;

use crate::message::OutboxRow;
use crate::sinks::{ErrorKind, Outcome};

/// What became of one row of a batch: the sink's word, or the relay's own decision.
#[derive(Debug, Clone, PartialEq)]
pub enum RowOutcome {
    /// The sink's word (or the relay's on its behalf: a publish timeout, a missing outcome).
    Sink(Outcome),
    /// No route matches the topic: dead-lettered.
    NoRoute,
    /// The sink's circuit is open: released untouched, no attempt counted.
    CircuitOpen,
    /// `relay.fault_injection_rate` (testing only): a retriable failure before publishing.
    InjectedFault,
    /// An earlier message of the row's key failed in this batch: released untouched. Not an
    /// error.
    HeldBack,
    /// The batch's time in its claim transaction ran out before this row's round: released
    /// untouched. Not an error.
    OutOfTime,
}

/// A failure as the retry policy sees it.
pub struct Failure<'a> {
    pub kind: ErrorKind,
    pub message: Cow<'a, str>,
}

impl RowOutcome {
    /// Anything but delivered or duplicate.
    pub fn is_failure(&self) -> bool {
        !matches!(
            self,
            RowOutcome::Sink(Outcome::Delivered | Outcome::Duplicate)
        )
    }

    /// The `error_type` label of `outbox_publish_errors_total`; `None` for delivered rows and
    /// for the relay's own holds, which are not errors.
    pub fn error_type(&self) -> Option<&'static str> {
        match self {
            RowOutcome::Sink(Outcome::Failed(e)) => Some(e.error_type),
            RowOutcome::Sink(_) | RowOutcome::HeldBack | RowOutcome::OutOfTime => None,
            RowOutcome::NoRoute => Some("no_route"),
            RowOutcome::CircuitOpen => Some("circuit_open"),
            RowOutcome::InjectedFault => Some("injected_fault"),
        }
    }

    /// How to treat the row, and the text recorded in its error history.
    pub fn failure(&self, row: &OutboxRow) -> Failure<'_> {
        let (kind, message): (ErrorKind, Cow<'_, str>) = match self {
            RowOutcome::Sink(Outcome::Failed(e)) => (e.kind, Cow::Borrowed(&e.message)),
            RowOutcome::Sink(_) => (ErrorKind::Unavailable, Cow::Borrowed("delivered")),
            RowOutcome::NoRoute => (
                ErrorKind::Permanent,
                Cow::Owned(format!(
                    "no route matches topic {:?}: add it (or a pattern) to a sink's routes",
                    row.topic
                )),
            ),
            RowOutcome::CircuitOpen => (ErrorKind::Unavailable, Cow::Borrowed("sink circuit open")),
            RowOutcome::InjectedFault => (
                ErrorKind::Retriable,
                Cow::Borrowed("fault injected (relay.fault_injection_rate)"),
            ),
            RowOutcome::HeldBack => (
                ErrorKind::Unavailable,
                Cow::Borrowed("an earlier message of this key failed in the same batch"),
            ),
            RowOutcome::OutOfTime => (
                ErrorKind::Unavailable,
                Cow::Borrowed("the batch's time in its claim transaction ran out"),
            ),
        };
        Failure { kind, message }
    }
}
