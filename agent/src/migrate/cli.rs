//! Command-line arguments of `pagefp migrate` and `pagefp templates export|import`.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Args, Subcommand};

use super::{
    receiver::{self, ReceiveOptions},
    sender::{self, SendOptions},
};
use crate::{
    api::report::Mode,
    catalog::{
        self,
        agreement::Negotiation,
        sources::{BuildOptions, TemplateSources, build_from_agent},
    },
    compression::ZstdPolicy,
    config::DEFAULT_SOCKET,
    net::{Timeouts, tls},
};

#[derive(Debug, Subcommand)]
pub enum MigrateCommand {
    /// Migrate a running VM to `pagefp migrate receive` on another host.
    Send(SendArgs),
    /// Receive one migration into an incoming VMM, then exit.
    Receive(ReceiveArgs),
}

#[derive(Debug, Args)]
pub struct SendArgs {
    /// The source VMM's pid (as `pagefp status` shows it).
    #[arg(long)]
    pub pid: u32,
    /// The source VMM's control socket.
    #[arg(long)]
    pub vmm_socket: PathBuf,
    /// HOST:PORT where `pagefp migrate receive` listens.
    #[arg(long)]
    pub to: String,
    /// baseline (zero pages + raw pages, like QEMU), templates, or templates+zstd.
    #[arg(long, default_value = "templates")]
    pub mode: Mode,
    /// The local agent's API socket (hash lists, dirty tracking, metrics).
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub agent_socket: PathBuf,
    /// Bandwidth limit, like QEMU's max-bandwidth: bytes per second, with an
    /// optional K/M/G suffix (powers of 1000) or `Mbit`/`Gbit`.
    #[arg(long, value_parser = parse_bandwidth)]
    pub max_bandwidth: Option<u64>,
    /// Longest acceptable pause of the VM, in milliseconds.
    #[arg(long, default_value_t = 300)]
    pub downtime_ms: u64,
    /// Pre-copy rounds before the VM is paused even if the target is not met.
    #[arg(long, default_value_t = 30)]
    pub max_rounds: u32,
    /// After success, leave the source VMM paused instead of ending it.
    #[arg(long)]
    pub keep_source: bool,
    /// zstd level for `templates+zstd`: the one `--zstd always` uses, and
    /// the strongest `auto` picks (it also tries 1, -1 and -5 below it).
    #[arg(long, default_value_t = 3)]
    pub zstd_level: i32,
    /// Threads reading, hashing and compressing pages, besides the one
    /// writing to the network (default: half the CPUs, at least one, so
    /// the host's guests keep the rest).
    #[arg(long)]
    pub threads: Option<usize>,
    /// `templates+zstd`: compress a frame of full pages only when that
    /// saves more link time than it costs CPU (auto), or always.
    #[arg(long, value_enum, default_value = "auto")]
    pub zstd: ZstdPolicy,
    #[command(flatten)]
    pub timeouts: Timeouts,
    #[command(flatten)]
    pub security: tls::ConnectSecurity,
    /// Print the final report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ReceiveArgs {
    /// Address to accept the migration on.
    #[arg(long)]
    pub listen: String,
    /// The incoming VMM's control socket (`pagefp-testvmm --incoming`).
    #[arg(long)]
    pub vmm_socket: PathBuf,
    #[command(flatten)]
    pub templates: TemplateSources,
    /// Leave the migrated VM paused instead of resuming it.
    #[arg(long)]
    pub no_resume: bool,
    /// Give up when no migration arrives within this many seconds.
    #[arg(long)]
    pub timeout_s: Option<u64>,
    /// How the templates are agreed: `auto` picks the cheaper of offering
    /// this host's catalog and asking for the VM's contents (always asking
    /// when a site store is configured); `offer` and `query` force one
    /// (to compare them).
    #[arg(long, value_enum, default_value_t = Negotiation::Auto)]
    pub negotiation: Negotiation,
    #[command(flatten)]
    pub timeouts: Timeouts,
    #[command(flatten)]
    pub security: tls::ListenSecurity,
    /// Print the final report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum CatalogCommand {
    /// Write the templates (with their pages) of chosen VMs to a file.
    Export(ExportArgs),
    /// Check a catalog file and install it for `pagefp migrate receive`.
    Import(ImportArgs),
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Output file.
    #[arg(long)]
    pub out: PathBuf,
    /// Only these VMs (pids, comma-separated); default: all the agent tracks.
    #[arg(long, value_delimiter = ',')]
    pub vms: Vec<u32>,
    /// Leave these VMs out (pids, comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub exclude: Vec<u32>,
    /// A content must be held by at least this many of the VMs.
    #[arg(long, default_value_t = 2)]
    pub min_vms: u32,
    /// Template budget in MiB (the agent's `template_budget_bytes` default).
    #[arg(long, default_value_t = 256)]
    pub budget_mib: u64,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The catalog file (from `pagefp templates export`).
    pub file: PathBuf,
    /// Where to install it.
    #[arg(long, default_value = catalog::DEFAULT_DIR)]
    pub dir: PathBuf,
}

