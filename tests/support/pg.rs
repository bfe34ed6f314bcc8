//! A PostgreSQL server the test owns: `initdb` into a temporary directory, `pg_ctl` on a free
//! port, its socket in the same directory. Fault tests stop and restart it without disturbing
//! the shared server on 5432. PostgreSQL refuses to run as root, so when the tests run as root
//! the server runs as the `postgres` user (`runuser -u postgres --`) and the directory is
//! handed to that user.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use sqlx::{Connection, PgConnection};

use super::{free_port, unique, wait_until};

pub struct OwnedPostgres {
    pub port: u16,
    pub dir: tempfile::TempDir,
    bindir: PathBuf,
    running: bool,
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
        pg.start_server().await;
        pg
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
        let url = self.url();
        wait_until(
            Duration::from_secs(30),
            "owned PostgreSQL accepts connections",
            || {
                let url = url.clone();
                async move { PgConnection::connect(&url).await.is_ok() }
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
        let mut admin = PgConnection::connect(&self.url())
            .await
            .expect("connect to the owned PostgreSQL");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        admin.close().await.ok();
        let url = self.url_for(&name);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&url)
            .await
            .unwrap();
        outbox_relay::store::migrate(&pool).await.unwrap();
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
