//! A real Redis cluster on loopback for the site catalog tests and the
//! benchmark: `redis-server` processes in cluster mode, each in its own
//! directory, joined by `redis-cli --cluster create`, stopped on drop.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::agent_process::TempDir;

/// One node: its port and process (`None` once killed).
struct Node {
    port: u16,
    child: Option<Child>,
}

/// A running cluster of `masters` masters with `replicas` replicas each.
pub struct RedisCluster {
    nodes: Vec<Node>,
    /// The address the nodes listen on (and announce to clients).
    ip: String,
    /// TLS only, with the certificates in this directory (a test PKI:
    /// ca-cert.pem, server-*.pem for the nodes, client-*.pem for the
    /// cluster bus and clients).
    tls: Option<PathBuf>,
    _dir: TempDir,
}

/// Whether `redis-server` and `redis-cli` are installed (by `cargo xtask
/// setup`); the message says what to run when they are not.
pub fn available() -> Result<(), String> {
    for tool in ["redis-server", "redis-cli"] {
        if Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            return Err(format!(
                "{tool} is not installed: run `cargo xtask setup` (it installs redis-server and redis-tools)"
            ));
        }
    }
    Ok(())
}

/// A port whose cluster bus port (+10000) is free too.
fn free_pair(ip: &str) -> anyhow::Result<u16> {
    for _ in 0..200 {
        let probe = std::net::TcpListener::bind((ip, 0))?;
        let port = probe.local_addr()?.port() % 20_000 + 20_000;
        drop(probe);
        let free = |p: u16| std::net::TcpListener::bind((ip, p)).is_ok();
        if free(port) && free(port + 10_000) {
            return Ok(port);
        }
    }
    bail!("no free pair of loopback ports (P, P+10000) for a Redis node")
}

fn cli(ip: &str, tls: Option<&Path>, port: u16, args: &[&str]) -> anyhow::Result<String> {
    let mut command = Command::new("redis-cli");
    if let Some(dir) = tls {
        command
            .arg("--tls")
            .arg("--cacert")
            .arg(dir.join("ca-cert.pem"))
            .arg("--cert")
            .arg(dir.join("client-cert.pem"))
            .arg("--key")
            .arg(dir.join("client-key.pem"));
    }
    let output = command
        .args(["-h", ip, "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running redis-cli")?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr))
}

