//! PostgreSQL: [`TestDb`], a fresh migrated database per test on the shared server
//! (`DATABASE_URL`, default 127.0.0.1:5432), dropped with the value; [`OwnedPostgres`], a server
//! the caller owns, to stop and restart without disturbing the shared one; probes of the
//! relay's claim state ([`claimable`], [`wait_for_open_claim`]).
//!
//! The owned server: `initdb` into a temporary directory, `pg_ctl` on a free port, its socket
//! in the same directory. PostgreSQL refuses to run as root, so when the tests run as root the
//! server runs as the `postgres` user (`runuser -u postgres --`) and the directory is handed to
//! that user. [`OwnedPostgres::start_with`] adds TLS (`ssl = on` with the test's certificates)
//! and a `pg_hba.conf` of the test's choosing; the kit itself always reaches the server as
//! `postgres` over its Unix socket ([`OwnedPostgres::admin`]), whatever the TCP rules are.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

use crate::names::{free_port, unique};
use crate::wait::wait_until;

/// The shared server's URL: `DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Applies the outbox migrations: the kit's one use of the relay library's schema code.
async fn migrate(pool: &PgPool) {
    outbox_relay::store::migrate(pool)
        .await
        .expect("apply the outbox migrations");
}

fn with_database(url: &str, db: &str) -> String {
    let mut u = url::Url::parse(url).expect("DATABASE_URL is a URL");
    u.set_path(&format!("/{db}"));
    u.to_string()
}

/// A database of its own, migrated. Dropped (with FORCE) when the value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
    admin_url: String,
}

impl TestDb {
    /// A fresh database, migrated.
    pub async fn new() -> Self {
        let db = Self::empty().await;
        migrate(&db.pool).await;
        db
    }

    /// A fresh database without the outbox schema (for `outbox-relay migrate` itself).
    pub async fn empty() -> Self {
        let admin_url = database_url();
        let name = unique("outbox_test");
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .expect("connect to PostgreSQL (DATABASE_URL)");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        admin.close().await.ok();
        let url = with_database(&admin_url, &name);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .unwrap();
        Self {
            name,
            url,
            pool,
            admin_url,
        }
    }

    pub async fn waiting(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM outbox.messages")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// The most attempts of a waiting row; `None` when no row waits.
    pub async fn max_attempts(&self) -> Option<i32> {
        sqlx::query_scalar("SELECT max(attempts) FROM outbox.messages")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Asserts what a sink that is down leaves behind: `n` rows waiting, no attempt counted on
    /// any, nothing dead-lettered. `what` starts the failure message.
    pub async fn assert_untouched(&self, n: i64, what: &str) {
        let state = (
            self.waiting().await,
            self.max_attempts().await,
            self.dead_letters().await,
        );
        assert_eq!(state, (n, Some(0), 0), "{what}: rows wait untouched");
    }

    pub async fn dead_letters(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM outbox.dead_letters")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Runs `sql` (one statement or several) as the database's owner.
    pub async fn execute(&self, sql: &str) {
        sqlx::raw_sql(sql)
            .execute(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin_url, name, pool) =
            (self.admin_url.clone(), self.name.clone(), self.pool.clone());
        // Drop runs inside the test's runtime; use a thread with its own runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                // Bounded: with a current-thread test runtime (blocked in this drop), a
                // connection still being returned to the pool never is, and close() would wait
                // for ever. DROP DATABASE ... WITH (FORCE) ends any connection left.
                let _ = tokio::time::timeout(Duration::from_secs(5), pool.close()).await;
                if let Ok(mut admin) = PgConnection::connect(&admin_url).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut admin)
                        .await;
                }
            });
        })
        .join();
    }
}

/// A PostgreSQL server the caller owns; stopped (immediate) on drop, its directory deleted.
pub struct OwnedPostgres {
    pub port: u16,
    pub dir: tempfile::TempDir,
    bindir: PathBuf,
    running: bool,
}

