//! `pagefp-images` (run by `cargo xtask images`): builds the real Linux guest
//! images the tests, the demo and the benchmark load (cached), then prints
//! what they hold.

use clap::Parser;
use pagefp_images::{self as guest_images, Options};

#[derive(Debug, Parser)]
#[command(
    name = "pagefp-images",
    about = "Build the Linux guest memory images (cached in target/pagefp-images)"
)]
struct Args {
    /// Rebuild every image even if its inputs did not change.
    #[arg(long)]
    force: bool,
    /// Seconds each guest runs its workload before its RAM is dumped
    /// (default: $PAGEFP_IMAGES_RUN_SECONDS, else 15; part of the inputs).
    #[arg(long)]
    run_seconds: Option<u64>,
    /// Guests booted at a time (default: $PAGEFP_IMAGES_JOBS, else 2).
    #[arg(long)]
    jobs: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let defaults = Options::default();
    let options = Options {
        force: args.force,
        run_seconds: args.run_seconds.unwrap_or(defaults.run_seconds),
        jobs: args.jobs.unwrap_or(defaults.jobs).max(1),
        print_summary: true,
        ..defaults
    };
    let images = guest_images::ensure_with(&options)?;
    let dir = images
        .first()
        .and_then(|image| image.ram_path.parent().map(ToOwned::to_owned));
    println!(
        "{} images in {} (manifest.json lists their inputs)",
        images.len(),
        dir.unwrap_or_else(guest_images::images_dir).display()
    );
    Ok(())
}
