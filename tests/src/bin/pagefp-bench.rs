//! `pagefp-bench` (run by `cargo xtask bench`): the foundation's benchmark
//! report, printed and written to target/pagefp-bench/report.json.

use clap::Parser;
use pagefp_tests::{
    agent_process::target_dir,
    bench::{self, Report},
};

#[derive(Debug, Parser)]
#[command(
    name = "pagefp-bench",
    about = "Measure pagefp's tracking cost, as ratios taken side by side"
)]
struct Args {
    /// Fewer rounds and smaller VMs (for a quick look; the figures are noisier).
    #[arg(long)]
    quick: bool,
    /// Only these parts (comma-separated: hashing, dirty, rehash, memory, migration).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Where to write the JSON report.
    #[arg(long)]
    output: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(reason) = pagefp_tests::privileged::missing() {
        anyhow::bail!("the benchmark needs root, /dev/kvm and tracefs: {reason}");
    }
    let (rounds, seconds, hash_pages, vm_pages) = if args.quick {
        (1, 1.0, 32768, 16384)
    } else {
        (3, 2.0, 131072, 65536)
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
    if wanted("memory") {
        println!("== agent memory (4 VMs of {vm_pages} pages)");
        figures.extend(bench::memory::measure(4, vm_pages)?);
    }
    if wanted("migration") {
        let images = pagefp_tests::guest_images::ensure_images()?;
        let mut settings = bench::migration::Settings::default();
        if args.quick {
            settings.links_mbit = vec![100];
            settings.migrate = images.iter().take(3).map(|i| i.name.clone()).collect();
        }
        println!(
            "== migration: {} guests x {:?} Mbit/s x {:?}",
            if settings.migrate.is_empty() { images.len() } else { settings.migrate.len() },
            settings.links_mbit,
            settings.modes
        );
        let report = bench::migration::run(&images, &settings)?;
        bench::migration::print_table(&report);
        let path = args
            .output
            .as_ref()
            .and_then(|p| p.parent().map(|d| d.join("migration.json")))
            .unwrap_or_else(|| target_dir().join("pagefp-bench").join("migration.json"));
        bench::migration::write(&report, &path)?;
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
