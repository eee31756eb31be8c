//! `pagefp-bench` (run by `cargo xtask bench`): the foundation's benchmark
//! report, printed and written to target/pagefp-bench/report.json.

use clap::Parser;
use pagefp_bench::{self as bench, Report};
use pagefp_tests::agent_process::target_dir;

#[derive(Debug, Parser)]
#[command(
    name = "pagefp-bench",
    about = "Measure pagefp's tracking cost, as ratios taken side by side"
)]
struct Args {
    /// Fewer rounds and smaller VMs (for a quick look; the figures are noisier).
    #[arg(long)]
    quick: bool,
    /// Only these parts (comma-separated: hashing, dirty, rehash, rescan, qemu-kvm, memory, fuzz, migration, qemu-proxy, throughput, scale).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Where to write the JSON report.
    #[arg(long)]
    output: Option<std::path::PathBuf>,
    /// Migration part: only these modes (baseline, templates, templates+zstd, qemu).
    #[arg(long, value_delimiter = ',')]
    modes: Vec<String>,
    /// Migration part: only these links, in Mbit/s with an optional round
    /// trip (100, 100/50ms, 1000).
    #[arg(long, value_delimiter = ',')]
    links: Vec<pagefp_tests::netns::LinkSpec>,
    /// Migration and qemu-proxy parts: only these guests (e.g. linux-httpd); the others still give templates.
    #[arg(long, value_delimiter = ',')]
    vms: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(reason) = pagefp_tests::privileged::missing() {
        anyhow::bail!("the benchmark needs root, /dev/kvm and tracefs: {reason}");
    }
    let (rounds, seconds, hash_pages, vm_pages) = if args.quick {
        (1, 1.0, 32768, 16384)
    } else {
        // Dirty-rate windows of 5 s: at 2 s this machine's noise swung
        // single rounds from 0.55 to 1.68.
        (3, 5.0, 131072, 65536)
    };
    let wanted = |part: &str| args.only.is_empty() || args.only.iter().any(|p| p == part);
    let mut figures = Vec::new();
    if wanted("hashing") {
        println!("== hashing throughput ({hash_pages} distinct pages, {rounds} rounds)");
        figures.extend(bench::hashing::measure(hash_pages, rounds)?);
    }
    if wanted("dirty") {
        println!("== guest dirty rate with and without the agent ({rounds} rounds of {seconds} s)");
        figures.extend(bench::dirty_rate::measure(rounds, seconds)?);
    }
    if wanted("rehash") {
        println!("== rehashing in steady state");
        figures.extend(bench::rehash::measure(if args.quick { 10 } else { 40 })?);
    }
    if wanted("rescan") {
        println!(
            "== rescans of an untracked VM: change detection vs blake3 alone ({rounds} rounds)"
        );
        figures.extend(bench::rescan::measure(vm_pages, rounds)?);
    }
    if wanted("qemu-kvm") {
        println!("== QEMU guests under KVM tracked during a migration ({rounds} rounds)");
        figures.extend(bench::qemu_kvm::measure(rounds)?);
    }
    if wanted("memory") {
        println!("== agent memory (4 VMs of {vm_pages} pages)");
        figures.extend(bench::memory::measure(4, vm_pages)?);
    }
    // First, so migration.json and qemu-proxy.json carry it too.
    let fuzz = if wanted("fuzz") {
        let (runs, seconds) = if args.quick {
            (100_000, 60)
        } else {
            (1_000_000, 600)
        };
        println!("== fuzzing: each target for {runs} executions (at most {seconds} s)");
        let fuzz = bench::fuzz::run(runs, seconds)?;
        let path = target_dir().join("pagefp-bench").join("fuzz.json");
        std::fs::create_dir_all(path.parent().unwrap())?;
        std::fs::write(
            &path,
            serde_json::to_vec_pretty(&serde_json::json!({
                "machine": bench::machine(),
                "target_executions_min": 1_000_000,
                "fuzz": fuzz,
            }))?,
        )?;
        println!("fuzz report written to {}", path.display());
        Some(fuzz)
    } else {
        None
    };
    if wanted("migration") {
        let images = pagefp_tests::guest_images::ensure_images()?;
        let mut settings = bench::migration::Settings::default();
        if args.quick {
            settings.links = vec![pagefp_tests::netns::LinkSpec::new(100, 0)];
            settings.migrate = images.iter().take(3).map(|i| i.name.clone()).collect();
        }
        if !args.modes.is_empty() {
            settings.modes = args.modes.clone();
        }
        if !args.links.is_empty() {
            settings.links = args.links.clone();
        }
        if !args.vms.is_empty() {
            if let Some(unknown) = args
                .vms
                .iter()
                .find(|vm| !images.iter().any(|i| &i.name == *vm))
            {
                anyhow::bail!(
                    "no guest image named {unknown}: the images are {}",
                    images
                        .iter()
                        .map(|i| i.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            settings.migrate = args.vms.clone();
        }
        println!(
            "== migration: {} guests x [{}] x {:?}",
            if settings.migrate.is_empty() {
                images.len()
            } else {
                settings.migrate.len()
            },
            settings
                .links
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            settings.modes
        );
        let mut report = bench::migration::run(&images, &settings)?;
        report.fuzz = fuzz.clone();
        bench::migration::print_table(&report);
        let path = args
            .output
            .as_ref()
            .and_then(|p| p.parent().map(|d| d.join("migration.json")))
            .unwrap_or_else(|| target_dir().join("pagefp-bench").join("migration.json"));
        bench::migration::write(&report, &path)?;
    }
    if wanted("qemu-proxy") {
        qemu_proxy(&args, fuzz.as_deref())?;
    }
    if wanted("throughput") {
        let images = pagefp_tests::guest_images::ensure_images()?;
        let migrate = if !args.vms.is_empty() {
            args.vms.clone()
        } else if args.quick {
            images.iter().take(2).map(|i| i.name.clone()).collect()
        } else {
            Vec::new()
        };
        println!(
            "== throughput: native migration on an unshaped link, and this machine's blake3 and memcpy"
        );
        let report = bench::throughput::run(&images, migrate)?;
        for mode in &report.modes {
            println!(
                "{:<20} {:>6.2} GiB/s  {:>6.2} GiB per sender CPU second  ({} VMs{})",
                mode.mode,
                mode.gib_per_second,
                mode.gib_per_sender_cpu_second,
                mode.vms,
                if mode.all_verified {
                    ", all verified"
                } else {
                    ", NOT ALL VERIFIED"
                }
            );
        }
        println!(
            "one core: blake3 {:.2} GiB/s, memcpy {:.2} GiB/s",
            report.blake3_gib_per_second, report.memcpy_gib_per_second
        );
        let path = target_dir().join("pagefp-bench").join("throughput.json");
        bench::throughput::write(&report, &path)?;
        println!("throughput report written to {}", path.display());
    }
    if wanted("scale") {
        let settings = if args.quick {
            bench::scale::Settings::quick()
        } else {
            bench::scale::Settings::default()
        };
        println!(
            "== the site catalog at scale: a {} MiB guest over {}, catalogs of {:?} templates, a site store of {} pages, {:?} publishing hosts",
            settings.guest_mib,
            settings.link,
            settings.catalog_sizes,
            settings.site_pages,
            settings.host_counts
        );
        let report = bench::scale::run(&settings)?;
        let path = target_dir().join("pagefp-bench").join("scale.json");
        bench::scale::write(&report, &path)?;
        println!(
            "{}\nscale report written to {}",
            serde_json::to_string_pretty(&report.summary)?,
            path.display()
        );
    }
    if let Some(crashed) = fuzz.iter().flatten().find(|f| f.crashes > 0) {
        anyhow::bail!(
            "fuzz target {} crashed (see target/pagefp-bench/fuzz.json and target/pagefp-fuzz)",
            crashed.target
        );
    }
    if figures.is_empty() {
        return Ok(());
    }
    let report = Report {
        machine: bench::machine(),
        figures,
    };
    let path = args
        .output
        .unwrap_or_else(|| target_dir().join("pagefp-bench/report.json"));
    bench::write_report(&report, &path)?;
    Ok(())
}

/// Unmodified QEMU migrated directly and through `pagefp qemu-proxy`, side by
/// side over the same shaped link; target/pagefp-bench/qemu-proxy.json.
fn qemu_proxy(args: &Args, fuzz: Option<&[bench::fuzz::FuzzRun]>) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use pagefp_tests::{
        agent_process::{AgentOptions, AgentProcess, TempDir},
        netns::ShapedLink,
        qemu::QemuBuild,
        qemu_proxy_run::{
            Capabilities, Ends, LIBVIRT, Templates, boot_shared_memory_guests, compare,
        },
    };
    let images = pagefp_tests::guest_images::ensure_images()?;
    let migrate: Vec<&str> = if !args.vms.is_empty() {
        args.vms.iter().map(String::as_str).collect()
    } else if args.quick {
        vec!["linux-httpd"]
    } else {
        vec!["linux-httpd", "linux-compress", "linux-perl"]
    };
    println!(
        "== QEMU through the proxies vs direct: {migrate:?} at 100 Mbit/s; QEMU 10.0 with libvirt's capabilities, with and without multifd, also at 1 Gbit/s"
    );
    let dir = TempDir::new("pagefp-proxy-bench");
    let agent = AgentProcess::start(&AgentOptions::default())?;
    let catalogs = bench::migration::build_catalogs(
        &agent,
        &dir,
        &images,
        &bench::migration::Settings::default(),
    )?;
    drop(agent);
    let link = ShapedLink::new("qp", 30, 100)?;
    let fast_link = ShapedLink::new("qpg", 31, 1000)?;
    let mut runs = Vec::new();
    let mut failures = Vec::new();
    // A failed run is recorded and the others still run; the benchmark
    // fails at the end.
    let mut measure = |image: &pagefp_tests::guest_images::GuestImage,
                       templates: Templates,
                       plaintext_too: bool,
                       qemu: (QemuBuild, &Capabilities),
                       link: &ShapedLink| match compare(
        image,
        &templates,
        &Ends { link: Some(link) },
        pagefp_tests::guest_images::RUN_SECONDS,
        plaintext_too,
        qemu,
    ) {
        Ok(run) => {
            print_proxy_run(&run);
            runs.push(run);
        }
        Err(err) => {
            println!("{:<16} {:<8} FAILED: {err:#}", image.name, templates.name());
            failures.push(serde_json::json!({
                "vm": image.name,
                "templates": templates.name(),
                "error": format!("{err:#}"),
            }));
        }
    };
    for (image, catalog) in images
        .iter()
        .zip(&catalogs)
        .filter(|(i, _)| migrate.contains(&i.name.as_str()))
    {
        // Beside each TLS run, the same through plaintext proxies.
        measure(
            image,
            Templates::Catalog(catalog.clone()),
            true,
            (QemuBuild::Debian7_2, &Capabilities::default()),
            &link,
        );
        // QEMU 10.0, as current distributions ship it, with the
        // capabilities libvirt sets (the return path among them), without
        // and with multifd (`virsh migrate --parallel
        // --parallel-connections 4`, and with QEMU's zstd), at 100 Mbit/s
        // and 1 Gbit/s. For linux-httpd only: linux-perl dirties about as
        // fast as the 100 Mbit/s link carries, so QEMU's own direct
        // migration (no auto-converge) never ends (seen: 900 s, ~2,900
        // pages/s).
        if QemuBuild::Backports10_0.available() && image.name == "linux-httpd" {
            let multifd = LIBVIRT.with_multifd(4, None);
            let multifd_zstd = LIBVIRT.with_multifd(4, Some("zstd"));
            for (capabilities, link) in [
                (&LIBVIRT, &link),
                (&multifd, &link),
                (&multifd_zstd, &link),
                (&LIBVIRT, &fast_link),
                (&multifd, &fast_link),
            ] {
                measure(
                    image,
                    Templates::Catalog(catalog.clone()),
                    false,
                    (QemuBuild::Backports10_0, capabilities),
                    link,
                );
            }
        }
    }
    // The product path: the destination agent adopts two QEMU guests of the
    // same OS running there on shared memory, and the receive proxy takes
    // its templates from them.
    {
        let agent = AgentProcess::start(&AgentOptions::default())?;
        let shm = TempDir::new_in(std::path::Path::new("/dev/shm"), "pagefp-proxy-bench");
        let ends = Ends { link: Some(&link) };
        let _holders =
            boot_shared_memory_guests(&agent, &images, &["idle", "find"], &ends, &dir.0, &shm.0)?;
        let image = images
            .iter()
            .find(|i| i.name == "linux-httpd")
            .context("no linux-httpd image")?;
        measure(
            image,
            Templates::Agent(agent.socket.clone()),
            false,
            (QemuBuild::Debian7_2, &Capabilities::default()),
            &link,
        );
    }
    let path = target_dir().join("pagefp-bench").join("qemu-proxy.json");
    std::fs::create_dir_all(path.parent().unwrap())?;
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(
            &serde_json::json!({"machine": bench::machine(), "target_bytes_ratio_max": 0.5, "tls_time_ratio_max": 1.1, "runs": runs, "failures": failures, "fuzz": fuzz}),
        )?,
    )?;
    println!("qemu-proxy report written to {}", path.display());
    anyhow::ensure!(
        failures.is_empty(),
        "{} QEMU proxy run(s) failed (listed above and under `failures` in {})",
        failures.len(),
        path.display()
    );
    Ok(())
}

fn print_proxy_run(run: &pagefp_tests::qemu_proxy_run::ProxyRun) {
    println!(
        "{:<16} {:<8} QEMU {:<4} {:>4} Mbit/s {} ch | direct {:>11} B {:>6.2} s | proxied {:>11} B {:>6.2} s | x{:.3} bytes x{:.3} time | {} {} | memory {}{}",
        run.vm,
        run.templates,
        run.qemu_version,
        run.link_mbit,
        run.channels,
        run.direct_wire_bytes,
        run.direct_seconds,
        run.proxied_wire_bytes,
        run.proxied_seconds,
        run.proxied_wire_bytes as f64 / run.direct_wire_bytes.max(1) as f64,
        run.proxied_seconds / run.direct_seconds.max(1e-9),
        run.qemu_status,
        if run.guest_resumed {
            "resumed"
        } else {
            "NOT RESUMED"
        },
        match (run.memory_identical, run.direct_memory_identical) {
            (Some(true), Some(true)) => "identical (direct too)",
            (Some(true), _) => "identical (direct: NOT)",
            (Some(false), _) => "DIFFERS",
            (None, _) => "not compared",
        },
        if run.dedup_to_end {
            ""
        } else {
            " | NOT deduplicated to the end of RAM"
        }
    );
    if let (Some(seconds), Some(ratio)) = (run.plaintext_proxied_seconds, run.tls_time_ratio) {
        println!(
            "{:<16} {:<8} proxied over plaintext {seconds:.2} s: TLS costs x{ratio:.3} time [target <= 1.1]",
            run.vm, run.templates
        );
    }
}
