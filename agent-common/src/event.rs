//! Kernel events: the one place where the meaning of every field is written.
//!
//! The eBPF programs build an [`Event`] only through its constructors (one per
//! [`EventKind`]); user space reads one only by decoding it into a
//! [`KernelEvent`], which rejects unknown kinds. The wire struct is a plain
//! header (kind, pid, time) and a payload of anonymous words whose fields are
//! private to this module, so the two sides cannot drift apart.

use core::fmt;

/// What an [`Event`] reports: a `u32` on the wire (an enum cannot be `Pod`:
/// a byte pattern outside its variants would be undefined behaviour).
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventKind(u32);

impl EventKind {
    /// `KVM_CREATE_VM` returned a VM fd.
    pub const VM_CREATED: Self = Self(1);
    /// `KVM_SET_USER_MEMORY_REGION(2)` succeeded (size 0 deletes the slot).
    pub const SLOT_SET: Self = Self(2);
    /// `KVM_ENABLE_CAP` succeeded.
    pub const CAP_ENABLED: Self = Self(3);
    /// `kvm:kvm_dirty_ring_push`: KVM put a newly dirtied page in a vCPU's ring.
    pub const DIRTY_RING_PUSH: Self = Self(4);
    /// `kvm:kvm_dirty_ring_reset`: one ring's harvested entries are
    /// write-protected again.
    pub const DIRTY_RING_RESET: Self = Self(5);
    /// `KVM_RESET_DIRTY_RINGS` started.
    pub const RESET_RINGS_BEGIN: Self = Self(6);
    /// `KVM_RESET_DIRTY_RINGS` returned: every ring's reset event came before.
    pub const RESET_RINGS_END: Self = Self(7);
    /// `KVM_GET_DIRTY_LOG` succeeded.
    pub const DIRTY_LOG_GET: Self = Self(8);
    /// `KVM_CLEAR_DIRTY_LOG` succeeded.
    pub const DIRTY_LOG_CLEAR: Self = Self(9);
    /// `mark_page_dirty_in_slot` (fexit): KVM marked a guest frame dirty.
    pub const DIRTY_GFN: Self = Self(10);
    /// `kvm:kvm_page_fault` with the write bit.
    pub const WRITE_FAULT: Self = Self(11);
    /// The last thread of a VMM process exited.
    pub const PROCESS_EXIT: Self = Self(12);
    /// Not an [`Event`]: the first word of a [`crate::BitmapChunk`], part of
    /// the bitmap a `KVM_GET_DIRTY_LOG` returned or a `KVM_CLEAR_DIRTY_LOG`
    /// was given.
    pub const DIRTY_BITMAP: Self = Self(13);

    /// Every kind of [`Event`], in wire order ([`Self::DIRTY_BITMAP`] is
    /// another record).
    pub const ALL: [Self; 12] = [
        Self::VM_CREATED,
        Self::SLOT_SET,
        Self::CAP_ENABLED,
        Self::DIRTY_RING_PUSH,
        Self::DIRTY_RING_RESET,
        Self::RESET_RINGS_BEGIN,
        Self::RESET_RINGS_END,
        Self::DIRTY_LOG_GET,
        Self::DIRTY_LOG_CLEAR,
        Self::DIRTY_GFN,
        Self::WRITE_FAULT,
        Self::PROCESS_EXIT,
    ];

    /// The number on the wire.
    #[inline(always)]
    pub const fn raw(self) -> u32 {
        self.0
    }

    /// A stable snake_case name (metrics labels, statistics), or `None` for a
    /// number that is no kind.
    pub const fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::VM_CREATED => "vm_created",
            Self::SLOT_SET => "slot_set",
            Self::CAP_ENABLED => "cap_enabled",
            Self::DIRTY_RING_PUSH => "dirty_ring_push",
            Self::DIRTY_RING_RESET => "dirty_ring_reset",
            Self::RESET_RINGS_BEGIN => "reset_rings_begin",
            Self::RESET_RINGS_END => "reset_rings_end",
            Self::DIRTY_LOG_GET => "dirty_log_get",
            Self::DIRTY_LOG_CLEAR => "dirty_log_clear",
            Self::DIRTY_GFN => "dirty_gfn",
            Self::WRITE_FAULT => "write_fault",
            Self::PROCESS_EXIT => "process_exit",
            Self::DIRTY_BITMAP => "dirty_bitmap",
            _ => return None,
        })
    }
}

