//! The worker loop: run batches back to back while there is work, wait for a wake-up when
//! there is none, and back off (logged once per outage) while the database is unreachable.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Pipeline;

/// Runs worker `worker` (0-based, of `relay.workers`) until `shutdown`; a batch in progress is
/// always finished.
pub async fn run(pipeline: Arc<Pipeline>, worker: usize, shutdown: CancellationToken) {
    let p = &*pipeline;
    let mut rx = p.wakeup.subscribe();
    let mut db_backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        rx.borrow_and_update();
        match p.run_batch(worker).await {
            Ok(report) => {
                p.wakeup.batch_done();
                if p.metrics.database_up.get() == 0 {
                    tracing::info!("database reachable again");
                }
                p.metrics.database_up.set(1);
                db_backoff = Duration::from_millis(100);
                if report.claimed > 0 {
                    p.wakeup.activity();
                    if report.claimed >= p.batch_size {
                        // More is likely waiting: let idle workers help.
                        p.wakeup.bump();
                    }
                    continue;
                }
                p.wakeup.wait(&mut rx, &shutdown).await;
            }
            Err(e) => {
                if p.metrics.database_up.get() == 1 {
                    tracing::error!(error = %e, retry_in_ms = db_backoff.as_millis() as u64,
                        "database unavailable; retrying with backoff");
                } else {
                    tracing::debug!(error = %e, "database still unavailable");
                }
                p.metrics.database_up.set(0);
                tokio::select! {
                    _ = tokio::time::sleep(db_backoff) => {}
                    _ = shutdown.cancelled() => {}
                }
                db_backoff = (db_backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}
