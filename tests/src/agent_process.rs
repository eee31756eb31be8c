//! Running the real `pagefp agent` from tests, the demo and the benchmark.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use agent::api::{
    client,
    wire::{PageRecord, parse_hash_list},
};
use anyhow::{Context as _, bail};
/// The workspace's target directory (tests run from target/{debug,release}/deps).
pub use pagefp_images::target_dir;
use serde_json::Value;

fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

static BUILD: Mutex<()> = Mutex::new(());

/// Builds binary `bin` of `package` in this build profile (cargo test does
/// not build other packages' binaries) and returns its path.
pub fn build_binary(package: &str, bin: &str) -> PathBuf {
    let _guard = BUILD.lock().unwrap();
    let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    build.args(["build", "--quiet", "-p", package, "--bin", bin]);
    if profile() == "release" {
        build.arg("--release");
    }
    build.current_dir(env!("CARGO_MANIFEST_DIR"));
    let status = build
        .status()
        .unwrap_or_else(|e| panic!("running cargo build for {bin}: {e}"));
    assert!(status.success(), "building {bin} failed");
    target_dir().join(profile()).join(bin)
}

/// The `pagefp` binary of this build profile (`PAGEFP_BIN` overrides).
pub fn agent_binary() -> PathBuf {
    if let Ok(path) = std::env::var("PAGEFP_BIN") {
        return PathBuf::from(path);
    }
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| build_binary("agent", "pagefp")).clone()
}

/// Options for a test agent.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub ring_buffer_bytes: Option<u32>,
    pub hash_threads: Option<usize>,
    pub min_vms: Option<u32>,
    pub zero_copy: bool,
    pub extra: Vec<String>,
    /// The agent's config file (TOML), empty if `None`.
    pub config: Option<String>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            ring_buffer_bytes: None,
            hash_threads: None,
            min_vms: None,
            zero_copy: true,
            extra: Vec::new(),
            config: None,
        }
    }
}

