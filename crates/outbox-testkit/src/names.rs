//! Names and ports that keep concurrent tests (and benchmark runs) apart on shared servers.

use std::net::TcpListener;

/// A short unique name: `prefix_<12 hex chars>`.
pub fn unique(prefix: &str) -> String {
    // The random tail of a UUIDv7 (the head is a timestamp shared by tests started together).
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("{prefix}_{}", &id[20..])
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port on 127.0.0.1")
        .port()
}
