//! Several "hosts" of one site on this machine, for the site catalog tests
//! and the scale benchmark. Each host is an agent that tracks only the VMM
//! processes started with `PAGEFP_TEST_HOST=<its id>`
//! (`--only-vms-with-env`) and publishes to the site store under that id
//! (`--host-id`), so two agents never see each other's VMs.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::bail;

use crate::{
    agent_process::{AgentOptions, AgentProcess, free_port},
    guest_images::GuestImage,
    qemu::QemuGuest,
    qemu_proxy_run::wait_hashed,
    synthetic_images::fleet_image_file,
    vmm_client::{VmmArgs, VmmProcess, testvmm_binary},
};

/// The environment variable that says which host a VMM process runs on.
pub const HOST_ENV: &str = "PAGEFP_TEST_HOST";

/// How a host agent publishes.
#[derive(Clone, Debug)]
pub struct HostSettings {
    pub lease_secs: u64,
    pub publish_ms: u64,
    pub min_hosts: u32,
    /// For `rediss://` nodes: `--site-store-tls-dir` (`redis://` nodes are
    /// accepted with `--site-store-plaintext`).
    pub tls_dir: Option<PathBuf>,
}

/// An agent acting as host `host`, publishing to the cluster nodes `nodes`
/// (none: it does not publish).
pub fn host_agent(
    host: &str,
    nodes: &[String],
    settings: &HostSettings,
) -> anyhow::Result<AgentProcess> {
    let mut extra = vec![
        "--host-id".to_string(),
        host.to_string(),
        "--only-vms-with-env".to_string(),
        format!("{HOST_ENV}={host}"),
    ];
    match &settings.tls_dir {
        Some(dir) => extra.extend(["--site-store-tls-dir".into(), dir.display().to_string()]),
        None if !nodes.is_empty() => extra.push("--site-store-plaintext".to_string()),
        None => {}
    }
    for url in nodes {
        extra.extend(["--site-store".to_string(), url.clone()]);
    }
    AgentProcess::start(&AgentOptions {
        ring_buffer_bytes: Some(64 << 20),
        extra,
        config: Some(format!(
            "[site]\nlease_secs = {}\npublish_ms = {}\nmin_hosts = {}\n",
            settings.lease_secs, settings.publish_ms, settings.min_hosts
        )),
        ..AgentOptions::default()
    })
}

/// Fleet VM `vm` (a synthetic image of `mem_mib`) on `host`, once all its
/// pages are clean in `agent`.
pub fn vm_on(
    dir: &Path,
    host: &str,
    agent: &AgentProcess,
    vm: usize,
    mem_mib: u32,
) -> anyhow::Result<VmmProcess> {
    let image = fleet_image_file(dir, vm, mem_mib as usize * 256);
    let mut args = VmmArgs::new(
        dir.join(format!("{host}-{vm}-{}.sock", free_port())),
        mem_mib,
    );
    args.image = Some(image);
    args.env = vec![(HOST_ENV.into(), host.into())];
    let process = VmmProcess::spawn(&testvmm_binary(), &args)?;
    agent.wait_all_clean(process.pid(), Duration::from_secs(300));
    Ok(process)
}

/// A QEMU guest of `image` on `host` (TCG, its RAM in a file of `shm`,
/// which `agent` finds and hashes), once its workload runs and `agent`
/// hashed every page; its console and QMP socket in `dir`.
pub fn qemu_on(
    dir: &Path,
    shm: &Path,
    host: &str,
    agent: &AgentProcess,
    image: &GuestImage,
) -> anyhow::Result<QemuGuest> {
    let name = format!("{host}-{}", image.workload);
    let spec = image.spec().shared_memory(&shm.join(format!("{name}.ram")));
    // The environment is the wrapper's from its start: the agent never
    // sees this process without it.
    let mut on_host = std::process::Command::new("env");
    on_host.env(HOST_ENV, host);
    let guest = QemuGuest::boot(&spec, dir, &name, Some(on_host))?;
    wait_hashed(agent, &guest, &image.workload)?;
    Ok(guest)
}

/// Waits until `agent`'s publisher has sent `at_least` counts and is healthy.
pub fn wait_published(agent: &AgentProcess, at_least: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let site = agent.status()["site"].clone();
        if site["healthy"] == true && site["held_sent"].as_u64() >= Some(at_least) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the agent did not publish {at_least} counts within 120 s: {site}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The distinct non-zero contents of `pid` as `agent` hashed them.
pub fn contents(agent: &AgentProcess, pid: u32) -> Vec<[u8; 32]> {
    let zero = agent::content::zero_page_hash();
    let mut hashes: Vec<[u8; 32]> = agent
        .hashes(pid)
        .into_iter()
        .map(|record| record.hash)
        .filter(|hash| *hash != zero && *hash != [0; 32])
        .collect();
    hashes.sort_unstable();
    hashes.dedup();
    hashes
}
