//! `outbox-relay demo`: the whole product in one command on local defaults.
//!
//! It works in a database of its own (`outbox_demo` on the server of `database.url`, created
//! when missing, or `--database`), never in the configured one, and publishes to a JetStream
//! stream of its own (`OUTBOX_DEMO_<id>`, subjects `outbox_demo_<id>.<topic>`), deleted at the
//! end unless `--keep`. Each sample user gets three events under its key, each written in one
//! transaction with the business change it announces (through the client crate). The demo's
//! relay runs in this process; an independent consumer reads the stream back, checks that every
//! key's events arrived in enqueue order, and the status is printed while the relay still runs
//! (so it shows the relay live and its sink up). It ends with the commands to run next.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use futures::StreamExt;
use outbox_client::{enqueue, Message};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::redact::redact_url;
use crate::relay::Relay;
use crate::sinks::nats::{NatsConfig, NatsRoute, NatsStreamConfig, DEFAULT_URL};
use crate::sinks::SinkConfig;
use crate::store;

/// Each user's events, in the order they are enqueued under the user's key.
const EVENTS: [&str; 3] = ["user.created", "user.email_changed", "user.activated"];
/// Arrivals printed one per line; the rest are counted.
const SHOWN: usize = 12;
/// Concurrent enqueuers: each owns a share of the users, so every key is written by one of
/// them, in order.
const WRITERS: usize = 4;

/// What `outbox-relay demo` was asked for.
#[derive(Debug, Clone)]
pub struct DemoArgs {
    pub count: u32,
    pub database: String,
    pub keep: bool,
}

pub async fn run(mut config: Config, args: DemoArgs) -> anyhow::Result<()> {
    let DemoArgs {
        count,
        database,
        keep,
    } = args;
    let nats_url = config
        .sinks
        .values()
        .find_map(|s| match s {
            SinkConfig::Nats(n) => Some(n.url.clone()),
            #[allow(unreachable_patterns)]
            _ => None,
        })
        .unwrap_or_else(|| DEFAULT_URL.to_string());
    // NATS first: without it there is nothing to show, and saying so takes no database work.
    let client = tokio::time::timeout(Duration::from_secs(10), async_nats::connect(&nats_url))
        .await
        .map_err(|_| anyhow::anyhow!("no answer within 10 s"))
        .and_then(|r| r.map_err(anyhow::Error::from))
        .with_context(|| {
            format!(
                "cannot connect to NATS at {}: start nats-server with JetStream (nats-server -js), or set the URL of a sink with kind = \"nats\"",
                redact_url(&nats_url)
            )
        })?;
    let js = async_nats::jetstream::new(client);

    // The demo's own database on the configured server.
    let server_url = config.database.url.clone();
    let mut demo_url = url::Url::parse(&server_url).context("database.url is not a URL")?;
    demo_url.set_path(&format!("/{database}"));
    let created = store::demo::ensure_database(&config.database, &database)
        .await
        .map_err(|source| crate::Error::Connect {
            url: redact_url(&server_url),
            source,
        })
        .with_context(|| format!("cannot create the demo's database {database}"))?;
    config.database.url = demo_url.to_string();
    // The demo's relay runs in this process; it needs no HTTP server.
    config.http.listen = String::new();

    // The demo's own stream and subjects.
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    let tag = &run_id[20..];
    let stream_name = format!("OUTBOX_DEMO_{}", tag.to_ascii_uppercase());
    let prefix = format!("outbox_demo_{tag}");
    let total = count as usize * EVENTS.len();
    config.sinks = BTreeMap::from([(
        "nats".to_string(),
        SinkConfig::Nats(NatsConfig {
            url: nats_url.clone(),
            stream: NatsStreamConfig {
                name: stream_name.clone(),
                subjects: vec![format!("{prefix}.>")],
                create: true,
                // A kept stream survives a NATS restart; the others live only for the demo.
                storage: if keep { "file" } else { "memory" }.to_string(),
                // About 1 KiB per message: room for all of them, no more reserved.
                max_bytes: (total as u64 * 1024).max(16 << 20),
                ..NatsStreamConfig::default()
            },
            routes: vec![NatsRoute {
                topics: vec!["*".into()],
                subject: format!("{prefix}.{{topic}}"),
            }],
            ..NatsConfig::default()
        }),
    )]);
    config.validate()?;

    let pool = store::connect(
        &config.database,
        config.database.max_connections,
        Duration::from_secs(config.relay.claim_timeout_secs),
    )
    .await
    .map_err(|source| crate::Error::Connect {
        url: redact_url(&config.database.url),
        source,
    })?;
    let before = store::history::applied_versions(&pool).await?;
    store::migrate(&pool)
        .await
        .context("migrating the demo's database")?;
    let applied = store::history::applied_versions(&pool)
        .await?
        .iter()
        .filter(|v| !before.contains(v))
        .count();
    println!(
        "1. database {database} at {} ({}), outbox schema {}",
        redact_url(&config.database.url),
        if created { "created" } else { "already there" },
        if applied > 0 {
            format!("migrated ({applied} migration(s) applied)")
        } else {
            "up to date".to_string()
        }
    );
    store::demo::prepare(&pool).await?;

    // Enqueue: per user three events under its key, each in one transaction with its change.
    let tty = std::io::stdout().is_terminal();
    let done = Arc::new(AtomicUsize::new(0));
    let progress = spawn_progress(tty, "2. writing users and their events:", total, &done);
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (pool, done, run_id) = (pool.clone(), Arc::clone(&done), run_id.clone());
        let users: Vec<u32> = (0..count).filter(|i| *i as usize % WRITERS == w).collect();
        writers.push(tokio::spawn(async move {
            write_users(&pool, &users, &run_id, &done).await
        }));
    }
    // message id → (key, position of the event in its key's sequence)
    let mut expected: HashMap<String, (String, usize)> = HashMap::with_capacity(total);
    for writer in writers {
        expected.extend(writer.await??);
    }
    progress.finish().await;
    println!(
        "2. created {count} users; each has {} events under its key (user-<id>: {}), each written in one transaction with the change it announces",
        EVENTS.len(),
        EVENTS.join(" → ")
    );

    // The relay, then an independent consumer on the stream it creates.
    let metrics = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();
    let relay = Relay::build(&config, pool.clone(), metrics, shutdown.clone()).await?;
    let relay_task = tokio::spawn(relay.run());
    let outcome = receive(&js, &stream_name, &prefix, &expected, count, tty).await;
    let outcome = match outcome {
        Ok(()) => show_status(&pool).await,
        Err(e) => Err(e),
    };
    shutdown.cancel();
    let _ = relay_task.await;
    if keep {
        println!(
            "   (stream {stream_name} kept, subjects {prefix}.>: `nats stream view {stream_name}`; `nats stream rm {stream_name}` when done)"
        );
    } else if js.delete_stream(&stream_name).await.is_ok() {
        println!("   (stream {stream_name} deleted; --keep keeps it)");
    }
    outcome?;
    println!(
        "6. next, with your own database (the demo's rows stay in {database}; `dropdb {database}` removes them):"
    );
    println!("   outbox-relay migrate              # the outbox schema in your database (OUTBOX_DATABASE__URL or DATABASE_URL)");
    println!("   outbox-relay run                  # relay its outbox to NATS (stream OUTBOX, subjects outbox.<topic>) until Ctrl-C");
    println!("   outbox-relay status --watch       # waiting rows, publish rates, sinks and relays, live");
    Ok(())
}

