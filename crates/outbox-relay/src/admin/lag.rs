//! The overview's lag chart: waiting rows per topic over the last hour, sampled by the relay
//! itself (no Prometheus needed) with the same query as the lag gauges ([`store::lag`]: one row
//! per topic, no table scan), every `admin.lag_sample_secs`, kept in memory.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::store;

/// How much history the chart shows.
pub const WINDOW: Duration = Duration::from_secs(3600);

/// One sample: when, and the waiting rows of every topic with any.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Sample {
    pub at: DateTime<Utc>,
    pub waiting: BTreeMap<String, i64>,
}

/// The samples of the last [`WINDOW`], oldest first.
pub struct LagHistory {
    samples: Mutex<VecDeque<Sample>>,
    capacity: usize,
}

impl LagHistory {
    pub fn new(interval: Duration) -> Self {
        let capacity = (WINDOW.as_secs_f64() / interval.as_secs_f64().max(1.0)).ceil() as usize + 1;
        Self {
            samples: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity,
        }
    }

    pub fn push(&self, sample: Sample) {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        while samples.len() >= self.capacity {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Samples lag every `interval` until `shutdown`; a failed sample is skipped (the chart
    /// shows the gap) and logged at debug level, the lag gauges' task logs database trouble.
    pub async fn run(&self, pool: PgPool, interval: Duration, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let lag = async {
                let mut conn = pool.acquire().await?;
                store::lag(&mut conn).await
            }
            .await;
            match lag {
                Ok(lag) => self.push(Sample {
                    at: Utc::now(),
                    waiting: lag.into_iter().map(|l| (l.topic, l.waiting)).collect(),
                }),
                Err(e) => tracing::debug!(error = %e, "admin lag sample skipped"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_one_hour_of_samples_oldest_first() {
        let h = LagHistory::new(Duration::from_secs(600));
        assert_eq!(h.capacity, 7);
        for i in 0..10 {
            h.push(Sample {
                at: Utc::now(),
                waiting: BTreeMap::from([("t".to_string(), i)]),
            });
        }
        let kept: Vec<i64> = h.samples().iter().map(|s| s.waiting["t"]).collect();
        assert_eq!(kept, vec![3, 4, 5, 6, 7, 8, 9]);
    }
}
