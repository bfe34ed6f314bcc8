//! Which Kafka topics exist, as far as the sink knows: a message is produced only to a topic the
//! broker has reported, so that a missing topic is refused at once instead of being held by
//! librdkafka for `topic.metadata.propagation.max.ms` (which would hold the whole batch, and
//! with ordering every key with rows in it).
//!
//! A topic the broker reports as unknown is not dead-lettered at once: a topic created moments
//! ago may not have reached every broker yet. Its rows fail as retriable until the topic has
//! been reported missing for `grace` (the same wait librdkafka applies), then permanently.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sinks::SinkError;

/// What one metadata request says about one topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lookup {
    /// The broker knows it (with its partitions): produce to it, remember it.
    Exists,
    /// `UNKNOWN_TOPIC_OR_PARTITION`: the broker does not have it and did not create it.
    Missing,
    /// Anything else (e.g. being created, leader election, not authorised): produce and let
    /// librdkafka and the delivery report decide; ask again next time.
    Undecided,
}

/// One topic reported missing: since when, and when last.
struct Missing {
    first: Instant,
    last: Instant,
}

pub(super) struct Topics {
    known: Mutex<HashSet<String>>,
    missing: Mutex<HashMap<String, Missing>>,
    grace: Duration,
}

impl Topics {
    pub fn new(grace: Duration) -> Self {
        Self {
            known: Mutex::new(HashSet::new()),
            missing: Mutex::new(HashMap::new()),
            grace,
        }
    }

    pub fn is_known(&self, topic: &str) -> bool {
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(topic)
    }

    /// A delivery report said the topic does not exist (deleted since): ask the broker again
    /// before the next message for it.
    pub fn forget(&self, topic: &str) {
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(topic);
    }

    /// Records the broker's answer; `Some(error)` for the rows of a missing topic, which are
    /// not produced.
    pub fn record(&self, topic: &str, lookup: Lookup, now: Instant) -> Option<SinkError> {
        let mut missing = self.missing.lock().unwrap_or_else(|e| e.into_inner());
        // A topic not reported missing for `grace` starts a new grace period: it may have been
        // created in between (and the broker asked may not know it yet).
        missing.retain(|_, m| now.saturating_duration_since(m.last) < self.grace);
        match lookup {
            Lookup::Exists => {
                missing.remove(topic);
                drop(missing);
                self.known
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(topic.to_string());
                None
            }
            Lookup::Undecided => {
                missing.remove(topic);
                None
            }
            Lookup::Missing => {
                let m = missing.entry(topic.to_string()).or_insert(Missing {
                    first: now,
                    last: now,
                });
                m.last = now;
                let waited = now.saturating_duration_since(m.first);
                Some(if waited < self.grace {
                    SinkError::retriable(
                        "unknown_topic",
                        format!(
                            "the Kafka topic {topic:?} does not exist (the broker reports it unknown and \
                             does not create it); retried while it is missing for less than {} ms, in case \
                             it was created moments ago, then dead-lettered: create the topic",
                            self.grace.as_millis()
                        ),
                    )
                } else {
                    SinkError::permanent(
                        "unknown_topic",
                        format!(
                            "the Kafka topic {topic:?} does not exist and the broker does not create it \
                             (auto-create is off; reported missing for {} ms): create the topic",
                            waited.as_millis()
                        ),
                    )
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::ErrorKind;

    #[test]
    fn missing_is_retriable_during_the_grace_period_then_permanent() {
        let topics = Topics::new(Duration::from_secs(5));
        let t0 = Instant::now();
        let kind = |at: u64| {
            topics
                .record("t", Lookup::Missing, t0 + Duration::from_secs(at))
                .map(|e| (e.kind, e.error_type))
        };
        assert_eq!(kind(0), Some((ErrorKind::Retriable, "unknown_topic")));
        assert_eq!(kind(4), Some((ErrorKind::Retriable, "unknown_topic")));
        assert_eq!(kind(5), Some((ErrorKind::Permanent, "unknown_topic")));
        assert_eq!(kind(9), Some((ErrorKind::Permanent, "unknown_topic")));
        // Not reported missing for 5 s: a new grace period (it may have been created since).
        assert_eq!(kind(20), Some((ErrorKind::Retriable, "unknown_topic")));
        assert!(!topics.is_known("t"));
        let e = topics
            .record("t", Lookup::Missing, t0 + Duration::from_secs(26))
            .unwrap();
        assert!(
            e.message.contains("\"t\"") && e.message.contains("create the topic"),
            "{}",
            e.message
        );
    }

    #[test]
    fn exists_is_remembered_and_ends_the_grace_period() {
        let topics = Topics::new(Duration::from_secs(5));
        let t0 = Instant::now();
        topics.record("t", Lookup::Missing, t0);
        assert!(topics
            .record("t", Lookup::Exists, t0 + Duration::from_secs(1))
            .is_none());
        assert!(topics.is_known("t"));
        topics.forget("t");
        assert!(!topics.is_known("t"));
        // Deleted again later: a fresh grace period, not the old one.
        let e = topics
            .record("t", Lookup::Missing, t0 + Duration::from_secs(7))
            .unwrap();
        assert_eq!(e.kind, ErrorKind::Retriable);
        assert!(topics
            .record("u", Lookup::Undecided, t0 + Duration::from_secs(7))
            .is_none());
        assert!(!topics.is_known("u"));
    }
}
