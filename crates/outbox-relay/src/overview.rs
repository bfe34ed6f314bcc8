//! What `outbox-relay status` and the admin's overview show, read from the database: the
//! backlog per topic (waiting rows, age of the oldest, publish rate, dead letters, paused), the
//! health of every sink and the live relays, and the held-back and parked keys.
//!
//! Everything comes from the database, so it works from any machine that reaches it and sees
//! every relay at once: the lag from [`store::lag`] (no table scan), dead letters from
//! `outbox.dead_letters`, and sink health and publish rates from the heartbeat rows the relays
//! write into `outbox.relays` ([`crate::cluster`]). A sink is shown `up` when every relay with
//! a fresh heartbeat reports it up; the publish rate of a topic is the sum of the rates those
//! relays measured over their last heartbeat interval (`cluster.heartbeat_ms`).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

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
    pub keys: KeysStatus,
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
    let keys = collect_keys(pool, 20).await?;
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

pub fn assemble(
    lag: Vec<TopicLag>,
    dead: Vec<(String, i64)>,
    relays: Vec<RelayRow>,
    keys: KeysStatus,
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

/// The ordering part of `status`.
#[derive(Debug, serde::Serialize)]
pub struct KeysStatus {
    pub held_back: Vec<store::keys::HeldKey>,
    pub parked: Vec<store::keys::ParkedKey>,
}

pub async fn collect_keys(pool: &PgPool, limit: i64) -> Result<KeysStatus, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    Ok(KeysStatus {
        held_back: store::keys::held_keys(&mut conn, limit).await?,
        parked: store::keys::parked_keys(&mut conn, limit).await?,
    })
}
