//! A KVM ioctl followed from `sys_enter_ioctl` to `sys_exit_ioctl`.
//!
//! The arguments are read at entry (the user pointer is valid then) and
//! reported at exit only if the ioctl succeeded. Both halves live here, so
//! the event an ioctl produces is the same in the eBPF program and in the
//! tests that build events the way it does.

use crate::event::{Event, EventKind, SlotRegion};

/// A dirty bitmap to copy at `sys_exit_ioctl` (see [`crate::bitmap`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapCopy {
    /// `KVM_GET_DIRTY_LOG` (the bitmap covers the whole slot) or
    /// `KVM_CLEAR_DIRTY_LOG` (`first_page..first_page + pages`).
    pub of: crate::BitmapOf,
    pub slot: u32,
    pub enter_ns: u64,
    /// The bitmap in the VMM's memory.
    pub user_ptr: u64,
    pub first_page: u64,
    /// `None` for a GET: the slot's size, which the eBPF side keeps.
    pub pages: Option<u32>,
}

/// An ioctl seen at `sys_enter_ioctl`, kept per thread until `sys_exit_ioctl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingIoctl {
    /// The event to report at exit.
    kind: EventKind,
    /// The fd the ioctl was made on.
    fd: u32,
    small: [u32; 2],
    /// `bpf_ktime_get_ns()` at `sys_enter_ioctl`.
    enter_ns: u64,
    wide: [u64; 3],
}

impl PendingIoctl {
    #[inline(always)]
    const fn new(kind: EventKind, fd: u32, enter_ns: u64, small: [u32; 2], wide: [u64; 3]) -> Self {
        Self {
            kind,
            fd,
            small,
            enter_ns,
            wide,
        }
    }

    /// `KVM_CREATE_VM` on the `/dev/kvm` fd `fd`.
    #[inline(always)]
    pub const fn create_vm(fd: u32, enter_ns: u64) -> Self {
        Self::new(EventKind::VM_CREATED, fd, enter_ns, [0; 2], [0; 3])
    }

    /// `KVM_SET_USER_MEMORY_REGION(2)` of `region` on VM `fd`.
    #[inline(always)]
    pub const fn set_memory_region(fd: u32, enter_ns: u64, region: SlotRegion) -> Self {
        Self::new(
            EventKind::SLOT_SET,
            fd,
            enter_ns,
            [region.slot, region.flags],
            [region.gpa, region.size, region.uaddr],
        )
    }

    /// `KVM_ENABLE_CAP` of `cap` with `flags` and `args[0]` on VM `fd`.
    #[inline(always)]
    pub const fn enable_cap(fd: u32, enter_ns: u64, cap: u32, flags: u32, arg0: u64) -> Self {
        Self::new(
            EventKind::CAP_ENABLED,
            fd,
            enter_ns,
            [cap, flags],
            [arg0, 0, 0],
        )
    }

    /// `KVM_GET_DIRTY_LOG` of `slot` on VM `fd`, into the VMM's bitmap at
    /// `bitmap`.
    #[inline(always)]
    pub const fn get_dirty_log(fd: u32, enter_ns: u64, slot: u32, bitmap: u64) -> Self {
        Self::new(
            EventKind::DIRTY_LOG_GET,
            fd,
            enter_ns,
            [slot, 0],
            [0, bitmap, 0],
        )
    }

    /// `KVM_CLEAR_DIRTY_LOG` of the pages set in the mask at `bitmap`, among
    /// `num_pages` pages from `first_page` of `slot`.
    #[inline(always)]
    pub const fn clear_dirty_log(
        fd: u32,
        enter_ns: u64,
        slot: u32,
        first_page: u64,
        num_pages: u32,
        bitmap: u64,
    ) -> Self {
        Self::new(
            EventKind::DIRTY_LOG_CLEAR,
            fd,
            enter_ns,
            [slot, num_pages],
            [first_page, bitmap, 0],
        )
    }

    /// The region a `KVM_SET_USER_MEMORY_REGION(2)` sets.
    #[inline(always)]
    pub const fn slot_region(&self) -> Option<SlotRegion> {
        if self.kind.raw() != EventKind::SLOT_SET.raw() {
            return None;
        }
        let [slot, flags] = self.small;
        let [gpa, size, uaddr] = self.wide;
        Some(SlotRegion {
            slot,
            flags,
            gpa,
            size,
            uaddr,
        })
    }

    /// The bitmap a dirty-log ioctl returned or was given, to copy at exit.
    #[inline(always)]
    pub const fn bitmap_copy(&self) -> Option<BitmapCopy> {
        let [slot, num_pages] = self.small;
        let [first_page, user_ptr, _] = self.wide;
        let (of, first_page, pages) = match self.kind {
            EventKind::DIRTY_LOG_GET => (crate::BitmapOf::Get, 0, None),
            EventKind::DIRTY_LOG_CLEAR => (crate::BitmapOf::Clear, first_page, Some(num_pages)),
            _ => return None,
        };
        Some(BitmapCopy {
            of,
            slot,
            enter_ns: self.enter_ns,
            user_ptr,
            first_page,
            pages,
        })
    }

    /// `KVM_RESET_DIRTY_RINGS` on VM `fd` (its start is reported at once, by
    /// [`Event::reset_rings_begin`]).
    #[inline(always)]
    pub const fn reset_dirty_rings(fd: u32, enter_ns: u64) -> Self {
        Self::new(EventKind::RESET_RINGS_END, fd, enter_ns, [0; 2], [0; 3])
    }

