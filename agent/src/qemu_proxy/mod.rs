//! `pagefp qemu-proxy send|receive`: template deduplication for unmodified
//! QEMU. The source QEMU migrates to the local send proxy (`migrate
//! tcp:127.0.0.1:PORT`); the send proxy parses QEMU's stream
//! ([`crate::qemu_stream`]), replaces every RAM page whose content the
//! receive proxy offered as a template by a reference, and carries the rest
//! unchanged ([`wire`]); the receive proxy rebuilds QEMU's exact stream for
//! the destination QEMU (`-incoming tcp:...`). See `docs/qemu-proxy.md`.

mod channels;
mod chunks;
pub mod receive;
pub mod send;
pub mod templates;

use std::time::Duration;

/// How long a peer may take to start listening (the receive proxy for the
/// send proxy, the destination QEMU for the receive proxy): refused
/// connects are retried for this long.
const CONNECT_RETRY: Duration = Duration::from_secs(10);

use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

use crate::{
    api::report::SiteFetch,
    catalog::{agreement::Negotiation, sources::TemplateSources, store::TemplateStore},
    compression::ZstdPolicy,
    config::DEFAULT_SOCKET,
    net::{Timeouts, tls},
    qemu_stream::{Options, Unsupported},
};

#[derive(Debug, Subcommand)]
pub enum ProxyCommand {
    /// Beside the source QEMU: accept its migration stream, send it deduplicated.
    Send(SendArgs),
    /// Beside the destination QEMU: rebuild the stream and feed QEMU's -incoming.
    Receive(ReceiveArgs),
}

