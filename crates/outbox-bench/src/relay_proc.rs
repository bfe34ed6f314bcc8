//! The relay under test, as a separate process (as in production): the `outbox-relay` binary
//! next to this one (or `--relay-bin`), or, when it is not built, this binary re-executing
//! itself as `outbox-bench relay-child`, which runs the same library entry point
//! (`outbox_relay::run`). Its peak RSS and CPU time are read from /proc.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use outbox_relay::config::Config;
use outbox_relay::sinks::SinkConfig;
use outbox_testkit::relay::die_with_parent;

use crate::machine;

/// How to start a relay.
#[derive(Debug, Clone)]
pub struct RelayLauncher {
    /// The `outbox-relay` binary, or None to re-execute this binary as `relay-child`.
    pub binary: Option<PathBuf>,
    pub batch_size: u32,
    pub workers: u32,
    pub log_dir: PathBuf,
    /// `http.listen` of the relays started (empty: no HTTP server).
    pub http_listen: String,
}

impl RelayLauncher {
    pub fn new(
        explicit: Option<PathBuf>,
        batch_size: u32,
        workers: u32,
        log_dir: PathBuf,
    ) -> anyhow::Result<Self> {
        let binary = match explicit {
            Some(p) if p.exists() => Some(p),
            Some(p) => anyhow::bail!("--relay-bin {} does not exist: build it with `cargo build --release -p outbox-relay`", p.display()),
            None => std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|d| d.join("outbox-relay")))
                .filter(|p| p.exists()),
        };
        std::fs::create_dir_all(&log_dir)
            .with_context(|| format!("cannot create {}", log_dir.display()))?;
        Ok(Self {
            binary,
            batch_size,
            workers,
            log_dir,
            http_listen: String::new(),
        })
    }

    pub fn describe(&self) -> String {
        match &self.binary {
            Some(p) => p.display().to_string(),
            None => "outbox-bench relay-child (the outbox_relay library in a child process)".into(),
        }
    }

    /// The relay configuration for `database_url` with the given sinks and `[ordering]
    /// enabled = ordering`, as TOML.
    pub fn config_toml(
        &self,
        database_url: &str,
        sinks: &[(String, SinkConfig)],
        ordering: bool,
    ) -> anyhow::Result<String> {
        let mut config = Config::default();
        config.database.url = database_url.to_string();
        config.database.max_connections = self.workers + 2;
        config.relay.batch_size = self.batch_size;
        config.relay.workers = self.workers;
        config.http.listen = self.http_listen.clone();
        config.log.level = "warn".into();
        config.sinks = sinks.iter().cloned().collect();
        config.ordering.enabled = ordering;
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("benchmark relay config: {e}"))?;
        // The file holds what the bench sets, whatever the defaults, and of each sink what
        // differs from that kind's defaults: a relay binary of an earlier version
        // (`--relay-bin`, for runs paired against it), which rejects settings it does not
        // know, reads it too and runs with the same settings.
        let mut file = toml::Table::new();
        let mut section = |name: &str, entries: Vec<(&str, toml::Value)>| {
            let table: toml::Table = entries
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            file.insert(name.to_string(), table.into());
        };
        section(
            "database",
            vec![
                ("url", config.database.url.clone().into()),
                (
                    "max_connections",
                    i64::from(config.database.max_connections).into(),
                ),
            ],
        );
        section(
            "relay",
            vec![
                ("batch_size", i64::from(config.relay.batch_size).into()),
                ("workers", i64::from(config.relay.workers).into()),
            ],
        );
        section("http", vec![("listen", config.http.listen.clone().into())]);
        section("log", vec![("level", config.log.level.clone().into())]);
        section("ordering", vec![("enabled", ordering.into())]);
        let defaults = SinkConfig::every_kind()
            .iter()
            .map(toml::Value::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let mut sink_tables = toml::Table::new();
        for (name, sink) in &config.sinks {
            let mut value = toml::Value::try_from(sink)?;
            let kind = value.get("kind").cloned();
            if let Some(default) = defaults.iter().find(|d| d.get("kind") == kind.as_ref()) {
                strip_defaults(&mut value, default);
            }
            if let (Some(table), Some(kind)) = (value.as_table_mut(), kind) {
                table.insert("kind".into(), kind);
            }
            sink_tables.insert(name.clone(), value);
        }
        file.insert("sinks".into(), sink_tables.into());
        Ok(toml::to_string(&file)?)
    }

    /// Creates the outbox schema in `database_url` with the relay binary's own `migrate`
    /// command: the schema of the version under test, for runs paired against an earlier one.
    pub async fn migrate(&self, database_url: &str) -> anyhow::Result<()> {
        let bin = self.binary.as_ref().ok_or_else(|| {
            anyhow::anyhow!("--relay-migrates needs the outbox-relay binary (--relay-bin)")
        })?;
        let mut database = toml::Table::new();
        database.insert("url".into(), database_url.into());
        let mut file = toml::Table::new();
        file.insert("database".into(), database.into());
        let config_path = self
            .log_dir
            .join(format!("migrate-{}.toml", crate::bench_db::unique("db")));
        std::fs::write(&config_path, toml::to_string(&file)?)?;
        let output = tokio::process::Command::new(bin)
            .arg("--config")
            .arg(&config_path)
            .arg("migrate")
            .env_remove("RUST_LOG")
            .output()
            .await
            .with_context(|| format!("cannot run {} migrate", bin.display()));
        let _ = std::fs::remove_file(&config_path);
        let output = output?;
        anyhow::ensure!(
            output.status.success(),
            "{} migrate failed ({}): {}",
            bin.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(())
    }

    /// Starts one relay process (`ordering`: see [`RelayLauncher::config_toml`]).
    pub fn start(
        &self,
        name: &str,
        database_url: &str,
        sinks: &[(String, SinkConfig)],
        ordering: bool,
    ) -> anyhow::Result<RelayProcess> {
        self.start_with_config(name, &self.config_toml(database_url, sinks, ordering)?)
    }

    /// Starts one relay process with `config` (TOML) as its configuration file.
    pub fn start_with_config(&self, name: &str, config: &str) -> anyhow::Result<RelayProcess> {
        let config_path = self.log_dir.join(format!("{name}.toml"));
        std::fs::write(&config_path, config)?;
        let stderr_path = self.log_dir.join(format!("{name}.log"));
        let stderr = std::fs::File::create(&stderr_path)?;
        let mut cmd = match &self.binary {
            Some(bin) => {
                let mut c = Command::new(bin);
                c.arg("--config").arg(&config_path).arg("run");
                c
            }
            None => {
                let mut c = Command::new(std::env::current_exe()?);
                c.arg("relay-child").arg("--config").arg(&config_path);
                c
            }
        };
        cmd.stdout(Stdio::null())
            .stderr(stderr)
            .env_remove("RUST_LOG");
        // Dies with the bench: a bench that crashes or is killed leaves no relay behind.
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start the relay ({})", self.describe()))?;
        Ok(RelayProcess {
            child: Some(child),
            stderr_path,
            config_path,
        })
    }
}

