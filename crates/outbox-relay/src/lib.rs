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
#[cfg(feature = "nats")]
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

/// A URL with its password replaced by `***`, for logs and errors. A user name alone is a
/// secret too where the scheme uses it as a token (`nats://TOKEN@host`), and is replaced then;
/// elsewhere (`postgres://app@db`) it is kept, because operators need it to debug access.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(mut u) if !u.username().is_empty() && u.scheme().starts_with("nats") => {
            let _ = u.set_username("***");
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

/// Every outbox row is inserted once and deleted once: without autovacuum the table and its
/// indexes only grow and the claim slows down with them (measured: docs/benchmarks.md, "Steady
/// state"). The relay cannot fix the server's setting, so it says so at start.
async fn warn_if_autovacuum_is_off(pool: &PgPool) {
    let setting: Result<String, _> = sqlx::query_scalar("SELECT current_setting('autovacuum')")
        .fetch_one(pool)
        .await;
    if matches!(setting.as_deref(), Ok("off")) {
        tracing::warn!(
            "autovacuum is off on this PostgreSQL server: outbox.messages will bloat (every row is \
             inserted and deleted once) and claims will slow down; turn autovacuum on, or run \
             VACUUM outbox.messages regularly"
        );
    }
}

/// Runs the relay until `shutdown` fires, then lets in-flight batches finish (bounded by
/// `relay.shutdown_timeout_secs`).
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    // While PostgreSQL is unreachable at start, probes get answers (alive, not ready) instead of
    // "connection refused".
    let starting = if config.http.listen.is_empty() {
        None
    } else {
        let listener = bind_http(&config.http.listen).await?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(http::serve_starting(
            listener,
            Arc::clone(&metrics),
            stop.clone(),
        ));
        Some((stop, task))
    };
    let pool = connect_with_retry(&config, &shutdown).await;
    if let Some((stop, mut task)) = starting {
        stop.cancel();
        // Open keep-alive connections (a scraper) get 2 s; then the address must be free for
        // the full server.
        if tokio::time::timeout(Duration::from_secs(2), &mut task)
            .await
            .is_err()
        {
            task.abort();
            let _ = task.await;
        }
    }
    let Some(pool) = pool else {
        return Ok(());
    };
    check_schema(&pool).await?;
    warn_if_autovacuum_is_off(&pool).await;
    let relay = Relay::new(&config, pool.clone(), metrics).await?;
    let result = run_relay(relay, &config, shutdown).await;
    // Bounded: a connection still held by an abandoned batch must not keep the process alive.
    let _ = tokio::time::timeout(Duration::from_secs(2), pool.close()).await;
    result
}

/// Binds `http.listen`, or says what to change.
async fn bind_http(listen: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let addr: std::net::SocketAddr = listen.parse()?;
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on http.listen = {addr}: {e}; pick a free address or set it empty"
        )
    })
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
        drop(bind_http(&config.http.listen).await?);
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
        .map(|w| tokio::spawn(Arc::clone(&relay).run_worker(w, shutdown.clone())))
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
    // The background tasks saw the same cancellation; they get one shared 2 s grace (not 2 s
    // each), so the exit comes at most about 2 s after the shutdown deadline.
    let background = async {
        // ordering (issue 6): free this relay's slots now rather than at lease expiry.
        if let (Some(o), Some(m)) = (&relay.ordering, membership) {
            let _ = m.await;
            ordering::membership::leave(&relay, o).await;
        }
        let _ = listener.await;
        futures::future::join_all(maintenance).await;
        if let Some(h) = http {
            let _ = h.await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(2), background)
        .await
        .is_err()
    {
        tracing::warn!("background tasks did not stop within 2 s; exiting without them");
    }
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn redact_url_hides_passwords_and_nats_tokens_but_keeps_user_names() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(redact_url("postgres://app@db/x"), "postgres://app@db/x");
        assert_eq!(
            redact_url("nats://s3cr3t-token@127.0.0.1:4222"),
            "nats://***@127.0.0.1:4222"
        );
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("not a url"), "<unparseable url>");
    }
}