#[derive(Debug, Args)]
pub struct SendArgs {
    /// Where the source QEMU migrates to (`migrate tcp:THIS`).
    #[arg(long)]
    pub listen: String,
    /// The receive proxy, HOST:PORT.
    #[arg(long)]
    pub to: String,
    /// Do not zstd-compress what travels unchanged.
    #[arg(long)]
    pub no_zstd: bool,
    /// Compress a chunk only when that saves more link time than it costs
    /// CPU, measured as it runs (auto), or every chunk (always).
    #[arg(long, value_enum, default_value = "auto")]
    pub zstd: ZstdPolicy,
    /// The strongest zstd level `auto` picks (it also tries 1, -1 and -5
    /// below it), and the one `always` uses.
    #[arg(long, default_value_t = 3)]
    pub zstd_level: i32,
    /// Carry streams with features the parser does not understand (block
    /// migration, unknown capabilities or RAM records) unchanged instead of
    /// refusing them; they are not deduplicated from that point on.
    #[arg(long)]
    pub pass_through_unsupported: bool,
    /// Give up when QEMU does not connect within this many seconds.
    #[arg(long)]
    pub timeout_s: Option<u64>,
    /// The local agent, asked for the source QEMU's hash list when the
    /// receive proxy asks which of the VM's contents it holds.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub agent_socket: PathBuf,
    /// The source QEMU's process id, for its hash list. Default: the
    /// process that connects (found in /proc when QEMU runs on this host).
    #[arg(long)]
    pub vm_pid: Option<u32>,
    /// Never list the VM's contents: the receive proxy offers its catalog.
    #[arg(long)]
    pub no_listing: bool,
    #[command(flatten)]
    pub timeouts: Timeouts,
    #[command(flatten)]
    pub security: tls::ConnectSecurity,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ReceiveArgs {
    /// Address the send proxy connects to.
    #[arg(long)]
    pub listen: String,
    /// The destination QEMU's `-incoming tcp:` address.
    #[arg(long)]
    pub qemu: String,
    #[command(flatten)]
    pub templates: TemplateSources,
    /// Offer this host's catalog, or ask for the VM's contents (when the
    /// send proxy can list them) and answer which this host or the site
    /// store holds.
    #[arg(long, value_enum, default_value_t = Negotiation::Auto)]
    pub negotiation: Negotiation,
    /// Give up when no send proxy connects within this many seconds.
    #[arg(long)]
    pub timeout_s: Option<u64>,
    #[command(flatten)]
    pub timeouts: Timeouts,
    #[command(flatten)]
    pub security: tls::ListenSecurity,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// What one proxied migration did (each proxy reports its side).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProxyReport {
    /// Bytes of QEMU's own stream.
    pub stream_bytes: u64,
    /// Bytes on the WAN connection, both directions.
    pub wire_bytes: u64,
    /// RAM `PAGE` records (send side).
    pub pages: u64,
    /// How chunks were compressed: what `--zstd auto` chose, and why (send
    /// side).
    #[serde(default)]
    pub compression: Option<String>,
    /// Pages that travelled as template references.
    pub template_pages: u64,
    pub zero_pages: u64,
    /// XBZRLE and compressed pages: passed on as they are.
    pub xbzrle_pages: u64,
    pub compressed_pages: u64,
    /// Templates agreed on: offered, or held of the VM's listed contents.
    pub templates_offered: u64,
    /// How they were agreed on (`offer: N templates`, `query: K of the
    /// VM's N contents held`).
    #[serde(default)]
    pub negotiation: Option<String>,
    /// Bytes on the WAN connection before the first chunk, both directions.
    #[serde(default)]
    pub negotiation_bytes: u64,
    /// What the site store delivered (receive side, when one is configured).
    #[serde(default)]
    pub site: Option<SiteFetch>,
    /// The RAM section ended normally (send side).
    pub ram_complete: bool,
    /// Where and why the stream was passed through without deduplication.
    pub pass_through: Option<String>,
    pub seconds: f64,
    /// The WAN link was TLS 1.3 with both proxies authenticated.
    #[serde(default)]
    pub tls: bool,
    /// How the WAN link was secured (cipher and peer certificate, or plaintext).
    #[serde(default)]
    pub channel: String,
    /// Bytes of the destination QEMU's return path relayed to the source
    /// (send side; 0 without the `return-path` capability).
    #[serde(default)]
    pub return_path_bytes: u64,
    /// CPU seconds this proxy's process used (all its threads).
    #[serde(default)]
    pub cpu_seconds: f64,
    /// QEMU connections relayed: 1, plus one per multifd channel.
    #[serde(default)]
    pub channels: u32,
    /// `multifd-compression` when the channels' pages were compressed by
    /// QEMU (carried unchanged, not deduplicated).
    #[serde(default)]
    pub multifd_compression: Option<String>,
}

pub fn run(command: ProxyCommand) -> anyhow::Result<()> {
    let (report, json) = match command {
        ProxyCommand::Send(args) => {
            let options = send::SendOptions {
                listen: args.listen.clone(),
                to: args.to.clone(),
                zstd: (!args.no_zstd).then_some(args.zstd),
                zstd_level: args.zstd_level,
                parser: Options {
                    unsupported: if args.pass_through_unsupported {
                        Unsupported::PassThrough
                    } else {
                        Unsupported::Refuse
                    },
                },
                timeout: args.timeout_s.map(Duration::from_secs),
                timeouts: args.timeouts,
                security: tls::Client::from_options(&args.security)?,
                listing: if args.no_listing {
                    send::Listing::Nothing
                } else {
                    send::Listing::Agent {
                        socket: args.agent_socket.clone(),
                        vm_pid: args.vm_pid,
                    }
                },
            };
            (send::send(&options)?, args.json)
        }
        ProxyCommand::Receive(args) => {
            let security = tls::Server::from_options(&args.security)?;
            let templates = load_templates(&args)?;
            let options = receive::ReceiveOptions {
                listen: args.listen.clone(),
                qemu: args.qemu.clone(),
                timeout: args.timeout_s.map(Duration::from_secs),
                timeouts: args.timeouts,
                security,
                negotiation: args.negotiation,
                site: args.templates.site.clone(),
            };
            (receive::receive(&options, templates)?, args.json)
        }
    };
    let report = ProxyReport {
        cpu_seconds: crate::clock::process_cpu_ns() as f64 / 1e9,
        ..report
    };
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "proxied {} bytes of QEMU stream as {} bytes ({:.1}%): {} pages, {} as templates, {} zero; {}{}; link: {}",
            report.stream_bytes,
            report.wire_bytes,
            100.0 * report.wire_bytes as f64 / report.stream_bytes.max(1) as f64,
            report.pages,
            report.template_pages,
            report.zero_pages,
            report.negotiation.as_deref().unwrap_or("no templates"),
            report
                .pass_through
                .as_ref()
                .map(|p| format!("; passed through {p}"))
                .unwrap_or_default(),
            report.channel
        );
    }
    Ok(())
}

/// The templates the receive proxy holds: catalog files, installed
/// catalogs, the local agent's VMs (the site store's are fetched when the
/// VM's contents are known). Every page is hashed again here.
pub fn load_templates(args: &ReceiveArgs) -> anyhow::Result<TemplateStore> {
    let mut set = TemplateStore::default();
    for (source, catalog) in args.templates.load()?.catalogs {
        let added = set.add(&catalog);
        log::info!("{source}: {} templates ({added} new)", catalog.len());
    }
    Ok(set)
}

#[cfg(test)]
mod tests;
