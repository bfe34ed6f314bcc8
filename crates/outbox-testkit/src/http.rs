//! The relay's (and Prometheus's) HTTP side, without an HTTP client crate: one HTTP/1.0 GET,
//! plain ([`get`], [`get_with`]) or over TLS ([`get_tls`]), one parser of the Prometheus text
//! format ([`metric`]), `/metrics` scraping, waiting for `/healthz` and for `/readyz` to report a
//! sink down ([`readyz_sink_down`]), and a relay config with its HTTP server on a given port.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::wait::wait_until;

/// Where an HTTP server listens: a port on 127.0.0.1, or `host:port`.
pub trait Endpoint {
    fn host_port(&self) -> String;
}

impl Endpoint for u16 {
    fn host_port(&self) -> String {
        format!("127.0.0.1:{self}")
    }
}

impl Endpoint for &str {
    fn host_port(&self) -> String {
        self.to_string()
    }
}

impl Endpoint for &String {
    fn host_port(&self) -> String {
        self.to_string()
    }
}

/// `GET path` (with its query) over plain HTTP/1.0 (no chunked encoding to decode): the status
/// and the body, or `None` while nothing answers (connection refused, no complete answer within
/// 15 s, a malformed answer).
pub async fn get(addr: impl Endpoint, path: &str) -> Option<(u16, String)> {
    get_with(addr, path, &[]).await
}

/// [`get`] with request headers, e.g. `[("Authorization", "Bearer …")]`.
pub async fn get_with(
    addr: impl Endpoint,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<(u16, String)> {
    let addr = addr.host_port();
    let connect = tokio::net::TcpStream::connect(addr.as_str());
    let stream = tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .ok()?
        .ok()?;
    exchange(stream, &addr, "GET", path, headers, "").await.ok()
}

/// Any request with a body (sent with its `Content-Length`); `None` when the server cannot be
/// reached or does not answer.
pub async fn request(
    addr: impl Endpoint,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<(u16, String)> {
    let addr = addr.host_port();
    let connect = tokio::net::TcpStream::connect(addr.as_str());
    let stream = tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .ok()?
        .ok()?;
    exchange(stream, &addr, method, path, headers, body)
        .await
        .ok()
}

/// [`get_with`] over TLS, trusting only the CA certificate in the PEM file `ca` and checking the
/// server's certificate against the host of `addr` (`127.0.0.1`, `localhost`). The error says
/// what failed: the connection, the handshake (with rustls's reason), or the answer.
pub async fn get_tls(
    addr: impl Endpoint,
    path: &str,
    headers: &[(&str, &str)],
    ca: &std::path::Path,
) -> Result<(u16, String), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let addr = addr.host_port();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| format!("CA file: {e}"))? {
        roots
            .add(cert.map_err(|e| format!("CA file: {e}"))?)
            .map_err(|e| format!("CA certificate: {e}"))?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let host = addr
        .rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']))
        .unwrap_or(&addr);
    let name = ServerName::try_from(host.to_string()).map_err(|e| format!("server name: {e}"))?;
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr.as_str()),
    )
    .await
    .map_err(|_| "connect: timed out".to_string())?
    .map_err(|e| format!("connect: {e}"))?;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let stream = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .map_err(|_| "TLS handshake: timed out".to_string())?
        .map_err(|e| format!("TLS handshake: {e}"))?;
    exchange(stream, &addr, "GET", path, headers, "").await
}

