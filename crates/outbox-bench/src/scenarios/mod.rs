//! The benchmark scenarios. Each one creates its own database (and its own broker
//! destinations), measures, and removes what it created, whether it succeeded or not.

pub mod admin;
pub mod enqueue;
pub mod latency;
pub mod peer;
pub mod storage;
pub mod throughput;

use std::time::Duration;

use crate::bench_db::BenchDb;
use crate::relay_proc::RelayLauncher;

/// Every knob, resolved from the command line (with `--quick` defaults applied).
#[derive(Debug, Clone)]
pub struct Opts {
    pub database_url: String,
    pub messages: u64,
    pub payload_bytes: usize,
    pub batch_size: u32,
    pub workers: u32,
    pub repeat: usize,
    /// Interleaved rounds of the enqueue, scale and peer scenarios.
    pub rounds: usize,
    pub relays: Vec<usize>,
    /// Distinct keys of the scale scenario's backlogs.
    pub keys: u64,
    pub rates: Vec<f64>,
    pub latency_secs: f64,
    pub producer_conns: usize,
    pub enqueue_secs: f64,
    pub enqueue_conns: Vec<usize>,
    pub steady_secs: f64,
    pub steady_window_secs: f64,
    pub steady_rate: Option<f64>,
    pub steady_fraction: f64,
    /// Messages per transaction of the steady state and of the maximum-rate run before it.
    pub steady_batch: usize,
    pub max_rate_secs: f64,
    /// Deleted-row counts of the `deadrows` scenario (cumulative).
    pub dead_rows: Vec<u64>,
    /// The held-xmin scenario: rate, baseline before the holder, the holder's time, time after.
    pub hold_rate: f64,
    pub hold_baseline_secs: f64,
    pub hold_secs: f64,
    pub hold_after_secs: f64,
    /// The steady state's autovacuum settings to run (on, off).
    pub steady_autovacuum: Vec<String>,
    /// Waiting rows of the `admin` scenario.
    pub admin_rows: u64,
    /// Concurrent jobs of the `peer` scenario's graphile-worker.
    pub peer_concurrency: usize,
    pub launcher: RelayLauncher,
    /// Benchmark databases get their schema from the relay binary's `migrate` command.
    pub relay_migrates: bool,
}

impl Opts {
    /// A new benchmark database with the outbox schema: the bench's own migrations, or, with
    /// `--relay-migrates`, those of the relay binary under test.
    pub async fn create_db(&self, scenario: &str) -> anyhow::Result<BenchDb> {
        if !self.relay_migrates {
            return BenchDb::create(&self.database_url, scenario).await;
        }
        let db = BenchDb::create_empty(&self.database_url, scenario).await?;
        self.launcher.migrate(&db.url).await?;
        Ok(db)
    }

    /// How long a drain of `n` messages may take before the benchmark gives up: generous
    /// (200 messages/s), since a failure here means something is broken, not slow.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(120 + self.messages / 200)
    }

    pub fn payload(&self) -> Vec<u8> {
        (0..self.payload_bytes)
            .map(|i| (i * 31 % 251) as u8)
            .collect()
    }
}
