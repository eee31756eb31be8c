//! VM, memory-slot and dirty-log discovery from the KVM ioctls a VMM makes.
//!
//! `sys_enter_ioctl` copies the arguments (the user pointer is valid then) into
//! `PENDING`; `sys_exit_ioctl` reports them only if the ioctl succeeded.
//! `KVM_RESET_DIRTY_RINGS` is reported at both ends, because the per-ring
//! `kvm_dirty_ring_reset` events fire in between. The entry time is kept too:
//! the dirty-log ioctls report it, since writes reported before it are the
//! ones a `KVM_GET_DIRTY_LOG` harvested. Which event an ioctl makes at exit is
//! decided by `agent_common::PendingIoctl::completed`, shared with the tests.

use agent_common::{Event, EventKind, PendingIoctl, SlotRegion, ioctl};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::tracepoint,
    programs::TracePointContext,
};
use aya_log_ebpf::warn;

use crate::emit::{PENDING, SLOT_PAGES, VM_PIDS, current_pid, emit, now_ns, offsets, slot_key};

/// The first 32 bytes of `kvm_userspace_memory_region` and `..._region2`.
#[repr(C)]
#[derive(Clone, Copy)]
struct MemoryRegion {
    slot: u32,
    flags: u32,
    guest_phys_addr: u64,
    memory_size: u64,
    userspace_addr: u64,
}

/// The head of `kvm_enable_cap`.
#[repr(C)]
#[derive(Clone, Copy)]
struct EnableCap {
    cap: u32,
    flags: u32,
    arg0: u64,
}

/// `kvm_dirty_log`.
#[repr(C)]
#[derive(Clone, Copy)]
struct DirtyLog {
    slot: u32,
    _pad: u32,
    dirty_bitmap: u64,
}

/// `kvm_clear_dirty_log`.
#[repr(C)]
#[derive(Clone, Copy)]
struct ClearDirtyLog {
    slot: u32,
    num_pages: u32,
    first_page: u64,
    dirty_bitmap: u64,
}

#[tracepoint]
pub fn pagefp_ioctl_enter(ctx: TracePointContext) -> u32 {
    let _ = try_ioctl_enter(&ctx);
    0
}

fn try_ioctl_enter(ctx: &TracePointContext) -> Result<(), i64> {
    let offsets = offsets().ok_or(0)?;
    // SAFETY: offsets come from this tracepoint's format file.
    let cmd = unsafe { ctx.read_at::<u64>(offsets.ioctl_enter_cmd as usize) }? as u32;
    if !is_watched(cmd) {
        return Ok(());
    }
    // SAFETY: as above.
    let fd = unsafe { ctx.read_at::<u64>(offsets.ioctl_enter_fd as usize) }? as u32;
    // SAFETY: as above.
    let arg = unsafe { ctx.read_at::<u64>(offsets.ioctl_enter_arg as usize) }?;
    let enter_ns = now_ns();
    let pending = match cmd {
        ioctl::KVM_CREATE_VM => PendingIoctl::create_vm(fd, enter_ns),
        ioctl::KVM_SET_USER_MEMORY_REGION | ioctl::KVM_SET_USER_MEMORY_REGION2 => {
            // SAFETY: bpf_probe_read_user checks the user address itself.
            let region = unsafe { bpf_probe_read_user(arg as *const MemoryRegion) }?;
            PendingIoctl::set_memory_region(
                fd,
                enter_ns,
                SlotRegion {
                    slot: region.slot,
                    flags: region.flags,
                    gpa: region.guest_phys_addr,
                    size: region.memory_size,
                    uaddr: region.userspace_addr,
                },
            )
        }
        ioctl::KVM_ENABLE_CAP => {
            // SAFETY: as above.
            let cap = unsafe { bpf_probe_read_user(arg as *const EnableCap) }?;
            PendingIoctl::enable_cap(fd, enter_ns, cap.cap, cap.flags, cap.arg0)
        }
        ioctl::KVM_GET_DIRTY_LOG => {
            // SAFETY: as above.
            let log = unsafe { bpf_probe_read_user(arg as *const DirtyLog) }?;
            PendingIoctl::get_dirty_log(fd, enter_ns, log.slot, log.dirty_bitmap)
        }
        ioctl::KVM_CLEAR_DIRTY_LOG => {
            // SAFETY: as above.
            let clear = unsafe { bpf_probe_read_user(arg as *const ClearDirtyLog) }?;
            PendingIoctl::clear_dirty_log(
                fd,
                enter_ns,
                clear.slot,
                clear.first_page,
                clear.num_pages,
                clear.dirty_bitmap,
            )
        }
        ioctl::KVM_RESET_DIRTY_RINGS => {
            emit(&Event::reset_rings_begin(current_pid(), enter_ns, fd));
            PendingIoctl::reset_dirty_rings(fd, enter_ns)
        }
        _ => return Ok(()),
    };
    if PENDING
        .insert(bpf_get_current_pid_tgid(), pending, 0)
        .is_err()
    {
        // The ioctl's result will not be reported: say so, and count it as a
        // loss so that the VM's pages become unknown.
        warn!(
            ctx,
            "pagefp: no room to follow KVM ioctl {:x} of pid {}",
            cmd,
            current_pid()
        );
        crate::emit::record_loss(current_pid(), enter_ns);
    }
    Ok(())
}

#[tracepoint]
pub fn pagefp_ioctl_exit(ctx: TracePointContext) -> u32 {
    let _ = try_ioctl_exit(&ctx);
    0
}

fn try_ioctl_exit(ctx: &TracePointContext) -> Result<(), i64> {
    let tid = bpf_get_current_pid_tgid();
    // SAFETY: values in PENDING are plain data written by this thread only.
    let pending = *unsafe { PENDING.get(tid) }.ok_or(0)?;
    let _ = PENDING.remove(tid);
    let offsets = offsets().ok_or(0)?;
    // SAFETY: offset from this tracepoint's format file.
    let ret = unsafe { ctx.read_at::<i64>(offsets.ioctl_exit_ret as usize) }?;
    let pid = current_pid();
    let Some(mut event) = pending.completed(pid, now_ns(), ret) else {
        return Ok(());
    };
    if event.kind() == EventKind::VM_CREATED {
        let _ = VM_PIDS.insert(pid, 1, 0);
    }
    if let Some(region) = pending.slot_region() {
        // Kept for the size of the bitmaps `KVM_GET_DIRTY_LOG` returns.
        let key = slot_key(pid, region.slot);
        if region.size == 0 {
            let _ = SLOT_PAGES.remove(&key);
        } else {
            let _ = SLOT_PAGES.insert(&key, &(region.size >> 12), 0);
        }
    }
    if let Some(copy) = pending.bitmap_copy() {
        event = event.with_bitmap_pages(crate::bitmap::send(pid, &copy));
    }
    emit(&event);
    Ok(())
}

#[inline(always)]
fn is_watched(cmd: u32) -> bool {
    matches!(
        cmd,
        ioctl::KVM_CREATE_VM
            | ioctl::KVM_SET_USER_MEMORY_REGION
            | ioctl::KVM_SET_USER_MEMORY_REGION2
            | ioctl::KVM_ENABLE_CAP
            | ioctl::KVM_GET_DIRTY_LOG
            | ioctl::KVM_CLEAR_DIRTY_LOG
            | ioctl::KVM_RESET_DIRTY_RINGS
    )
}