/// A memory slot as `KVM_SET_USER_MEMORY_REGION(2)` sets it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotRegion {
    /// as_id << 16 | slot id.
    pub slot: u32,
    /// `KVM_MEM_*` flags.
    pub flags: u32,
    /// Guest physical address.
    pub gpa: u64,
    /// Bytes; 0 deletes the slot.
    pub size: u64,
    /// Userspace address of the slot in the VMM.
    pub uaddr: u64,
}

/// One event from the kernel, delivered through the ring buffer.
///
/// Built only by the constructors below, read only through
/// [`KernelEvent::try_from`]; which payload word means what is written once,
/// in each constructor and in the matching arm of the decoder next to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    kind: EventKind,
    /// Process id (thread group id) of the VMM.
    pid: u32,
    /// `bpf_ktime_get_ns()` when the event was made (0 for the untimed
    /// dirty-ring pushes, whose entry indexes give their order).
    ktime_ns: u64,
    small: [u32; 4],
    wide: [u64; 3],
}

impl Event {
    #[inline(always)]
    const fn new(
        kind: EventKind,
        pid: u32,
        ktime_ns: u64,
        small: [u32; 4],
        wide: [u64; 3],
    ) -> Self {
        Self {
            kind,
            pid,
            ktime_ns,
            small,
            wide,
        }
    }

    /// `KVM_CREATE_VM` returned `fd`.
    #[inline(always)]
    pub const fn vm_created(pid: u32, ktime_ns: u64, fd: u32) -> Self {
        Self::new(EventKind::VM_CREATED, pid, ktime_ns, [fd, 0, 0, 0], [0; 3])
    }

    /// A memory slot of VM `fd` was set to `region`.
    #[inline(always)]
    pub const fn slot_set(pid: u32, ktime_ns: u64, fd: u32, region: SlotRegion) -> Self {
        Self::new(
            EventKind::SLOT_SET,
            pid,
            ktime_ns,
            [fd, region.slot, region.flags, 0],
            [region.gpa, region.size, region.uaddr],
        )
    }

    /// `KVM_ENABLE_CAP` of capability `cap` with `flags` and `args[0]`.
    #[inline(always)]
    pub const fn cap_enabled(
        pid: u32,
        ktime_ns: u64,
        fd: u32,
        cap: u32,
        flags: u32,
        arg0: u64,
    ) -> Self {
        Self::new(
            EventKind::CAP_ENABLED,
            pid,
            ktime_ns,
            [fd, cap, flags, 0],
            [arg0, 0, 0],
        )
    }

    /// `kvm:kvm_dirty_ring_push`: entry `entry` of vCPU ring `ring` holds page
    /// `offset` of `slot` (as_id << 16 | slot id). Untimed.
    #[inline(always)]
    pub const fn dirty_ring_push(pid: u32, ring: u32, entry: u32, slot: u32, offset: u64) -> Self {
        Self::new(
            EventKind::DIRTY_RING_PUSH,
            pid,
            0,
            [ring, entry, slot, 0],
            [offset, 0, 0],
        )
    }

    /// `kvm:kvm_dirty_ring_reset`: entries of `ring` below `reset_index` are
    /// write-protected again; `dirty_index` is the ring's dirty index then.
    #[inline(always)]
    pub const fn dirty_ring_reset(
        pid: u32,
        ktime_ns: u64,
        ring: u32,
        reset_index: u32,
        dirty_index: u32,
    ) -> Self {
        Self::new(
            EventKind::DIRTY_RING_RESET,
            pid,
            ktime_ns,
            [ring, reset_index, dirty_index, 0],
            [0; 3],
        )
    }

    /// `KVM_RESET_DIRTY_RINGS` started on VM `fd`.
    #[inline(always)]
    pub const fn reset_rings_begin(pid: u32, ktime_ns: u64, fd: u32) -> Self {
        Self::new(
            EventKind::RESET_RINGS_BEGIN,
            pid,
            ktime_ns,
            [fd, 0, 0, 0],
            [0; 3],
        )
    }

    /// `KVM_RESET_DIRTY_RINGS` on VM `fd` returned `ret` (entries reset, or
    /// a negative errno: a failed reset still ends the batch).
    #[inline(always)]
    pub const fn reset_rings_end(pid: u32, ktime_ns: u64, fd: u32, ret: i64) -> Self {
        Self::new(
            EventKind::RESET_RINGS_END,
            pid,
            ktime_ns,
            [fd, 0, 0, 0],
            [ret as u64, 0, 0],
        )
    }

