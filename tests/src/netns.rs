//! A shaped link between two network namespaces: the "WAN" of the
//! migration experiments. Each end is shaped by `tc tbf` to the same rate
//! (real kernel shaping). Without a round-trip time the ends are a veth
//! pair; with one (this kernel has no netem) they are two TUN devices and a
//! user-space delayer between them ([`crate::packet_delay`]).

use std::{fs::File, os::fd::AsRawFd as _, process::Command};

use anyhow::{Context as _, bail};

use crate::packet_delay::Delayer;

/// Runs `f` on a thread inside the network namespace `ns` (`ip netns`
/// name) and returns what it returns; this thread stays where it is.
pub fn in_namespace<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let ns_path = format!("/run/netns/{ns}");
    std::thread::spawn(move || -> anyhow::Result<T> {
        let ns_file = File::open(&ns_path).with_context(|| format!("opening {ns_path}"))?;
        // SAFETY: setns on a namespace file this thread holds open; it
        // changes only this thread's network namespace, and the thread ends
        // when `f` returns.
        if unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("entering network namespace {ns_path} (needs root)"));
        }
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("a thread in network namespace {ns} panicked"))?
}

/// Opens a new TUN device `name` (IP packets, no header) inside the
/// network namespace `ns`.
fn open_tun(ns: &str, name: &str) -> anyhow::Result<File> {
    if name.len() >= libc::IFNAMSIZ {
        bail!(
            "TUN device name {name} is longer than {} bytes",
            libc::IFNAMSIZ - 1
        );
    }
    let name = name.to_string();
    in_namespace(ns, move || {
        let tun = File::options()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .context("opening /dev/net/tun (needs root and the tun module)")?;
        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
            *slot = byte as libc::c_char;
        }
        request.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which lives on this
        // stack frame for the whole call; the descriptor is open.
        if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut request) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("creating TUN device {name}"));
        }
        Ok(tun)
    })
}

/// What a link of an experiment is: its rate (0: not shaped, as fast as
/// this machine goes), and the round trip the delayer adds (0: none).
/// Written `100`, `100/50ms` (Mbit/s, then RTT) or `unlimited`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LinkSpec {
    pub mbit: u32,
    pub rtt_ms: u32,
}

impl LinkSpec {
    /// Loopback speed through a veth pair, no shaping, no delay.
    pub const UNLIMITED: Self = Self::new(0, 0);

    pub const fn new(mbit: u32, rtt_ms: u32) -> Self {
        Self { mbit, rtt_ms }
    }
}

impl std::str::FromStr for LinkSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "link `{text}`: give Mbit/s, optionally /RTT in ms (100, 100/50ms), or `unlimited`"
            )
        };
        if text.trim() == "unlimited" {
            return Ok(Self::UNLIMITED);
        }
        let (mbit, rtt) = text.split_once('/').unwrap_or((text, "0"));
        let mbit: u32 = mbit.trim().parse().map_err(|_| bad())?;
        let rtt_ms: u32 = rtt
            .trim()
            .trim_end_matches("ms")
            .parse()
            .map_err(|_| bad())?;
        if mbit == 0 || rtt_ms > 10_000 {
            return Err(bad());
        }
        Ok(Self { mbit, rtt_ms })
    }
}

impl std::fmt::Display for LinkSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.mbit, self.rtt_ms) {
            (0, 0) => write!(f, "unlimited"),
            (0, rtt) => write!(f, "unlimited {rtt} ms"),
            (mbit, 0) => write!(f, "{mbit} Mbit/s"),
            (mbit, rtt) => write!(f, "{mbit} Mbit/s {rtt} ms"),
        }
    }
}

/// Two namespaces joined by a shaped link; removed on drop.
pub struct ShapedLink {
    pub source_ns: String,
    pub dest_ns: String,
    pub source_ip: String,
    pub dest_ip: String,
    pub mbit: u32,
    /// Round-trip time added by the delayer (0: none, a veth pair).
    pub rtt_ms: u32,
    delayer: Option<Delayer>,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run("ip", args)
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (install iproute2: cargo xtask setup)"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

impl ShapedLink {
    /// `tag` keeps concurrent links apart (≤ 6 characters).
    pub fn new(tag: &str, index: u8, mbit: u32) -> anyhow::Result<Self> {
        Self::with_rtt(tag, index, mbit, 0)
    }

    /// The link `spec` describes.
    pub fn from_spec(tag: &str, index: u8, spec: LinkSpec) -> anyhow::Result<Self> {
        Self::with_rtt(tag, index, spec.mbit, spec.rtt_ms)
    }

    /// What this link is.
    pub fn spec(&self) -> LinkSpec {
        LinkSpec::new(self.mbit, self.rtt_ms)
    }

    /// A link of `mbit` whose packets take `rtt_ms` to go and come back.
    pub fn with_rtt(tag: &str, index: u8, mbit: u32, rtt_ms: u32) -> anyhow::Result<Self> {
        let source_ns = format!("pfsrc-{tag}");
        let dest_ns = format!("pfdst-{tag}");
        // Leftovers from a killed run.
        let _ = ip(&["netns", "del", &source_ns]);
        let _ = ip(&["netns", "del", &dest_ns]);
        let mut link = Self {
            source_ip: format!("10.231.{index}.1"),
            dest_ip: format!("10.231.{index}.2"),
            source_ns,
            dest_ns,
            mbit,
            rtt_ms,
            delayer: None,
        };
        ip(&["netns", "add", &link.source_ns])?;
        ip(&["netns", "add", &link.dest_ns])?;
        let created = if rtt_ms == 0 {
            link.create_veth()
        } else {
            link.create_delayed()
        };
        created.with_context(|| {
            format!(
                "creating the shaped link {tag} (network namespaces, veth or TUN, tc tbf need root)"
            )
        })?;
        Ok(link)
    }

