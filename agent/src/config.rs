//! The agent's configuration: `/etc/pagefp/pagefp.toml`, every key optional,
//! command-line flags override it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

pub const DEFAULT_CONFIG: &str = "/etc/pagefp/pagefp.toml";
pub const DEFAULT_SOCKET: &str = "/run/pagefp/pagefp.sock";
/// Default Prometheus endpoint (loopback only).
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9641";

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// API socket (mode 0600: root only).
    pub socket: PathBuf,
    /// Prometheus `/metrics` address.
    pub metrics_addr: SocketAddr,
    /// Hash worker threads; 0 = one per CPU.
    pub hash_threads: usize,
    /// Nice value of the hash worker threads (-20..=19; raised, hashing
    /// yields to the guests, and pages take longer to be clean).
    pub hash_nice: i32,
    /// eBPF event ring buffer size in bytes (power of two, >= 4096).
    pub ring_buffer_bytes: u32,
    /// Pages per second read to rescan VMs that are not dirty-tracked.
    pub rescan_pages_per_sec: u32,
    /// Milliseconds a re-protected page must stay unwritten before it is
    /// rehashed (pages the guest keeps writing are not hashed again and again).
    pub rehash_delay_ms: u64,
    /// A content becomes a template candidate when this many VMs hold it.
    pub min_vms: u32,
    /// Memory the templates may use at a destination, in bytes.
    pub template_budget_bytes: u64,
    /// Map sealed memfd guest memory instead of copying it.
    pub zero_copy: bool,
    /// Rescans of untracked VMs skip blake3 for pages whose xxh3-64 did not
    /// change since they were last hashed.
    pub rescan_change_detection: bool,
    /// Seconds between scans for QEMU guests without KVM whose RAM is a
    /// shared memory backend; 0 turns the scan off.
    pub qemu_scan_secs: u64,
    /// Which eBPF program watches dirty-ring pushes (the per-page hot path).
    pub ring_push_program: RingPushProgram,
    /// Turn on the kernel's run-time statistics of eBPF programs
    /// (`BPF_ENABLE_STATS`) while the agent runs, so `GET /v1/status` and
    /// the metrics show what each program costs. Off by default: it adds two
    /// clock reads to every program run.
    pub ebpf_run_stats: bool,
    /// Track only the VMs whose process environment holds this
    /// `NAME=VALUE` (none: every VM of the host). Lets several agents on
    /// one machine act as different hosts, or one agent serve one tenant.
    pub only_vms_with_env: Option<String>,
    /// The site-wide template store this host publishes to.
    pub site: SiteConfig,
}

/// Where the site-wide template store is, and how a client may reach it:
/// the `[site]` section of the agent's config and the `--site-store` flags
/// of the agent and both receivers.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct SiteStoreConfig {
    /// A node of the site's Redis cluster: `rediss://HOST:PORT` (TLS) or
    /// `redis://HOST:PORT` (plaintext, with --site-store-plaintext). One is
    /// enough, the others are discovered; repeat for more. None: no site
    /// store, only this host's templates.
    #[arg(
        long = "site-store",
        id = "site_store",
        value_name = "rediss://HOST:PORT"
    )]
    pub nodes: Vec<String>,
    /// Accept an unencrypted connection to the site store (`redis://`).
    /// Template pages are checked against their hashes, so the store cannot
    /// make a guest wrong, but anyone on that network can read them: only
    /// on a network you trust.
    #[arg(long = "site-store-plaintext", id = "site_store_plaintext")]
    pub plaintext: bool,
    /// For `rediss://` nodes: the directory holding the CA that signed the
    /// nodes' certificates (ca-cert.pem) and this host's client
    /// certificate (client-cert.pem, client-key.pem; sent when present,
    /// for Redis's `tls-auth-clients`). Default: /etc/pki/qemu, the
    /// migration link's.
    #[arg(
        long = "site-store-tls-dir",
        id = "site_store_tls_dir",
        value_name = "DIR"
    )]
    pub tls_dir: Option<std::path::PathBuf>,
}

/// The agent's part in the site catalog (see docs/site-catalog.md).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct SiteConfig {
    /// The site's Redis cluster nodes (see [`SiteStoreConfig::nodes`]).
    pub nodes: Vec<String>,
    /// See [`SiteStoreConfig::plaintext`].
    pub plaintext: bool,
    /// See [`SiteStoreConfig::tls_dir`].
    pub tls_dir: Option<std::path::PathBuf>,
    /// This host's name in the store (default: the machine's hostname).
    pub host_id: Option<String>,
    /// Seconds a host's counts stay in the store after its last renewal.
    pub lease_secs: u64,
    /// Milliseconds between publications of changed counts.
    pub publish_ms: u64,
    /// A content's page is stored once this many hosts hold it.
    pub min_hosts: u32,
    /// Seconds a stored page is kept after a host last reported holding it.
    pub page_ttl_secs: u64,
    /// Most bytes of template pages the site stores (0: no limit). Over it,
    /// the site's curator (one host at a time) keeps the best ranked 90%.
    pub budget_bytes: u64,
    /// Seconds between the curator's passes (its lease lasts two).
    pub curate_secs: u64,
}