    /// `KVM_GET_DIRTY_LOG` of `slot` on VM `fd` entered the kernel at
    /// `enter_ns` and returned 0 at `ktime_ns`. The bitmap it returned
    /// follows in [`crate::BitmapChunk`]s, sent before this event; see
    /// [`Self::with_bitmap_pages`].
    #[inline(always)]
    pub const fn dirty_log_get(pid: u32, ktime_ns: u64, fd: u32, slot: u32, enter_ns: u64) -> Self {
        Self::new(
            EventKind::DIRTY_LOG_GET,
            pid,
            ktime_ns,
            [fd, slot, 0, 0],
            [enter_ns, 0, 0],
        )
    }

    /// A dirty-log event whose bitmap was sent for its first `pages` pages
    /// (the pages of the slot, or of the cleared range, past them were not:
    /// the agent must treat them as unknown). Other kinds are returned as
    /// they are.
    #[inline(always)]
    pub const fn with_bitmap_pages(mut self, pages: u32) -> Self {
        match self.kind {
            EventKind::DIRTY_LOG_GET | EventKind::DIRTY_LOG_CLEAR => self.small[3] = pages,
            _ => {}
        }
        self
    }

    /// `KVM_CLEAR_DIRTY_LOG` of pages `first_page..first_page + num_pages` of
    /// `slot` on VM `fd` entered at `enter_ns` and returned 0 at `ktime_ns`.
    #[inline(always)]
    pub const fn dirty_log_clear(
        pid: u32,
        ktime_ns: u64,
        fd: u32,
        slot: u32,
        first_page: u64,
        num_pages: u32,
        enter_ns: u64,
    ) -> Self {
        Self::new(
            EventKind::DIRTY_LOG_CLEAR,
            pid,
            ktime_ns,
            [fd, slot, num_pages, 0],
            [first_page, enter_ns, 0],
        )
    }

    /// `mark_page_dirty_in_slot`: KVM marked guest frame `gfn` dirty.
    #[inline(always)]
    pub const fn dirty_gfn(pid: u32, ktime_ns: u64, gfn: u64) -> Self {
        Self::new(EventKind::DIRTY_GFN, pid, ktime_ns, [0; 4], [gfn, 0, 0])
    }

    /// A write fault on guest physical address `gpa`.
    #[inline(always)]
    pub const fn write_fault(pid: u32, ktime_ns: u64, gpa: u64) -> Self {
        Self::new(EventKind::WRITE_FAULT, pid, ktime_ns, [0; 4], [gpa, 0, 0])
    }

    /// The VMM process `pid` exited.
    #[inline(always)]
    pub const fn process_exit(pid: u32, ktime_ns: u64) -> Self {
        Self::new(EventKind::PROCESS_EXIT, pid, ktime_ns, [0; 4], [0; 3])
    }

    /// What the event reports (not checked: see [`KernelEvent::try_from`]).
    #[inline(always)]
    pub const fn kind(&self) -> EventKind {
        self.kind
    }

    /// Process id (thread group id) of the VMM.
    #[inline(always)]
    pub const fn pid(&self) -> u32 {
        self.pid
    }

    /// `bpf_ktime_get_ns()` when the event was made; 0 for dirty-ring pushes.
    #[inline(always)]
    pub const fn ktime_ns(&self) -> u64 {
        self.ktime_ns
    }
}

/// An [`Event`] decoded: what happened, with every field named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelEvent {
    VmCreated {
        fd: u32,
    },
    SlotSet {
        fd: u32,
        region: SlotRegion,
    },
    CapEnabled {
        fd: u32,
        cap: u32,
        flags: u32,
        arg0: u64,
    },
    DirtyRingPush {
        ring: u32,
        entry: u32,
        slot: u32,
        offset: u64,
    },
    DirtyRingReset {
        ring: u32,
        reset_index: u32,
        dirty_index: u32,
    },
    ResetRingsBegin {
        fd: u32,
    },
    ResetRingsEnd {
        fd: u32,
        ret: i64,
    },
    /// `enter_ns`: when the ioctl entered the kernel. Writes reported
    /// before it were harvested (and their pages re-protected) by it.
    DirtyLogGet {
        fd: u32,
        slot: u32,
        enter_ns: u64,
        /// Pages of the slot whose bits were sent (from page 0).
        bitmap_pages: u32,
    },
    /// `enter_ns`: when the ioctl entered the kernel.
    DirtyLogClear {
        fd: u32,
        slot: u32,
        first_page: u64,
        num_pages: u32,
        enter_ns: u64,
        /// Pages of the range whose mask bits were sent (from `first_page`).
        bitmap_pages: u32,
    },
    DirtyGfn {
        gfn: u64,
    },
    WriteFault {
        gpa: u64,
    },
    ProcessExit,
}