    fn create_veth(&self) -> anyhow::Result<()> {
        let (a, b) = ("pfveth-a", "pfveth-b");
        ip(&[
            "-n",
            &self.source_ns,
            "link",
            "add",
            a,
            "type",
            "veth",
            "peer",
            "name",
            b,
            "netns",
            &self.dest_ns,
        ])?;
        for (ns, dev, addr) in [
            (&self.source_ns, a, &self.source_ip),
            (&self.dest_ns, b, &self.dest_ip),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            self.bring_up(ns, dev)?;
        }
        Ok(())
    }

    /// Two TUN devices, point to point, and the delayer between them.
    fn create_delayed(&mut self) -> anyhow::Result<()> {
        let (a, b) = ("pftun-a", "pftun-b");
        let tun_a = open_tun(&self.source_ns, a)?;
        let tun_b = open_tun(&self.dest_ns, b)?;
        for (ns, dev, addr, peer) in [
            (&self.source_ns, a, &self.source_ip, &self.dest_ip),
            (&self.dest_ns, b, &self.dest_ip, &self.source_ip),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "peer", peer, "dev", dev])?;
            self.bring_up(ns, dev)?;
        }
        let one_way = std::time::Duration::from_micros(u64::from(self.rtt_ms) * 500);
        self.delayer = Some(Delayer::start(tun_a, tun_b, one_way)?);
        Ok(())
    }

    /// Sets `dev` and loopback up in `ns` and shapes `dev`'s output (at
    /// a rate of 0, not at all).
    fn bring_up(&self, ns: &str, dev: &str) -> anyhow::Result<()> {
        ip(&["-n", ns, "link", "set", dev, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        if self.mbit == 0 {
            return Ok(());
        }
        // tbf: rate, a bucket of at least 10 ms of traffic (and 64 KiB,
        // one segment with offloads), 50 ms of queue (plus the round trip,
        // so a window of a full bandwidth-delay product is not dropped).
        let bytes_per_sec = u64::from(self.mbit) * 125_000;
        let burst = (bytes_per_sec / 100).max(64 * 1024);
        run(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "tc",
                "qdisc",
                "add",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                &format!("{}mbit", self.mbit),
                "burst",
                &burst.to_string(),
                "latency",
                &format!("{}ms", 50 + self.rtt_ms),
            ],
        )
    }

    /// `ip netns exec <source ns>`: append the program and its arguments.
    pub fn in_source(&self) -> Command {
        in_ns(&self.source_ns)
    }

    /// `ip netns exec <destination ns>`.
    pub fn in_dest(&self) -> Command {
        in_ns(&self.dest_ns)
    }

    /// Packets the delayer forwarded and dropped (`None` without a delay).
    pub fn delayed_packets(&self) -> Option<(u64, u64)> {
        let counters = &self.delayer.as_ref()?.counters;
        Some((
            counters.packets.load(std::sync::atomic::Ordering::Relaxed),
            counters.dropped.load(std::sync::atomic::Ordering::Relaxed),
        ))
    }
}

/// The destination site's LAN: an unshaped veth pair from this namespace
/// into a link's destination namespace. A service on `host_ip` (the site
/// store) is reachable from here and from the destination end of the link,
/// which the WAN link alone would not give: a program in the destination
/// namespace cannot reach this namespace's loopback, and an agent cannot run
/// inside a namespace `ip netns exec` made (it remounts /sys, without
/// tracefs). Removed on drop.
pub struct SiteLan {
    pub host_ip: String,
    pub dest_ip: String,
    device: String,
}

impl SiteLan {
    /// `tag` ≤ 6 characters; `index` keeps the subnets apart.
    pub fn new(link: &ShapedLink, tag: &str, index: u8) -> anyhow::Result<Self> {
        let device = format!("pflan-{tag}");
        let peer = format!("pflan-{tag}-d");
        let _ = ip(&["link", "del", &device]);
        let lan = Self {
            host_ip: format!("10.232.{index}.1"),
            dest_ip: format!("10.232.{index}.2"),
            device,
        };
        ip(&[
            "link",
            "add",
            &lan.device,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            &link.dest_ns,
        ])
        .context("creating the site LAN (veth needs root)")?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", lan.host_ip),
            "dev",
            &lan.device,
        ])?;
        ip(&["link", "set", &lan.device, "up"])?;
        let dest = &link.dest_ns;
        ip(&[
            "-n",
            dest,
            "addr",
            "add",
            &format!("{}/24", lan.dest_ip),
            "dev",
            &peer,
        ])?;
        ip(&["-n", dest, "link", "set", &peer, "up"])?;
        Ok(lan)
    }
}

impl Drop for SiteLan {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.device]);
    }
}

fn in_ns(ns: &str) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", ns]);
    command
}

impl Drop for ShapedLink {
    fn drop(&mut self) {
        // The delayer's threads hold the TUN devices: stop them first.
        self.delayer = None;
        let _ = ip(&["netns", "del", &self.source_ns]);
        let _ = ip(&["netns", "del", &self.dest_ns]);
    }
}
