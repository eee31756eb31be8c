//! SIGINT, SIGTERM and SIGHUP during `pagefp migrate send`: the migration
//! stops at the next page it would send, as if its connection were lost,
//! so before "go" the source VM resumes (it is never left paused by a
//! Ctrl-C or a closed terminal). After "go" the outcome is already on its
//! way: the sender waits for it (bounded by `--io-timeout-s`) and reports it.

use std::sync::atomic::{AtomicI32, Ordering};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

/// The signal that asked the migration to stop, 0 if none did.
static STOP: AtomicI32 = AtomicI32::new(0);

extern "C" fn note(signal: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(signal, Ordering::SeqCst);
}

/// Catches SIGINT, SIGTERM and SIGHUP for the rest of the process.
pub fn install() -> anyhow::Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(note),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores into an atomic, which is
        // async-signal-safe; no other code of this process installs one.
        unsafe { sigaction(signal, &action) }
            .map_err(|e| anyhow::anyhow!("cannot catch {signal}: {e}"))?;
    }
    Ok(())
}

/// An error if a signal asked the migration to stop.
pub fn check() -> anyhow::Result<()> {
    match STOP.load(Ordering::SeqCst) {
        0 => Ok(()),
        signal => {
            let name = Signal::try_from(signal).map_or("a signal", Signal::as_str);
            anyhow::bail!("interrupted by {name}")
        }
    }
}