/// Writes `users` (their indexes): every user's created event, then every email change, then
/// every activation, so keys interleave in the table while each key's events stay in order.
async fn write_users(
    pool: &sqlx::PgPool,
    users: &[u32],
    run_id: &str,
    done: &AtomicUsize,
) -> anyhow::Result<Vec<(String, (String, usize))>> {
    let mut ids = Vec::with_capacity(users.len());
    let mut written = Vec::with_capacity(users.len() * EVENTS.len());
    for (seq, event) in EVENTS.iter().enumerate() {
        for (n, i) in users.iter().enumerate() {
            let mut tx = pool.begin().await?;
            let (id, email) = match seq {
                0 => {
                    let email = format!("user{i}-{}@example.com", &run_id[24..]);
                    let id = store::demo::insert_user(&mut tx, &email).await?;
                    ids.push(id);
                    (id, email)
                }
                1 => {
                    let email = format!("user{i}-{}@example.org", &run_id[24..]);
                    store::demo::change_email(&mut tx, ids[n], &email).await?;
                    (ids[n], email)
                }
                _ => {
                    store::demo::activate(&mut tx, ids[n]).await?;
                    (ids[n], String::new())
                }
            };
            let key = format!("user-{id}");
            let mut body = serde_json::json!({ "user_id": id, "event": event });
            if !email.is_empty() {
                body["email"] = email.into();
            }
            let message = Message::json(*event, &body)?
                .key(key.clone())
                .header("demo-run", run_id.to_string());
            let e = enqueue(&mut tx, &message).await?;
            tx.commit().await?;
            written.push((e.message_id, (key, seq)));
            done.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(written)
}

/// Reads the demo's messages back and checks each key's order.
async fn receive(
    js: &async_nats::jetstream::Context,
    stream_name: &str,
    prefix: &str,
    expected: &HashMap<String, (String, usize)>,
    count: u32,
    tty: bool,
) -> anyhow::Result<()> {
    let total = expected.len();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30 + (total / 1_000) as u64);
    // The relay creates the stream when its sink starts.
    let stream = loop {
        if let Ok(s) = js.get_stream(stream_name).await {
            break s;
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "the demo's relay did not create stream {stream_name} within the time allowed: is JetStream enabled on the NATS server (nats-server -js)?"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let consumer = stream
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            ..Default::default()
        })
        .await
        .context("creating the demo's consumer")?;
    let mut messages = consumer.messages().await?;
    println!("3. relaying to NATS: stream {stream_name}, subjects {prefix}.<topic>; arriving:");
    let received = Arc::new(AtomicUsize::new(0));
    let mut progress = None;
    let mut next_seq: HashMap<&str, usize> = HashMap::new();
    let mut out_of_order = Vec::new();
    let mut seen = 0;
    let subject_width = prefix.len() + 1 + EVENTS.iter().map(|e| e.len()).max().unwrap_or(0);
    while seen < total {
        let msg = match tokio::time::timeout_at(deadline, messages.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => anyhow::bail!("reading from NATS: {e}"),
            Ok(None) | Err(_) => anyhow::bail!(
                "only {seen} of {total} messages arrived in time; `outbox-relay status` on the demo's database shows what waits"
            ),
        };
        let id = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        let Some((key, seq)) = expected.get(&id) else {
            continue;
        };
        seen += 1;
        received.store(seen, Ordering::Relaxed);
        let want = next_seq.entry(key.as_str()).or_insert(0);
        if *seq != *want {
            out_of_order.push(format!(
                "{key}: {} arrived where {} was due",
                EVENTS[*seq], EVENTS[*want]
            ));
        }
        *want = (*seq).max(*want) + 1;
        if seen <= SHOWN {
            println!(
                "   {:<width$}  {:<10}  {}",
                msg.subject.as_str(),
                key,
                String::from_utf8_lossy(&msg.payload),
                width = subject_width
            );
        } else if progress.is_none() {
            progress = Some(spawn_progress(tty, "   …", total, &received));
        }
    }
    if let Some(p) = progress {
        p.finish().await;
    }
    if !out_of_order.is_empty() {
        anyhow::bail!(
            "{} event(s) arrived out of their key's order:\n  {}",
            out_of_order.len(),
            out_of_order.join("\n  ")
        );
    }
    println!(
        "4. all {total} messages arrived. Keys interleave, but each of the {count} keys received its events in the order they were enqueued ({}): per-key order held",
        EVENTS.join(" → ")
    );
    Ok(())
}

/// Prints `status` once the demo's relay has marked every row sent and heartbeated with its
/// sink up (at most 10 s).
async fn show_status(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        let s = super::status::collect(pool).await?;
        let ready = s.live_relays >= 1
            && !s.sinks.is_empty()
            && s.sinks.iter().all(|k| k.up)
            && s.topics.iter().all(|t| t.lag.waiting == 0);
        if ready || tokio::time::Instant::now() >= deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("5. `outbox-relay status` while the demo's relay still runs:");
    for line in super::status::render_table(&status).lines() {
        println!("   {line}");
    }
    Ok(())
}

/// A progress line (`label done/total`) redrawn every 200 ms on a terminal; nothing elsewhere.
struct Progress {
    task: Option<tokio::task::JoinHandle<()>>,
    stop: CancellationToken,
}

fn spawn_progress(tty: bool, label: &str, total: usize, done: &Arc<AtomicUsize>) -> Progress {
    let stop = CancellationToken::new();
    let task = tty.then(|| {
        let (label, done, stop) = (label.to_string(), Arc::clone(done), stop.clone());
        tokio::spawn(async move {
            loop {
                print!("\r{label} {}/{total}", done.load(Ordering::Relaxed));
                let _ = std::io::stdout().flush();
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
            // Clear the line: what follows prints the result.
            print!("\r{}\r", " ".repeat(label.len() + 24));
            let _ = std::io::stdout().flush();
        })
    });
    Progress { task, stop }
}

impl Progress {
    /// Stops the line and waits for its last redraw (it clears the line).
    async fn finish(self) {
        self.stop.cancel();
        if let Some(task) = self.task {
            let _ = task.await;
        }
    }
}