/// How [`OwnedPostgres::start_with`] sets a server up beyond initdb's defaults.
#[derive(Debug, Clone, Default)]
pub struct ServerSetup {
    /// `ssl = on` with these files (copied into the server's directory).
    pub tls: Option<ServerTls>,
    /// The TCP lines of `pg_hba.conf`, e.g. `hostssl all all 127.0.0.1/32 scram-sha-256`,
    /// replacing initdb's trust-everyone file. A `local all postgres trust` line always comes
    /// first: the kit's own connection over the socket.
    pub hba: Option<Vec<String>>,
}

/// The server's TLS files.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `ssl_ca_file`: the CA whose client certificates the server accepts (`cert` auth).
    pub client_ca: Option<PathBuf>,
}

/// Where the server binaries are: `pg_config --bindir`, else the Debian default.
pub fn bindir() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("pg_ctl").exists() && dir.join("initdb").exists() {
            return dir;
        }
    }
    for v in ["17", "16", "15", "14"] {
        let dir = PathBuf::from(format!("/usr/lib/postgresql/{v}/bin"));
        if dir.join("pg_ctl").exists() {
            return dir;
        }
    }
    panic!("PostgreSQL server binaries not found: install postgresql (pg_ctl, initdb) or put pg_config on PATH");
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

fn run_as_postgres(bin: &Path, args: &[&str]) -> Output {
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    cmd.args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()))
}

impl OwnedPostgres {
    /// Initialises a cluster and starts it; waits until it accepts connections.
    pub async fn start() -> Self {
        Self::start_with(ServerSetup::default()).await
    }

    /// [`OwnedPostgres::start`] with TLS and `pg_hba.conf` as `setup` says.
    pub async fn start_with(setup: ServerSetup) -> Self {
        let bindir = bindir();
        let dir = tempfile::Builder::new()
            .prefix("outbox-pg-")
            .tempdir()
            .unwrap();
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(
                status.success(),
                "chown of the PostgreSQL test directory failed"
            );
        }
        let data = dir.path().join("data");
        let out = run_as_postgres(
            &bindir.join("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = Self {
            port: free_port(),
            dir,
            bindir,
            running: false,
        };
        pg.configure(&setup);
        pg.start_server().await;
        pg
    }

    /// Writes `setup` into the data directory: the TLS files (owned by the server's user, the
    /// key private, as PostgreSQL demands), `postgresql.conf` lines, `pg_hba.conf`.
    fn configure(&self, setup: &ServerSetup) {
        let data = self.dir.path().join("data");
        let mut conf = String::new();
        if let Some(tls) = &setup.tls {
            let mut copy = |from: &Path, name: &str, key: &str| {
                let to = self.dir.path().join(name);
                std::fs::copy(from, &to)
                    .unwrap_or_else(|e| panic!("copy {} for the server: {e}", from.display()));
                self.hand_over(&to, 0o600);
                conf.push_str(&format!("{key} = '{}'\n", to.display()));
            };
            copy(&tls.cert, "server.crt", "ssl_cert_file");
            copy(&tls.key, "server.key", "ssl_key_file");
            if let Some(ca) = &tls.client_ca {
                copy(ca, "client-ca.crt", "ssl_ca_file");
            }
            conf.push_str("ssl = on\n");
        }
        if !conf.is_empty() {
            let path = data.join("postgresql.conf");
            let mut all = std::fs::read_to_string(&path).expect("read postgresql.conf");
            all.push_str(&conf);
            std::fs::write(&path, all).expect("write postgresql.conf");
        }
        if let Some(lines) = &setup.hba {
            let mut hba = String::from("local all postgres trust\n");
            for line in lines {
                hba.push_str(line);
                hba.push('\n');
            }
            let path = data.join("pg_hba.conf");
            std::fs::write(&path, hba).expect("write pg_hba.conf");
            self.hand_over(&path, 0o600);
        }
    }

    /// Gives a file to the server's user with `mode`.
    fn hand_over(&self, path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
        if is_root() {
            let status = Command::new("chown")
                .arg("postgres:postgres")
                .arg(path)
                .status()
                .unwrap();
            assert!(status.success(), "chown {} failed", path.display());
        }
    }

