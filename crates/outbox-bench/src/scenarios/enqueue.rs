//! Enqueue throughput: the client crate (one message per transaction, and `enqueue_many` of
//! 100) against a raw INSERT of the same rows, at each connection count, in three wake-up
//! states:
//!
//! - `busy`: the schema as shipped, no relay registered as sleeper. This is what enqueuers pay
//!   while relays are busy: the insert trigger's shared advisory lock and sleeper check, but no
//!   NOTIFY.
//! - `sleeping`: a relay session LISTENs and is registered in `outbox.relay_sleepers`, so every
//!   enqueuing transaction sends NOTIFY (the cost the design avoids under load).
//! - `no-wakeup`: the insert trigger replaced, in this benchmark's own database only, by one
//!   without the wake-up part (count deltas only): the baseline for the wake-up's cost.
//!
//! Every cell starts from an empty table (TRUNCATE) after a CHECKPOINT, and discards a warm-up
//! fifth of its time. The cells that are compared run back to back: for each connection count
//! and method the three wake-up states follow each other, in an order that rotates from round to
//! round (`--rounds`), so that drift of the machine (checkpoints, page cache, the other
//! tenants of a shared host) spreads over all three instead of biasing one. The wake-up cost is
//! the median over rounds of `1 - busy / no-wakeup` paired within a round.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_client::{enqueue, enqueue_many, Message};
use serde::Serialize;
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::PgPool;

use super::Opts;
use crate::bench_db::BenchDb;
use crate::brokers::TOPIC;

pub const BATCH: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    RawSingle,
    ClientSingle,
    RawBatch,
    ClientBatch,
}