/// An [`Event`] that user space cannot read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The kind number is none of [`EventKind`]'s.
    UnknownKind(u32),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownKind(kind) => write!(
                f,
                "eBPF event of unknown kind {kind}: the agent and its eBPF object were built from different versions (rebuild and reinstall pagefp)"
            ),
        }
    }
}

impl TryFrom<&Event> for KernelEvent {
    type Error = DecodeError;

    fn try_from(event: &Event) -> Result<Self, DecodeError> {
        let [s0, s1, s2, s3] = event.small;
        let [w0, w1, w2] = event.wide;
        Ok(match event.kind {
            EventKind::VM_CREATED => Self::VmCreated { fd: s0 },
            EventKind::SLOT_SET => Self::SlotSet {
                fd: s0,
                region: SlotRegion {
                    slot: s1,
                    flags: s2,
                    gpa: w0,
                    size: w1,
                    uaddr: w2,
                },
            },
            EventKind::CAP_ENABLED => Self::CapEnabled {
                fd: s0,
                cap: s1,
                flags: s2,
                arg0: w0,
            },
            EventKind::DIRTY_RING_PUSH => Self::DirtyRingPush {
                ring: s0,
                entry: s1,
                slot: s2,
                offset: w0,
            },
            EventKind::DIRTY_RING_RESET => Self::DirtyRingReset {
                ring: s0,
                reset_index: s1,
                dirty_index: s2,
            },
            EventKind::RESET_RINGS_BEGIN => Self::ResetRingsBegin { fd: s0 },
            EventKind::RESET_RINGS_END => Self::ResetRingsEnd {
                fd: s0,
                ret: w0 as i64,
            },
            EventKind::DIRTY_LOG_GET => Self::DirtyLogGet {
                fd: s0,
                slot: s1,
                enter_ns: w0,
                bitmap_pages: s3,
            },
            EventKind::DIRTY_LOG_CLEAR => Self::DirtyLogClear {
                fd: s0,
                slot: s1,
                num_pages: s2,
                first_page: w0,
                enter_ns: w1,
                bitmap_pages: s3,
            },
            EventKind::DIRTY_GFN => Self::DirtyGfn { gfn: w0 },
            EventKind::WRITE_FAULT => Self::WriteFault { gpa: w0 },
            EventKind::PROCESS_EXIT => Self::ProcessExit,
            other => return Err(DecodeError::UnknownKind(other.raw())),
        })
    }
}

impl KernelEvent {
    /// The kind on the wire.
    pub const fn kind(&self) -> EventKind {
        match self {
            Self::VmCreated { .. } => EventKind::VM_CREATED,
            Self::SlotSet { .. } => EventKind::SLOT_SET,
            Self::CapEnabled { .. } => EventKind::CAP_ENABLED,
            Self::DirtyRingPush { .. } => EventKind::DIRTY_RING_PUSH,
            Self::DirtyRingReset { .. } => EventKind::DIRTY_RING_RESET,
            Self::ResetRingsBegin { .. } => EventKind::RESET_RINGS_BEGIN,
            Self::ResetRingsEnd { .. } => EventKind::RESET_RINGS_END,
            Self::DirtyLogGet { .. } => EventKind::DIRTY_LOG_GET,
            Self::DirtyLogClear { .. } => EventKind::DIRTY_LOG_CLEAR,
            Self::DirtyGfn { .. } => EventKind::DIRTY_GFN,
            Self::WriteFault { .. } => EventKind::WRITE_FAULT,
            Self::ProcessExit => EventKind::PROCESS_EXIT,
        }
    }

