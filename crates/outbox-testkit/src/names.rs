//! Names and ports that keep concurrent tests (and benchmark runs) apart on shared servers.

use std::net::TcpListener;

/// A short unique name: `prefix_<12 hex chars>`.
pub fn unique(prefix: &str) -> String {
    // The random tail of a UUIDv7 (the head is a timestamp shared by tests started together).
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("{prefix}_{}", &id[20..])
}

/// A TCP port on 127.0.0.1 that was free a moment ago, for a server a test starts.
///
/// Chosen at random below the kernel's ephemeral range (32768–60999 by default) and checked by
/// binding it: a port from that range (what `bind(0)` gives) can be taken, between the check and
/// the server's own bind, as the local end of any outgoing connection on the machine, and a
/// suite that opens thousands of connections does take one now and then.
pub fn free_port() -> u16 {
    const LOW: u16 = 20_000;
    const HIGH: u16 = 32_000;
    for _ in 0..1_000 {
        let port = rand::random_range(LOW..HIGH);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 between {LOW} and {HIGH} after 1,000 tries")
}