impl SiteConfig {
    /// How to reach the store.
    pub fn store(&self) -> SiteStoreConfig {
        SiteStoreConfig {
            nodes: self.nodes.clone(),
            plaintext: self.plaintext,
            tls_dir: self.tls_dir.clone(),
        }
    }
}

impl Default for SiteConfig {
    fn default() -> Self {
        Self {
            nodes: Vec::new(),
            plaintext: false,
            tls_dir: None,
            host_id: None,
            lease_secs: 30,
            publish_ms: 2000,
            min_hosts: 2,
            page_ttl_secs: 7 * 24 * 3600,
            budget_bytes: 4 << 30,
            curate_secs: 300,
        }
    }
}

/// The eBPF program on `kvm_dirty_ring_push`, from cheapest to most costly
/// per page the guest dirties.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RingPushProgram {
    /// The first of `btf`, `raw`, `tracepoint` the kernel takes.
    #[default]
    Auto,
    /// A BTF-typed tracepoint (`tp_btf`): reads the ring's indexes in place.
    Btf,
    /// A raw tracepoint: reads them with one helper call.
    Raw,
    /// The classic tracepoint: the kernel formats a trace record first.
    Tracepoint,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            socket: DEFAULT_SOCKET.into(),
            metrics_addr: DEFAULT_METRICS_ADDR.parse().unwrap(),
            hash_threads: 0,
            hash_nice: 0,
            ring_buffer_bytes: 16 << 20,
            rescan_pages_per_sec: 25_600,
            rehash_delay_ms: 250,
            min_vms: 2,
            template_budget_bytes: 256 << 20,
            zero_copy: true,
            rescan_change_detection: true,
            qemu_scan_secs: 2,
            ring_push_program: RingPushProgram::Auto,
            ebpf_run_stats: false,
            only_vms_with_env: None,
            site: SiteConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("ring_buffer_bytes must be a power of two of at least 4096, not {0}")]
    RingSize(u32),
    #[error("min_vms must be at least 1")]
    MinVms,
    #[error("hash_nice must be a nice value, -20 to 19, not {0}")]
    Nice(i32),
    #[error("only_vms_with_env must be NAME=VALUE, not `{0}`")]
    EnvFilter(String),
    #[error(
        "site: lease_secs, publish_ms and min_hosts must be at least 1, and publish_ms under lease_secs (so a lease is renewed before it ends)"
    )]
    SiteTimes,
}

impl Config {
    /// Reads `path`; a missing file at the default path means defaults.
    pub fn load(path: &Path, explicit: bool) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Self::default());
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.into(),
                    source,
                });
            }
        };
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.ring_buffer_bytes.is_power_of_two() || self.ring_buffer_bytes < 4096 {
            return Err(ConfigError::RingSize(self.ring_buffer_bytes));
        }
        if self.min_vms == 0 {
            return Err(ConfigError::MinVms);
        }
        if !(-20..=19).contains(&self.hash_nice) {
            return Err(ConfigError::Nice(self.hash_nice));
        }
        if let Some(filter) = &self.only_vms_with_env
            && filter
                .split_once('=')
                .is_none_or(|(name, _)| name.is_empty())
        {
            return Err(ConfigError::EnvFilter(filter.clone()));
        }
        let site = &self.site;
        if site.lease_secs == 0
            || site.publish_ms == 0
            || site.min_hosts == 0
            || site.publish_ms >= site.lease_secs.saturating_mul(1000)
        {
            return Err(ConfigError::SiteTimes);
        }
        Ok(())
    }

    pub fn threads(&self) -> usize {
        if self.hash_threads > 0 {
            self.hash_threads
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_files_keep_defaults_and_unknown_keys_are_refused() {
        let config: Config = toml::from_str("min_vms = 3").unwrap();
        assert_eq!(config.min_vms, 3);
        assert_eq!(config.socket, PathBuf::from(DEFAULT_SOCKET));
        assert!(toml::from_str::<Config>("min_vm = 3").is_err());
        assert!(
            Config {
                ring_buffer_bytes: 5000,
                ..Config::default()
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn the_documented_example_parses() {
        let example = include_str!("../../docs/pagefp.toml");
        let config: Config = toml::from_str(example).unwrap();
        assert_eq!(config, Config::default());
    }
}
