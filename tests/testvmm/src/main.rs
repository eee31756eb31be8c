//! `pagefp-testvmm`: the small VMM of pagefp's tests, demo and benchmarks.
//! See the `pagefp_testvmm` library for what it does and its control protocol.

use std::path::PathBuf;

use clap::Parser;
use pagefp_testvmm::{DirtyMode, Harvest, TestVm, VmConfig, control::Server};

#[derive(Debug, Parser)]
#[command(
    name = "pagefp-testvmm",
    about = "One KVM VM whose guest writes pages as told over a control socket"
)]
struct Args {
    /// Control socket path.
    #[arg(long)]
    socket: PathBuf,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 64)]
    mem_mib: u32,
    /// Raw image copied to the start of guest RAM before KVM sees it.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Dirty logging mode.
    #[arg(long, value_enum, default_value = "ring")]
    dirty: DirtyMode,
    /// Dirty ring entries per vCPU (power of two).
    #[arg(long, default_value_t = 65536)]
    ring_entries: u32,
    /// When to harvest the dirty log: after every run, or only when asked.
    #[arg(long, value_enum, default_value = "auto")]
    harvest: Harvest,
    /// Number of equal RAM slots.
    #[arg(long, default_value_t = 1)]
    slots: u32,
    /// Wait for a migration: zeroed guest memory (RAM slots and code slot)
    /// that KVM sees only once `load_state` registers it; `resume` runs it.
    #[arg(long, conflicts_with = "image")]
    incoming: bool,
}

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    let config = VmConfig {
        mem_bytes: args.mem_mib as usize * (1 << 20),
        image: args.image,
        dirty: args.dirty,
        ring_entries: args.ring_entries,
        harvest: args.harvest,
        slots: args.slots,
    };
    let vm = if args.incoming {
        TestVm::new_incoming(config)
    } else {
        TestVm::new(config)
    };
    let result = vm.and_then(|vm| Server::new(vm, &args.socket).serve());
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("pagefp-testvmm: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
