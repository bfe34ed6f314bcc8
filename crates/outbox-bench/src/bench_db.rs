//! A database of its own per benchmark (`outbox_bench_<scenario>_<hex>`), migrated with the
//! relay's migrations, preloaded when a backlog is needed, dropped when the benchmark ends.

use anyhow::Context;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};

pub struct BenchDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
    admin_url: String,
    dropped: bool,
}

/// A short unique suffix: the random tail of a UUIDv7.
pub fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("{prefix}_{}", &id[20..])
}

fn with_database(url: &str, db: &str) -> anyhow::Result<String> {
    let mut u = url::Url::parse(url).with_context(|| "--database-url is not a URL")?;
    u.set_path(&format!("/{db}"));
    Ok(u.to_string())
}

impl BenchDb {
    /// A new database migrated with the relay's migrations.
    pub async fn create(admin_url: &str, scenario: &str) -> anyhow::Result<Self> {
        let db = Self::create_empty(admin_url, scenario).await?;
        outbox_relay::store::migrate(&db.pool).await?;
        Ok(db)
    }

    /// A new database without the relay's schema (for the `peer` scenario's job queue).
    pub async fn create_empty(admin_url: &str, scenario: &str) -> anyhow::Result<Self> {
        let name = unique(&format!("outbox_bench_{scenario}"));
        let mut admin = PgConnection::connect(admin_url).await.with_context(|| {
            format!(
                "cannot connect to PostgreSQL at {}",
                outbox_relay::redact_url(admin_url)
            )
        })?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .with_context(|| format!("cannot create the benchmark database {name}"))?;
        admin.close().await.ok();
        let url = with_database(admin_url, &name)?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await?;
        Ok(Self {
            name,
            url,
            pool,
            admin_url: admin_url.to_string(),
            dropped: false,
        })
    }

    /// Inserts `n` messages on topic `topic` with `payload_bytes`-byte payloads (distinct
    /// contents, incompressible hex-derived bytes). With `keys` above 0, message `g` gets the
    /// key `k<g mod keys>` (keys interleaved, each with about `n / keys` messages); otherwise
    /// none.
    ///
    /// [`Load::Vacuumed`]: in chunks, then VACUUM ANALYZE, so every drain starts from the same
    /// table state. [`Load::AtOnce`]: committed in one transaction (for relays that are already
    /// running), then ANALYZE only, since the relays are reading the table.
    pub async fn preload(
        &self,
        n: u64,
        payload_bytes: usize,
        topic: &str,
        keys: u64,
        load: Load,
    ) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        insert_backlog(&mut tx, n, payload_bytes, topic, keys).await?;
        tx.commit().await?;
        match load {
            Load::Vacuumed => self.vacuum().await,
            Load::AtOnce => {
                sqlx::query("ANALYZE outbox.messages")
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }
        }
    }

    pub async fn vacuum(&self) -> anyhow::Result<()> {
        sqlx::query("VACUUM ANALYZE outbox.messages")
            .execute(&self.pool)
            .await?;
        sqlx::query("VACUUM ANALYZE outbox.topic_counts")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Rows waiting, from the trigger-maintained per-topic deltas: cheap enough to poll every
    /// few milliseconds while the relay drains, unlike COUNT(*) over a churning table.
    pub async fn waiting(&self) -> anyhow::Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT coalesce(sum(n), 0)::bigint FROM outbox.topic_counts")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    pub async fn drop_db(mut self) {
        self.dropped = true;
        self.pool.close().await;
        drop_database(&self.admin_url, &self.name).await;
    }
}

/// How [`BenchDb::preload`] leaves the backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Load {
    Vacuumed,
    AtOnce,
}

async fn insert_backlog(
    conn: &mut sqlx::PgConnection,
    n: u64,
    payload_bytes: usize,
    topic: &str,
    keys: u64,
) -> anyhow::Result<()> {
    const CHUNK: u64 = 20_000;
    // md5 gives 16 bytes per call; repeat enough of them and cut to size.
    let repeats = payload_bytes.div_ceil(16).max(1);
    let mut done = 0;
    while done < n {
        let count = CHUNK.min(n - done);
        sqlx::query(&format!(
            "INSERT INTO outbox.messages (topic, key, payload)
             SELECT $1,
                    CASE WHEN $4::bigint > 0 THEN 'k' || ((g + $2::bigint) % $4::bigint) END,
                    substring(decode(repeat(md5(g::text || $2::text), {repeats}), 'hex') FROM 1 FOR {payload_bytes})
               FROM generate_series(1, $3::bigint) g"
        ))
        .bind(topic)
        .bind(done as i64)
        .bind(count as i64)
        .bind(keys as i64)
        .execute(&mut *conn)
        .await?;
        done += count;
    }
    Ok(())
}

async fn drop_database(admin_url: &str, name: &str) {
    match PgConnection::connect(admin_url).await {
        Ok(mut admin) => {
            if let Err(e) = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut admin)
                .await
            {
                eprintln!("warning: could not drop benchmark database {name}: {e}");
            }
        }
        Err(e) => eprintln!("warning: could not drop benchmark database {name}: {e}"),
    }
}

impl Drop for BenchDb {
    /// A benchmark that failed half-way still removes its database.
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(drop_database(&admin_url, &name));
            }
        })
        .join();
    }
}
