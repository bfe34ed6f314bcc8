//! `/metrics` (Prometheus text format), `/healthz` (the process is alive) and `/readyz` (the
//! database and every sink are reachable; 503 with the reason otherwise).
//!
//! The listener is bound once, before anything else at start, and serves from the first
//! millisecond: while the relay still connects to PostgreSQL, `/healthz` answers (the process
//! is alive and retrying, so a liveness probe must not restart it), `/readyz` says 503 with the
//! reason and `/metrics` shows `outbox_database_up 0`. [`HttpState::set_running`] switches it to
//! the running relay.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::pipeline::dispatch::Dispatcher;
use crate::store;

/// What the endpoints read: the metrics from the start, the pool and the sinks once running.
pub struct HttpState {
    metrics: Arc<Metrics>,
    running: OnceLock<Running>,
}

struct Running {
    pool: PgPool,
    dispatcher: Arc<Dispatcher>,
}

impl HttpState {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            metrics,
            running: OnceLock::new(),
        })
    }

    /// The relay is connected and its sinks are built: `/readyz` checks them from now on.
    pub fn set_running(&self, pool: PgPool, dispatcher: Arc<Dispatcher>) {
        let _ = self.running.set(Running { pool, dispatcher });
    }
}

/// Binds `listen`, or says what to change.
pub async fn bind(listen: &str) -> crate::Result<tokio::net::TcpListener> {
    let addr: SocketAddr = listen
        .parse()
        .map_err(|e| crate::Error::Config(format!("http.listen = {listen:?}: {e}")))?;
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| crate::Error::Listen {
            addr: addr.to_string(),
            source,
        })
}

/// Serves on `listener` until `shutdown` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<HttpState>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "HTTP server listening (/metrics, /healthz, /readyz)");
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn metrics(State(state): State<Arc<HttpState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

/// How long `/readyz` waits for one sink's check.
const SINK_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

async fn readyz(State(state): State<Arc<HttpState>>) -> impl IntoResponse {
    let Some(running) = state.running.get() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({
                "ready": false,
                "database": false,
                "sinks": [],
                "reason": "starting: connecting to PostgreSQL (see the relay's log)",
            })),
        );
    };
    let database = state.metrics.database_up.get() == 1 && store::ping(&running.pool).await;
    // The breaker only learns about a broker that went away when a batch fails; an idle relay
    // would stay "ready" with its broker down. So ask every closed-circuit sink now.
    let sinks = running.dispatcher.sinks();
    let checks = sinks.iter().map(|s| async move {
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
    let sinks: Vec<serde_json::Value> = sinks
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