    /// The kind's stable name (metrics labels, statistics).
    pub const fn name(&self) -> &'static str {
        match self.kind().name() {
            Some(name) => name,
            None => "unknown",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REGION: SlotRegion = SlotRegion {
        slot: (1 << 16) | 2,
        flags: 3,
        gpa: 0x1_0000_0000,
        size: 1 << 30,
        uaddr: 0x7f12_3456_0000,
    };

    /// One event of every kind, built by its constructor, with what it must
    /// decode to.
    fn every_kind() -> [(Event, KernelEvent); 12] {
        const PID: u32 = 77;
        const T: u64 = 1_000_000_007;
        [
            (
                Event::vm_created(PID, T, 9),
                KernelEvent::VmCreated { fd: 9 },
            ),
            (
                Event::slot_set(PID, T, 9, REGION),
                KernelEvent::SlotSet {
                    fd: 9,
                    region: REGION,
                },
            ),
            (
                Event::cap_enabled(PID, T, 9, 192, 4, 65536),
                KernelEvent::CapEnabled {
                    fd: 9,
                    cap: 192,
                    flags: 4,
                    arg0: 65536,
                },
            ),
            (
                Event::dirty_ring_push(PID, 3, u32::MAX, REGION.slot, 1 << 40),
                KernelEvent::DirtyRingPush {
                    ring: 3,
                    entry: u32::MAX,
                    slot: REGION.slot,
                    offset: 1 << 40,
                },
            ),
            (
                Event::dirty_ring_reset(PID, T, 3, 100, 120),
                KernelEvent::DirtyRingReset {
                    ring: 3,
                    reset_index: 100,
                    dirty_index: 120,
                },
            ),
            (
                Event::reset_rings_begin(PID, T, 9),
                KernelEvent::ResetRingsBegin { fd: 9 },
            ),
            (
                Event::reset_rings_end(PID, T, 9, -22),
                KernelEvent::ResetRingsEnd { fd: 9, ret: -22 },
            ),
            (
                Event::dirty_log_get(PID, T, 9, 5, T - 500).with_bitmap_pages(4096),
                KernelEvent::DirtyLogGet {
                    fd: 9,
                    slot: 5,
                    enter_ns: T - 500,
                    bitmap_pages: 4096,
                },
            ),
            (
                Event::dirty_log_clear(PID, T, 9, 5, 64, 128, T - 300).with_bitmap_pages(128),
                KernelEvent::DirtyLogClear {
                    fd: 9,
                    slot: 5,
                    first_page: 64,
                    num_pages: 128,
                    enter_ns: T - 300,
                    bitmap_pages: 128,
                },
            ),
            (
                Event::dirty_gfn(PID, T, 0xabcdef),
                KernelEvent::DirtyGfn { gfn: 0xabcdef },
            ),
            (
                Event::write_fault(PID, T, 0xabcdef000),
                KernelEvent::WriteFault { gpa: 0xabcdef000 },
            ),
            (Event::process_exit(PID, T), KernelEvent::ProcessExit),
        ]
    }

    #[test]
    fn every_constructor_decodes_to_its_kind_with_its_fields() {
        let cases = every_kind();
        for ((event, expected), kind) in cases.iter().zip(EventKind::ALL) {
            assert_eq!(event.kind(), kind);
            assert_eq!(event.pid(), 77);
            let expected_time = if kind == EventKind::DIRTY_RING_PUSH {
                0
            } else {
                1_000_000_007
            };
            assert_eq!(event.ktime_ns(), expected_time, "{kind:?}");
            let decoded = KernelEvent::try_from(event).unwrap();
            assert_eq!(decoded, *expected);
            assert_eq!(decoded.kind(), kind);
            assert_eq!(Some(decoded.name()), kind.name());
        }
    }

    #[test]
    fn kinds_are_numbered_and_named_once() {
        for (i, kind) in EventKind::ALL.iter().enumerate() {
            assert_eq!(kind.raw(), i as u32 + 1);
            let name = kind.name().unwrap();
            for other in &EventKind::ALL[i + 1..] {
                assert_ne!(Some(name), other.name());
            }
        }
        assert_eq!(EventKind(0).name(), None);
        assert_eq!(EventKind::DIRTY_BITMAP.name(), Some("dirty_bitmap"));
        assert!(!EventKind::ALL.contains(&EventKind::DIRTY_BITMAP));
        assert_eq!(EventKind(14).name(), None);
    }

    #[test]
    fn unknown_kinds_are_rejected() {
        for raw in [0, 13, 14, 0x8000_0000, u32::MAX] {
            let mut event = Event::process_exit(1, 2);
            event.kind = EventKind(raw);
            assert_eq!(
                KernelEvent::try_from(&event),
                Err(DecodeError::UnknownKind(raw))
            );
        }
    }
}