/// A running agent, stopped (SIGTERM, then SIGKILL) on drop.
pub struct AgentProcess {
    child: Child,
    pub socket: PathBuf,
    pub metrics_addr: String,
    _dir: TempDir,
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        Self::new_in(&std::env::temp_dir(), prefix)
    }

    /// In `parent` (e.g. `/dev/shm` for guest RAM files).
    pub fn new_in(parent: &Path, prefix: &str) -> Self {
        let dir = parent.join(format!("{prefix}-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&dir).expect("creating a temporary directory");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A free loopback TCP port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl AgentProcess {
    pub fn start(options: &AgentOptions) -> anyhow::Result<Self> {
        let dir = TempDir::new("pagefp-agent");
        let socket = dir.0.join("pagefp.sock");
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let mut command = Command::new(agent_binary());
        command
            .arg("agent")
            .arg("--config")
            .arg(dir.0.join("none.toml"))
            .arg("--socket")
            .arg(&socket)
            .arg("--metrics-addr")
            .arg(&metrics_addr);
        // An explicit config path must exist: write an empty one.
        std::fs::write(
            dir.0.join("none.toml"),
            options.config.as_deref().unwrap_or_default(),
        )?;
        if let Some(bytes) = options.ring_buffer_bytes {
            command.arg("--ring-buffer-bytes").arg(bytes.to_string());
        }
        if let Some(threads) = options.hash_threads {
            command.arg("--hash-threads").arg(threads.to_string());
        }
        if let Some(min_vms) = options.min_vms {
            command.arg("--min-vms").arg(min_vms.to_string());
        }
        if !options.zero_copy {
            command.arg("--no-zero-copy");
        }
        command.args(&options.extra);
        command.env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        );
        command.stdout(Stdio::null()).stderr(Stdio::inherit());
        let child = command.spawn().context("spawning pagefp agent")?;
        let mut agent = Self {
            child,
            socket,
            metrics_addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while client::get_blocking(&agent.socket, "/v1/status").is_err() {
            if let Some(status) = agent.child.try_wait()? {
                bail!("pagefp agent exited during start: {status}");
            }
            if Instant::now() > deadline {
                bail!(
                    "pagefp agent did not answer on {} within 30 s",
                    agent.socket.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(agent)
    }

    /// The test VMMs' guest-RAM mappings (`memfd:pagefp-guest-ram`) the
    /// agent process holds now.
    pub fn guest_ram_mappings(&self) -> usize {
        std::fs::read_to_string(format!("/proc/{}/maps", self.pid()))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("pagefp-guest-ram"))
            .count()
    }

    /// Waits until the VMs `pids` (exited) are no longer listed and the
    /// agent maps no guest RAM any more.
    pub fn wait_released(&self, pids: &[u32], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while pids.iter().any(|pid| self.vm(*pid).is_some()) || self.guest_ram_mappings() > 0 {
            assert!(
                Instant::now() < deadline,
                "{} guest-RAM mappings of exited VMs are still held (VMs still listed: {:?})",
                self.guest_ram_mappings(),
                pids.iter()
                    .filter(|pid| self.vm(**pid).is_some())
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn get(&self, path: &str) -> Result<Vec<u8>, client::ClientError> {
        client::get_blocking(&self.socket, path)
    }

    pub fn get_json(&self, path: &str) -> Value {
        let body = self.get(path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
        serde_json::from_slice(&body).unwrap_or_else(|e| panic!("GET {path}: bad JSON: {e}"))
    }

    pub fn status(&self) -> Value {
        self.get_json("/v1/status")
    }

    /// The VM of `pid`, if the agent knows it.
    pub fn vm(&self, pid: u32) -> Option<Value> {
        self.get(&format!("/v1/vms/{pid}"))
            .ok()
            .map(|b| serde_json::from_slice(&b).unwrap())
    }

    /// The binary hash list of `pid`.
    pub fn hashes(&self, pid: u32) -> Vec<PageRecord> {
        let body = self
            .get(&format!("/v1/vms/{pid}/hashes"))
            .unwrap_or_else(|e| panic!("hash list of {pid}: {e}"));
        parse_hash_list(&body).unwrap().records
    }

    /// `pagefp templates export` from this agent: the contents VMs `vms`
    /// hold, as a catalog file `out`; `extra` flags (`--min-vms 1`, ...).
    /// Returns the command's summary line.
    pub fn export_templates(
        &self,
        out: &Path,
        vms: &[u32],
        extra: &[&str],
    ) -> anyhow::Result<String> {
        let vms: Vec<String> = vms.iter().map(u32::to_string).collect();
        let output = Command::new(agent_binary())
            .args(["templates", "--socket"])
            .arg(&self.socket)
            .args(["export", "--out"])
            .arg(out)
            .args(["--vms", &vms.join(",")])
            .args(extra)
            .output()
            .context("running pagefp templates export")?;
        if !output.status.success() {
            bail!(
                "pagefp templates export failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    pub fn templates(&self) -> Value {
        self.get_json("/v1/templates")
    }

    /// Waits until `check` holds for VM `pid`'s view, or fails after `timeout`.
    pub fn wait_vm(
        &self,
        pid: u32,
        timeout: Duration,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let view = self.vm(pid);
            if let Some(view) = &view
                && check(view)
            {
                return view.clone();
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for VM {pid}: {what}; last view: {view:#?}"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Waits until VM `pid` is tracked and every page is clean.
    /// The test VMM registers its read-only code slot (id 100) after its RAM,
    /// so "every page clean" is only final once that slot is known: before,
    /// the RAM alone can already be all clean.
    pub fn wait_all_clean(&self, pid: u32, timeout: Duration) -> Value {
        self.wait_vm(pid, timeout, "all pages clean", |v| {
            let code_slot_known = v["slots"]
                .as_array()
                .is_some_and(|slots| slots.iter().any(|s| s["slot"] == 100));
            code_slot_known && v["pages"].as_u64() > Some(0) && v["clean"] == v["pages"]
        })
    }

    /// Anonymous memory of the agent process (its own heap), in bytes.
    pub fn rss_anon_bytes(&self) -> u64 {
        proc_status_kib(self.pid(), "RssAnon:") * 1024
    }

    pub fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let mut stream =
            std::net::TcpStream::connect(&self.metrics_addr).expect("connecting to metrics");
        write!(stream, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        // The body of the HTTP answer: the exposition.
        match response.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => {
                body.to_string()
            }
            _ => panic!("GET /metrics did not answer 200: {response}"),
        }
    }
}

/// A `/proc/PID/status` field in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

impl AgentProcess {
    /// Kills the agent with SIGKILL (a host that dies: no clean stop).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// blake3 of a page, as the agent computes it.
pub fn page_hash(page: &[u8]) -> [u8; 32] {
    *blake3::hash(page).as_bytes()
}

/// Checks that a path exists, for clearer failures.
pub fn must_exist(path: &Path) {
    assert!(path.exists(), "{} does not exist", path.display());
}
