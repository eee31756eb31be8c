//! `pagefp-demo` (run by `cargo xtask demo`): a fleet of VMs that share part
//! of their memory, the agent tracking them with eBPF, their guests writing,
//! and the templates the agent finds.

use std::{process::Command, time::Duration};

use clap::Parser;
use pagefp_bench as bench;
use pagefp_tests::{
    agent_process::{self, AgentOptions, AgentProcess, TempDir, agent_binary},
    fleet::{Vm, VmOptions, assert_served_hashes_match},
    synthetic_images::{FleetLayout, write_fleet},
};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(name = "pagefp-demo", about = "pagefp on a fleet of real KVM VMs")]
struct Args {
    /// Number of VMs.
    #[arg(long, default_value_t = 4)]
    vms: usize,
    /// Guest RAM per VM in MiB.
    #[arg(long, default_value_t = 64)]
    mem_mib: usize,
    /// Real Linux guests to migrate (image names, comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "linux-httpd,linux-compress"
    )]
    migrate: Vec<String>,
    /// Link speed of the migration part, Mbit/s.
    #[arg(long, default_value_t = 100)]
    link_mbit: u32,
    /// Skip the migration part.
    #[arg(long)]
    no_migration: bool,
}

fn show(agent: &AgentProcess, what: &str) -> anyhow::Result<()> {
    let output = Command::new(agent_binary())
        .args([what, "--socket"])
        .arg(&agent.socket)
        .output()?;
    print!("{}", String::from_utf8_lossy(&output.stdout));
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(reason) = pagefp_tests::privileged::missing() {
        anyhow::bail!(
            "the demo needs root, /dev/kvm and tracefs: {reason}. Run `cargo xtask setup` as root"
        );
    }
    let pages = args.mem_mib * 256;
    let dir = TempDir::new("pagefp-demo");
    println!(
        "== making {} guest images of {} MiB: 40% OS pages shared by all, 20% shared by half, 20% zero, 20% unique",
        args.vms, args.mem_mib
    );
    let images = write_fleet(&dir.0, args.vms, pages, FleetLayout::default())?;

    println!("== starting one VM before the agent (it is adopted), then the agent");
    let mut fleet = vec![Vm::start(&dir, &images[0], VmOptions::default())];
    let agent = AgentProcess::start(&AgentOptions::default())?;
    println!(
        "   agent pid {}, API {}, metrics http://{}/metrics",
        agent.pid(),
        agent.socket.display(),
        agent.metrics_addr
    );
    println!(
        "== starting {} more VMs (seen from KVM_CREATE_VM on)",
        args.vms - 1
    );
    for image in &images[1..] {
        fleet.push(Vm::start(&dir, image, VmOptions::default()));
    }
    // The first VM re-registers its memory, as QEMU does when migration starts.
    fleet[0].reregister();
    fleet[0].touch(0, 1, 1);
    for vm in &fleet {
        agent.wait_all_clean(vm.pid(), Duration::from_secs(120));
    }
    let sources = agent.status()["sources"].clone();
    println!("   eBPF attached: {}", sources["attached"]);
    if let Some(why) = sources["fentry_error"].as_str() {
        println!(
            "   fentry not used here ({why}); dirty rings are tracked through kvm:kvm_dirty_ring_push"
        );
    }
    show(&agent, "status")?;

    println!("\n== the guests write: VM 1 gives 2000 pages fresh content, VM 2 touches 5000 pages");
    let before: Vec<u64> = fleet
        .iter()
        .map(|vm| {
            agent.vm(vm.pid()).unwrap()["stats"]["pages_rehashed"]
                .as_u64()
                .unwrap()
        })
        .collect();
    fleet[1].run(json!([{"op": "random", "first": 0, "count": 2000, "seed": 1}]));
    fleet[2 % fleet.len()].touch(1000, 5000.min(pages as u32 - 1000), 7);
    for (i, vm) in fleet.iter().enumerate() {
        let view = agent.wait_all_clean(vm.pid(), Duration::from_secs(120));
        println!(
            "   VM {i} (pid {}): {} dirty events, {} pages rehashed",
            vm.pid(),
            view["stats"]["dirty_events"],
            view["stats"]["pages_rehashed"].as_u64().unwrap() - before[i]
        );
    }
    for vm in &fleet {
        assert_served_hashes_match(&agent, vm);
    }
    println!("   every served hash equals blake3 of the page in the VMM's memory");
    show(&agent, "status")?;

    println!("\n== templates: contents held by at least 2 VMs, ranked by pages saved");
    Command::new(agent_binary())
        .args(["templates", "--top", "8", "--socket"])
        .arg(&agent.socket)
        .status()?;
    let status = agent.status();
    println!(
        "\n   {} distinct contents host-wide; {} templates ({} MiB)",
        status["distinct_contents"],
        status["templates"],
        status["template_bytes"].as_u64().unwrap_or(0) >> 20
    );
    let metrics = agent.metrics();
    let lines: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("pagefp_vm_pages"))
        .take(5)
        .collect();
    println!(
        "\n== Prometheus metrics at http://{}/metrics, for example:",
        agent.metrics_addr
    );
    for line in lines {
        println!("   {line}");
    }
    println!(
        "\n   (Prometheus: point a scrape job at http://{}/metrics; Grafana dashboards in grafana/)",
        agent.metrics_addr
    );
    drop(fleet);
    drop(agent);
    if !args.no_migration {
        migration_part(&args)?;
    }
    println!("\ndemo done: the VMs and the agent stop now");
    Ok(())
}

/// Real Linux guests migrated over a shaped link, pagefp's modes side by side
/// with QEMU's own migration of the same guest.
fn migration_part(args: &Args) -> anyhow::Result<()> {
    println!(
        "\n== live migration of real Linux guests over a {} Mbit/s link",
        args.link_mbit
    );
    println!(
        "   guest images: Debian kernel + busybox/perl initramfs under QEMU TCG, one workload each (cargo xtask images)"
    );
    let images = pagefp_tests::guest_images::ensure_images()?;
    let settings = bench::migration::Settings {
        links: vec![pagefp_tests::netns::LinkSpec::new(args.link_mbit, 0)],
        migrate: args.migrate.clone(),
        ..bench::migration::Settings::default()
    };
    println!(
        "   each guest's destination holds templates exported from the {} other images' VMs (never its own pages)",
        images.len() - 1
    );
    let report = bench::migration::run(&images, &settings)?;
    bench::migration::print_table(&report);
    let path = agent_process::target_dir()
        .join("pagefp-bench")
        .join("migration-demo.json");
    bench::migration::write(&report, &path)?;
    println!(
        "   the full experiment (every image, 100 Mbit/s and 1 Gbit/s): cargo xtask bench -- --only migration"
    );
    Ok(())
}
