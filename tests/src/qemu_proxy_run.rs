//! Migrating a real QEMU guest directly and through `pagefp qemu-proxy`,
//! for the tests and the benchmark (`target/pagefp-bench/qemu-proxy.json`).

use std::{
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use agent::qemu_proxy::ProxyReport;
use anyhow::{Context as _, bail};
use serde::Serialize;
use serde_json::json;

use crate::{
    agent_process::{AgentProcess, TempDir, agent_binary, free_port},
    guest_images::GuestImage,
    link_security::LinkSecurity,
    netns::ShapedLink,
    qemu::{QemuBuild, QemuGuest, Qmp},
};

/// Where the receive proxy takes its templates from.
#[derive(Clone, Debug)]
pub enum Templates {
    /// A catalog file (`pagefp templates export`), moved ahead of time.
    Catalog(std::path::PathBuf),
    /// The destination's own VMs, through its agent at this socket
    /// (`--local-templates`).
    Agent(std::path::PathBuf),
    /// The site store: a Redis cluster's nodes, over TLS with the
    /// certificates of `tls_dir`, or plaintext without one.
    Site {
        nodes: Vec<String>,
        tls_dir: Option<std::path::PathBuf>,
    },
}

impl Templates {
    pub fn args(&self) -> Vec<std::ffi::OsString> {
        match self {
            Self::Catalog(path) => vec!["--templates".into(), path.into()],
            Self::Agent(socket) => vec![
                "--local-templates".into(),
                "--agent-socket".into(),
                socket.into(),
            ],
            Self::Site { nodes, tls_dir } => {
                let mut args: Vec<std::ffi::OsString> = match tls_dir {
                    Some(dir) => vec!["--site-store-tls-dir".into(), dir.into()],
                    None => vec!["--site-store-plaintext".into()],
                };
                for node in nodes {
                    args.extend(["--site-store".into(), node.into()]);
                }
                args
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Catalog(_) => "catalog",
            Self::Agent(_) => "agent",
            Self::Site { .. } => "site",
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
    /// The proxied run's WAN link was TLS 1.3, both proxies authenticated.
    pub tls: bool,
    /// The QEMU both ends ran ("7.2", "10.0"), its accelerator, its
    /// migration channels (1: no multifd) and the capabilities switched on.
    pub qemu_version: String,
    pub accel: String,
    pub channels: u32,
    pub capabilities: Vec<String>,
    /// QEMU's own multifd compression, when on: those pages travel as
    /// QEMU compressed them (`compressed_pages`), not deduplicated.
    pub multifd_compression: Option<String>,
    pub compressed_pages: u64,
    /// The send proxy parsed RAM to its end (nothing passed through).
    pub dedup_to_end: bool,
    /// The proxied run's paused destination memory equals the paused
    /// source's (dumped after QEMU completed and the destination loaded
    /// everything, before it runs on); None if QEMU did not complete.
    pub memory_identical: Option<bool>,
    /// The same for QEMU's direct migration (the reference).
    pub direct_memory_identical: Option<bool>,
    /// The same guest through the proxies over plaintext, when measured:
    /// seconds and WAN bytes, and the TLS run's time ÷ this one's.
    pub plaintext_proxied_seconds: Option<f64>,
    pub plaintext_proxied_wire_bytes: Option<u64>,
    pub tls_time_ratio: Option<f64>,
    /// What the send proxy's compression gauge chose (its report's
    /// `compression`), in the proxied run and in the plaintext one.
    pub compression: Option<String>,
    pub plaintext_compression: Option<String>,
}

/// Migration capabilities switched on at each end.
#[derive(Clone, Copy, Debug, Default)]
pub struct Capabilities {
    pub source: &'static [&'static str],
    pub destination: &'static [&'static str],
    /// multifd at both ends: `multifd-channels` (0: no multifd) and
    /// `multifd-compression` (None: QEMU's default, none).
    pub multifd: u8,
    pub multifd_compression: Option<&'static str>,
}

impl Capabilities {
    /// These, with multifd on over `channels` channels.
    pub const fn with_multifd(self, channels: u8, compression: Option<&'static str>) -> Self {
        Self {
            multifd: channels,
            multifd_compression: compression,
            ..self
        }
    }

    /// Every capability switched on, at either end, and the multifd
    /// parameters (for reports).
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .source
            .iter()
            .chain(self.destination)
            .map(|n| n.to_string())
            .collect();
        if self.multifd > 0 {
            names.push("multifd".into());
            names.push(format!("multifd-channels={}", self.multifd));
            if let Some(compression) = self.multifd_compression {
                names.push(format!("multifd-compression={compression}"));
            }
        }
        names.sort();
        names.dedup();
        names
    }

    /// Switches them on in `source` and `destination` (the destination
    /// still waiting, started with `-incoming defer`).
    pub fn apply(&self, source: &mut Qmp, destination: &mut Qmp) -> anyhow::Result<()> {
        let on = |names: &[&'static str]| names.iter().map(|n| (*n, true)).collect::<Vec<_>>();
        if !self.source.is_empty() {
            source.migrate_set_capabilities(&on(self.source))?;
        }
        if !self.destination.is_empty() {
            destination.migrate_set_capabilities(&on(self.destination))?;
        }
        if self.multifd > 0 {
            let mut parameters = json!({"multifd-channels": self.multifd});
            if let Some(compression) = self.multifd_compression {
                parameters["multifd-compression"] = json!(compression);
            }
            for qmp in [source, destination] {
                qmp.migrate_set_capabilities(&[("multifd", true)])?;
                qmp.execute("migrate-set-parameters", Some(parameters.clone()))?;
            }
        }
        Ok(())
    }
}

/// What libvirt switches on for a live migration that is not tunnelled
/// (`qemu_migration_params.c`): the return path at both ends,
/// pause-before-switchover at the source (then `migrate-continue`),
/// late-block-activate at the destination, events at both.
pub const LIBVIRT: Capabilities = Capabilities {
    source: &["return-path", "pause-before-switchover", "events"],
    destination: &["return-path", "late-block-activate", "events"],
    multifd: 0,
    multifd_compression: None,
};

/// Where the two QEMUs and the proxies run: two namespaces of a shaped
/// link, or loopback.
pub struct Ends<'a> {
    pub link: Option<&'a ShapedLink>,
}

impl Ends<'static> {
    /// Everything in this network namespace, on loopback.
    pub const LOOPBACK: Self = Ends { link: None };
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

/// One QEMU migration, as [`migrate_once`] saw it.
pub struct Migrated {
    /// QEMU's `ram.transferred`.
    pub wire_bytes: u64,
    /// QEMU's `total-time` (from `migrate` to completed, as QEMU counts it,
    /// the measure of QEMU's direct migrations in the bench); the wall
    /// time from `migrate` to the answer that said it ended when QEMU gave
    /// none.
    pub seconds: f64,
    /// QEMU's `downtime`, when it gave one.
    pub downtime_ms: Option<u64>,
    /// QEMU's `ram.dirty-sync-count`: its pre-copy rounds.
    pub rounds: u32,
    /// QEMU's final status (`completed`, `failed`, ...).
    pub status: String,
    /// The guest's heartbeat went on at the destination.
    pub resumed: bool,
    /// The paused destination's memory equals the paused source's.
    pub memory_identical: Option<bool>,
    /// The send proxy's report, through the proxies.
    pub proxy: Option<ProxyReport>,
}

/// Boots the guest at both ends, waits `run_seconds` of workload, and
/// migrates it (through the proxies if `proxy` is given).
pub fn migrate_once(
    image: &GuestImage,
    ends: &Ends,
    dir: &TempDir,
    run_seconds: u64,
    (build, capabilities): (QemuBuild, &Capabilities),
    proxy: Option<(&Templates, &LinkSecurity)>,
) -> anyhow::Result<Migrated> {
    let tag = if proxy.is_some() { "proxied" } else { "direct" };
    let qemu_port = free_port();
    let mut source = QemuGuest::boot_on(
        build,
        &image.spec(),
        &dir.0,
        &format!("{tag}-src-{}", image.name),
        ends.source(),
    )?;
    // Through the proxies, the receive proxy feeds QEMU on loopback.
    let incoming_ip = if proxy.is_some() {
        "127.0.0.1".into()
    } else {
        ends.dest_ip()
    };
    // Deferred: multifd's capability and parameters are set first. Paused
    // (-S) once loaded, so its memory can be compared with the source's.
    let mut dest = QemuGuest::boot_on(
        build,
        &image.spec().incoming("defer").with_args(["-S"]),
        &dir.0,
        &format!("{tag}-dst-{}", image.name),
        ends.dest(),
    )?;
    source.wait_serial(
        &format!("pagefp-ready {}", image.workload),
        Duration::from_secs(180),
    )?;
    std::thread::sleep(Duration::from_secs(run_seconds));
    source.qmp.uncap_migration()?;
    capabilities.apply(&mut source.qmp, &mut dest.qmp)?;
    dest.qmp.execute(
        "migrate-incoming",
        Some(json!({"uri": format!("tcp:{incoming_ip}:{qemu_port}")})),
    )?;
    let proxies = proxy
        .map(|(templates, security)| {
            Proxies::start(
                ends,
                qemu_port,
                std::slice::from_ref(templates),
                &[],
                security,
            )
        })
        .transpose()?;
    let uri = match &proxies {
        None => format!("tcp:{}:{qemu_port}", ends.dest_ip()),
        Some(proxies) => proxies.uri.clone(),
    };
    let started = Instant::now();
    source.qmp.migrate(&uri)?;
    let info = source.qmp.wait_migration(Duration::from_secs(900));
    let seconds = started.elapsed().as_secs_f64();
    let mut proxy_report = None;
    if let Some(proxies) = proxies {
        let outcome = proxies.wait()?;
        match (outcome.send, outcome.receive) {
            (Ok(sent), Ok(_)) => proxy_report = Some(sent),
            (send, receive) => bail!(
                "the proxies failed:\nsend: {}\nreceive: {}",
                send.err().unwrap_or_default(),
                receive.err().unwrap_or_default()
            ),
        }
    }
    let info = info?;
    let status = info["status"].as_str().unwrap_or("?").to_string();
    let seconds = info.total_time_ms.map_or(seconds, |ms| ms as f64 / 1000.0);
    std::thread::sleep(Duration::from_millis(200));
    if let Some(exit) = dest.exited() {
        bail!(
            "the destination QEMU ({tag}) exited ({exit}) after the source reported {status}: {}",
            std::fs::read_to_string(&dest.stderr_path)
                .unwrap_or_default()
                .trim()
        );
    }
    // Without the return path the source calls it completed before the
    // destination loaded everything: wait until it has, then compare the
    // two paused memories.
    let deadline = Instant::now() + Duration::from_secs(120);
    while dest.qmp.status()? == "inmigrate" {
        if Instant::now() > deadline {
            bail!(
                "the destination QEMU ({tag}) was still loading 120 s after the source completed"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let memory_identical = if status == "completed" {
        let size = u64::from(image.mem_mib) << 20;
        let (a, b) = (
            dir.0.join(format!("{tag}-src.mem")),
            dir.0.join(format!("{tag}-dst.mem")),
        );
        source.qmp.pmemsave(&a, size)?;
        dest.qmp.pmemsave(&b, size)?;
        let identical = std::fs::read(&a)? == std::fs::read(&b)?;
        let _ = std::fs::remove_file(&a);
        let _ = std::fs::remove_file(&b);
        Some(identical)
    } else {
        None
    };
    dest.qmp.cont()?;
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
    Ok(Migrated {
        wire_bytes: info["ram"]["transferred"].as_u64().unwrap_or(0),
        seconds,
        downtime_ms: info.downtime_ms,
        rounds: info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) as u32,
        status,
        resumed,
        memory_identical,
        proxy: proxy_report,
    })
}

/// The same guest migrated directly, then through the proxies (TLS), on
/// `ends`; with `plaintext_too`, also through the proxies in plaintext.
pub fn compare(
    image: &GuestImage,
    templates: &Templates,
    ends: &Ends,
    run_seconds: u64,
    plaintext_too: bool,
    (build, capabilities): (QemuBuild, &Capabilities),
) -> anyhow::Result<ProxyRun> {
    let dir = TempDir::new("pagefp-qemu-proxy");
    let qemu = (build, capabilities);
    let direct = migrate_once(image, ends, &dir, run_seconds, qemu, None)?;
    if direct.status != "completed" {
        bail!("the direct QEMU migration ended {}", direct.status);
    }
    let tls = LinkSecurity::default();
    let proxied = migrate_once(
        image,
        ends,
        &dir,
        run_seconds,
        qemu,
        Some((templates, &tls)),
    )?;
    let report = proxied.proxy.context("no proxy report")?;
    let plaintext = if plaintext_too {
        let plain = migrate_once(
            image,
            ends,
            &dir,
            run_seconds,
            qemu,
            Some((templates, &LinkSecurity::Plaintext)),
        )?;
        let plain_report = plain.proxy.context("no proxy report")?;
        if plain.status != "completed" || plain_report.tls {
            bail!("the plaintext proxied migration ended {}", plain.status);
        }
        Some((
            plain.seconds,
            plain_report.wire_bytes,
            plain_report.compression,
        ))
    } else {
        None
    };
    Ok(ProxyRun {
        vm: image.name.clone(),
        templates: templates.name().into(),
        link_mbit: ends.mbit(),
        direct_wire_bytes: direct.wire_bytes,
        proxied_wire_bytes: report.wire_bytes,
        direct_seconds: direct.seconds,
        proxied_seconds: proxied.seconds,
        qemu_status: proxied.status,
        guest_resumed: proxied.resumed,
        stream_bytes: report.stream_bytes,
        pages: report.pages,
        template_pages: report.template_pages,
        templates_offered: report.templates_offered,
        tls: report.tls,
        qemu_version: build.version().into(),
        accel: "tcg".into(),
        channels: report.channels,
        capabilities: capabilities.names(),
        multifd_compression: report.multifd_compression.clone(),
        compressed_pages: report.compressed_pages,
        dedup_to_end: report.ram_complete && report.pass_through.is_none(),
        memory_identical: proxied.memory_identical,
        direct_memory_identical: direct.memory_identical,
        plaintext_proxied_seconds: plaintext.as_ref().map(|p| p.0),
        plaintext_proxied_wire_bytes: plaintext.as_ref().map(|p| p.1),
        tls_time_ratio: plaintext.as_ref().map(|p| proxied.seconds / p.0),
        compression: report.compression.clone(),
        plaintext_compression: plaintext.and_then(|p| p.2),
    })
}

/// The two proxies as `pagefp qemu-proxy` processes: the receive proxy at
/// the destination end, feeding QEMU's `-incoming` on `127.0.0.1:dest_port`
/// there and offering `templates`; the send proxy at the source end, where
/// QEMU migrates to [`Proxies::uri`].
pub struct Proxies {
    send: Child,
    receive: Child,
    pub uri: String,
}

/// How each proxy ended: its report, or what it printed on failure.
pub struct ProxyOutcome {
    pub send: Result<ProxyReport, String>,
    pub receive: Result<ProxyReport, String>,
}

impl Proxies {
    /// Starts both and returns once the send proxy listens; `send_args` are
    /// extra flags of the send proxy.
    pub fn start(
        ends: &Ends,
        dest_port: u16,
        templates: &[Templates],
        send_args: &[&str],
        security: &LinkSecurity,
    ) -> anyhow::Result<Self> {
        Self::start_on(ends, free_port(), dest_port, templates, send_args, security)
    }

    /// [`Proxies::start`] with the send proxy on 127.0.0.1:`local_port`
    /// (libvirt: the same port as the destination QEMU's, at each end).
    pub fn start_on(
        ends: &Ends,
        local_port: u16,
        dest_port: u16,
        templates: &[Templates],
        send_args: &[&str],
        security: &LinkSecurity,
    ) -> anyhow::Result<Self> {
        let wan = format!("{}:{}", ends.dest_ip(), free_port());
        let local = format!("127.0.0.1:{local_port}");
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
                "--qemu",
                &format!("127.0.0.1:{dest_port}"),
            ])
            .args(templates.iter().flat_map(Templates::args))
            .args(security.receive_args())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting pagefp qemu-proxy receive")?;
        let send = wrapped(ends.source(), agent_binary())
            .args([
                "qemu-proxy",
                "send",
                "--json",
                "--timeout-s",
                "120",
                "--listen",
                &local,
                "--to",
                &wan,
            ])
            .args(send_args)
            .args(security.send_args())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting pagefp qemu-proxy send")?;
        // A probe connection would be taken for a peer's: watch the socket
        // tables of the proxies' network namespaces instead. The receive
        // proxy listens once its templates are loaded, as it would before
        // a real migration starts: that load is its own cost, not the
        // migration's.
        let mut proxies = Self {
            send,
            receive,
            uri: format!("tcp:{local}"),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        for (name, child, addr) in [
            ("receive", &mut proxies.receive, wan.as_str()),
            ("send", &mut proxies.send, local.as_str()),
        ] {
            let addr: std::net::SocketAddrV4 = addr.parse()?;
            while !listens(child.id(), addr) {
                if let Some(status) = child.try_wait()? {
                    bail!("the {name} proxy exited before it listened ({status})");
                }
                if Instant::now() > deadline {
                    bail!("the {name} proxy does not listen on {addr}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(proxies)
    }

    /// Waits for both to end.
    pub fn wait(self) -> anyhow::Result<ProxyOutcome> {
        fn report(output: Output) -> Result<ProxyReport, String> {
            if output.status.success() {
                serde_json::from_slice(&output.stdout).map_err(|e| format!("bad report: {e}"))
            } else {
                Err(String::from_utf8_lossy(&output.stderr).into_owned())
            }
        }
        Ok(ProxyOutcome {
            send: report(self.send.wait_with_output()?),
            receive: report(self.receive.wait_with_output()?),
        })
    }
}

/// Whether a socket listens on `addr` in the network namespace of process
/// `pid` (its `/proc/PID/net/tcp`, addresses in host byte order: x86).
fn listens(pid: u32, addr: std::net::SocketAddrV4) -> bool {
    const LISTEN: &str = "0A";
    let wanted = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(addr.ip().octets()),
        addr.port()
    );
    std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).is_ok_and(|table| {
        table.lines().skip(1).any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(1) == Some(&wanted.as_str()) && fields.get(3) == Some(&LISTEN)
        })
    })
}

/// Boots the images of `workloads` under QEMU TCG at the destination end
/// with their RAM in shared memory files in `shm` (consoles in `dir`),
/// waits for their workloads, then for `agent` to have hashed each of
/// their pages once: the destination's own guests, as `--local-templates`
/// sees them. The agent finds them by its process scan, not through KVM.
pub fn boot_shared_memory_guests(
    agent: &AgentProcess,
    images: &[GuestImage],
    workloads: &[&str],
    ends: &Ends,
    dir: &Path,
    shm: &Path,
) -> anyhow::Result<Vec<QemuGuest>> {
    let mut guests = Vec::new();
    for workload in workloads {
        let image = images
            .iter()
            .find(|i| i.workload == *workload)
            .with_context(|| format!("no guest image runs the {workload} workload"))?;
        let spec = image
            .spec()
            .shared_memory(&shm.join(format!("{workload}.ram")));
        guests.push(QemuGuest::boot(
            &spec,
            dir,
            &format!("shared-{workload}"),
            ends.dest(),
        )?);
    }
    for (guest, workload) in guests.iter().zip(workloads) {
        wait_hashed(agent, guest, workload)?;
    }
    Ok(guests)
}

/// Waits for `guest`'s `workload` to start, then for `agent` to have hashed
/// each of its pages once.
pub fn wait_hashed(agent: &AgentProcess, guest: &QemuGuest, workload: &str) -> anyhow::Result<()> {
    guest.wait_ready(workload, Duration::from_secs(180))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while agent
        .vm(guest.pid())
        .is_none_or(|v| v["pages"].as_u64() == Some(0) || v["unknown"] != 0)
    {
        if Instant::now() > deadline {
            bail!(
                "the agent did not hash every page of QEMU {} ({workload}) within 120 s: {:?}",
                guest.pid(),
                agent.vm(guest.pid())
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}
