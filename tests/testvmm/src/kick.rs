//! Getting the vCPU out of KVM_RUN from another thread, the way firecracker
//! and cloud-hypervisor do: set `immediate_exit` in the vCPU's `kvm_run`
//! page (a KVM_RUN entered afterwards returns EINTR at once) and send a
//! signal to the vCPU thread (a KVM_RUN in progress returns EINTR). The
//! vCPU's registers then say exactly where the guest stopped, so the
//! interrupted routine continues with the next KVM_RUN.

use std::{
    num::NonZeroUsize,
    os::fd::BorrowedFd,
    ptr::NonNull,
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicU8, Ordering},
    },
};

use anyhow::Context as _;
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

/// The signal that kicks the vCPU thread (the first real-time signal the C
/// library leaves to applications).
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn ignore_kick(_: libc::c_int) {}

/// Installs the (empty) handler once: a handled signal interrupts KVM_RUN,
/// where the default action would end the process.
fn install_handler() -> anyhow::Result<()> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            // SAFETY: a zeroed sigaction is valid; the handler is an empty
            // extern "C" function, async-signal-safe. SA_RESTART restarts
            // other syscalls the signal may hit; KVM_RUN returns EINTR anyway.
            let ret = unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = ignore_kick as *const () as libc::sighandler_t;
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(kick_signal(), &action, std::ptr::null_mut())
            };
            if ret == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error().to_string())
            }
        })
        .clone()
        .map_err(|e| anyhow::anyhow!("installing the vCPU kick signal handler: {e}"))
}

/// Kicks one vCPU out of KVM_RUN; shared by the control threads.
pub struct Kicker {
    /// A mapping of the vCPU's `kvm_run` page of our own (the vCPU fd keeps
    /// the page alive as long as this mapping exists).
    run: NonNull<u8>,
    len: usize,
    /// The thread that runs the vCPU, while it is bound (see [`Kicker::bind`]).
    thread: Mutex<Option<libc::pthread_t>>,
}

// SAFETY: `run` points to a shared mapping owned by the Kicker and only
// touched through an atomic byte; `thread` is behind a mutex.
unsafe impl Send for Kicker {}
// SAFETY: as above.
unsafe impl Sync for Kicker {}

/// Unbinds the vCPU thread when dropped.
pub struct Bound<'a>(&'a Kicker);

impl Drop for Bound<'_> {
    fn drop(&mut self) {
        *self.0.thread.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl Kicker {
    /// Maps the `kvm_run` page of `vcpu_fd` (a second mapping beside
    /// kvm-ioctls' own).
    pub fn new(vcpu_fd: BorrowedFd<'_>) -> anyhow::Result<Self> {
        install_handler()?;
        let len = size_of::<kvm_bindings::kvm_run>().next_multiple_of(4096);
        // SAFETY: KVM maps the vCPU's kvm_run structure at offset 0 of its fd.
        let run = unsafe {
            mmap(
                None,
                NonZeroUsize::new(len).context("kvm_run size")?,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                vcpu_fd,
                0,
            )
        }
        .context("mapping the vCPU's kvm_run page for kicks")?;
        Ok(Self {
            run: run.cast(),
            len,
            thread: Mutex::new(None),
        })
    }

    fn immediate_exit(&self) -> &AtomicU8 {
        // SAFETY: the field lies inside the mapping, which lives as long as
        // self; KVM reads it with READ_ONCE, we access it atomically.
        unsafe {
            &*self
                .run
                .as_ptr()
                .add(std::mem::offset_of!(kvm_bindings::kvm_run, immediate_exit))
                .cast::<AtomicU8>()
        }
    }

    /// Makes the calling thread the one [`Kicker::kick`] signals, until the
    /// returned guard is dropped.
    pub fn bind(&self) -> Bound<'_> {
        // SAFETY: pthread_self has no preconditions.
        *self.thread.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(unsafe { libc::pthread_self() });
        Bound(self)
    }

    /// Gets the vCPU out of KVM_RUN now, or makes its next KVM_RUN return
    /// at once. The vCPU thread calls [`Kicker::clear`] once it is out.
    pub fn kick(&self) {
        self.immediate_exit().store(1, Ordering::SeqCst);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(thread) = *thread {
            // SAFETY: a bound thread unbinds (taking this lock) before it
            // ends, so `thread` is alive while we hold the lock.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }

    /// Lets KVM_RUN run again (after it returned EINTR).
    pub fn clear(&self) {
        self.immediate_exit().store(0, Ordering::SeqCst);
    }
}

impl Drop for Kicker {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        let _ = unsafe { munmap(self.run.cast(), self.len) };
    }
}
