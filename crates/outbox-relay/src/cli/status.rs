//! `outbox-relay status`: the backlog per topic (waiting rows, age of the oldest, publish rate,
//! dead letters), the health of every sink and the live relays, as a table or JSON; with
//! `--watch`, a live view refreshed every second (JSON: one object per line).
//!
//! Everything comes from the database, so `status` works from any machine that reaches it and
//! sees every relay at once: the lag from [`store::lag`] (no table scan), dead letters from
//! `outbox.dead_letters`, and sink health and publish rates from the heartbeat rows the relays
//! write into `outbox.relays` ([`crate::cluster`]). A sink is shown `up` when every relay with
//! a fresh heartbeat reports it up; the publish rate of a topic is the sum of the rates those
//! relays measured over their last heartbeat interval (`cluster.heartbeat_ms`).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::keys;
use crate::store::admin::TopicPause;
use crate::store::cluster::RelayRow;
use crate::store::{self, TopicLag};

#[derive(Debug, serde::Serialize)]
pub struct Status {
    /// When the sample was taken (local clock).
    pub at: DateTime<Utc>,
    pub topics: Vec<TopicStatus>,
    pub dead_letters: Vec<DeadCount>,
    pub sinks: Vec<SinkStatus>,
    /// Every row of `outbox.relays`, fresh or not.
    pub relays: Vec<RelayRow>,
    /// Relays whose heartbeat is fresh (at most three intervals old).
    pub live_relays: usize,
    /// Ordering: held-back and parked keys (at most 20 of each).
    pub keys: keys::KeysStatus,
    /// Topics an operator paused (`outbox-relay topics pause`): no relay claims their rows.
    pub paused_topics: Vec<TopicPause>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TopicStatus {
    /// `topic`, `waiting`, `scheduled`, `oldest_due_since`, `oldest_age_seconds`.
    #[serde(flatten)]
    pub lag: TopicLag,
    /// Rows per second marked delivered by the live relays; `null` when no relay reports.
    pub publish_rate_per_second: Option<f64>,
    pub dead_letters: i64,
    /// An operator paused the topic: its rows wait until it is resumed.
    pub paused: bool,
}

#[derive(Debug, serde::Serialize)]
pub struct DeadCount {
    pub topic: String,
    pub count: i64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SinkStatus {
    pub sink: String,
    pub kind: String,
    /// Every live relay reports the sink reachable.
    pub up: bool,
    pub relays_up: usize,
    pub relays_reporting: usize,
    /// The error of a relay that reports the sink down.
    pub error: Option<String>,
}

pub async fn collect(pool: &PgPool) -> Result<Status, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let lag = store::lag(&mut conn).await?;
    let dead = store::dead_counts(&mut conn).await?;
    let relays = store::cluster::list(&mut conn).await?;
    let paused = store::admin::paused_topics(&mut conn).await?;
    drop(conn);
    let keys = keys::collect(pool, 20).await?;
    let mut s = assemble(lag, dead, relays, keys);
    mark_paused(&mut s, paused);
    Ok(s)
}

/// Marks the paused topics (a paused topic with nothing waiting is listed too).
fn mark_paused(s: &mut Status, paused: Vec<TopicPause>) {
    for p in &paused {
        match s.topics.iter_mut().find(|t| t.lag.topic == p.topic) {
            Some(t) => t.paused = true,
            None => s.topics.push(TopicStatus {
                lag: TopicLag {
                    topic: p.topic.clone(),
                    waiting: 0,
                    scheduled: 0,
                    oldest_due_since: None,
                    oldest_age_seconds: 0.0,
                },
                publish_rate_per_second: None,
                dead_letters: 0,
                paused: true,
            }),
        }
    }
    s.topics.sort_by(|a, b| a.lag.topic.cmp(&b.lag.topic));
    s.paused_topics = paused;
}

fn assemble(
    lag: Vec<TopicLag>,
    dead: Vec<(String, i64)>,
    relays: Vec<RelayRow>,
    keys: keys::KeysStatus,
) -> Status {
    let fresh: Vec<&RelayRow> = relays.iter().filter(|r| r.is_fresh()).collect();
    let mut rates: BTreeMap<&str, f64> = BTreeMap::new();
    for r in &fresh {
        for (topic, rate) in &r.publish_rates {
            *rates.entry(topic.as_str()).or_default() += rate;
        }
    }
    let dead_of: BTreeMap<&str, i64> = dead.iter().map(|(t, n)| (t.as_str(), *n)).collect();
    let mut topics: BTreeMap<String, TopicStatus> = BTreeMap::new();
    let names = lag
        .iter()
        .map(|l| l.topic.clone())
        .chain(dead.iter().map(|(t, _)| t.clone()))
        .chain(rates.keys().map(|t| t.to_string()));
    for name in names {
        topics.entry(name.clone()).or_insert_with(|| TopicStatus {
            lag: lag
                .iter()
                .find(|l| l.topic == name)
                .cloned()
                .unwrap_or(TopicLag {
                    topic: name.clone(),
                    waiting: 0,
                    scheduled: 0,
                    oldest_due_since: None,
                    oldest_age_seconds: 0.0,
                }),
            publish_rate_per_second: (!fresh.is_empty())
                .then(|| rates.get(name.as_str()).copied().unwrap_or(0.0)),
            dead_letters: dead_of.get(name.as_str()).copied().unwrap_or(0),
            paused: false,
        });
    }
    let mut sinks: BTreeMap<&str, SinkStatus> = BTreeMap::new();
    for r in &fresh {
        for s in &r.sinks {
            let e = sinks.entry(s.sink.as_str()).or_insert_with(|| SinkStatus {
                sink: s.sink.clone(),
                kind: s.kind.clone(),
                up: true,
                relays_up: 0,
                relays_reporting: 0,
                error: None,
            });
            e.relays_reporting += 1;
            if s.up {
                e.relays_up += 1;
            } else {
                e.up = false;
                if e.error.is_none() {
                    e.error = s.error.clone();
                }
            }
        }
    }
    Status {
        at: Utc::now(),
        topics: topics.into_values().collect(),
        dead_letters: dead
            .into_iter()
            .map(|(topic, count)| DeadCount { topic, count })
            .collect(),
        sinks: sinks.into_values().collect(),
        live_relays: fresh.len(),
        relays,
        keys,
        paused_topics: Vec::new(),
    }
}

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
    use super::*;
    use crate::store::cluster::SinkHealth;

    fn no_keys() -> keys::KeysStatus {
        keys::KeysStatus {
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
