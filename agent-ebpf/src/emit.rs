//! Maps shared by every program, and event delivery with loss accounting.
//!
//! Events are built with `agent_common::Event`'s constructors (one per kind),
//! never field by field: their layout and meaning live in `agent-common`.

use agent_common::{Event, LossRecord, PendingIoctl, RingLayout, TraceOffsets};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};

/// Events to user space. User space may resize it at load time.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(16 * 1024 * 1024, 0);

/// Tracepoint field offsets, set by user space from the format files before
/// the programs load. Read-only (`.rodata`, frozen): the verifier knows every
/// field as a constant. Read only through [`offsets`].
#[unsafe(no_mangle)]
static TRACE_OFFSETS: TraceOffsets = TraceOffsets::UNSET;

/// `struct kvm_dirty_ring`'s layout, set by user space from the kernel's BTF
/// before the programs load (read-only, as above). Read only through
/// [`ring_layout`].
#[unsafe(no_mangle)]
static RING_LAYOUT: RingLayout = RingLayout::UNSET;

/// Events lost per VMM pid.
#[map]
pub static LOSSES: HashMap<u32, LossRecord> = HashMap::with_max_entries(4096, 0);

/// Every loss recorded so far (in `LOSSES` or `UNATTRIBUTED_LOSSES`), per
/// CPU (so no increment is lost: a CPU runs one program at a time): user
/// space reads this one element each round and walks `LOSSES` only when the
/// sum moved.
#[map]
pub static LOSS_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Events lost that could not even be counted under a pid: every VM is affected.
#[map]
pub static UNATTRIBUTED_LOSSES: Array<LossRecord> = Array::with_max_entries(1, 0);

/// Processes known to hold a KVM VM (filled here on `KVM_CREATE_VM` and by user
/// space for VMs it adopts). Only their exits are reported.
#[map]
pub static VM_PIDS: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);

/// Pages of every memory slot: key [`slot_key`], filled at each
/// `KVM_SET_USER_MEMORY_REGION(2)`; the size of a `KVM_GET_DIRTY_LOG` bitmap.
#[map]
pub static SLOT_PAGES: HashMap<u64, u64> = HashMap::with_max_entries(65536, 0);

/// The key of a slot (as_id << 16 | id) of VMM `pid` in [`SLOT_PAGES`].
#[inline(always)]
pub fn slot_key(pid: u32, slot: u32) -> u64 {
    (u64::from(pid) << 32) | u64::from(slot)
}

/// KVM ioctls between `sys_enter` and `sys_exit`, per thread (pid_tgid).
#[map]
pub static PENDING: HashMap<u64, PendingIoctl> = HashMap::with_max_entries(8192, 0);

/// The offsets, or `None` if user space did not set them (then nothing is
/// sent: offsets of 0 would read the wrong fields).
#[inline(always)]
pub fn offsets() -> Option<TraceOffsets> {
    // SAFETY: a volatile read of a static, so that the compiler does not
    // fold the object file's zeros in: the loader replaces them.
    let offsets = unsafe { core::ptr::read_volatile(&TRACE_OFFSETS) };
    (offsets.ready == 1).then_some(offsets)
}

/// `struct kvm_dirty_ring`'s layout (meaningful only in the programs user
/// space attaches when it knew the layout).
#[inline(always)]
pub fn ring_layout() -> RingLayout {
    // SAFETY: as in `offsets`.
    unsafe { core::ptr::read_volatile(&RING_LAYOUT) }
}

/// The current process id (thread group id).
#[inline(always)]
pub fn current_pid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC, the clock of every event.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// `BPF_RB_NO_WAKEUP`: do not wake the reader for this record.
pub const NO_WAKEUP: u64 = 1;

/// Sends `event`, or records its loss under its pid. The reader is woken for
/// rare events only; for the stream of dirty-page events it polls on its own
/// (every few milliseconds, and before it serves anything), which spares the
/// vCPU thread a wake-up per guest page write.
#[inline(always)]
pub fn emit(event: &Event) {
    emit_with(event, 0);
}

/// Like [`emit`], without waking the reader.
#[inline(always)]
pub fn emit_quiet(event: &Event) {
    emit_with(event, NO_WAKEUP);
}

#[inline(always)]
fn emit_with(event: &Event, flags: u64) {
    // One helper call (reserve, copy and submit in the kernel) rather than
    // a reserve and a submit: this runs once per guest page write.
    if EVENTS.output::<Event>(event, flags).is_ok() {
        return;
    }
    let ktime_ns = if event.ktime_ns() != 0 {
        event.ktime_ns()
    } else {
        now_ns()
    };
    record_loss(event.pid(), ktime_ns);
}

/// Records a loss of events of `pid` at `ktime_ns`, then counts it in
/// [`LOSS_COUNT`] (after the record, so that a reader who sees the count
/// move finds the record).
#[inline(always)]
pub fn record_loss(pid: u32, ktime_ns: u64) {
    note_loss(pid, ktime_ns);
    if let Some(count) = LOSS_COUNT.get_ptr_mut(0) {
        // SAFETY: this CPU's element lives as long as the map, and no other
        // program writes it while this one runs.
        unsafe { *count += 1 };
    }
}

#[inline(always)]
fn note_loss(pid: u32, ktime_ns: u64) {
    if let Some(record) = LOSSES.get_ptr_mut(pid) {
        // SAFETY: the pointer comes from a map lookup and stays valid for the
        // whole program run; a racing update can at worst lose one increment,
        // and any change of the record is enough for user space.
        unsafe {
            (*record).count += 1;
            (*record).last_ktime_ns = ktime_ns;
        }
        return;
    }
    let fresh = LossRecord {
        count: 1,
        last_ktime_ns: ktime_ns,
    };
    if LOSSES.insert(pid, fresh, 0).is_ok() {
        return;
    }
    if let Some(record) = UNATTRIBUTED_LOSSES.get_ptr_mut(0) {
        // SAFETY: as above, an array element lives as long as the map.
        unsafe {
            (*record).count += 1;
            (*record).last_ktime_ns = ktime_ns;
        }
    }
}