impl Method {
    pub const ALL: [Method; 4] = [
        Method::RawSingle,
        Method::ClientSingle,
        Method::RawBatch,
        Method::ClientBatch,
    ];
    pub fn label(self) -> &'static str {
        match self {
            Method::RawSingle => "raw INSERT, 1 row/tx",
            Method::ClientSingle => "client enqueue, 1 row/tx",
            Method::RawBatch => "raw INSERT, 100 rows/tx",
            Method::ClientBatch => "client enqueue_many, 100 rows/tx",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Wake {
    Busy,
    Sleeping,
    NoWakeup,
}

impl Wake {
    pub const ALL: [Wake; 3] = [Wake::Busy, Wake::Sleeping, Wake::NoWakeup];
    pub fn label(self) -> &'static str {
        match self {
            Wake::Busy => "busy",
            Wake::Sleeping => "sleeping",
            Wake::NoWakeup => "no-wakeup",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EnqueueCell {
    /// The round (0-based) this cell ran in.
    pub round: usize,
    pub method: Method,
    pub wake: Wake,
    pub conns: usize,
    pub rows_per_sec: f64,
    pub tx_per_sec: f64,
}

const RAW_SINGLE: &str =
    "INSERT INTO outbox.messages (message_id, topic, payload) VALUES ($1, $2, $3)";
const RAW_BATCH: &str = "INSERT INTO outbox.messages (message_id, topic, payload)
                         SELECT * FROM UNNEST($1::text[], $2::text[], $3::bytea[])";
/// The insert trigger without the wake-up part (advisory lock, sleeper check, NOTIFY).
const NO_WAKEUP_TRIGGER: &str = "CREATE OR REPLACE FUNCTION outbox.after_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO outbox.topic_counts (topic, n) SELECT topic, count(*) FROM inserted GROUP BY topic;
  RETURN NULL;
END $$";

fn message_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

async fn one_op(pool: &PgPool, method: Method, payload: &[u8]) -> Result<u64, sqlx::Error> {
    let client_err = |e: outbox_client::Error| match e {
        outbox_client::Error::Database(e) => e,
        other => sqlx::Error::Protocol(other.to_string()),
    };
    match method {
        Method::RawSingle => {
            sqlx::query(RAW_SINGLE)
                .bind(message_id())
                .bind(TOPIC)
                .bind(payload)
                .execute(pool)
                .await?;
            Ok(1)
        }
        Method::ClientSingle => {
            enqueue(&mut *pool.acquire().await?, &Message::bytes(TOPIC, payload))
                .await
                .map_err(client_err)?;
            Ok(1)
        }
        Method::RawBatch => {
            let ids: Vec<String> = (0..BATCH).map(|_| message_id()).collect();
            let topics = vec![TOPIC; BATCH];
            let payloads = vec![payload; BATCH];
            sqlx::query(RAW_BATCH)
                .bind(&ids)
                .bind(&topics)
                .bind(&payloads)
                .execute(pool)
                .await?;
            Ok(BATCH as u64)
        }
        Method::ClientBatch => {
            let messages: Vec<Message> =
                (0..BATCH).map(|_| Message::bytes(TOPIC, payload)).collect();
            enqueue_many(&mut *pool.acquire().await?, &messages)
                .await
                .map_err(client_err)?;
            Ok(BATCH as u64)
        }
    }
}

async fn cell(
    db: &BenchDb,
    o: &Opts,
    round: usize,
    method: Method,
    wake: Wake,
    conns: usize,
) -> anyhow::Result<EnqueueCell> {
    sqlx::query("TRUNCATE outbox.messages, outbox.topic_counts")
        .execute(&db.pool)
        .await?;
    // Every cell starts right after a checkpoint, so none of them pays for one more than the
    // others (full-page writes follow each checkpoint).
    sqlx::query("CHECKPOINT").execute(&db.pool).await?;
    let pool = PgPoolOptions::new()
        .max_connections(conns as u32)
        .min_connections(conns as u32)
        .connect(&db.url)
        .await?;
    let warm: Vec<_> = futures::future::try_join_all((0..conns).map(|_| pool.acquire())).await?;
    drop(warm);
    let rows = Arc::new(AtomicU64::new(0));
    let txs = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let payload = Arc::new(o.payload());
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let (pool, rows, txs, stop, payload) = (
                pool.clone(),
                Arc::clone(&rows),
                Arc::clone(&txs),
                Arc::clone(&stop),
                Arc::clone(&payload),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let n = one_op(&pool, method, &payload).await?;
                    rows.fetch_add(n, Ordering::Relaxed);
                    txs.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<_, sqlx::Error>(())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(o.enqueue_secs / 5.0)).await;
    let (r0, t0, started) = (
        rows.load(Ordering::Relaxed),
        txs.load(Ordering::Relaxed),
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs_f64(o.enqueue_secs)).await;
    let (r1, t1, secs) = (
        rows.load(Ordering::Relaxed),
        txs.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
    );
    stop.store(true, Ordering::Relaxed);
    for t in futures::future::join_all(tasks).await {
        t??;
    }
    pool.close().await;
    Ok(EnqueueCell {
        round,
        method,
        wake,
        conns,
        rows_per_sec: (r1 - r0) as f64 / secs,
        tx_per_sec: (t1 - t0) as f64 / secs,
    })
}

/// A relay asleep: LISTENing and registered, so every enqueue NOTIFYs. Drains notifications.
struct Sleeper {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<u64>,
}

impl Sleeper {
    async fn start(db: &BenchDb) -> anyhow::Result<Self> {
        let mut listener = PgListener::connect(&db.url).await?;
        listener.listen(outbox_relay::wakeup::CHANNEL).await?;
        sqlx::query("INSERT INTO outbox.relay_sleepers (pid) VALUES (pg_backend_pid())")
            .execute(&mut listener)
            .await?;
        let stop = tokio_util::sync::CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let mut received = 0;
            loop {
                tokio::select! {
                    n = listener.recv() => match n {
                        Ok(_) => received += 1,
                        Err(_) => break,
                    },
                    _ = token.cancelled() => break,
                }
            }
            received
        });
        Ok(Self { stop, task })
    }

    async fn stop(self, db: &BenchDb) -> anyhow::Result<u64> {
        self.stop.cancel();
        let received = self.task.await.unwrap_or(0);
        sqlx::query("DELETE FROM outbox.relay_sleepers")
            .execute(&db.pool)
            .await?;
        Ok(received)
    }
}

pub async fn enqueue_bench(o: &Opts) -> anyhow::Result<Vec<EnqueueCell>> {
    let db = o.create_db("enqueue").await?;
    let result = enqueue_inner(o, &db).await;
    db.drop_db().await;
    result
}

async fn enqueue_inner(o: &Opts, db: &BenchDb) -> anyhow::Result<Vec<EnqueueCell>> {
    // The trigger as shipped, to put back after each no-wakeup cell.
    let shipped: String =
        sqlx::query_scalar("SELECT pg_get_functiondef('outbox.after_insert()'::regprocedure)")
            .fetch_one(&db.pool)
            .await?;
    let mut cells = Vec::new();
    let mut notified = 0;
    for round in 0..o.rounds {
        for &conns in &o.enqueue_conns {
            for method in Method::ALL {
                for i in 0..Wake::ALL.len() {
                    let wake = Wake::ALL[(i + round) % Wake::ALL.len()];
                    let sleeper = match wake {
                        Wake::Sleeping => Some(Sleeper::start(db).await?),
                        Wake::NoWakeup => {
                            sqlx::query(NO_WAKEUP_TRIGGER).execute(&db.pool).await?;
                            None
                        }
                        Wake::Busy => None,
                    };
                    let c = cell(db, o, round, method, wake, conns).await;
                    if let Some(s) = sleeper {
                        notified += s.stop(db).await?;
                    }
                    if wake == Wake::NoWakeup {
                        sqlx::query(&shipped).execute(&db.pool).await?;
                    }
                    let c = c?;
                    eprintln!(
                        "  enqueue round {} {:>9} {:>2} conn(s) {:<34} {:>9.0} rows/s",
                        round + 1,
                        wake.label(),
                        conns,
                        method.label(),
                        c.rows_per_sec
                    );
                    cells.push(c);
                }
            }
        }
    }
    anyhow::ensure!(
        notified > 0,
        "the sleeping-relay cells received no NOTIFY: the wake-up trigger did not fire"
    );
    Ok(cells)
}
