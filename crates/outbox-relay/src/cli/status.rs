//! `outbox-relay status`: the backlog per topic (waiting rows, age of the oldest, publish rate,
//! dead letters), the health of every sink and the live relays, as a table or JSON; with
//! `--watch`, a live view refreshed every second (JSON: one object per line).
//!
//! What it shows is read by [`crate::overview`] (which the admin's overview shares): everything
//! comes from the database, so `status` works from any machine that reaches it and sees every
//! relay at once. This module renders it.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use sqlx::PgPool;

use super::keys;
pub use crate::overview::{collect, DeadCount, SinkStatus, Status, TopicStatus};

fn fmt_age(secs: f64) -> String {
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else if secs < 3600.0 {
        format!("{}m{:02}s", (secs / 60.0) as u64, (secs % 60.0) as u64)
    } else {
        format!(
            "{}h{:02}m",
            (secs / 3600.0) as u64,
            ((secs % 3600.0) / 60.0) as u64
        )
    }
}

pub fn render_table(s: &Status) -> String {
    let mut out = String::new();
    let width = s
        .topics
        .iter()
        .map(|t| t.lag.topic.len())
        .max()
        .unwrap_or(5)
        .max(5);
    out.push_str(&format!(
        "{:<width$}  {:>10}  {:>10}  {:>10}  {:>10}  {:>8}\n",
        "TOPIC", "WAITING", "SCHEDULED", "OLDEST DUE", "PUBLISH/S", "DEAD"
    ));
    if s.topics.is_empty() {
        out.push_str("(nothing waiting)\n");
    }
    for t in &s.topics {
        let rate = t
            .publish_rate_per_second
            .map(|r| format!("{r:.1}"))
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<width$}  {:>10}  {:>10}  {:>10}  {:>10}  {:>8}{}\n",
            t.lag.topic,
            t.lag.waiting,
            t.lag.scheduled,
            fmt_age(t.lag.oldest_age_seconds),
            rate,
            t.dead_letters,
            if t.paused { "  PAUSED" } else { "" }
        ));
    }
    if !s.paused_topics.is_empty() {
        out.push('\n');
        out.push_str(&super::admin::render_paused(&s.paused_topics));
    }
    out.push('\n');
    if s.sinks.is_empty() {
        out.push_str("SINKS: unknown (no relay with a fresh heartbeat in outbox.relays)\n");
    } else {
        let w = s
            .sinks
            .iter()
            .map(|k| k.sink.len())
            .max()
            .unwrap_or(4)
            .max(4);
        out.push_str(&format!(
            "{:<w$}  {:<6}  {:<5}  {:>7}  ERROR\n",
            "SINK", "KIND", "STATE", "RELAYS"
        ));
        for k in &s.sinks {
            out.push_str(&format!(
                "{:<w$}  {:<6}  {:<5}  {:>7}  {}\n",
                k.sink,
                k.kind,
                if k.up { "up" } else { "DOWN" },
                format!("{}/{}", k.relays_up, k.relays_reporting),
                k.error.as_deref().unwrap_or("")
            ));
        }
    }
    out.push_str(&format!("\nRELAYS: {} live", s.live_relays));
    for r in &s.relays {
        out.push_str(&format!(
            "\n  {}:{}  v{}  heartbeat {} ago{}",
            r.hostname,
            r.pid,
            r.version,
            fmt_age(r.heartbeat_age_seconds),
            if r.is_fresh() { "" } else { "  (late)" }
        ));
    }
    out.push_str("\n\n");
    out.push_str(&keys::render_table(&s.keys));
    out
}

/// One-shot `status`.
pub async fn print(pool: &PgPool, json: bool) -> anyhow::Result<()> {
    let s = collect(pool).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", render_table(&s));
    }
    Ok(())
}

