//! A real Prometheus (Debian's `prometheus` package) started by the tests on
//! loopback, scraping an agent every second, and a small client for its
//! HTTP query API.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::agent_process::{TempDir, free_port};

/// A Prometheus process, killed on drop.
pub struct Prometheus {
    child: Child,
    pub addr: String,
    _dir: TempDir,
}

pub fn binary() -> Option<PathBuf> {
    which::which("prometheus").ok()
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (host:port) every second.
    pub fn start(targets: &[String]) -> anyhow::Result<Self> {
        let binary = binary().context("prometheus is not installed: run `cargo xtask setup`")?;
        let dir = TempDir::new("pagefp-prometheus");
        let config = dir.0.join("prometheus.yml");
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: pagefp\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )?;
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.0.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting prometheus")?;
        let prometheus = Self {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while prometheus.get("/-/ready").is_err() {
            if Instant::now() > deadline {
                bail!("prometheus did not become ready on {} within 60 s", prometheus.addr);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // Target discovery reaches the scrape loop a few seconds after start:
        // wait for the first scrape, so later queries see everything.
        while prometheus.query("up").map_or(true, |r| r.is_empty()) {
            if Instant::now() > deadline {
                bail!("prometheus did not scrape its targets within 60 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(prometheus)
    }

    /// GET `path` (with its query string); the body of a 200 answer.
    pub fn get(&self, path: &str) -> anyhow::Result<String> {
        http_get(&self.addr, path)
    }

    /// `/api/v1/query_range` over the last `seconds`: the result series.
    pub fn query_range(&self, expr: &str, seconds: u64) -> anyhow::Result<Vec<Value>> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let path = format!(
            "/api/v1/query_range?query={}&start={}&end={}&step=1",
            encode(expr),
            now - seconds,
            now
        );
        let answer: Value = serde_json::from_str(&self.get(&path)?)?;
        if answer["status"] != "success" {
            bail!("prometheus refused {expr:?}: {answer}");
        }
        Ok(answer["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// `/api/v1/query` now: the result series.
    pub fn query(&self, expr: &str) -> anyhow::Result<Vec<Value>> {
        let answer: Value = serde_json::from_str(&self.get(&format!("/api/v1/query?query={}", encode(expr)))?)?;
        if answer["status"] != "success" {
            bail!("prometheus refused {expr:?}: {answer}");
        }
        Ok(answer["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.0 GET.
pub fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").context("no HTTP header end")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("GET {path}: {}: {body}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}

/// Percent-encodes a query parameter.
pub fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