    /// The event to report when the ioctl returned `ret` at `now_ns` in
    /// process `pid`, or `None` if it failed (and so changed nothing). A failed
    /// `KVM_RESET_DIRTY_RINGS` is still reported: it ends the batch of
    /// per-ring reset events.
    #[inline(always)]
    pub const fn completed(&self, pid: u32, now_ns: u64, ret: i64) -> Option<Event> {
        if ret < 0 && self.kind.raw() != EventKind::RESET_RINGS_END.raw() {
            return None;
        }
        let [s0, s1] = self.small;
        let [w0, w1, w2] = self.wide;
        let fd = self.fd;
        Some(match self.kind {
            EventKind::VM_CREATED => Event::vm_created(pid, now_ns, ret as u32),
            EventKind::SLOT_SET => Event::slot_set(
                pid,
                now_ns,
                fd,
                SlotRegion {
                    slot: s0,
                    flags: s1,
                    gpa: w0,
                    size: w1,
                    uaddr: w2,
                },
            ),
            EventKind::CAP_ENABLED => Event::cap_enabled(pid, now_ns, fd, s0, s1, w0),
            EventKind::DIRTY_LOG_GET => Event::dirty_log_get(pid, now_ns, fd, s0, self.enter_ns),
            EventKind::DIRTY_LOG_CLEAR => {
                Event::dirty_log_clear(pid, now_ns, fd, s0, w0, s1, self.enter_ns)
            }
            EventKind::RESET_RINGS_END => Event::reset_rings_end(pid, now_ns, fd, ret),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::KernelEvent;

    const PID: u32 = 4;
    const ENTER: u64 = 1_000;
    const EXIT: u64 = 2_000;

    fn decoded(pending: PendingIoctl, ret: i64) -> Option<KernelEvent> {
        let event = pending.completed(PID, EXIT, ret)?;
        assert_eq!(event.pid(), PID);
        assert_eq!(event.ktime_ns(), EXIT);
        Some(KernelEvent::try_from(&event).unwrap())
    }

    #[test]
    fn the_dirty_log_ioctls_carry_their_entry_time() {
        assert_eq!(
            decoded(PendingIoctl::get_dirty_log(7, ENTER, 3, 0x7000), 0),
            Some(KernelEvent::DirtyLogGet {
                fd: 7,
                slot: 3,
                enter_ns: ENTER,
                bitmap_pages: 0,
            })
        );
        assert_eq!(
            decoded(
                PendingIoctl::clear_dirty_log(7, ENTER, 3, 64, 32, 0x7000),
                0
            ),
            Some(KernelEvent::DirtyLogClear {
                fd: 7,
                slot: 3,
                first_page: 64,
                num_pages: 32,
                enter_ns: ENTER,
                bitmap_pages: 0,
            })
        );
        assert_eq!(
            PendingIoctl::get_dirty_log(7, ENTER, 3, 0x7000).bitmap_copy(),
            Some(BitmapCopy {
                of: crate::BitmapOf::Get,
                slot: 3,
                enter_ns: ENTER,
                user_ptr: 0x7000,
                first_page: 0,
                pages: None,
            })
        );
        assert_eq!(
            PendingIoctl::clear_dirty_log(7, ENTER, 3, 64, 32, 0x8000).bitmap_copy(),
            Some(BitmapCopy {
                of: crate::BitmapOf::Clear,
                slot: 3,
                enter_ns: ENTER,
                user_ptr: 0x8000,
                first_page: 64,
                pages: Some(32),
            })
        );
        assert_eq!(PendingIoctl::create_vm(3, ENTER).bitmap_copy(), None);
    }

    #[test]
    fn each_ioctl_makes_its_event_at_exit() {
        let region = SlotRegion {
            slot: 1,
            flags: 1,
            gpa: 0x10_0000,
            size: 0x20_0000,
            uaddr: 0x7f00_0000_0000,
        };
        assert_eq!(
            decoded(PendingIoctl::create_vm(3, ENTER), 11),
            Some(KernelEvent::VmCreated { fd: 11 }),
            "the VM fd is the return value"
        );
        assert_eq!(
            decoded(PendingIoctl::set_memory_region(11, ENTER, region), 0),
            Some(KernelEvent::SlotSet { fd: 11, region })
        );
        assert_eq!(
            PendingIoctl::set_memory_region(11, ENTER, region).slot_region(),
            Some(region)
        );
        assert_eq!(
            decoded(PendingIoctl::enable_cap(11, ENTER, 168, 0, 3), 0),
            Some(KernelEvent::CapEnabled {
                fd: 11,
                cap: 168,
                flags: 0,
                arg0: 3,
            })
        );
        assert_eq!(
            decoded(PendingIoctl::reset_dirty_rings(11, ENTER), 5),
            Some(KernelEvent::ResetRingsEnd { fd: 11, ret: 5 })
        );
    }

    #[test]
    fn failed_ioctls_report_nothing_but_a_failed_reset_ends_its_batch() {
        let region = SlotRegion {
            slot: 1,
            flags: 0,
            gpa: 0,
            size: 4096,
            uaddr: 4096,
        };
        for pending in [
            PendingIoctl::create_vm(3, ENTER),
            PendingIoctl::set_memory_region(11, ENTER, region),
            PendingIoctl::enable_cap(11, ENTER, 192, 0, 4096),
            PendingIoctl::get_dirty_log(11, ENTER, 0, 0x7000),
            PendingIoctl::clear_dirty_log(11, ENTER, 0, 0, 64, 0x7000),
        ] {
            assert_eq!(pending.completed(PID, EXIT, -22), None, "{pending:?}");
        }
        assert_eq!(
            decoded(PendingIoctl::reset_dirty_rings(11, ENTER), -4),
            Some(KernelEvent::ResetRingsEnd { fd: 11, ret: -4 })
        );
    }
}
