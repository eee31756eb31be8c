//! A real Prometheus (Debian's `prometheus` package) started by the tests on
//! loopback, scraping agents every second; a small client for its HTTP API;
//! and the Grafana dashboards of `grafana/` read as Grafana would run them
//! (panel queries with their variables filled in).

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::agent_process::{TempDir, free_port};

/// The `prometheus` and `promtool` binaries, or what is missing.
pub fn binaries() -> Result<(PathBuf, PathBuf), String> {
    let find = |name: &str| {
        which::which(name).map_err(|_| {
            format!("{name} is not installed (Debian package prometheus: run `cargo xtask setup`)")
        })
    };
    Ok((find("prometheus")?, find("promtool")?))
}

/// A Prometheus process, killed on drop.
pub struct Prometheus {
    child: Child,
    pub addr: String,
    dir: TempDir,
}

impl Prometheus {
    /// Starts Prometheus on a free loopback port, scraping `targets`
    /// (host:port) every second as job `pagefp`; returns once every target
    /// was scraped successfully.
    pub fn start(targets: &[String]) -> anyhow::Result<Self> {
        let (binary, _) = binaries().map_err(anyhow::Error::msg)?;
        let dir = TempDir::new("pagefp-prometheus");
        let config = dir.0.join("prometheus.yml");
        let quoted: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: pagefp\n    static_configs:\n      - targets: [{}]\n",
                quoted.join(", ")
            ),
        )?;
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.0.join("prometheus.log"))?;
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting prometheus")?;
        let mut prometheus = Self { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        while prometheus.get("/-/ready").is_err() {
            if let Some(status) = prometheus.child.try_wait()? {
                bail!("prometheus exited ({status}):\n{}", prometheus.log_tail());
            }
            if Instant::now() > deadline {
                bail!(
                    "prometheus did not become ready on {} within 60 s:\n{}",
                    prometheus.addr,
                    prometheus.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // Target discovery reaches the scrape loop a moment after start:
        // wait until every target was scraped, so later queries see them.
        loop {
            let up = prometheus.query("up == 1").unwrap_or_default();
            if up.len() == targets.len() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "prometheus did not scrape {targets:?} within 60 s (up: {up:?}); targets: {}\n{}",
                    prometheus.get("/api/v1/targets").unwrap_or_default(),
                    prometheus.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(prometheus)
    }

    /// The end of Prometheus's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.0.join("prometheus.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// GET `path` (with its query string); the body of a 200 answer.
    pub fn get(&self, path: &str) -> anyhow::Result<String> {
        http_get(&self.addr, path)
    }

    fn data(&self, path: &str, what: &str) -> anyhow::Result<Value> {
        let body = match self.get(path) {
            Ok(body) => body,
            // Refused queries answer 400 with the reason in the body.
            Err(err) => bail!("prometheus refused {what}: {err}"),
        };
        let answer: Value = serde_json::from_str(&body)?;
        if answer["status"] != "success" {
            bail!("prometheus refused {what}: {answer}");
        }
        Ok(answer["data"].clone())
    }

    /// `/api/v1/query` now: the result (vector series or a scalar).
    pub fn query(&self, expr: &str) -> anyhow::Result<Vec<Value>> {
        let data = self.data(&format!("/api/v1/query?query={}", encode(expr)), expr)?;
        Ok(results(&data))
    }

    /// `/api/v1/query` evaluated at `time` (Unix seconds).
    pub fn query_at(&self, expr: &str, time: f64) -> anyhow::Result<Vec<Value>> {
        let data = self.data(
            &format!("/api/v1/query?query={}&time={time:.3}", encode(expr)),
            expr,
        )?;
        Ok(results(&data))
    }

    /// `/api/v1/query_range` from `start` to `end` (Unix seconds), one step
    /// per second: the result series.
    pub fn query_range(&self, expr: &str, start: f64, end: f64) -> anyhow::Result<Vec<Value>> {
        let data = self.data(
            &format!(
                "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step=1",
                encode(expr)
            ),
            expr,
        )?;
        Ok(results(&data))
    }

    /// The values of `label` among the series matching `selector` between
    /// `start` and `end`: what Grafana's `label_values(selector, label)`
    /// offers.
    pub fn label_values(
        &self,
        selector: &str,
        label: &str,
        start: f64,
        end: f64,
    ) -> anyhow::Result<Vec<String>> {
        let data = self.data(
            &format!(
                "/api/v1/series?match[]={}&start={start:.3}&end={end:.3}",
                encode(selector)
            ),
            selector,
        )?;
        let mut values: Vec<String> = data
            .as_array()
            .map(|series| {
                series
                    .iter()
                    .filter_map(|s| s[label].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        values.sort();
        values.dedup();
        Ok(values)
    }

    /// Prometheus's clock (Unix seconds): the time of an instant query.
    pub fn now(&self) -> anyhow::Result<f64> {
        let data = self.data("/api/v1/query?query=time()", "time()")?;
        data["result"][0]
            .as_f64()
            .context("time() answered no number")
    }
}

/// The series of a vector or matrix answer; a scalar answer as one entry.
fn results(data: &Value) -> Vec<Value> {
    match data["resultType"].as_str() {
        Some("scalar") | Some("string") => vec![data["result"].clone()],
        _ => data["result"].as_array().cloned().unwrap_or_default(),
    }
}

/// The values of one answer that are numbers (not NaN or infinite).
pub fn numbers(result: &[Value]) -> Vec<f64> {
    let parse = |v: &Value| v[1].as_str().and_then(|s| s.parse::<f64>().ok());
    result
        .iter()
        .flat_map(|series| {
            if let Some(values) = series["values"].as_array() {
                values.iter().filter_map(parse).collect::<Vec<f64>>()
            } else if series["value"].is_array() {
                parse(&series["value"]).into_iter().collect()
            } else {
                // A scalar: [time, "value"].
                parse(series).into_iter().collect()
            }
        })
        .filter(|v| v.is_finite())
        .collect()
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `promtool check metrics` on an exposition: what it complains about
/// (empty when nothing).
pub fn promtool_check_metrics(exposition: &str) -> anyhow::Result<String> {
    let (_, promtool) = binaries().map_err(anyhow::Error::msg)?;
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting promtool")?;
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(exposition.as_bytes())?;
    let output = child.wait_with_output()?;
    let mut complaints = String::from_utf8_lossy(&output.stdout).into_owned();
    complaints.push_str(&String::from_utf8_lossy(&output.stderr));
    if !output.status.success() && complaints.trim().is_empty() {
        complaints = format!("promtool failed: {}", output.status);
    }
    Ok(complaints.trim().to_string())
}

/// A plain HTTP/1.0 GET; the body of a 200 answer.
pub fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .context("no HTTP header end")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("GET {path}: {}: {body}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}

/// Percent-encodes a query parameter.
pub fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One Grafana dashboard of `grafana/dashboards`.
pub struct Dashboard {
    pub file: String,
    pub json: Value,
}

/// One query of a dashboard panel.
#[derive(Clone, Debug)]
pub struct PanelQuery {
    pub dashboard: String,
    pub panel: String,
    pub expr: String,
}

/// A dashboard variable of type `query`: `label_values(SELECTOR, LABEL)`.
#[derive(Clone, Debug)]
pub struct QueryVariable {
    pub name: String,
    pub selector: String,
    pub label: String,
}

pub fn grafana_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../grafana")
}

/// Every dashboard, by file name.
pub fn dashboards() -> Vec<Dashboard> {
    let dir = grafana_dir().join("dashboards");
    let mut all: Vec<Dashboard> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| Dashboard {
            file: file_name(&p),
            json: serde_json::from_slice(&std::fs::read(&p).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", p.display())),
        })
        .collect();
    all.sort_by(|a, b| a.file.cmp(&b.file));
    all
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

impl Dashboard {
    /// Panels that show data (rows only group them).
    pub fn panels(&self) -> Vec<&Value> {
        self.json["panels"]
            .as_array()
            .map(|p| p.iter().filter(|p| p["type"] != "row").collect())
            .unwrap_or_default()
    }

    pub fn queries(&self) -> Vec<PanelQuery> {
        let mut out = Vec::new();
        for panel in self.panels() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                out.push(PanelQuery {
                    dashboard: self.file.clone(),
                    panel: panel["title"].as_str().unwrap_or("?").to_string(),
                    expr: target["expr"].as_str().unwrap_or("").to_string(),
                });
            }
        }
        out
    }

    pub fn variables(&self) -> Vec<&Value> {
        self.json["templating"]["list"]
            .as_array()
            .map(|v| v.iter().collect())
            .unwrap_or_default()
    }

    /// The `query` variables, parsed.
    pub fn query_variables(&self) -> Vec<QueryVariable> {
        self.variables()
            .into_iter()
            .filter(|v| v["type"] == "query")
            .map(|v| {
                let name = v["name"].as_str().unwrap_or("?").to_string();
                let query = v["query"]["query"]
                    .as_str()
                    .or(v["query"].as_str())
                    .unwrap_or("");
                let inner = query
                    .strip_prefix("label_values(")
                    .and_then(|q| q.strip_suffix(')'))
                    .unwrap_or_else(|| {
                        panic!(
                            "{}: variable {name}: not label_values(...): {query}",
                            self.file
                        )
                    });
                let (selector, label) = inner.rsplit_once(',').unwrap();
                QueryVariable {
                    name,
                    selector: selector.trim().to_string(),
                    label: label.trim().to_string(),
                }
            })
            .collect()
    }
}

/// Grafana's text for a multi-value variable inside a regex matcher: the
/// `allValue` for "All", or the value with regex characters escaped.
pub fn regex_value(value: Option<&str>) -> String {
    match value {
        None => ".*".to_string(),
        Some(value) => value
            .chars()
            .map(|c| {
                if "\\.+*?()|[]{}^$".contains(c) {
                    // Escaped for the regex, and that backslash for the
                    // PromQL string.
                    format!("\\\\{c}")
                } else {
                    c.to_string()
                }
            })
            .collect(),
    }
}

/// `expr` with Grafana's variables replaced: `vars` are (name, text);
/// `$__rate_interval` and `$__range` as given. Panics if a variable is left.
pub fn expand(expr: &str, vars: &[(&str, String)], rate_interval: &str, range: &str) -> String {
    let mut out = expr
        .replace("$__rate_interval", rate_interval)
        .replace("$__range", range);
    for (name, text) in vars {
        out = out
            .replace(&format!("${{{name}}}"), text)
            .replace(&format!("${name}"), text);
    }
    assert!(!out.contains('$'), "a variable is left in {out}");
    out
}
