//! The command line, parsed once into a validated configuration.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, DEFAULT_CONFIG, DEFAULT_SOCKET, RingPushProgram};

#[derive(Debug, Parser)]
#[command(
    name = "pagefp",
    version,
    about = "Page fingerprints of KVM guests for template-based live migration"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (as root): track VMs with eBPF, hash their pages, serve the API.
    Agent(AgentArgs),
    /// Show the VMs the agent tracks.
    Status(ClientArgs),
    /// Show the top templates, or export/import template catalogs.
    Templates(TemplatesArgs),
    /// Live-migrate a VM (pre-copy, template-deduplicated).
    #[command(subcommand)]
    Migrate(crate::migrate::cli::MigrateCommand),
    /// Deduplicate unmodified QEMU's migration stream through a proxy pair.
    #[command(subcommand, name = "qemu-proxy")]
    QemuProxy(crate::qemu_proxy::ProxyCommand),
    /// TLS certificates for the WAN channels.
    #[command(subcommand)]
    Tls(TlsCommand),
}

#[derive(Debug, Subcommand)]
pub enum TlsCommand {
    /// Make a test CA and the server and client certificates (the layout of
    /// /etc/pki/qemu), for trials; a real site uses its own CA.
    MakeTestPki(crate::net::pki::TestPki),
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Config file (TOML); missing is fine at the default path.
    #[arg(long, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// API socket path.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Prometheus metrics address.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Hash worker threads (0 = one per CPU).
    #[arg(long)]
    pub hash_threads: Option<usize>,
    /// Nice value of the hash workers (-20..19; raised, hashing yields to the guests).
    #[arg(long, allow_hyphen_values = true)]
    pub hash_nice: Option<i32>,
    /// eBPF event ring buffer bytes (power of two).
    #[arg(long)]
    pub ring_buffer_bytes: Option<u32>,
    /// Rescan rate of untracked VMs, pages per second.
    #[arg(long)]
    pub rescan_pages_per_sec: Option<u32>,
    /// Milliseconds a written page must stay quiet before it is rehashed.
    #[arg(long)]
    pub rehash_delay_ms: Option<u64>,
    /// Minimum number of VMs holding a content for it to be a template.
    #[arg(long)]
    pub min_vms: Option<u32>,
    /// Template memory budget in bytes.
    #[arg(long)]
    pub template_budget_bytes: Option<u64>,
    /// Always copy guest memory (never map memfds).
    #[arg(long)]
    pub no_zero_copy: bool,
    /// Rescans hash every page with blake3 (no xxh3 change detection).
    #[arg(long)]
    pub no_change_detection: bool,
    /// Seconds between scans for QEMU guests without KVM on shared memory
    /// backends (0 = never).
    #[arg(long)]
    pub qemu_scan_secs: Option<u64>,
    /// The eBPF program on dirty-ring pushes (auto: the cheapest that loads).
    #[arg(long, value_enum)]
    pub ring_push_program: Option<RingPushProgram>,
    /// Turn on the kernel's eBPF run-time statistics while the agent runs
    /// (what each program costs, in `GET /v1/status` and the metrics).
    #[arg(long)]
    pub ebpf_run_stats: bool,
    /// Track only VMs whose process environment holds NAME=VALUE.
    #[arg(long, value_name = "NAME=VALUE")]
    pub only_vms_with_env: Option<String>,
    #[command(flatten)]
    pub site_store: crate::config::SiteStoreConfig,
    /// This host's name in the site store (default: the hostname).
    #[arg(long)]
    pub host_id: Option<String>,
}

impl AgentArgs {
    /// The file's configuration with the flags applied.
    pub fn config(&self) -> anyhow::Result<Config> {
        let explicit = self.config.as_os_str() != DEFAULT_CONFIG;
        let mut config = Config::load(&self.config, explicit)?;
        if let Some(v) = &self.socket {
            config.socket = v.clone();
        }
        if let Some(v) = self.metrics_addr {
            config.metrics_addr = v;
        }
        if let Some(v) = self.hash_threads {
            config.hash_threads = v;
        }
        if let Some(v) = self.hash_nice {
            config.hash_nice = v;
        }
        if let Some(v) = self.ring_buffer_bytes {
            config.ring_buffer_bytes = v;
        }
        if let Some(v) = self.rescan_pages_per_sec {
            config.rescan_pages_per_sec = v;
        }
        if let Some(v) = self.rehash_delay_ms {
            config.rehash_delay_ms = v;
        }
        if let Some(v) = self.min_vms {
            config.min_vms = v;
        }
        if let Some(v) = self.template_budget_bytes {
            config.template_budget_bytes = v;
        }
        if self.no_zero_copy {
            config.zero_copy = false;
        }
        if self.no_change_detection {
            config.rescan_change_detection = false;
        }
        if let Some(v) = self.qemu_scan_secs {
            config.qemu_scan_secs = v;
        }
        if let Some(v) = self.ring_push_program {
            config.ring_push_program = v;
        }
        if self.ebpf_run_stats {
            config.ebpf_run_stats = true;
        }
        if let Some(v) = &self.only_vms_with_env {
            config.only_vms_with_env = Some(v.clone());
        }
        if !self.site_store.nodes.is_empty() {
            config.site.nodes = self.site_store.nodes.clone();
        }
        if self.site_store.plaintext {
            config.site.plaintext = true;
        }
        if let Some(dir) = &self.site_store.tls_dir {
            config.site.tls_dir = Some(dir.clone());
        }
        if let Some(v) = &self.host_id {
            config.site.host_id = Some(v.clone());
        }
        config.validate()?;
        Ok(config)
    }
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The agent's API socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Print the raw JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct TemplatesArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// How many templates to show.
    #[arg(long, default_value_t = 20)]
    pub top: usize,
    #[command(subcommand)]
    pub action: Option<crate::migrate::cli::CatalogCommand>,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    /// Every subcommand's arguments are well formed (unique ids, valid
    /// defaults): clap checks these only when a command is first parsed.
    #[test]
    fn every_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
