//! Observability: the repository's deploy/ files, `promtool` and a Prometheus server the
//! caller owns (free port, temporary storage, killed on drop), and the parsing of dashboard and
//! alert queries.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::http;
use crate::names::free_port;

/// The workspace root (this crate is crates/outbox-testkit).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

pub fn deploy(path: &str) -> PathBuf {
    repo_root().join("deploy").join(path)
}

/// The path of `name` on PATH (or in `$<ENV>`), if it is there.
pub fn find_tool(name: &str, env: &str) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// `promtool` or `prometheus`; `None` means the test skips (it says so). Under CI (`CI` set) a
/// missing tool fails instead: .ci/observability-deps.sh installs it.
pub fn require_tool(name: &str, env: &str, test: &str) -> Option<PathBuf> {
    match find_tool(name, env) {
        Some(p) => Some(p),
        None if std::env::var_os("CI").is_some() => {
            panic!("{name} is not installed; CI must run .ci/observability-deps.sh (Debian package `prometheus`)")
        }
        None => {
            crate::skip::skipped(
                test,
                &format!(
                    "`{name}` is not on PATH. Install it with .ci/observability-deps.sh \
                     (Debian package `prometheus`) or set {env}."
                ),
            );
            None
        }
    }
}

/// Runs a command, returns (success, stdout + stderr).
pub fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("run command");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