/// Removes from `value` every setting equal to the one in `defaults`, and tables left empty.
fn strip_defaults(value: &mut toml::Value, defaults: &toml::Value) {
    let (Some(table), Some(default_table)) = (value.as_table_mut(), defaults.as_table()) else {
        return;
    };
    table.retain(|key, v| match default_table.get(key) {
        Some(d) if v == d => false,
        Some(d) if v.is_table() => {
            strip_defaults(v, d);
            v.as_table().is_some_and(|t| !t.is_empty())
        }
        _ => true,
    });
}

pub struct RelayProcess {
    child: Option<Child>,
    pub stderr_path: PathBuf,
    config_path: PathBuf,
}

/// What a relay process used, read just before it was stopped.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct RelayUsage {
    pub peak_rss_mib: f64,
    pub cpu_seconds: f64,
}

impl RelayProcess {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Fails with the relay's log when it has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Some(status) = c.try_wait()? {
                let log = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
                anyhow::bail!("the relay exited early ({status}); its log:\n{log}");
            }
        }
        Ok(())
    }

    pub fn usage(&self) -> RelayUsage {
        let pid = self.pid();
        RelayUsage {
            peak_rss_mib: machine::vm_hwm_kib(pid).unwrap_or(0) as f64 / 1024.0,
            cpu_seconds: machine::cpu_seconds(pid).unwrap_or(0.0),
        }
    }

    /// SIGTERM, then waits (at most 20 s, then SIGKILL). Returns the usage read before the signal.
    pub async fn stop(mut self) -> RelayUsage {
        let usage = self.usage();
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    eprintln!("warning: relay did not stop within 20 s of SIGTERM; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let _ = std::fs::remove_file(&self.config_path);
        usage
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `outbox-bench relay-child --config FILE`: the relay library's `run`, until SIGTERM.
pub fn relay_child_main(config: PathBuf) -> std::process::ExitCode {
    let config = match Config::load(Some(&config)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async move {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let token = shutdown.clone();
        tokio::spawn(async move {
            if let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            {
                term.recv().await;
            }
            token.cancel();
        });
        outbox_relay::run(config, shutdown).await
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outbox_relay::sinks::nats::NatsConfig;

    fn launcher() -> RelayLauncher {
        RelayLauncher {
            binary: None,
            batch_size: 700,
            workers: 3,
            log_dir: std::env::temp_dir(),
            http_listen: String::new(),
        }
    }

    #[test]
    fn the_config_file_holds_what_the_bench_sets_and_reads_back_the_same() {
        let sinks = vec![("nats".to_string(), SinkConfig::Nats(NatsConfig::default()))];
        let text = launcher()
            .config_toml("postgres://u@h:1/d", &sinks, false)
            .unwrap();
        let table: toml::Table = toml::from_str(&text).unwrap();
        let mut sections: Vec<&str> = table.keys().map(String::as_str).collect();
        sections.sort_unstable();
        assert_eq!(
            sections,
            ["database", "http", "log", "ordering", "relay", "sinks"],
            "{text}"
        );
        let nats = table["sinks"]["nats"].as_table().unwrap();
        let keys: Vec<&str> = nats.keys().map(String::as_str).collect();
        assert_eq!(keys, ["kind"], "a sink at its kind's defaults: {text}");

        let read: Config = toml::from_str(&text).unwrap();
        let mut expected = Config::default();
        expected.database.url = "postgres://u@h:1/d".into();
        expected.database.max_connections = 5;
        expected.relay.batch_size = 700;
        expected.relay.workers = 3;
        expected.http.listen = String::new();
        expected.log.level = "warn".into();
        expected.sinks = sinks.into_iter().collect();
        expected.ordering.enabled = false;
        assert_eq!(read, expected);
    }
}
