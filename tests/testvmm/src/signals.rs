//! Clean exit on SIGTERM / SIGINT: the control socket file is removed and the
//! process exits 0, as after an `exit` request.

use std::path::PathBuf;

use anyhow::Context as _;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};

/// Blocks SIGTERM and SIGINT in the calling thread (and so in every thread it
/// starts later) and starts a thread that waits for them. Call it before
/// starting any other thread.
pub fn exit_on_termination(socket: PathBuf) -> anyhow::Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
        .context("blocking SIGTERM/SIGINT for the signal thread")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let signal = set.wait();
            log::info!("{signal:?}: exiting");
            exit_now(&socket);
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// Removes the socket file and ends the process with status 0. The VM's file
/// descriptors and mappings go with the process.
pub fn exit_now(socket: &std::path::Path) -> ! {
    let _ = std::fs::remove_file(socket);
    std::process::exit(0)
}