pub fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A `prometheus` server owned by the test.
pub struct PrometheusServer {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl PrometheusServer {
    /// Starts Prometheus on a free port scraping `targets` as job `outbox-relay` every
    /// `scrape_interval`, with `rule_files` loaded; waits until it is ready.
    pub async fn start(
        bin: &Path,
        targets: &[String],
        rule_files: &[PathBuf],
        scrape_interval: &str,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let rules: Vec<String> = rule_files
            .iter()
            .map(|p| format!("  - {:?}", p.display().to_string()))
            .collect();
        let targets: Vec<String> = targets.iter().map(|t| format!("{t:?}")).collect();
        let config = format!(
            "global:\n  scrape_interval: {scrape_interval}\n  evaluation_interval: {scrape_interval}\n\
             rule_files:\n{}\n\
             scrape_configs:\n  - job_name: outbox-relay\n    static_configs:\n      - targets: [{}]\n",
            rules.join("\n"),
            targets.join(", ")
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn prometheus");
        let mut server = Self { child, port, dir };
        let addr = server.addr();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some((200, _)) = http::get(&addr, "/-/ready").await {
                break;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!(
                    "prometheus exited with {status} before it was ready:\n{}",
                    server.log()
                );
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("prometheus not ready after 60 s:\n{}", server.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        server
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// GETs an API path and returns the `data` of a `status: success` answer, or the error.
    pub async fn api(&self, path_and_query: &str) -> Result<serde_json::Value, String> {
        let addr = self.addr();
        let (code, body) = http::get(&addr, path_and_query)
            .await
            .ok_or_else(|| format!("GET http://{addr}{path_and_query}: no answer"))?;
        let v: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| format!("HTTP {code}, not JSON ({e}): {body:.300}"))?;
        if v["status"] == "success" {
            Ok(v["data"].clone())
        } else {
            Err(format!("HTTP {code}: {} {}", v["errorType"], v["error"]))
        }
    }

    /// An instant query; the result vector (empty when nothing matches).
    pub async fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>, String> {
        let data = self
            .api(&format!("/api/v1/query?query={}", urlencode(expr)))
            .await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every query of the dashboard: (panel title, expr), with the Grafana variables replaced by
/// what they mean at "All" (`$topic` → `.*`) and `$__rate_interval` by `rate_interval`.
/// Panics when a panel has no query or an unknown variable is used.
pub fn dashboard_queries(
    dashboard: &serde_json::Value,
    rate_interval: &str,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut panels: Vec<&serde_json::Value> = dashboard["panels"]
        .as_array()
        .expect("dashboard has panels")
        .iter()
        .collect();
    // Collapsed rows keep their panels inside.
    let nested: Vec<&serde_json::Value> = panels
        .iter()
        .filter_map(|p| p["panels"].as_array())
        .flat_map(|v| v.iter())
        .collect();
    panels.extend(nested);
    for p in panels {
        if p["type"] == "row" {
            continue;
        }
        let title = p["title"].as_str().unwrap_or("(untitled)").to_string();
        let targets = p["targets"].as_array().filter(|t| !t.is_empty());
        let targets = targets.unwrap_or_else(|| panic!("panel {title:?} has no query"));
        for t in targets {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {title:?}: a target without expr"));
            let expr = expr
                .replace("$__rate_interval", rate_interval)
                .replace("$topic", ".*");
            assert!(
                !expr.contains('$'),
                "panel {title:?}: unknown variable in {expr:?}"
            );
            out.push((title.clone(), expr));
        }
    }
    out
}

/// The parts of an alert expression that must return series while the system runs: the
/// operands of top-level `and`/`or`/`unless`, each without its trailing comparison to a number
/// (`max by (topic) (x) > 300` → `max by (topic) (x)`). Operands that are `absent(...)` or
/// `vector(...)` are left out: they are empty whenever things are healthy.
pub fn alert_probes(expr: &str) -> Vec<String> {
    split_top_level_keywords(expr, &["and", "or", "unless"])
        .into_iter()
        .map(|operand| strip_comparison(&operand))
        .filter(|o| {
            !(o.starts_with("absent(")
                || o.starts_with("absent_over_time(")
                || o.starts_with("vector("))
        })
        .collect()
}

/// Splits on binary keywords outside parentheses, brackets, braces and quotes.
fn split_top_level_keywords(expr: &str, keywords: &[&str]) -> Vec<String> {
    let chars: Vec<char> = expr.chars().collect();
    let (mut depth, mut quote, mut start) = (0i32, None::<char>, 0usize);
    let mut parts = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if let Some(q) = quote {
            if c == '\\' {
                i += 2;
                continue;
            }
            if c == q {
                quote = None;
            }
        } else {
            match c {
                '"' | '\'' | '`' => quote = Some(c),
                '(' | '[' | '{' => depth += 1,
                ')' | ']' | '}' => depth -= 1,
                _ if depth == 0 && (i == 0 || chars[i - 1].is_whitespace()) => {
                    for kw in keywords {
                        let end = i + kw.len();
                        if end < chars.len()
                            && chars[i..end].iter().collect::<String>() == *kw
                            && chars[end].is_whitespace()
                        {
                            parts.push(
                                chars[start..i]
                                    .iter()
                                    .collect::<String>()
                                    .trim()
                                    .to_string(),
                            );
                            start = end;
                            i = end;
                            break;
                        }
                    }
                }
                _ => {}
            }
        }
        i += 1;
    }
    parts.push(chars[start..].iter().collect::<String>().trim().to_string());
    parts.into_iter().filter(|p| !p.is_empty()).collect()
}

/// `q > 300`, `q == 0`, `q >= bool 1` → `q` (only a comparison at the top level, to a number).
fn strip_comparison(operand: &str) -> String {
    let s = operand.trim();
    for op in ["==", "!=", ">=", "<=", ">", "<"] {
        if let Some(pos) = s.rfind(op) {
            let (lhs, rhs) = (&s[..pos], s[pos + op.len()..].trim());
            let rhs = rhs.strip_prefix("bool").map(str::trim).unwrap_or(rhs);
            let balanced = lhs.matches('(').count() == lhs.matches(')').count()
                && lhs.matches('{').count() == lhs.matches('}').count();
            if balanced && rhs.parse::<f64>().is_ok() {
                return lhs.trim().to_string();
            }
        }
    }
    s.to_string()
}
