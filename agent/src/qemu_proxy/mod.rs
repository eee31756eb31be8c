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

use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

use crate::{
    catalog::{sources::TemplateSources, store::TemplateStore},
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
    /// Carry streams with features the parser does not understand (block
    /// migration, unknown capabilities or RAM records) unchanged instead of
    /// refusing them; they are not deduplicated from that point on.
    #[arg(long)]
    pub pass_through_unsupported: bool,
    /// Give up when QEMU does not connect within this many seconds.
    #[arg(long)]
    pub timeout_s: Option<u64>,
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
    /// Pages that travelled as template references.
    pub template_pages: u64,
    pub zero_pages: u64,
    /// XBZRLE and compressed pages: passed on as they are.
    pub xbzrle_pages: u64,
    pub compressed_pages: u64,
    pub templates_offered: u64,
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
                zstd: !args.no_zstd,
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
            };
            (receive::receive(&options, &templates)?, args.json)
        }
    };
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "proxied {} bytes of QEMU stream as {} bytes ({:.1}%): {} pages, {} as templates, {} zero{}; link: {}",
            report.stream_bytes,
            report.wire_bytes,
            100.0 * report.wire_bytes as f64 / report.stream_bytes.max(1) as f64,
            report.pages,
            report.template_pages,
            report.zero_pages,
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

/// The templates the receive proxy offers: catalog files, installed
/// catalogs, the local agent's VMs. Every page is hashed again here.
pub fn load_templates(args: &ReceiveArgs) -> anyhow::Result<TemplateStore> {
    if !args.templates.site.nodes.is_empty() {
        anyhow::bail!(
            "the QEMU proxies do not use the site store yet (only `pagefp migrate receive` does): \
             drop --site-store (the proxies use this host's catalogs and VMs)"
        );
    }
    let mut set = TemplateStore::default();
    for (source, catalog) in args.templates.load()?.catalogs {
        let added = set.add(&catalog);
        log::info!("{source}: {} templates ({added} new)", catalog.len());
    }
    Ok(set)
}

#[cfg(test)]
mod tests;
