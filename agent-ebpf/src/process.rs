//! VMM process exit.

use agent_common::Event;
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};

use crate::emit::{VM_PIDS, current_pid, emit, now_ns, offsets};

/// `sched:sched_process_exit`: reported when the last thread of a process that
/// holds a VM exits.
#[tracepoint]
pub fn pagefp_process_exit(ctx: TracePointContext) -> u32 {
    let _ = try_process_exit(&ctx);
    0
}

fn try_process_exit(ctx: &TracePointContext) -> Result<(), i64> {
    let offsets = offsets().ok_or(0)?;
    // SAFETY: offset from this tracepoint's format file.
    let group_dead = unsafe { ctx.read_at::<u8>(offsets.process_exit_group_dead as usize) }?;
    if group_dead == 0 {
        return Ok(());
    }
    let pid = current_pid();
    // SAFETY: a plain u32 value.
    if unsafe { VM_PIDS.get(pid) }.is_none() {
        return Ok(());
    }
    let _ = VM_PIDS.remove(pid);
    emit(&Event::process_exit(pid, now_ns()));
    Ok(())
}
