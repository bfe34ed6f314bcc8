//! outbox-relay: publishes committed transactional-outbox rows from PostgreSQL to NATS
//! JetStream, RabbitMQ and Kafka, at least once, marking a row sent only after the broker
//! acknowledged it.
//!
//! The binary (`src/main.rs`) is a thin CLI over this library: [`run`] is the relay,
//! [`config::Config`] its configuration, [`db`] every SQL statement that matters, [`relay`] the
//! claim → publish → mark loop, [`sinks`] the brokers, [`wakeup`] LISTEN/NOTIFY with adaptive
//! polling, [`maintenance`] the periodic tasks, [`http`] `/metrics`, `/healthz`, `/readyz`.

pub mod cli;
pub mod config;
pub mod db;
pub mod dead;
pub mod demo;
pub mod heartbeat;
pub mod http;
pub mod maintenance;
pub mod metrics;
pub mod ordering;
pub mod relay;
pub mod routing;
pub mod sinks;
pub mod status;
pub mod wakeup;

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::relay::Relay;

/// A URL with its password replaced by `***`, for logs and errors.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "<unparseable url>".into(),
    }
}

/// Connects to PostgreSQL, retrying with exponential backoff (logged) until it answers or
/// `shutdown` fires (then `None`).
pub async fn connect_with_retry(config: &Config, shutdown: &CancellationToken) -> Option<PgPool> {
    let mut delay = Duration::from_millis(200);
    loop {
        match db::connect(
            &config.database.url,
            config.database.max_connections,
            Duration::from_secs(config.database.connect_timeout_secs),
            Duration::from_secs(config.relay.claim_timeout_secs),
        )
        .await
        {
            Ok(pool) => return Some(pool),
            Err(e) => {
                tracing::error!(
                    database = %redact_url(&config.database.url),
                    error = %e,
                    retry_in_ms = delay.as_millis() as u64,
                    "cannot reach PostgreSQL; is it running, and is database.url right? retrying"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return None,
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Fails with a clear message when the schema is missing.
pub async fn check_schema(pool: &PgPool) -> anyhow::Result<()> {
    let present: bool = sqlx::query_scalar("SELECT to_regclass('outbox.messages') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    if !present {
        anyhow::bail!(
            "the outbox schema is missing in this database: run `outbox-relay migrate` first"
        );
    }
    Ok(())
}

/// Runs the relay until `shutdown` fires, then lets in-flight batches finish (bounded by
/// `relay.shutdown_timeout_secs`).
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let Some(pool) = connect_with_retry(&config, &shutdown).await else {
        return Ok(());
    };
    check_schema(&pool).await?;
    let relay = Relay::new(&config, pool.clone(), metrics).await?;
    let result = run_relay(relay, &config, shutdown).await;
    // Bounded: a connection still held by an abandoned batch must not keep the process alive.
    let _ = tokio::time::timeout(Duration::from_secs(5), pool.close()).await;
    result
}

/// Runs an already built relay (the demo and tests use this too).
pub async fn run_relay(
    relay: Arc<Relay>,
    config: &Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let http = if config.http.listen.is_empty() {
        None
    } else {
        let addr = config.http.listen.parse()?;
        let listener_check = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on http.listen = {addr}: {e}; pick a free address or set it empty"
            )
        })?;
        drop(listener_check);
        Some(tokio::spawn(http::serve(
            addr,
            Arc::clone(&relay),
            shutdown.clone(),
        )))
    };
    relay.check_sinks(&shutdown).await;
    let workers = relay.config.workers as usize;
    let excluded: wakeup::Excluded = {
        let relay = Arc::clone(&relay);
        Arc::new(move || relay.excluded_topics())
    };
    let listener = tokio::spawn(Arc::clone(&relay.wakeup).run(
        relay.pool.clone(),
        relay.config.clone(),
        workers,
        excluded,
        shutdown.clone(),
    ));
    let maintenance = maintenance::spawn_all(&relay, &shutdown);
    // ordering (issue 6): heartbeats and slot leases.
    let membership = relay
        .ordering
        .as_ref()
        .map(|o| ordering::membership::spawn(&relay, o, &shutdown));
    let handles: Vec<_> = (0..workers)
        .map(|_| tokio::spawn(Arc::clone(&relay).run_worker(shutdown.clone())))
        .collect();
    tracing::info!(
        workers,
        batch_size = relay.config.batch_size,
        sinks = relay.sinks.len(),
        "relay running"
    );

    shutdown.cancelled().await;
    tracing::info!("shutting down: no new claims; finishing in-flight batches");
    let deadline = Duration::from_secs(relay.config.shutdown_timeout_secs);
    let aborts: Vec<_> = handles.iter().map(|h| h.abort_handle()).collect();
    if tokio::time::timeout(deadline, futures::future::join_all(handles))
        .await
        .is_err()
    {
        tracing::warn!(
            timeout_secs = deadline.as_secs(),
            "in-flight batches did not finish in time; abandoning them: their claim transactions roll back, the rows are released and will be published again"
        );
        // Dropping a batch mid-flight drops its transaction: PostgreSQL rolls it back.
        aborts.iter().for_each(|a| a.abort());
    }
    // ordering (issue 6): free this relay's slots now rather than at lease expiry.
    if let (Some(o), Some(m)) = (&relay.ordering, membership) {
        let _ = tokio::time::timeout(Duration::from_secs(2), m).await;
        ordering::membership::leave(&relay, o).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), listener).await;
    for t in maintenance {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    if let Some(h) = http {
        let _ = tokio::time::timeout(Duration::from_secs(2), h).await;
    }
    tracing::info!("stopped");
    Ok(())
}
