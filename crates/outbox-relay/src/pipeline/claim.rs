//! The claim, unordered or ordered behind one type. In ordered mode each worker claims keyed
//! rows only from its share of the slots this relay holds.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgConnection;

use crate::message::Claimed;
use crate::store;

/// The slots this relay holds, kept by the cluster heartbeat and read by every claim.
pub struct Slots {
    owned: Mutex<Owned>,
}

struct Owned {
    slots: Arc<Vec<i16>>,
    /// The leases are ours until then (measured locally from before the renewing statement).
    valid_until: Instant,
}

impl Default for Slots {
    fn default() -> Self {
        Self {
            owned: Mutex::new(Owned {
                slots: Arc::new(Vec::new()),
                valid_until: Instant::now(),
            }),
        }
    }
}

impl Slots {
    /// The slots to claim from now: none once the leases may have expired (a relay that cannot
    /// heartbeat stops claiming keyed rows; it still claims unkeyed ones).
    pub fn owned(&self) -> Arc<Vec<i16>> {
        let owned = self.owned.lock().unwrap_or_else(|e| e.into_inner());
        if Instant::now() < owned.valid_until {
            Arc::clone(&owned.slots)
        } else {
            Arc::new(Vec::new())
        }
    }

    /// Records the slots a heartbeat left this relay with; true when it gained any.
    pub fn set(&self, slots: Vec<i16>, valid_until: Instant) -> bool {
        let mut owned = self.owned.lock().unwrap_or_else(|e| e.into_inner());
        let grew = slots.iter().any(|s| !owned.slots.contains(s));
        owned.slots = Arc::new(slots);
        owned.valid_until = valid_until;
        grew
    }

    pub fn clear(&self) {
        self.set(Vec::new(), Instant::now());
    }
}

/// How a worker claims: unordered, or keyed rows in key order from the owned slots with
/// `slot % workers == worker`; both from the claim floor on (see [`store::floor`]).
pub struct Claimer {
    batch_size: u32,
    order: Order,
    floor: Arc<store::floor::Shared>,
}

enum Order {
    Unordered,
    Ordered { workers: usize, slots: Arc<Slots> },
}

impl Claimer {
    /// `slots` is `Some` in ordered mode.
    pub fn new(
        batch_size: u32,
        workers: usize,
        slots: Option<Arc<Slots>>,
        floor: Arc<store::floor::Shared>,
    ) -> Self {
        let order = match slots {
            Some(slots) => Order::Ordered { workers, slots },
            None => Order::Unordered,
        };
        Self {
            batch_size,
            order,
            floor,
        }
    }

    pub fn is_ordered(&self) -> bool {
        matches!(self.order, Order::Ordered { .. })
    }

    /// One claim in the caller's transaction; returns the rows (with their `ctid`s, which the
    /// completion addresses them by) and how long the statement took.
    ///
    /// In ordered mode worker `worker` claims keyed rows only from the owned slots with
    /// `slot % workers == worker`, so the workers of one relay never claim the same key at once.
    /// Without that split, with keys interleaved in the table (the common case), the next worker
    /// claims the second row of the keys whose first rows the previous worker holds, and the
    /// ordered claim must drop them all: only about as many workers as there are "layers" of
    /// keys in a batch did useful work, the others locked rows for nothing. The split is stable
    /// across rebalancing (it depends on the slot, not on which slots are owned); the claim's
    /// per-key rule stays the guarantee either way.
    pub async fn claim(
        &self,
        conn: &mut PgConnection,
        worker: usize,
        excluded: &[String],
    ) -> Result<(Vec<Claimed>, Duration), sqlx::Error> {
        let started = Instant::now();
        let (limit, floor) = (i64::from(self.batch_size), self.floor.get());
        let rows = match &self.order {
            Order::Unordered => store::claim(conn, limit, excluded, floor).await?,
            Order::Ordered { workers, slots } => {
                let workers = (*workers).max(1);
                let mine: Vec<i16> = slots
                    .owned()
                    .iter()
                    .copied()
                    .filter(|s| *s as usize % workers == worker % workers)
                    .collect();
                store::claim_ordered(conn, limit, excluded, &mine, floor).await?
            }
        };
        Ok((rows, started.elapsed()))
    }
}
