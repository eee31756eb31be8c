//! Migrating a real QEMU guest directly and through `pagefp qemu-proxy`,
//! for the tests and the benchmark (`target/pagefp-bench/qemu-proxy.json`).

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;
use serde_json::json;

use crate::{
    agent_process::{TempDir, agent_binary, free_port},
    guest_images::GuestImage,
    netns::ShapedLink,
    qemu::QemuGuest,
};

/// Where the receive proxy takes its templates from.
#[derive(Clone, Debug)]
pub enum Templates {
    /// A catalog file (`pagefp templates export`), moved ahead of time.
    Catalog(std::path::PathBuf),
    /// The destination's own VMs, through its agent at this socket
    /// (`--local-templates`).
    Agent(std::path::PathBuf),
}

impl Templates {
    fn args(&self) -> Vec<std::ffi::OsString> {
        match self {
            Self::Catalog(path) => vec!["--templates".into(), path.into()],
            Self::Agent(socket) => vec![
                "--local-templates".into(),
                "--agent-socket".into(),
                socket.into(),
            ],
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Catalog(_) => "catalog",
            Self::Agent(_) => "agent",
        }
    }
}

/// One guest migrated directly and through the proxies.
#[derive(Clone, Debug, Serialize)]
pub struct ProxyRun {
    pub vm: String,
    /// `catalog` (a file exported from other guests' memory) or `agent`
    /// (the destination agent's own VMs).
    pub templates: String,
    pub link_mbit: u32,
    pub direct_wire_bytes: u64,
    pub proxied_wire_bytes: u64,
    pub direct_seconds: f64,
    pub proxied_seconds: f64,
    pub qemu_status: String,
    pub guest_resumed: bool,
    /// QEMU's own stream through the proxies, and what they saw in it.
    pub stream_bytes: u64,
    pub pages: u64,
    pub template_pages: u64,
    pub templates_offered: u64,
}

/// Where the two QEMUs and the proxies run: two namespaces of a shaped
/// link, or loopback.
pub struct Ends<'a> {
    pub link: Option<&'a ShapedLink>,
}

impl Ends<'_> {
    fn source(&self) -> Option<Command> {
        self.link.map(ShapedLink::in_source)
    }

    fn dest(&self) -> Option<Command> {
        self.link.map(ShapedLink::in_dest)
    }

    fn dest_ip(&self) -> String {
        self.link.map_or("127.0.0.1".into(), |l| l.dest_ip.clone())
    }

    fn mbit(&self) -> u32 {
        self.link.map_or(0, |l| l.mbit)
    }
}

