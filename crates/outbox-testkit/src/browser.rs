//! A headless Chromium driven over WebDriver (chromedriver on a free port, a profile of its own),
//! for the admin's end-to-end tests. Debian: `apt-get install chromium chromium-driver`
//! (`scripts/test install` does it).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder};

use crate::names::free_port;
use crate::skip::skipped;

pub use fantoccini::Locator;

/// A browser session; the driver and the browser end when it is dropped.
pub struct Browser {
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

fn on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in names {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

impl Browser {
    /// Starts chromedriver and a headless Chromium with a window of `width` x `height`; `None`
    /// (after saying what is missing) when either is not installed, unless `CI` is set: there
    /// `scripts/test install` has installed them, so a missing one fails the test.
    pub async fn start(test: &str, width: u32, height: u32) -> Option<Self> {
        let chromium = on_path(&["chromium", "chromium-browser", "google-chrome"]);
        let driver = on_path(&["chromedriver"]);
        let (Some(chromium), Some(driver)) = (chromium, driver) else {
            let why = "chromium and chromedriver are needed (Debian: apt-get install chromium chromium-driver, or scripts/test install)";
            assert!(std::env::var_os("CI").is_none(), "{why}");
            skipped(test, why);
            return None;
        };
        let port = free_port();
        let profile = tempfile::tempdir().expect("a profile directory");
        let driver = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chromium,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--disable-extensions",
                    format!("--user-data-dir={}", profile.path().display()),
                    format!("--window-size={width},{height}"),
                ],
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let client = loop {
            match ClientBuilder::native()
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => break c,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot start a Chromium session through chromedriver: {e}"),
            }
        };
        Some(Self {
            client,
            driver,
            _profile: profile,
        })
    }

    /// The text of the whole page, as a person reads it.
    pub async fn text(&self) -> String {
        self.client
            .find(Locator::Css("body"))
            .await
            .expect("a body")
            .text()
            .await
            .expect("its text")
    }

    /// Waits until the page's text contains `needle` (the page refreshes itself, or a reload
    /// is asked for with `reload`), at most `timeout`.
    pub async fn wait_for_text(&self, needle: &str, reload: bool, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let text = self.text().await;
            if text.contains(needle) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the page never showed {needle:?}; it shows:\n{text}"
            );
            if reload {
                self.client.refresh().await.expect("reload");
            } else {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// Clicks the element `css`, then accepts the confirmation dialog it opens (if any).
    pub async fn click_and_confirm(&self, css: &str) {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css} on the page: {e}"))
            .click()
            .await
            .expect("click");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match self.client.accept_alert().await {
                Ok(()) => return,
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("no confirmation dialog after clicking {css}: {e}"),
            }
        }
    }

    /// Ends the browser session (the browser exits), then the driver.
    pub async fn quit(self) {
        let _ = self.client.clone().close().await;
    }

    /// A screenshot of the window as PNG, written to `path`.
    pub async fn screenshot(&self, path: &std::path::Path) {
        let png = self.client.screenshot().await.expect("screenshot");
        std::fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
