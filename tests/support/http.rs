//! Helpers for tests that talk to the relay's HTTP server: a plain HTTP/1.1 GET (no client
//! crate needed), Prometheus text parsing, and a config with the server on a given port.
//!
//! Load it next to `support` with `#[path = "support/http.rs"] mod http;`.
#![allow(dead_code)]

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET path` on `addr` (`127.0.0.1:port`); `None` while nothing answers.
pub async fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(request.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .ok()
        .flatten()
}

/// The sum of every series of metric `name` whose labels include all of `labels`; `None`
/// when no series matches. `name` is the exact sample name (e.g. `x_count` for a histogram).
pub fn metric(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = match line.rsplit_once(' ') {
            Some(p) => p,
            None => continue,
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

/// Scrapes `/metrics`; panics when the server does not answer 200 within 10 s. A relay that
/// just started hands its port from the start-up server (served while it connects) to the full
/// one, and a connection attempt in between is refused: retried, as a scraper's next interval
/// would.
pub async fn scrape(addr: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match get(addr, "/metrics").await {
            Some((200, body)) => return body,
            None if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => panic!("GET {addr}/metrics failed: {other:?}"),
        }
    }
}

/// Puts the relay's HTTP server of a `support::nats_config` on `127.0.0.1:port`.
pub fn with_http(config: String, port: u16) -> String {
    assert!(
        config.contains("listen = \"\""),
        "config has no empty http.listen to replace"
    );
    config.replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""))
}

/// Waits until the relay's `/healthz` answers 200.
pub async fn wait_healthy(addr: &str, timeout: Duration) {
    let addr = addr.to_string();
    super::support::wait_until(timeout, "relay /healthz answers 200", || {
        let addr = addr.clone();
        async move { matches!(get(&addr, "/healthz").await, Some((200, _))) }
    })
    .await;
}
