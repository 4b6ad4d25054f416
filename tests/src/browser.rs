//! A real browser for the status page's tests: Debian's `chromium`, headless, driven through
//! `chromedriver` (WebDriver) by fantoccini. Each [`Browser`] has its own chromedriver on a free
//! loopback port and its own fresh profile, so tests run in parallel without sharing state.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;

use crate::free_port;

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Chromium's narrowest window.
const MIN_WINDOW_WIDTH: u32 = 500;

pub struct Browser {
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

/// `$CHROMIUM`/`$CHROMEDRIVER`, else Debian's paths. Missing is a failure, not a skip: the page's
/// safety is only shown in a browser (`scripts/setup.sh` installs both).
fn binary(variable: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(variable)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default));
    assert!(
        path.is_file(),
        "{} not found: the status page tests need Debian's chromium and chromium-driver (scripts/setup.sh installs them; or set ${variable})",
        path.display()
    );
    path
}

impl Browser {
    /// A headless chromium whose viewport is `width` × `height` CSS pixels.
    pub async fn start(width: u32, height: u32) -> Browser {
        let chromium = binary("CHROMIUM", CHROMIUM);
        let chromedriver = binary("CHROMEDRIVER", CHROMEDRIVER);
        let port = free_port();
        let profile = tempfile::tempdir().expect("browser profile dir");
        let driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()));
        let url = format!("http://127.0.0.1:{port}");
        let mut driver = DriverGuard(Some(driver));
        wait_listening(port, driver.0.as_mut().expect("driver")).await;
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                    "--hide-scrollbars",
                    "--force-device-scale-factor=1",
                    format!("--window-size={width},{height}"),
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        });
        let mut capabilities = capabilities
            .as_object()
            .cloned()
            .expect("capabilities object");
        // A desktop window is at least 500 px wide; narrower is a phone's screen, emulated as
        // Chrome's device mode does (the page's viewport meta tag is honoured).
        if width < MIN_WINDOW_WIDTH
            && let Some(options) = capabilities
                .get_mut("goog:chromeOptions")
                .and_then(|o| o.as_object_mut())
        {
            options.insert(
                "mobileEmulation".into(),
                json!({"deviceMetrics": {"width": width, "height": height, "pixelRatio": 1.0}}),
            );
        }
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&url)
            .await
            .unwrap_or_else(|e| panic!("chromedriver at {url} started no chromium session: {e}"));
        Browser {
            client,
            driver: driver.0.take().expect("driver"),
            _profile: profile,
        }
    }

    /// Ends the session and the driver (chromium goes with it).
    pub async fn close(mut self) {
        let client = self.client.clone();
        let _ = tokio::time::timeout(Duration::from_secs(10), client.close()).await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }

    /// A PNG of the window, saved under [`screenshots_dir`]; returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("screenshot");
        let dir = screenshots_dir();
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        let path = dir.join(name);
        std::fs::write(&path, png).expect("write screenshot");
        eprintln!(
            "screenshot kept for a person to look at: {}",
            path.display()
        );
        path
    }

    /// The text of the first element matching `css`.
    pub async fn text(&self, css: &str) -> String {
        let element = self
            .client
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(fantoccini::Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element {css}: {e}"));
        element.text().await.unwrap_or_default()
    }

    pub async fn eval(&self, script: &str) -> serde_json::Value {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("script {script:?} failed: {e}"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Kills the driver if starting the session panics.
struct DriverGuard(Option<Child>);

impl Drop for DriverGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn wait_listening(port: u16, driver: &mut Child) {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        if let Ok(Some(status)) = driver.try_wait() {
            panic!("chromedriver exited before listening: {status}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("chromedriver did not listen on {port} within 10s");
}

/// Where screenshots are kept: `<target dir>/ui-screenshots` (the test binary lives in
/// `<target dir>/debug/deps`).
pub fn screenshots_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let target = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    target.join("ui-screenshots")
}