fn parse_bandwidth(text: &str) -> Result<u64, String> {
    let lower = text.trim().to_ascii_lowercase();
    let (number, scale) = [
        ("gbit", 1e9 / 8.0),
        ("mbit", 1e6 / 8.0),
        ("kbit", 1e3 / 8.0),
        ("g", 1e9),
        ("m", 1e6),
        ("k", 1e3),
    ]
    .iter()
    .find_map(|(suffix, scale)| lower.strip_suffix(suffix).map(|n| (n.to_string(), *scale)))
    .unwrap_or((lower.clone(), 1.0));
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a bandwidth: use e.g. 12500000, 100Mbit or 1G"))?;
    if value <= 0.0 {
        return Err("the bandwidth limit must be positive".into());
    }
    Ok((value * scale) as u64)
}

pub fn run_migrate(command: MigrateCommand, show_progress: bool) -> anyhow::Result<()> {
    match command {
        MigrateCommand::Send(args) => {
            // Before anything is paused: a Ctrl-C then never strands the VM.
            super::interrupt::install()?;
            // Certificates are read before the VM is touched.
            let security = tls::Client::from_options(&args.security)?;
            let options = SendOptions {
                pid: args.pid,
                vmm_socket: args.vmm_socket,
                to: args.to,
                mode: args.mode,
                agent_socket: args.agent_socket,
                max_bandwidth: args.max_bandwidth,
                downtime_ms: args.downtime_ms,
                max_rounds: args.max_rounds.max(1),
                keep_source: args.keep_source,
                progress: show_progress,
                zstd_level: args.zstd_level,
                threads: args.threads.unwrap_or_else(default_threads).max(1),
                zstd_policy: args.zstd,
                timeouts: args.timeouts,
                security,
            };
            let report = sender::send(&options)?;
            if args.json {
                receiver::print_json(&report)?;
            } else {
                println!(
                    "migrated VM pid {} in {:.2} s ({} rounds, downtime {:.0} ms): {} bytes on the wire; pages: {} zero, {} template, {} full, {} zstd; verified",
                    report.vm_pid,
                    report.elapsed_seconds,
                    report.round,
                    report.downtime_ms.unwrap_or(0.0),
                    report.wire_bytes,
                    report.pages.zero,
                    report.pages.template,
                    report.pages.full,
                    report.pages.zstd
                );
            }
            Ok(())
        }
        MigrateCommand::Receive(args) => {
            let options = ReceiveOptions {
                listen: args.listen,
                vmm_socket: args.vmm_socket,
                templates: args.templates,
                resume: !args.no_resume,
                progress: show_progress,
                accept_timeout: args.timeout_s.map(Duration::from_secs),
                negotiation: args.negotiation,
                timeouts: args.timeouts,
                security: tls::Server::from_options(&args.security)?,
            };
            let report = receiver::receive(&options)?;
            if args.json {
                receiver::print_json(&report)?;
            } else {
                println!(
                    "received VM into pid {} in {:.2} s: {} bytes on the wire, {} templates agreed, memory verified{}",
                    report.vm_pid,
                    report.elapsed_seconds,
                    report.wire_bytes,
                    report.templates_agreed,
                    if options.resume {
                        ", VM resumed"
                    } else {
                        ", VM left paused"
                    }
                );
            }
            Ok(())
        }
    }
}

pub fn run_catalog(command: CatalogCommand, agent_socket: &std::path::Path) -> anyhow::Result<()> {
    match command {
        CatalogCommand::Export(args) => {
            let options = BuildOptions {
                vms: args.vms,
                exclude: args.exclude,
                min_vms: args.min_vms,
                budget_bytes: args.budget_mib << 20,
            };
            let catalog = build_from_agent(agent_socket, &options)?;
            let bytes = catalog
                .save(&args.out)
                .with_context(|| format!("writing {}", args.out.display()))?;
            println!(
                "{}: {} templates ({} MiB of pages) in {bytes} bytes",
                args.out.display(),
                catalog.len(),
                catalog.pages.len() >> 20
            );
            Ok(())
        }
        CatalogCommand::Import(args) => {
            let (path, catalog) = catalog::import(&args.file, &args.dir)?;
            println!(
                "installed {} templates as {}",
                catalog.len(),
                path.display()
            );
            Ok(())
        }
    }
}

/// Half the CPUs this process may use, at least one.
fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidths_parse_with_units() {
        assert_eq!(parse_bandwidth("100Mbit"), Ok(12_500_000));
        assert_eq!(parse_bandwidth("1G"), Ok(1_000_000_000));
        assert_eq!(parse_bandwidth("4096"), Ok(4096));
        assert!(parse_bandwidth("fast").is_err());
        assert!(parse_bandwidth("-1").is_err());
    }
}
