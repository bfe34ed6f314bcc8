//! `/metrics` (Prometheus text format), `/healthz` (the process is alive) and `/readyz` (the
//! database and every sink are reachable; 503 with the reason otherwise).
//!
//! The listener is bound once, before anything else at start, and serves from the first
//! millisecond: while the relay still connects to PostgreSQL, `/healthz` answers (the process
//! is alive and retrying, so a liveness probe must not restart it), `/readyz` says 503 with the
//! reason and `/metrics` shows `outbox_database_up 0`. [`HttpState::set_running`] switches it to
//! the running relay.
//!
//! Security (docs/security.md, "The HTTP endpoints"): by default the endpoints listen on
//! loopback without authentication. With `http.token`, `/metrics` answers 401 unless the request
//! carries `Authorization: Bearer <token>`, and `/readyz` without it answers its status code
//! with `{"ready": …}` only (no sink names, no errors), so that probes that cannot send a header
//! still work; a wrong token is always 401. `/healthz` stays open: it says "ok" and nothing else,
//! and a liveness probe must reach it. With `http.tls.cert_file` and `key_file` the endpoints
//! speak HTTPS only (rustls; the files are read again when they change, for certificate
//! rotation).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use axum_server::tls_rustls::RustlsConfig;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::HttpConfig;
use crate::metrics::Metrics;
use crate::pipeline::dispatch::Dispatcher;
use crate::redact::Secret;
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

/// The bound listener with what [`serve`] needs to know: TLS (the files, for reloading) and the
/// token.
pub struct Listener {
    tcp: tokio::net::TcpListener,
    tls: Option<Tls>,
    token: Option<Secret>,
}

struct Tls {
    config: RustlsConfig,
    cert_file: PathBuf,
    key_file: PathBuf,
}

/// Binds `http.listen` and loads the TLS certificate and key (if configured), or says what to
/// change. Warns when the address is reachable from other hosts without a token.
pub async fn bind(config: &HttpConfig) -> crate::Result<Listener> {
    let listen = &config.listen;
    let addr: SocketAddr = listen
        .parse()
        .map_err(|e| crate::Error::Config(format!("http.listen = {listen:?}: {e}")))?;
    let tls = match (&config.tls.cert_file, &config.tls.key_file) {
        (Some(cert_file), Some(key_file)) => Some(Tls {
            config: RustlsConfig::from_config(server_config(cert_file, key_file)?),
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
        }),
        _ => None,
    };
    let token = (!config.token.is_empty()).then(|| config.token.clone());
    if !addr.ip().is_loopback() {
        if token.is_none() {
            tracing::warn!(
                listen = %addr,
                "the HTTP endpoints are reachable from other hosts without a token: anyone who \
                 can connect reads /metrics (topic names, rates) and /readyz; set http.token \
                 (and http.tls.*), or listen on 127.0.0.1 (docs/security.md, \"The HTTP endpoints\")"
            );
        } else if tls.is_none() {
            tracing::warn!(
                listen = %addr,
                "http.token is sent in plaintext to an address reachable from other hosts: set \
                 http.tls.cert_file and http.tls.key_file (docs/security.md, \"The HTTP endpoints\")"
            );
        }
    }
    let tcp = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| crate::Error::Listen {
            addr: addr.to_string(),
            source,
        })?;
    Ok(Listener { tcp, tls, token })
}

