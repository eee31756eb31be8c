//! VM, memory-slot and dirty-log discovery from the KVM ioctls a VMM makes.
//!
//! `sys_enter_ioctl` copies the arguments (the user pointer is valid then) into
//! `PENDING`; `sys_exit_ioctl` reports them only if the ioctl succeeded.
//! `KVM_RESET_DIRTY_RINGS` is reported at both ends, because the per-ring
//! `kvm_dirty_ring_reset` events fire in between.

use agent_common::{PendingIoctl, ioctl, kind};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::tracepoint,
    programs::TracePointContext,
};
use aya_log_ebpf::warn;

use crate::emit::{PENDING, VM_PIDS, current_pid, emit, new_event, offsets};

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

/// `kvm_clear_dirty_log` (the head of `kvm_dirty_log` is its first field).
#[repr(C)]
#[derive(Clone, Copy)]
struct ClearDirtyLog {
    slot: u32,
    num_pages: u32,
    first_page: u64,
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
    let mut pending = PendingIoctl {
        cmd,
        fd,
        ..PendingIoctl::default()
    };
    match cmd {
        ioctl::KVM_SET_USER_MEMORY_REGION | ioctl::KVM_SET_USER_MEMORY_REGION2 => {
            // SAFETY: bpf_probe_read_user checks the user address itself.
            let region = unsafe { bpf_probe_read_user(arg as *const MemoryRegion) }?;
            pending.slot = region.slot;
            pending.flags = region.flags;
            pending.addr = region.guest_phys_addr;
            pending.size = region.memory_size;
            pending.uaddr = region.userspace_addr;
        }
        ioctl::KVM_ENABLE_CAP => {
            // SAFETY: as above.
            let cap = unsafe { bpf_probe_read_user(arg as *const EnableCap) }?;
            pending.slot = cap.cap;
            pending.flags = cap.flags;
            pending.addr = cap.arg0;
        }
        ioctl::KVM_GET_DIRTY_LOG => {
            // SAFETY: as above.
            pending.slot = unsafe { bpf_probe_read_user(arg as *const u32) }?;
        }
        ioctl::KVM_CLEAR_DIRTY_LOG => {
            // SAFETY: as above.
            let clear = unsafe { bpf_probe_read_user(arg as *const ClearDirtyLog) }?;
            pending.slot = clear.slot;
            pending.addr = clear.first_page;
            pending.size = u64::from(clear.num_pages);
        }
        ioctl::KVM_RESET_DIRTY_RINGS => {
            let mut event = new_event(kind::RESET_RINGS_BEGIN);
            event.fd = fd;
            emit(&event);
        }
        _ => {}
    }
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
        let mut lost = new_event(kind::SLOT_SET);
        lost.fd = fd;
        crate::emit::record_loss(lost.pid, lost.ktime_ns);
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
    let event_kind = match pending.cmd {
        ioctl::KVM_CREATE_VM => kind::VM_CREATED,
        ioctl::KVM_SET_USER_MEMORY_REGION | ioctl::KVM_SET_USER_MEMORY_REGION2 => kind::SLOT_SET,
        ioctl::KVM_ENABLE_CAP => kind::CAP_ENABLED,
        ioctl::KVM_GET_DIRTY_LOG => kind::DIRTY_LOG_GET,
        ioctl::KVM_CLEAR_DIRTY_LOG => kind::DIRTY_LOG_CLEAR,
        ioctl::KVM_RESET_DIRTY_RINGS => kind::RESET_RINGS_END,
        _ => return Ok(()),
    };
    // A failed reset still ends the batch of per-ring events; anything else
    // that failed changed nothing.
    if ret < 0 && event_kind != kind::RESET_RINGS_END {
        return Ok(());
    }
    let mut event = new_event(event_kind);
    event.fd = pending.fd;
    event.slot = pending.slot;
    event.flags = pending.flags;
    event.addr = pending.addr;
    event.size = pending.size;
    event.uaddr = pending.uaddr;
    if event_kind == kind::VM_CREATED {
        event.fd = ret as u32;
        let _ = VM_PIDS.insert(current_pid(), 1, 0);
    }
    if event_kind == kind::RESET_RINGS_END {
        event.seq = ret as u32;
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
