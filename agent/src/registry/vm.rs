//! One VM: its memory slots, dirty-tracking mode and sync state.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::pages::{PageCounts, PageTable};
use crate::{content::VmContentCounts, page::PAGE_SHIFT};

/// How the VM reports page writes to KVM's dirty log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DirtyMode {
    /// Not known yet (a VM adopted after it started).
    Unknown,
    /// KVM's per-vCPU dirty ring (`KVM_CAP_DIRTY_LOG_RING`).
    Ring,
    /// KVM's dirty bitmap (`KVM_GET_DIRTY_LOG`), optionally with manual
    /// re-protection (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`).
    Bitmap { manual_protect: bool },
    /// No KVM at all: a QEMU guest under TCG whose RAM is shared memory
    /// (see [`crate::tracking::qemu_guests`]); nothing reports its writes.
    None,
}

impl DirtyMode {
    /// The name `pagefp status` shows (`bitmap-mp`: manual re-protection).
    pub fn name(self) -> &'static str {
        match self {
            DirtyMode::Unknown => "unknown",
            DirtyMode::Ring => "ring",
            DirtyMode::Bitmap {
                manual_protect: false,
            } => "bitmap",
            DirtyMode::Bitmap {
                manual_protect: true,
            } => "bitmap-mp",
            DirtyMode::None => "none",
        }
    }
}

/// How the agent came to know the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Discovery {
    /// Seen from `KVM_CREATE_VM` on: nothing was missed.
    AtCreation,
    /// Running before the agent started.
    Adopted,
    /// A QEMU process without KVM whose RAM is a shared memory backend,
    /// found by scanning processes (see [`crate::tracking::qemu_guests`]).
    SharedMemory,
}

/// Whether every write since some point is known to have been reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncState {
    Synced,
    /// Something may have been missed at `since_ns` (agent start, lost
    /// events): pages stay unknown until every dirty ring was reset past what
    /// it held then.
    Unsynced {
        since_ns: u64,
        /// Ring → dirty index that a later reset must reach.
        barrier: Option<HashMap<u32, u32>>,
        /// Bitmap mode: slots harvested (`KVM_GET_DIRTY_LOG`) since then.
        harvested: std::collections::BTreeSet<u32>,
    },
}

/// A guest memory slot.
#[derive(Debug)]
pub struct Slot {
    /// as_id << 16 | slot id.
    pub id: u32,
    pub gpa: u64,
    pub size: u64,
    pub uaddr: u64,
    pub flags: u32,
    /// Changes whenever the slot is replaced, so stale hash jobs are dropped.
    pub epoch: u64,
    pub pages: PageTable,
    /// Bitmap mode with `mark_page_dirty_in_slot` events: (page, generation,
    /// ktime) of writes waiting for a `KVM_GET_DIRTY_LOG` that entered later.
    pub pending_bitmap: Vec<(u32, u32, u64)>,
    /// Next page the bounded-rate rescan of an untracked slot reads.
    pub rescan_cursor: u32,
    /// Bitmap harvests ([`super::bitmap`]): when the last two
    /// `KVM_GET_DIRTY_LOG`s of the slot entered the kernel, latest first.
    pub harvests: [Option<u64>; 2],
    /// Bitmap harvests: (page, generation, end of the read) of pages hashed
    /// and waiting for a harvest that entered after their read.
    pub confirming: Vec<(u32, u32, u64)>,
    /// Rescans of an untracked slot: each page's xxh3-64 when it was last
    /// hashed (0: none), so that a page that did not change is not hashed
    /// with blake3 again. Empty until the first rescan, and while tracked.
    pub checksums: Vec<u64>,
}

impl Slot {
    /// A slot whose pages are all unknown.
    pub fn new(id: u32, gpa: u64, size: u64, uaddr: u64, flags: u32, epoch: u64) -> Self {
        Self {
            id,
            gpa,
            size,
            uaddr,
            flags,
            epoch,
            pages: PageTable::new((size >> PAGE_SHIFT) as usize),
            pending_bitmap: Vec::new(),
            rescan_cursor: 0,
            harvests: [None; 2],
            confirming: Vec::new(),
            checksums: Vec::new(),
        }
    }

    pub fn logged(&self) -> bool {
        self.flags & agent_common::ioctl::KVM_MEM_LOG_DIRTY_PAGES != 0
    }

    /// The guest cannot write the slot (ROM, firmware, code).
    pub fn read_only(&self) -> bool {
        self.flags & agent_common::ioctl::KVM_MEM_READONLY != 0
    }