/// The rustls server configuration of the certificate chain and key in these PEM files; errors
/// name the key to fix.
fn server_config(cert_file: &Path, key_file: &Path) -> crate::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |key: &str, path: &Path, what: String| {
        crate::Error::Config(format!("http.tls.{key} = {}: {what}", path.display()))
    };
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            bad(
                "cert_file",
                cert_file,
                format!("no PEM certificate chain could be read ({e})"),
            )
        })?;
    if certs.is_empty() {
        return Err(bad(
            "cert_file",
            cert_file,
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
        bad(
            "key_file",
            key_file,
            format!("no PEM private key could be read ({e}); PKCS#8, PKCS#1 (RSA) and SEC1 (EC) keys are accepted, unencrypted"),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| crate::Error::Config(format!("http.tls: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            bad(
                "key_file",
                key_file,
                format!(
                    "does not go with the certificate of http.tls.cert_file = {} ({e})",
                    cert_file.display()
                ),
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves on `listener` until `shutdown` fires; with `admin`, also the admin's routes under its
/// path prefix (behind the admin's own accounts, not `http.token`).
pub async fn serve(
    listener: Listener,
    state: Arc<HttpState>,
    admin: Option<(String, Router)>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(listener.token),
            authorize,
        ))
        .with_state(state);
    let mut paths = "/metrics, /healthz, /readyz".to_string();
    if let Some((prefix, admin)) = admin {
        paths += &format!(", the admin at {prefix}");
        app = app.nest(&prefix, admin);
    }
    let addr = listener.tcp.local_addr()?;
    let Some(tls) = listener.tls else {
        tracing::info!(%addr, "HTTP server listening ({paths})");
        return axum::serve(listener.tcp, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    };
    tracing::info!(%addr, "HTTPS server listening ({paths})");
    let handle = axum_server::Handle::new();
    tokio::spawn({
        let (handle, shutdown) = (handle.clone(), shutdown.clone());
        async move {
            shutdown.cancelled().await;
            handle.graceful_shutdown(Some(Duration::from_secs(2)));
        }
    });
    tokio::spawn(reload_on_change(
        tls.config.clone(),
        tls.cert_file,
        tls.key_file,
        shutdown,
    ));
    axum_server::from_tcp_rustls(listener.tcp.into_std()?, tls.config)?
        .handle(handle)
        .serve(app.into_make_service())
        .await
}

/// How often the certificate and key files are checked for a change (a renewed certificate
/// mounted in place of the old one): two `stat` calls, so often enough that a renewal shows
/// within seconds.
const TLS_RELOAD_CHECK: Duration = Duration::from_secs(5);

/// Loads the certificate and key again whenever either file's modification time changes; a pair
/// that does not load (a half-written file, a key of another certificate) leaves the current one
/// serving, with a warning.
async fn reload_on_change(
    config: RustlsConfig,
    cert_file: PathBuf,
    key_file: PathBuf,
    shutdown: CancellationToken,
) {
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let stamp = |c: &Path, k: &Path| -> (Option<SystemTime>, Option<SystemTime>) {
        (modified(c), modified(k))
    };
    let mut seen = stamp(&cert_file, &key_file);
    let mut ticker = tokio::time::interval(TLS_RELOAD_CHECK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let now = stamp(&cert_file, &key_file);
        if now == seen {
            continue;
        }
        match server_config(&cert_file, &key_file) {
            Ok(server) => {
                config.reload_from_config(server);
                seen = now;
                tracing::info!(cert_file = %cert_file.display(), "HTTPS certificate reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "HTTPS certificate not reloaded; still serving the previous one")
            }
        }
    }
}

/// Whether this request showed the right token (or none is configured): `/readyz` tells its
/// details only then.
#[derive(Clone, Copy)]
struct Authorized(bool);

/// The token check in front of every endpoint (see the module documentation).
async fn authorize(
    State(token): State<Arc<Option<Secret>>>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(token) = token.as_ref() else {
        request.extensions_mut().insert(Authorized(true));
        return next.run(request).await;
    };
    let path = request.uri().path();
    let open = path == "/healthz";
    let authorized = match bearer(request.headers()) {
        Some(given) => {
            let matches: bool =
                subtle::ConstantTimeEq::ct_eq(given.as_bytes(), token.expose().as_bytes()).into();
            if !matches && !open {
                return unauthorized("invalid_token", "wrong bearer token");
            }
            matches
        }
        None if open || path == "/readyz" => false,
        None => return unauthorized("", "this endpoint needs a bearer token"),
    };
    request.extensions_mut().insert(Authorized(authorized));
    next.run(request).await
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn unauthorized(error: &str, message: &str) -> Response {
    let challenge = if error.is_empty() {
        r#"Bearer realm="outbox-relay""#.to_string()
    } else {
        format!(r#"Bearer realm="outbox-relay", error="{error}""#)
    };
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, challenge)],
        format!("{message}: send the header Authorization: Bearer <http.token>\n"),
    )
        .into_response()
}

async fn metrics(State(state): State<Arc<HttpState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

/// How long `/readyz` waits for one sink's check.
const SINK_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

async fn readyz(
    State(state): State<Arc<HttpState>>,
    Extension(Authorized(detailed)): Extension<Authorized>,
) -> impl IntoResponse {
    let (status, Json(body)) = readiness(&state).await;
    if detailed {
        (status, Json(body))
    } else {
        (status, Json(serde_json::json!({"ready": body["ready"]})))
    }
}

async fn readiness(state: &HttpState) -> (StatusCode, Json<serde_json::Value>) {
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
