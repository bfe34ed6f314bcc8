//! Per-key ordering across many relays, with poison isolation per key and automatic
//! rebalancing (docs/ordering.md has the algorithm, its failure cases and why it is correct).
//!
//! What this module guarantees, with `[ordering] enabled = true`: messages with the same key
//! reach the broker in `id` order (the enqueue order), whatever the number of relays, retries,
//! crashes and rebalances; a message waiting for a retry holds back only the later messages of
//! its own key; rows without a key stay unordered.
//!
//! - [`sql`]: the ordered claim (the correctness lives there, not in slot ownership), leases,
//!   membership, parked keys.
//! - [`membership`]: the heartbeat task that keeps this relay's slot leases and rebalances.
//! - [`rounds`]: publishes a claimed batch so that a key's messages are sent in order and a
//!   later one is never sent after an earlier one failed.
//! - [`keys`]: `outbox-relay keys list|release|skip` and the ordering part of `status`.

pub mod keys;
pub mod membership;
pub mod rounds;
pub mod sql;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{IntGauge, IntGaugeVec, Opts, Registry};
use serde::{Deserialize, Serialize};

/// The number of slots the key space is split into; fixed by migrations/0004_ordering.sql.
pub const SLOTS: usize = 256;

/// The `error_type` of rows released untouched because an earlier message of their key failed
/// in the same batch (no attempt counted, not a publish error).
pub const HELD_BACK: &str = "held_back";

/// Every default lives here, with the reason for its value.
pub mod defaults {
    /// Ordered delivery is the product's promise for keyed rows; rows without a key pay nothing
    /// for it. Set `enabled = false` to publish keyed rows unordered (the fastest mode).
    pub const ENABLED: bool = true;
    /// A relay that stops heartbeating loses its slots after this long: the time a dead
    /// relay's keys wait (only for efficiency: ordering never depends on the lease).
    pub const LEASE_MS: u64 = 5_000;
    /// Heartbeats renew the leases and rebalance; a few per lease so one lost beat is harmless.
    pub const HEARTBEAT_MS: u64 = 1_000;
}

/// What a dead-lettered message does to its key.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnDead {
    /// The key flows on with its next message (the dead letter stays for an operator).
    #[default]
    Release,
    /// The key is parked in `outbox.parked_keys`: its later messages wait until an operator
    /// runs `outbox-relay keys release|skip <key>`.
    Park,
}

/// `[ordering]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OrderingConfig {
    pub enabled: bool,
    pub on_dead: OnDead,
    pub lease_ms: u64,
    pub heartbeat_ms: u64,
}

impl Default for OrderingConfig {
    fn default() -> Self {
        Self {
            enabled: defaults::ENABLED,
            on_dead: OnDead::Release,
            lease_ms: defaults::LEASE_MS,
            heartbeat_ms: defaults::HEARTBEAT_MS,
        }
    }
}

impl OrderingConfig {
    /// Problems in sentences, each naming its key.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.heartbeat_ms == 0 {
            problems.push("ordering.heartbeat_ms must be above 0".to_string());
        }
        if self.lease_ms < 2 * self.heartbeat_ms {
            problems.push(format!(
                "ordering.lease_ms ({}) must be at least twice ordering.heartbeat_ms ({}), or one late heartbeat would drop this relay's slots",
                self.lease_ms, self.heartbeat_ms
            ));
        }
        problems
    }
}

/// The ordering metrics, registered into the relay's registry.
pub struct OrderingMetrics {
    pub partitions_owned: IntGauge,
    pub held_back_keys: IntGaugeVec,
    pub parked_keys: IntGaugeVec,
    pub rounds: IntGauge,
}

impl OrderingMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            partitions_owned: IntGauge::with_opts(Opts::new(
                "outbox_partitions_owned",
                "Ordering slots (of 256) this relay holds a lease on.",
            ))?,
            held_back_keys: IntGaugeVec::new(
                Opts::new(
                    "outbox_held_back_keys",
                    "Keys whose oldest message waits for a retry, holding back the later messages of the key.",
                ),
                &["topic"],
            )?,
            parked_keys: IntGaugeVec::new(
                Opts::new("outbox_parked_keys", "Keys parked after a dead letter, waiting for an operator."),
                &["topic"],
            )?,
            rounds: IntGauge::with_opts(Opts::new(
                "outbox_ordering_rounds_last_batch",
                "Publish rounds the last ordered batch needed (its most repeated key).",
            ))?,
        };
        registry.register(Box::new(m.partitions_owned.clone()))?;
        registry.register(Box::new(m.held_back_keys.clone()))?;
        registry.register(Box::new(m.parked_keys.clone()))?;
        registry.register(Box::new(m.rounds.clone()))?;
        Ok(m)
    }
}

/// This relay's ordering state, shared by the workers and the membership task.
pub struct Ordering {
    pub config: OrderingConfig,
    /// Unique per process: `<hostname>/<pid>/<random>`.
    pub relay_id: String,
    pub metrics: OrderingMetrics,
    owned: Mutex<Owned>,
}

struct Owned {
    slots: Arc<Vec<i16>>,
    /// The leases are ours until then (measured locally from before the renewing statement).
    valid_until: Instant,
}

impl Ordering {
    pub fn new(
        config: OrderingConfig,
        registry: &Registry,
    ) -> Result<Arc<Self>, prometheus::Error> {
        let hostname = membership::hostname();
        let suffix = format!("{:016x}", rand::random::<u64>());
        Ok(Arc::new(Self {
            relay_id: format!("{hostname}/{}/{}", std::process::id(), &suffix[..8]),
            metrics: OrderingMetrics::new(registry)?,
            config,
            owned: Mutex::new(Owned {
                slots: Arc::new(Vec::new()),
                valid_until: Instant::now(),
            }),
        }))
    }

    /// The slots to claim from now: none once the leases may have expired (a relay that cannot
    /// heartbeat stops claiming keyed rows; it still claims unkeyed ones).
    pub fn owned_slots(&self) -> Arc<Vec<i16>> {
        let owned = self.owned.lock().unwrap_or_else(|e| e.into_inner());
        if Instant::now() < owned.valid_until {
            Arc::clone(&owned.slots)
        } else {
            Arc::new(Vec::new())
        }
    }

    fn set_owned(&self, slots: Vec<i16>, valid_until: Instant) -> bool {
        let mut owned = self.owned.lock().unwrap_or_else(|e| e.into_inner());
        let grew = slots.iter().any(|s| !owned.slots.contains(s));
        self.metrics.partitions_owned.set(slots.len() as i64);
        owned.slots = Arc::new(slots);
        owned.valid_until = valid_until;
        grew
    }

    fn clear_owned(&self) {
        self.set_owned(Vec::new(), Instant::now());
    }

    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.config.lease_ms)
    }
}
