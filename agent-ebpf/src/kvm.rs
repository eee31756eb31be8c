//! Guest page writes and re-protection points, from KVM's own tracepoints.

use agent_common::Event;
use aya_ebpf::{
    macros::{fexit, tracepoint},
    programs::{FExitContext, TracePointContext},
};

use crate::emit::{current_pid, emit, emit_quiet, now_ns, offsets};

/// `kvm:kvm_dirty_ring_push`: KVM put a newly dirtied page in a vCPU's ring.
/// Runs in the vCPU thread, so the current pid is the VMM's.
#[tracepoint]
pub fn pagefp_dirty_ring_push(ctx: TracePointContext) -> u32 {
    let _ = try_dirty_ring_push(&ctx);
    0
}

fn try_dirty_ring_push(ctx: &TracePointContext) -> Result<(), i64> {
    let offsets = offsets().ok_or(0)?;
    // One read of the record's head instead of one helper call per field.
    // SAFETY: the tracepoint record is at least RECORD bytes long (its last
    // field, `offset`, ends at byte 32 on every kernel with this tracepoint).
    let record: [u8; RECORD] = unsafe { ctx.read_at(0) }?;
    let event = Event::dirty_ring_push(
        current_pid(),
        field_u32(&record, offsets.ring_push_index),
        // The tracepoint fires after the index moved past the new entry.
        field_u32(&record, offsets.ring_push_dirty_index).wrapping_sub(1),
        field_u32(&record, offsets.ring_push_slot),
        field_u64(&record, offsets.ring_push_offset),
    );
    emit_quiet(&event);
    Ok(())
}

/// Bytes of the dirty-ring push record read at once.
const RECORD: usize = 32;

#[inline(always)]
fn field_u32(record: &[u8; RECORD], offset: u32) -> u32 {
    let at = (offset as usize) & (RECORD - 1) & !3;
    if at + 4 > RECORD {
        return 0;
    }
    u32::from_ne_bytes([record[at], record[at + 1], record[at + 2], record[at + 3]])
}

#[inline(always)]
fn field_u64(record: &[u8; RECORD], offset: u32) -> u64 {
    let at = (offset as usize) & (RECORD - 1) & !7;
    if at + 8 > RECORD {
        return 0;
    }
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&record[at..at + 8]);
    u64::from_ne_bytes(bytes)
}

/// `kvm:kvm_dirty_ring_reset`: KVM write-protected again every harvested entry
/// of one ring below `reset_index`.
#[tracepoint]
pub fn pagefp_dirty_ring_reset(ctx: TracePointContext) -> u32 {
    let _ = try_dirty_ring_reset(&ctx);
    0
}

fn try_dirty_ring_reset(ctx: &TracePointContext) -> Result<(), i64> {
    let offsets = offsets().ok_or(0)?;
    // SAFETY: offsets come from this tracepoint's format file.
    let (ring, reset_index, dirty_index) = unsafe {
        (
            ctx.read_at::<u32>(offsets.ring_reset_index as usize)?,
            ctx.read_at::<u32>(offsets.ring_reset_reset_index as usize)?,
            ctx.read_at::<u32>(offsets.ring_reset_dirty_index as usize)?,
        )
    };
    emit(&Event::dirty_ring_reset(
        current_pid(),
        now_ns(),
        ring,
        reset_index,
        dirty_index,
    ));
    Ok(())
}

/// `kvm:kvm_page_fault` with the write bit: the guest wrote a page that was
/// not writable. Only a hint (it never makes a page clean); it fires on
/// hardware-virtualised hosts, not under the instruction emulator.
#[tracepoint]
pub fn pagefp_write_fault(ctx: TracePointContext) -> u32 {
    let _ = try_write_fault(&ctx);
    0
}

const PFERR_WRITE_MASK: u64 = 1 << 1;

fn try_write_fault(ctx: &TracePointContext) -> Result<(), i64> {
    let offsets = offsets().ok_or(0)?;
    // SAFETY: offsets come from this tracepoint's format file.
    let error_code = unsafe { ctx.read_at::<u64>(offsets.page_fault_error_code as usize) }?;
    if error_code & PFERR_WRITE_MASK == 0 {
        return Ok(());
    }
    // SAFETY: as above.
    let gpa = unsafe { ctx.read_at::<u64>(offsets.page_fault_address as usize) }?;
    emit(&Event::write_fault(current_pid(), now_ns(), gpa));
    Ok(())
}

/// `mark_page_dirty_in_slot(kvm, memslot, gfn)`: every page KVM marks dirty, in
/// bitmap and ring mode alike. Loaded only where the kernel allows BPF
/// trampolines (fentry/fexit).
///
/// At exit, not entry: the event's time must come after the bit is set in the
/// slot's dirty bitmap. User space hashes the page after the first
/// `KVM_GET_DIRTY_LOG` that entered the kernel after that time, which then
/// surely harvested the bit and write-protected the page. A time taken at
/// entry could precede a GET that ran while this vCPU was preempted before
/// `set_bit`: that GET would neither harvest nor protect the page, and a hash
/// read after it could go stale unreported.
#[fexit(function = "mark_page_dirty_in_slot")]
pub fn pagefp_mark_page_dirty(ctx: FExitContext) -> u32 {
    if offsets().is_none() {
        return 0;
    }
    emit(&Event::dirty_gfn(
        current_pid(),
        now_ns(),
        ctx.arg::<u64>(2),
    ));
    0
}
