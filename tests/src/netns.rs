//! A shaped link between two network namespaces: the "WAN" of the
//! migration experiments. A veth pair, one end in each namespace, each end
//! shaped by `tc tbf` to the same rate (real kernel shaping; this kernel has
//! no netem, so there is no added latency).

use std::process::Command;

use anyhow::{Context as _, bail};

/// Two namespaces joined by a shaped veth pair; removed on drop.
pub struct ShapedLink {
    pub source_ns: String,
    pub dest_ns: String,
    pub source_ip: String,
    pub dest_ip: String,
    pub mbit: u32,
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
        let source_ns = format!("pfsrc-{tag}");
        let dest_ns = format!("pfdst-{tag}");
        // Leftovers from a killed run.
        let _ = ip(&["netns", "del", &source_ns]);
        let _ = ip(&["netns", "del", &dest_ns]);
        let link = Self {
            source_ip: format!("10.231.{index}.1"),
            dest_ip: format!("10.231.{index}.2"),
            source_ns,
            dest_ns,
            mbit,
        };
        link.create().with_context(|| {
            format!("creating the shaped link {tag} (network namespaces, veth, tc tbf need root)")
        })?;
        Ok(link)
    }

    fn create(&self) -> anyhow::Result<()> {
        let (a, b) = ("pfveth-a", "pfveth-b");
        ip(&["netns", "add", &self.source_ns])?;
        ip(&["netns", "add", &self.dest_ns])?;
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
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            // tbf: rate, a bucket of at least 10 ms of traffic (and 64 KiB,
            // one segment with offloads), 50 ms of queue.
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
                    "50ms",
                ],
            )?;
        }
        Ok(())
    }

    /// `ip netns exec <source ns>`: append the program and its arguments.
    pub fn in_source(&self) -> Command {
        in_ns(&self.source_ns)
    }

    /// `ip netns exec <destination ns>`.
    pub fn in_dest(&self) -> Command {
        in_ns(&self.dest_ns)
    }
}

fn in_ns(ns: &str) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", ns]);
    command
}

impl Drop for ShapedLink {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.source_ns]);
        let _ = ip(&["netns", "del", &self.dest_ns]);
    }
}
