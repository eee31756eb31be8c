//! KVM's per-vCPU dirty ring, harvested the way QEMU's reaper does.
//! (kvm-ioctls has no helpers for it.)

use std::{
    num::NonZeroUsize,
    os::fd::{AsRawFd, BorrowedFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::Context as _;
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

const DIRTY: u32 = 1;
const RESET: u32 = 2;
/// `_IO(KVMIO, 0xc7)`
const KVM_RESET_DIRTY_RINGS: libc::c_ulong = 0xAEC7;

/// `struct kvm_dirty_gfn`.
#[repr(C)]
struct DirtyGfn {
    flags: AtomicU32,
    slot: u32,
    offset: u64,
}

pub struct DirtyRing {
    entries: NonNull<DirtyGfn>,
    count: u32,
    fetch: u32,
}

// SAFETY: the mapping is owned by the ring and only used by its owner.
unsafe impl Send for DirtyRing {}

impl DirtyRing {
    /// Maps the ring of a vCPU created after the capability was enabled.
    pub fn map(vcpu_fd: BorrowedFd<'_>, count: u32) -> anyhow::Result<Self> {
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)?.unwrap_or(4096) as i64;
        let len = NonZeroUsize::new(count as usize * size_of::<DirtyGfn>()).context("ring size")?;
        // SAFETY: KVM provides the ring at this offset of the vCPU fd.
        let ptr = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                vcpu_fd,
                i64::from(kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET) * page,
            )
        }
        .context("mapping the vCPU dirty ring")?;
        Ok(Self {
            entries: ptr.cast(),
            count,
            fetch: 0,
        })
    }

    /// Collects every dirty entry (slot, page offset) and marks it for reset.
    pub fn collect(&mut self, out: &mut Vec<(u32, u64)>) -> usize {
        let mut n = 0;
        loop {
            let index = (self.fetch % self.count) as usize;
            // SAFETY: index < count, inside the mapping.
            let entry = unsafe { &*self.entries.as_ptr().add(index) };
            if entry.flags.load(Ordering::Acquire) & DIRTY == 0 {
                break;
            }
            out.push((entry.slot, entry.offset));
            entry.flags.store(RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
            n += 1;
        }
        n
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `map`.
        let _ = unsafe {
            munmap(
                self.entries.cast(),
                self.count as usize * size_of::<DirtyGfn>(),
            )
        };
    }
}

/// Asks KVM to write-protect every collected entry again.
pub fn reset_rings(vm_fd: &impl AsRawFd) -> anyhow::Result<u32> {
    // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument.
    let ret = unsafe { libc::ioctl(vm_fd.as_raw_fd(), KVM_RESET_DIRTY_RINGS as _, 0) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error()).context("KVM_RESET_DIRTY_RINGS");
    }
    Ok(ret as u32)
}
