//! The relay under test as a separate process, as in production: [`RelayProcess`] runs the
//! real `outbox-relay` binary (`--config <file> run`) with a config file of its own; SIGKILL,
//! SIGTERM, exit status, captured stderr, and the lines of it a test looks for ([`log_lines`]).
//!
//! The binary's path comes from the caller: Cargo tells only the relay crate's own integration
//! tests where it built it (`env!("CARGO_BIN_EXE_outbox-relay")`). [`die_with_parent`] ties any
//! child process to the caller that started it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running `outbox-relay run` with its own config file; killed on drop.
pub struct RelayProcess {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub stderr_path: PathBuf,
}

impl RelayProcess {
    /// Starts `bin --config <dir>/relay.toml run` with `config_toml` as that file and `env`
    /// added to the environment; stderr goes to [`RelayProcess::stderr`]. `RUST_LOG` defaults to
    /// `outbox_relay=info,warn` unless the caller's environment or `env` sets it.
    pub fn spawn(bin: &Path, config_toml: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory for the relay");
        let config_path = dir.path().join("relay.toml");
        std::fs::write(&config_path, config_toml).expect("write the relay config");
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).expect("create the relay's stderr log");
        let mut cmd = Command::new(bin);
        cmd.arg("--config")
            .arg(&config_path)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        if std::env::var("RUST_LOG").is_err() && !env.iter().any(|(k, _)| *k == "RUST_LOG") {
            cmd.env("RUST_LOG", "outbox_relay=info,warn");
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        Self {
            child,
            dir,
            stderr_path,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn sigterm(&self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid(), libc::SIGTERM);
        }
    }

    /// Waits for the process to exit, at most `timeout`; returns its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

/// How many lines of a relay's log (`stderr`) are at `level` (`"INFO"`, `"WARN"`) and contain
/// every one of `parts`.
pub fn log_lines(stderr: &str, level: &str, parts: &[&str]) -> usize {
    stderr
        .lines()
        .filter(|l| l.contains(level) && parts.iter().all(|p| l.contains(p)))
        .count()
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Makes a child of a long-running caller (the benchmark: relays, tansu) receive SIGKILL when
/// the caller's thread that started it ends, so that a caller that crashes or is killed leaves
/// no process behind. Start such children from a thread that lives until exit (the main
/// thread); not for children started from a runtime's worker or blocking threads.
pub fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl(2) is async-signal-safe and touches only the child being started.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs `bin args…` to completion with `env` added, and without the caller's `OUTBOX_*`,
/// `DATABASE_URL` and `PG*` variables (which would stand in for the configuration under test);
/// killed, and the test failed, if it runs past `timeout`.
pub fn run_command(
    bin: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> std::process::Output {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("DATABASE_URL");
    for (k, _) in std::env::vars()
        .filter(|(k, _)| k.starts_with("OUTBOX_") || (k.starts_with("PG") && k != "PG_CONFIG"))
    {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().copied());
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.expect("wait for the command"),
        Err(_) => {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{} {args:?} did not exit within {timeout:?}", bin.display());
        }
    }
}
