//! Guest page writes and re-protection points, from KVM's own tracepoints.

use agent_common::Event;
use aya_ebpf::{
    helpers::bpf_probe_read_kernel,
    macros::{btf_tracepoint, fexit, raw_tracepoint, tracepoint},
    programs::{BtfTracePointContext, FExitContext, RawTracePointContext, TracePointContext},
};

use crate::emit::{current_pid, emit, emit_quiet, now_ns, offsets, ring_layout};

// `kvm:kvm_dirty_ring_push(ring, slot, offset)`: KVM put a newly dirtied page
// in a vCPU's ring: the hot path, once per page a guest dirties. It runs in
// the vCPU thread, so the current pid is the VMM's. Three programs, of which
// user space attaches the cheapest the kernel takes: BTF-typed (the ring's
// indexes read in place), raw (read with one helper call), classic (the
// kernel formats a trace record first). All send the same event.

/// Sends the push of the entry before `dirty_index` (the tracepoint fires
/// after the index moved past the new entry) in ring `ring`.
#[inline(always)]
fn emit_push(ring: u32, dirty_index: u32, slot: u32, offset: u64) {
    emit_quiet(&Event::dirty_ring_push(
        current_pid(),
        ring,
        dirty_index.wrapping_sub(1),
        slot,
        offset,
    ));
}

/// `tp_btf/kvm_dirty_ring_push`: the kernel's arguments, and `ring`'s
/// indexes loaded directly (the verifier checks each load against the BTF
/// of `struct kvm_dirty_ring`, at the constant offsets of `RING_LAYOUT`).
#[btf_tracepoint(function = "kvm_dirty_ring_push")]
pub fn pagefp_dirty_ring_push_btf(ctx: BtfTracePointContext) -> u32 {
    let layout = ring_layout();
    let ring: *const u8 = ctx.arg(0);
    // SAFETY: `ring` is the kernel's `struct kvm_dirty_ring *`, valid for the
    // call; the offsets are its members' (from BTF), and the verifier
    // refuses the program if a load is not a whole member.
    let (index, dirty_index) = unsafe {
        (
            core::ptr::read_volatile(ring.add(layout.index as usize).cast::<u32>()),
            core::ptr::read_volatile(ring.add(layout.dirty_index as usize).cast::<u32>()),
        )
    };
    emit_push(index, dirty_index, ctx.arg(1), ctx.arg(2));
    0
}

/// Bytes of `struct kvm_dirty_ring` the raw program reads at once: its
/// indexes are within them (user space attaches it only then).
const RING_HEAD: usize = agent_common::RingLayout::HEAD_BYTES;

/// `raw_tracepoint/kvm_dirty_ring_push` where BTF-typed programs are
/// refused: the same, with the ring's head read by one helper call.
#[raw_tracepoint(tracepoint = "kvm_dirty_ring_push")]
pub fn pagefp_dirty_ring_push_raw(ctx: RawTracePointContext) -> u32 {
    let layout = ring_layout();
    let ring: *const [u8; RING_HEAD] = ctx.arg(0);
    // SAFETY: `ring` is the kernel's `struct kvm_dirty_ring *`, at least
    // RING_HEAD bytes long; a failed read sends nothing, and then the ring
    // reset that follows finds entries it was not told about, which makes
    // the ring's pages unknown (never clean).
    let Ok(head) = (unsafe { bpf_probe_read_kernel(ring) }) else {
        return 0;
    };
    emit_push(
        field_u32(&head, layout.index),
        field_u32(&head, layout.dirty_index),
        ctx.arg(1),
        ctx.arg(2),
    );
    0
}

/// The classic tracepoint, where neither of the above loads.
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
    emit_push(
        field_u32(&record, offsets.ring_push_index),
        field_u32(&record, offsets.ring_push_dirty_index),
        field_u32(&record, offsets.ring_push_slot),
        field_u64(&record, offsets.ring_push_offset),
    );
    Ok(())
}

/// Bytes of the dirty-ring push record read at once.
const RECORD: usize = 32;

#[inline(always)]
fn field_u32<const N: usize>(record: &[u8; N], offset: u32) -> u32 {
    let at = (offset as usize) & (N - 1) & !3;
    if at + 4 > N {
        return 0;
    }
    u32::from_ne_bytes([record[at], record[at + 1], record[at + 2], record[at + 3]])
}

#[inline(always)]
fn field_u64<const N: usize>(record: &[u8; N], offset: u32) -> u64 {
    let at = (offset as usize) & (N - 1) & !7;
    if at + 8 > N {
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
