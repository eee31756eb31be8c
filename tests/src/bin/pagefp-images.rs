//! `pagefp-images` (run by `cargo xtask images`): builds the real Linux guest
//! images the tests, the demo and the benchmark migrate (cached).

use clap::Parser;
use pagefp_tests::guest_images;

#[derive(Debug, Parser)]
#[command(name = "pagefp-images", about = "Build the Linux guest memory images (cached)")]
struct Args {
    /// Rebuild every image even if its inputs did not change.
    #[arg(long)]
    force: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let images = guest_images::ensure(args.force)?;
    println!("{:<18} {:<10} {:>6} {:>14}  path", "image", "workload", "MiB", "non-zero pages");
    for image in &images {
        println!(
            "{:<18} {:<10} {:>6} {:>14}  {}",
            image.name,
            image.workload,
            image.mem_mib,
            image.nonzero_pages,
            image.ram_path.display()
        );
    }
    Ok(())
}
