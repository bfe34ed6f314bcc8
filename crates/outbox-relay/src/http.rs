//! `/metrics` (Prometheus text format), `/healthz` (the process is alive) and `/readyz` (the
//! database and every sink are reachable; 503 with the reason otherwise).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use crate::relay::Relay;

pub async fn serve(
    addr: SocketAddr,
    relay: Arc<Relay>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(relay);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "HTTP server listening (/metrics, /healthz, /readyz)");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// The HTTP server of a relay still connecting to PostgreSQL at start: `/healthz` answers (the
/// process is alive and retrying, so a liveness probe must not restart it), `/readyz` says 503
/// with the reason, `/metrics` shows `outbox_database_up 0`. It stops when `stop` fires, and the
/// full server takes the address over.
pub async fn serve_starting(
    listener: tokio::net::TcpListener,
    metrics: Arc<crate::metrics::Metrics>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Arc<crate::metrics::Metrics>>| async move {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    m.render(),
                )
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|| async {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(serde_json::json!({
                        "ready": false,
                        "database": false,
                        "sinks": [],
                        "reason": "starting: connecting to PostgreSQL (see the relay's log)",
                    })),
                )
            }),
        )
        .with_state(metrics);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

async fn metrics(State(relay): State<Arc<Relay>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        relay.metrics.render(),
    )
}

/// How long `/readyz` waits for one sink's check.
const SINK_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

async fn readyz(State(relay): State<Arc<Relay>>) -> impl IntoResponse {
    let database = relay.database_up.load(Ordering::Acquire)
        && sqlx::query("SELECT 1").execute(&relay.pool).await.is_ok();
    // The breaker only learns about a broker that went away when a batch fails; an idle relay
    // would stay "ready" with its broker down. So ask every closed-circuit sink now.
    let checks = relay.sinks.iter().map(|s| async move {
        if !s.is_up() {
            return (false, s.last_error());
        }
        match tokio::time::timeout(SINK_CHECK_TIMEOUT, s.sink.check()).await {
            Ok(Ok(())) => (true, None),
            Ok(Err(e)) => (false, Some(e.message)),
            Err(_) => (
                false,
                Some(format!(
                    "no answer within {}s",
                    SINK_CHECK_TIMEOUT.as_secs()
                )),
            ),
        }
    });
    let results = futures::future::join_all(checks).await;
    let sinks: Vec<serde_json::Value> = relay
        .sinks
        .iter()
        .zip(&results)
        .map(|(s, (up, error))| serde_json::json!({"sink": s.name, "up": up, "error": error}))
        .collect();
    let ready = database && results.iter().all(|(up, _)| *up);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({"ready": ready, "database": database, "sinks": sinks})),
    )
}