fn start_node(ip: &str, tls: Option<&Path>, dir: &Path, port: u16) -> anyhow::Result<Child> {
    let node_dir = dir.join(port.to_string());
    std::fs::create_dir_all(&node_dir)?;
    let mut command = Command::new("redis-server");
    match tls {
        Some(pki) => {
            let file = |name: &str| pki.join(name).to_string_lossy().into_owned();
            command
                .args(["--port", "0", "--tls-port", &port.to_string()])
                .args(["--tls-cert-file", &file("server-cert.pem")])
                .args(["--tls-key-file", &file("server-key.pem")])
                .args(["--tls-client-cert-file", &file("client-cert.pem")])
                .args(["--tls-client-key-file", &file("client-key.pem")])
                .args(["--tls-ca-cert-file", &file("ca-cert.pem")])
                .args(["--tls-auth-clients", "yes"])
                .args(["--tls-cluster", "yes", "--tls-replication", "yes"]);
        }
        None => {
            command.args(["--port", &port.to_string()]);
        }
    }
    command
        .current_dir(&node_dir)
        .args(["--bind", ip])
        .args([
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
        ])
        .args(["--cluster-node-timeout", "2000"])
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
        .args(["--logfile", "redis.log"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting redis-server")
}

impl RedisCluster {
    /// Starts the nodes and joins them; returns once every slot is served.
    pub fn start(masters: usize, replicas: usize) -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1", masters, replicas)
    }

    /// [`RedisCluster::start`] on address `ip` of this host (one reachable
    /// from a destination namespace too: [`crate::netns::SiteLan`]).
    pub fn start_on(ip: &str, masters: usize, replicas: usize) -> anyhow::Result<Self> {
        Self::start_with(ip, None, masters, replicas)
    }

    /// A cluster on loopback that speaks only TLS and requires client
    /// certificates, with the test PKI in `pki`
    /// ([`crate::link_security::test_pki`]).
    pub fn start_tls(pki: &Path, masters: usize, replicas: usize) -> anyhow::Result<Self> {
        Self::start_with("127.0.0.1", Some(pki), masters, replicas)
    }

    fn start_with(
        ip: &str,
        tls: Option<&Path>,
        masters: usize,
        replicas: usize,
    ) -> anyhow::Result<Self> {
        available().map_err(anyhow::Error::msg)?;
        let dir = TempDir::new("pagefp-redis");
        let mut nodes = Vec::new();
        for _ in 0..masters * (1 + replicas) {
            let port = free_pair(ip)?;
            let child = start_node(ip, tls, &dir.0, port)?;
            nodes.push(Node {
                port,
                child: Some(child),
            });
        }
        let cluster = Self {
            nodes,
            ip: ip.to_owned(),
            tls: tls.map(Path::to_path_buf),
            _dir: dir,
        };
        for node in &cluster.nodes {
            cluster.wait_for(node.port, "PONG", &["ping"])?;
        }
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|node| format!("{}:{}", cluster.ip, node.port))
            .collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addresses.iter().map(String::as_str));
        let replicas = replicas.to_string();
        args.extend(["--cluster-replicas", &replicas, "--cluster-yes"]);
        let created = cluster.cli(cluster.nodes[0].port, &args)?;
        if !created.contains("All 16384 slots covered") {
            bail!("redis-cli --cluster create failed:\n{created}");
        }
        for node in &cluster.nodes {
            cluster.wait_for(node.port, "cluster_state:ok", &["cluster", "info"])?;
        }
        Ok(cluster)
    }

    /// `redis-cli` against the node on `port`.
    fn cli(&self, port: u16, args: &[&str]) -> anyhow::Result<String> {
        cli(&self.ip, self.tls.as_deref(), port, args)
    }

    fn wait_for(&self, port: u16, expected: &str, args: &[&str]) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let said = self.cli(port, args)?;
            if said.contains(expected) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("Redis node {port} did not answer `{expected}` within 30 s: {said}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The certificates of a TLS cluster (`None`: plaintext).
    pub fn tls_dir(&self) -> Option<PathBuf> {
        self.tls.clone()
    }

    /// `redis://IP:PORT` (`rediss://` with TLS) of every node still running.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|node| node.child.is_some())
            .map(|node| {
                let scheme = if self.tls.is_some() {
                    "rediss"
                } else {
                    "redis"
                };
                format!("{scheme}://{}:{}", self.ip, node.port)
            })
            .collect()
    }

    /// The ports of the current masters.
    pub fn master_ports(&self) -> anyhow::Result<Vec<u16>> {
        let port = self
            .nodes
            .iter()
            .find(|node| node.child.is_some())
            .context("every node is down")?
            .port;
        Ok(self
            .cli(port, &["cluster", "nodes"])?
            .lines()
            .filter(|line| line.contains("master") && !line.contains("fail"))
            .filter_map(|line| line.split_whitespace().nth(1))
            .filter_map(|address| address.split(['@', ':']).nth(1)?.parse().ok())
            .collect())
    }

    /// Waits until every node lists a replica for every shard. Redis lists
    /// a replica (in CLUSTER SLOTS, which clients route reads by) only once
    /// it has replicated something and the cluster bus has said so, so a
    /// test that reads from replicas must store its data first, then wait.
    pub fn wait_replicas_listed(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let running: Vec<u16> = self
            .nodes
            .iter()
            .filter(|node| node.child.is_some())
            .map(|node| node.port)
            .collect();
        // Every node's view: a client takes its slot map from any of them,
        // and each learns the replicas' offsets by gossip, at its own time.
        for port in running {
            loop {
                let said = self.cli(port, &["--json", "cluster", "slots"])?;
                let slots: serde_json::Value = serde_json::from_str(&said).unwrap_or_default();
                let listed = slots.as_array().is_some_and(|shards| {
                    !shards.is_empty()
                        && shards
                            .iter()
                            .all(|shard| shard.as_array().is_some_and(|s| s.len() >= 4))
                });
                if listed {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("node {port} did not list a replica for every shard within 30 s: {said}");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// CPU seconds (user and system) the running nodes have used.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        // SAFETY: sysconf only reads a configuration value.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let mut total = 0.0;
        for child in self.nodes.iter().filter_map(|node| node.child.as_ref()) {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id()))?;
            // Fields after the command name (which may hold spaces): state
            // is the 3rd field; utime and stime the 14th and 15th.
            let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
            let fields: Vec<&str> = after.split_whitespace().collect();
            let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
            total += field(14).unwrap_or(0.0) + field(15).unwrap_or(0.0);
        }
        Ok(total / ticks)
    }

    /// The process id of the node on `port`, while it runs.
    pub fn pid(&self, port: u16) -> Option<u32> {
        let node = self.nodes.iter().find(|node| node.port == port)?;
        node.child.as_ref().map(Child::id)
    }

    /// Kills the node on `port` (SIGKILL: a host that dies).
    pub fn kill(&mut self, port: u16) -> anyhow::Result<()> {
        let node = self
            .nodes
            .iter_mut()
            .find(|node| node.port == port)
            .with_context(|| format!("no Redis node on port {port}"))?;
        if let Some(mut child) = node.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Keys on all running masters matching `pattern` (for the tests).
    pub fn count_keys(&self, pattern: &str) -> anyhow::Result<u64> {
        let mut total = 0;
        for port in self.master_ports()? {
            let said = self.cli(port, &["--scan", "--pattern", pattern])?;
            total += said.lines().filter(|line| !line.is_empty()).count() as u64;
        }
        Ok(total)
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