    /// Options for the `postgres` superuser over the server's Unix socket (trusted whatever
    /// `pg_hba.conf` says for TCP), on database `db`.
    pub fn admin_options(&self, db: &str) -> PgConnectOptions {
        PgConnectOptions::new_without_pgpass()
            .socket(self.dir.path())
            .port(self.port)
            .username("postgres")
            .database(db)
    }

    /// A superuser connection over the socket to the `postgres` database.
    pub async fn admin(&self) -> PgConnection {
        PgConnection::connect_with(&self.admin_options("postgres"))
            .await
            .expect("connect to the owned PostgreSQL over its socket")
    }

    /// Runs `sql` as the superuser over the socket.
    pub async fn execute(&self, sql: &str) {
        let mut conn = self.admin().await;
        sqlx::raw_sql(sql)
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        conn.close().await.ok();
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// The URL of the `postgres` database.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    pub fn url_for(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Starts the server (again) on the same port and data directory.
    pub async fn start_server(&mut self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log").display().to_string();
        let out = run_as_postgres(
            &self.bindir.join("pg_ctl"),
            &[
                "-D",
                &self.data(),
                "-o",
                &opts,
                "-l",
                &log,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        self.running = true;
        let options = self.admin_options("postgres");
        wait_until(
            Duration::from_secs(30),
            "owned PostgreSQL accepts connections",
            || {
                let options = options.clone();
                async move { PgConnection::connect_with(&options).await.is_ok() }
            },
        )
        .await;
    }

    /// Stops the server: `fast` disconnects every client and shuts down cleanly.
    pub fn stop(&mut self) {
        self.stop_mode("fast");
    }

    pub fn stop_mode(&mut self, mode: &str) {
        if !self.running {
            return;
        }
        let out = run_as_postgres(
            &self.bindir.join("pg_ctl"),
            &["-D", &self.data(), "-m", mode, "-w", "stop"],
        );
        assert!(
            out.status.success(),
            "pg_ctl stop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.running = false;
    }

    /// Stops and starts again on the same port.
    pub async fn restart(&mut self) {
        self.stop();
        self.start_server().await;
    }

    /// Creates a database, applies the outbox migrations, returns its URL.
    pub async fn create_migrated_database(&self) -> String {
        let name = unique("outbox_chaos");
        self.execute(&format!("CREATE DATABASE {name}")).await;
        let url = self.url_for(&name);
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect_with(self.admin_options(&name))
            .await
            .unwrap();
        migrate(&pool).await;
        pool.close().await;
        url
    }
}

impl Drop for OwnedPostgres {
    fn drop(&mut self) {
        if self.running {
            let _ = run_as_postgres(
                &self.bindir.join("pg_ctl"),
                &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
            );
        }
    }
}

/// Rows of this database's outbox that a new claim could lock right now.
pub async fn claimable(pool: &PgPool) -> i64 {
    let mut tx = pool.begin().await.unwrap();
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM outbox.messages FOR UPDATE SKIP LOCKED) s",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    n
}

/// The backend pid of a relay's claim transaction that waits on the broker (`idle in
/// transaction` in database `db`, its claim statement done) while it holds some of the `waiting`
/// rows locked. A transaction seen idle may be a claim that found nothing and is about to
/// commit: it counts only if it stayed idle, unchanged, across a count of the rows still
/// claimable that came out below `waiting`.
pub async fn wait_for_open_claim(pool: &PgPool, db: &str, waiting: i64, timeout: Duration) -> i32 {
    let deadline = tokio::time::Instant::now() + timeout;
    let idle_claim = || async {
        sqlx::query_as::<_, (i32, String)>(
            "SELECT a.pid, a.state_change::text FROM pg_stat_activity a
               JOIN pg_locks l ON l.pid = a.pid AND l.relation = 'outbox.messages'::regclass AND l.mode = 'RowShareLock'
              WHERE a.datname = $1 AND a.application_name = 'outbox-relay' AND a.state = 'idle in transaction'
              ORDER BY a.state_change LIMIT 1",
        )
        .bind(db)
        .fetch_optional(pool)
        .await
        .unwrap()
    };
    loop {
        if let Some(before) = idle_claim().await {
            if claimable(pool).await < waiting && idle_claim().await.as_ref() == Some(&before) {
                return before.0;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no relay claim transaction holding rows appeared within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