/// `status --watch`: a fresh sample every `interval` until interrupted (or stdout closes). On a
/// terminal the screen is redrawn in place; with `json`, one JSON object per line. A database
/// error is reported and the next refresh tries again.
pub async fn watch(pool: &PgPool, json: bool, interval: Duration) -> anyhow::Result<()> {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let redraw = !json && std::io::stdout().is_terminal();
    loop {
        ticker.tick().await;
        let frame = match collect(pool).await {
            Ok(s) if json => serde_json::to_string(&s)? + "\n",
            Ok(s) => {
                let head = format!(
                    "outbox-relay status  {}  (every {:.1}s, Ctrl-C to quit)\n\n",
                    s.at.format("%Y-%m-%d %H:%M:%S UTC"),
                    interval.as_secs_f64()
                );
                head + &render_table(&s) + if redraw { "" } else { "\n" }
            }
            Err(e) => {
                eprintln!("status: cannot read the database: {e}; retrying");
                continue;
            }
        };
        let mut out = std::io::stdout().lock();
        let written = if redraw {
            write!(out, "\x1b[H\x1b[2J{frame}")
        } else {
            write!(out, "{frame}")
        };
        match written.and_then(|_| out.flush()) {
            Ok(()) => {}
            // The reader went away (`| head`): stop quietly.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::Utc;

    use super::*;
    use crate::overview::{assemble, KeysStatus};
    use crate::store::cluster::{RelayRow, SinkHealth};
    use crate::store::TopicLag;

    fn no_keys() -> KeysStatus {
        KeysStatus {
            held_back: vec![],
            parked: vec![],
        }
    }

    fn relay(age: f64, up: bool, rates: &[(&str, f64)]) -> RelayRow {
        RelayRow {
            relay_id: uuid::Uuid::now_v7().to_string(),
            hostname: "h".into(),
            pid: 1,
            version: "0".into(),
            started_at: Utc::now(),
            heartbeat_at: Utc::now(),
            heartbeat_age_seconds: age,
            heartbeat_interval_ms: 2000,
            sinks: vec![SinkHealth {
                sink: "nats".into(),
                kind: "nats".into(),
                up,
                error: (!up).then(|| "refused".into()),
            }],
            publish_rates: rates.iter().map(|(t, r)| (t.to_string(), *r)).collect(),
        }
    }

    #[test]
    fn rates_add_up_over_fresh_relays_and_a_sink_is_down_if_any_relay_says_so() {
        let lag = vec![TopicLag {
            topic: "a".into(),
            waiting: 5,
            scheduled: 0,
            oldest_due_since: None,
            oldest_age_seconds: 1.0,
        }];
        let relays = vec![
            relay(0.5, true, &[("a", 10.0)]),
            relay(1.0, false, &[("a", 5.0), ("b", 2.0)]),
            relay(60.0, true, &[("a", 1000.0)]), // stale: ignored
        ];
        let s = assemble(lag, vec![("c".into(), 3)], relays, no_keys());
        assert_eq!(s.live_relays, 2);
        let t: BTreeMap<_, _> = s.topics.iter().map(|t| (t.lag.topic.as_str(), t)).collect();
        assert_eq!(t["a"].publish_rate_per_second, Some(15.0));
        assert_eq!(t["a"].lag.waiting, 5);
        assert_eq!(t["b"].publish_rate_per_second, Some(2.0));
        assert_eq!(t["c"].dead_letters, 3);
        assert_eq!(t["c"].publish_rate_per_second, Some(0.0));
        assert_eq!(s.sinks.len(), 1);
        assert!(!s.sinks[0].up);
        assert_eq!((s.sinks[0].relays_up, s.sinks[0].relays_reporting), (1, 2));
        assert_eq!(s.sinks[0].error.as_deref(), Some("refused"));
        let table = render_table(&s);
        assert!(table.contains("DOWN"), "{table}");
    }

    #[test]
    fn without_relays_rates_and_sinks_are_unknown() {
        let s = assemble(vec![], vec![("x".into(), 1)], vec![], no_keys());
        assert_eq!(s.topics[0].publish_rate_per_second, None);
        assert!(s.sinks.is_empty());
        assert!(render_table(&s).contains("SINKS: unknown"));
    }
}