/// One request on `stream` and its whole answer (HTTP/1.0: the server closes when done).
async fn exchange<S>(
    mut stream: S,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<(u16, String), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut request = format!("{method} {path} HTTP/1.0\r\nHost: {host}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method != "GET" {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut buf))
        .await
        .map_err(|_| "no complete answer within 15 s".to_string())?;
    // A TLS server may close without close_notify after a complete HTTP/1.0 answer.
    if let Err(e) = read {
        if buf.is_empty() {
            return Err(format!("receive: {e}"));
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not an HTTP answer: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// The sum of every series of metric `name` whose labels include all of `labels`; `None`
/// when no series matches. `name` is the exact sample name (e.g. `x_count` for a histogram).
pub fn metric(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, label_text) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| label_text.split(',').any(|kv| kv == format!("{k}=\"{v}\"")))
        {
            let v: f64 = value.parse().unwrap_or(f64::NAN);
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

/// [`metric`], 0 when no series matches (a labelled counter not incremented yet).
pub fn metric_or_zero(body: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(body, name, labels).unwrap_or(0.0)
}

/// Scrapes `/metrics`; panics when the server does not answer 200 within 10 s. A relay that
/// just started hands its port from the start-up server (served while it connects) to the full
/// one, and a connection attempt in between is refused: retried, as a scraper's next interval
/// would.
pub async fn scrape(addr: impl Endpoint) -> String {
    let addr = addr.host_port();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match get(&addr, "/metrics").await {
            Some((200, body)) => return body,
            None if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => panic!("GET {addr}/metrics failed: {other:?}"),
        }
    }
}

/// One scrape of `/metrics`, then [`metric_or_zero`]; 0 when the relay does not answer.
pub async fn scrape_metric(addr: impl Endpoint, name: &str, labels: &[(&str, &str)]) -> f64 {
    match get(addr, "/metrics").await {
        Some((200, body)) => metric_or_zero(&body, name, labels),
        _ => 0.0,
    }
}

/// Polls `/readyz` for up to 60 s until it answers 503 with sink `sink` down and its error
/// containing every one of `want`; returns that error and the whole answer. `Err` says what the
/// last answer was, for the caller's panic message (with the relay's log, say).
pub async fn readyz_sink_down(
    addr: impl Endpoint,
    sink: &str,
    want: &[&str],
) -> Result<(String, serde_json::Value), String> {
    let addr = addr.host_port();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let answer = get(&addr, "/readyz").await;
        if let Some((503, body)) = &answer {
            let json: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
            let error = json["sinks"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| s["sink"] == sink && s["up"] == false)
                .and_then(|s| s["error"].as_str())
                .map(str::to_owned);
            if let Some(error) = error.filter(|e| want.iter().all(|w| e.contains(w))) {
                return Ok((error, json));
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "/readyz at {addr} did not report sink {sink} down with {want:?} within 60 s; last answer: {answer:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Puts the relay's HTTP server of a config with `listen = ""` (e.g. a
/// [`crate::nats::nats_config`]) on `127.0.0.1:port`.
pub fn with_http(config: String, port: u16) -> String {
    assert!(
        config.contains("listen = \"\""),
        "config has no empty http.listen to replace"
    );
    config.replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""))
}

/// Waits until the relay's `/healthz` answers 200.
pub async fn wait_healthy(addr: impl Endpoint, timeout: Duration) {
    let addr = addr.host_port();
    wait_until(timeout, "relay /healthz answers 200", || {
        let addr = addr.clone();
        async move { matches!(get(&addr, "/healthz").await, Some((200, _))) }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = "# HELP x_total a counter\n\
        # TYPE x_total counter\n\
        x_total{outcome=\"delivered\",topic=\"a\"} 3\n\
        x_total{outcome=\"delivered\",topic=\"b\"} 4\n\
        x_total{outcome=\"retry\",topic=\"a\"} 1\n\
        x_total_other 9\n\
        y 2.5\n";

    #[test]
    fn metric_sums_the_matching_series_only() {
        assert_eq!(metric(BODY, "x_total", &[]), Some(8.0));
        assert_eq!(
            metric(BODY, "x_total", &[("outcome", "delivered")]),
            Some(7.0)
        );
        assert_eq!(
            metric(BODY, "x_total", &[("outcome", "retry"), ("topic", "a")]),
            Some(1.0)
        );
        assert_eq!(metric(BODY, "y", &[]), Some(2.5));
        assert_eq!(metric(BODY, "x_total", &[("topic", "c")]), None);
        assert_eq!(metric_or_zero(BODY, "x_total", &[("topic", "c")]), 0.0);
    }
}
