//! pagefp's eBPF programs.
//!
//! They watch KVM from the outside, on tracepoints only (see ENVIRONMENT.md:
//! kprobes are absent and fentry may be refused), and send events to user
//! space through one ring buffer. Every event is made by a constructor of
//! `agent_common::Event` (and every ioctl's by `agent_common::PendingIoctl`),
//! the layout user space decodes; no program writes an event's fields itself.
//! Sources:
//! - VMs and memory slots: `syscalls:sys_enter_ioctl` / `sys_exit_ioctl`.
//! - Guest page writes: `kvm:kvm_dirty_ring_push`, `fexit/mark_page_dirty_in_slot`
//!   (where the kernel allows BPF trampolines) and write faults
//!   (`kvm:kvm_page_fault`).
//! - Re-protection points: `kvm:kvm_dirty_ring_reset`, and the dirty-log ioctls
//!   with their bitmaps (`KVM_GET_DIRTY_LOG`'s result, `KVM_CLEAR_DIRTY_LOG`'s
//!   mask), copied at `sys_exit_ioctl`.
//! - VMM exit: `sched:sched_process_exit`.
//!
//! An event that does not fit in the ring buffer is counted in `LOSSES` under
//! the VMM's pid (or in `UNATTRIBUTED_LOSSES` if even that fails), so user
//! space always learns which VM may have missed something.
#![no_std]
#![no_main]

mod bitmap;
mod emit;
mod ioctl;
mod kvm;
mod process;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects programs that can reach this; it is never run.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