    pub fn page_count(&self) -> usize {
        (self.size >> PAGE_SHIFT) as usize
    }

    /// The page of guest physical address `gpa`, if inside this slot.
    pub fn page_of_gpa(&self, gpa: u64) -> Option<u32> {
        (gpa >= self.gpa && gpa < self.gpa + self.size)
            .then(|| ((gpa - self.gpa) >> PAGE_SHIFT) as u32)
    }
}

/// A reported ring entry waiting for its reset.
#[derive(Clone, Copy, Debug)]
pub struct PendingEntry {
    pub entry: u32,
    pub slot: u32,
    pub page: u32,
    pub generation: u32,
}

/// One vCPU's dirty ring as seen through its events.
#[derive(Debug, Default)]
pub struct Ring {
    pub pending: VecDeque<PendingEntry>,
    /// Reset index of the last reset seen.
    pub last_reset: Option<u32>,
}

/// Per-VM statistics.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct VmStats {
    pub dirty_events: u64,
    pub pages_hashed: u64,
    pub pages_rehashed: u64,
    pub losses: u64,
    pub resyncs: u64,
    /// Dirty events per second over the last sampling interval.
    pub dirty_per_sec: f64,
    #[serde(skip)]
    pub last_dirty_events: u64,
}

/// A `KVM_RESET_DIRTY_RINGS` under way: when it began (ktime), and per ring
/// (reset index, dirty index).
pub type ResetBatch = (u64, HashMap<u32, (u32, u32)>);

/// A VM held by one VMM process.
#[derive(Debug)]
pub struct Vm {
    pub pid: u32,
    /// The VMM's process name, filled in by the tracker
    /// ([`super::Registry::name_new_vms`]); empty until then.
    pub comm: String,
    pub vm_fd: Option<u32>,
    pub discovery: Discovery,
    pub dirty_mode: DirtyMode,
    pub slots: BTreeMap<u32, Slot>,
    pub rings: HashMap<u32, Ring>,
    pub sync: SyncState,
    /// Per-ring (reset index, dirty index) of the reset batch under way.
    pub reset_batch: Option<ResetBatch>,
    pub counts: VmContentCounts,
    pub stats: VmStats,
    /// Why the VM is not (fully) tracked, when it is not.
    pub note: Option<String>,
    /// Manual re-protection with `KVM_DIRTY_LOG_INITIALLY_SET`: turning
    /// dirty logging on marks every page dirty (and protects none).
    pub initially_set: bool,
    /// Chunks of dirty bitmaps waiting for their ioctl's event.
    pub bitmaps: Vec<super::bitmap::PendingBitmap>,
}

impl Vm {
    pub fn new(pid: u32, discovery: Discovery, sync: SyncState) -> Self {
        Self {
            pid,
            comm: String::new(),
            vm_fd: None,
            discovery,
            dirty_mode: match discovery {
                Discovery::AtCreation => DirtyMode::Bitmap {
                    manual_protect: false,
                },
                Discovery::Adopted => DirtyMode::Unknown,
                Discovery::SharedMemory => DirtyMode::None,
            },
            slots: BTreeMap::new(),
            rings: HashMap::new(),
            sync,
            reset_batch: None,
            counts: VmContentCounts::default(),
            stats: VmStats::default(),
            note: None,
            initially_set: false,
            bitmaps: Vec::new(),
        }
    }

    /// The VM's writes are learnt from the dirty bitmaps its VMM harvests
    /// ([`super::bitmap`]), not write by write.
    pub fn harvests_bitmaps(&self, fentry_active: bool) -> bool {
        match self.dirty_mode {
            DirtyMode::Bitmap { manual_protect } => manual_protect || !fentry_active,
            _ => false,
        }
    }

    /// The slot and page of guest physical address `gpa`.
    pub fn locate_gpa(&self, gpa: u64) -> Option<(u32, u32)> {
        self.slots
            .values()
            .find_map(|slot| slot.page_of_gpa(gpa).map(|page| (slot.id, page)))
    }

    pub fn page_count(&self) -> usize {
        self.slots.values().map(Slot::page_count).sum()
    }

    /// Pages by state, over every slot (kept as pages change: no page walk).
    pub fn page_counts(&self) -> PageCounts {
        let mut counts = PageCounts::default();
        for slot in self.slots.values() {
            counts.add(&slot.pages.counts());
        }
        counts
    }
}