fn wrapped(wrap: Option<Command>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match wrap {
        Some(mut command) => {
            command.arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// Boots the guest at both ends, waits `run_seconds` of workload, and
/// migrates it (through the proxies if `proxy` is given).
fn migrate_once(
    image: &GuestImage,
    ends: &Ends,
    dir: &TempDir,
    run_seconds: u64,
    proxy: Option<&Templates>,
) -> anyhow::Result<(u64, f64, String, bool, Option<serde_json::Value>)> {
    let tag = if proxy.is_some() { "proxied" } else { "direct" };
    let qemu_port = free_port();
    let mut source = QemuGuest::boot(
        &image.spec(),
        &dir.0,
        &format!("{tag}-src-{}", image.name),
        ends.source(),
    )?;
    let mut spec = image.spec();
    spec.extra = vec![
        "-incoming".into(),
        format!(
            "tcp:{}:{qemu_port}",
            if proxy.is_some() {
                "127.0.0.1".into()
            } else {
                ends.dest_ip()
            }
        ),
    ];
    let mut dest = QemuGuest::boot(
        &spec,
        &dir.0,
        &format!("{tag}-dst-{}", image.name),
        ends.dest(),
    )?;
    source.wait_serial(
        &format!("pagefp-ready {}", image.workload),
        Duration::from_secs(180),
    )?;
    std::thread::sleep(Duration::from_secs(run_seconds));
    source.qmp.execute(
        "migrate-set-parameters",
        Some(json!({"max-bandwidth": 10_000_000_000u64, "downtime-limit": 300})),
    )?;
    let mut proxies = None;
    let uri = match proxy {
        None => format!("tcp:{}:{qemu_port}", ends.dest_ip()),
        Some(templates) => {
            let wan = format!("{}:{}", ends.dest_ip(), free_port());
            let local = format!("127.0.0.1:{}", free_port());
            let receive = wrapped(ends.dest(), agent_binary())
                .args([
                    "qemu-proxy",
                    "receive",
                    "--json",
                    "--no-installed",
                    "--timeout-s",
                    "120",
                    "--listen",
                    &wan,
                ])
                .args(["--qemu", &format!("127.0.0.1:{qemu_port}")])
                .args(templates.args())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting pagefp qemu-proxy receive")?;
            std::thread::sleep(Duration::from_millis(800));
            let send = wrapped(ends.source(), agent_binary())
                .args([
                    "qemu-proxy",
                    "send",
                    "--json",
                    "--listen",
                    &local,
                    "--to",
                    &wan,
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting pagefp qemu-proxy send")?;
            std::thread::sleep(Duration::from_millis(500));
            proxies = Some((send, receive));
            format!("tcp:{local}")
        }
    };
    let started = Instant::now();
    source.qmp.migrate(&uri)?;
    let info = source.qmp.wait_migration(Duration::from_secs(900));
    let seconds = started.elapsed().as_secs_f64();
    let mut proxy_report = None;
    if let Some((send, receive)) = proxies {
        let sent = send.wait_with_output()?;
        let received = receive.wait_with_output()?;
        if !sent.status.success() || !received.status.success() {
            bail!(
                "the proxies failed:\nsend: {}\nreceive: {}",
                String::from_utf8_lossy(&sent.stderr),
                String::from_utf8_lossy(&received.stderr)
            );
        }
        proxy_report =
            Some(serde_json::from_slice(&sent.stdout).context("the send proxy's report")?);
    }
    let info = info?;
    let status = info["status"].as_str().unwrap_or("?").to_string();
    std::thread::sleep(Duration::from_millis(200));
    if let Some(exit) = dest.exited() {
        bail!(
            "the destination QEMU ({tag}) exited ({exit}) after the source reported {status}: {}",
            std::fs::read_to_string(&dest.stderr_path)
                .unwrap_or_default()
                .trim()
        );
    }
    // The guest runs on at the destination: its heartbeat counter goes on.
    let deadline = Instant::now() + Duration::from_secs(60);
    while dest.qmp.status()? != "running" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let resumed = dest.qmp.status()? == "running" && {
        dest.wait_serial("pagefp-heartbeat", Duration::from_secs(30))
            .is_ok()
            && {
                let first = dest.heartbeat().unwrap_or(0);
                std::thread::sleep(Duration::from_secs(3));
                dest.heartbeat().unwrap_or(0) > first
            }
    };
    let wire = info["ram"]["transferred"].as_u64().unwrap_or(0);
    Ok((wire, seconds, status, resumed, proxy_report))
}

/// The same guest migrated directly, then through the proxies, on `ends`.
pub fn compare(
    image: &GuestImage,
    templates: &Templates,
    ends: &Ends,
    run_seconds: u64,
) -> anyhow::Result<ProxyRun> {
    let dir = TempDir::new("pagefp-qemu-proxy");
    let (direct_bytes, direct_seconds, direct_status, _, _) =
        migrate_once(image, ends, &dir, run_seconds, None)?;
    if direct_status != "completed" {
        bail!("the direct QEMU migration ended {direct_status}");
    }
    let (_, proxied_seconds, status, resumed, report) =
        migrate_once(image, ends, &dir, run_seconds, Some(templates))?;
    let report = report.context("no proxy report")?;
    let number = |key: &str| report[key].as_u64().unwrap_or(0);
    Ok(ProxyRun {
        vm: image.name.clone(),
        templates: templates.name().into(),
        link_mbit: ends.mbit(),
        direct_wire_bytes: direct_bytes,
        proxied_wire_bytes: number("wire_bytes"),
        direct_seconds,
        proxied_seconds,
        qemu_status: status,
        guest_resumed: resumed,
        stream_bytes: number("stream_bytes"),
        pages: number("pages"),
        template_pages: number("template_pages"),
        templates_offered: number("templates_offered"),
    })
}
