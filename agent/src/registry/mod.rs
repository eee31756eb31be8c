//! The VM registry: what the agent knows of every VM, fed by eBPF events and
//! by hash results.
//!
//! The rule that keeps served hashes from ever being stale: a page is clean
//! only if it was read after KVM write-protected it again following the last
//! write the agent was told of. Every reported write bumps the page's
//! generation; a hash read before that bump is dropped at commit. Whatever may
//! have been missed (lost events, a VM that ran before the agent) makes the
//! VM unsynced: its pages stay unknown until every dirty ring has been reset
//! past what it held at that moment.
//!
//! Kernel events arrive as `agent_common::Event` records and are decoded into
//! `agent_common::KernelEvent` here, at the door ([`Registry::apply`]); one
//! that does not decode is counted and ignored. Nothing below reads a raw
//! event field. In bitmap mode a write reported at the exit of
//! `mark_page_dirty_in_slot` (its bit is set by then) is hashed after the
//! first `KVM_GET_DIRTY_LOG` of its slot that *entered* the kernel after the
//! report (the event carries that entry time).

pub mod bitmap;
pub mod pages;
pub mod vm;

use std::collections::{BTreeMap, HashMap};

use agent_common::{Event, KernelEvent, SlotRegion, ioctl};
pub use pages::{PageCounts, PageEntry, PageState, PageTable};
pub use vm::{DirtyMode, Discovery, SyncState, Vm};
use vm::{PendingEntry, Slot};

use crate::content::{ContentTable, PageHash, VmContentCounts};

/// One shared mapping holding guest RAM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamRegion {
    /// Where QEMU maps it.
    pub uaddr: u64,
    pub size: u64,
    /// Offset of the mapping in the backend file.
    pub offset: u64,
    /// The backend file as the memory map names it.
    pub path: String,
}

/// A QEMU process without KVM whose RAM is shared memory (found by
/// `crate::tracking::qemu_guests`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedRamGuest {
    pub pid: u32,
    pub regions: Vec<RamRegion>,
}

/// Which pages a hash job covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobPages {
    Range {
        first: u32,
        count: u32,
    },
    /// (page, generation): pages written and re-protected; each is hashed
    /// only if it was not written again since (then a newer job has it).
    List(Vec<(u32, u32)>),
}

/// Why pages are hashed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Dirty-tracked pages: a committed hash is clean.
    Track,
    /// Untracked pages: a committed hash is unverified.
    Rescan,
}

/// Pages of one slot to hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HashJob {
    pub pid: u32,
    pub slot: u32,
    pub epoch: u64,
    pub pages: JobPages,
    pub purpose: Purpose,
}

/// What a worker reads for a job: taken under the lock, before the read.
#[derive(Clone, Debug)]
pub struct ReadPlan {
    pub pid: u32,
    /// Userspace address of the slot in the VMM.
    pub uaddr: u64,
    /// (page, generation) to read.
    pub pages: Vec<(u32, u32)>,
    /// When the read ended (`crate::clock::monotonic_ns`), set by whoever
    /// read the pages; [`u64::MAX`] (as planned) means never: hashes of
    /// bitmap-harvested slots are then never confirmed ([`bitmap`]).
    pub read_end_ns: u64,
    /// Rescans: each page of `pages`'s checksum when it was last hashed
    /// (empty for other jobs). The reader leaves the checksum it computed
    /// here for the commit to keep, and marks the pages whose checksum did
    /// not move `unchanged` (their hash: `None`, nothing read anew).
    pub checks: Vec<ChangeCheck>,
}

/// A rescanned page's checksum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChangeCheck {
    /// xxh3-64 of the page (0: not known).
    pub checksum: u64,
    /// The reader found the page's checksum as it was when its content was
    /// last hashed: its content stands.
    pub unchanged: bool,
}

/// How a slot's pages are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tracking {
    /// Every write is reported: hashes are clean.
    Tracked,
    /// Tracked, but waiting until nothing missed can still be pending.
    Syncing,
    /// No usable write reports: rescanned at a bounded rate, unverified.
    Untracked,
}

impl Tracking {
    /// The name the API, `pagefp status` and the metrics use.
    pub fn name(self) -> &'static str {
        match self {
            Tracking::Tracked => "tracked",
            Tracking::Syncing => "syncing",
            Tracking::Untracked => "untracked",
        }
    }
}

/// Agent-wide event statistics.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RegistryStats {
    /// Events applied, by [`KernelEvent::name`].
    pub events: BTreeMap<&'static str, u64>,
    /// Events that could not be decoded (unknown kind: an eBPF object of
    /// another version), dropped.
    pub events_rejected: u64,
    pub events_unknown_vm: u64,
    pub losses_attributed: u64,
    pub losses_unattributed: u64,
    pub pages_hashed: u64,
    pub pages_rehashed: u64,
    pub hashes_dropped_stale: u64,
}

/// Everything the agent knows about the VMs of this host.
#[derive(Debug, Default)]
pub struct Registry {
    vms: BTreeMap<u32, Vm>,
    pub contents: ContentTable,
    /// The trampoline program (fexit) on `mark_page_dirty_in_slot` is
    /// attached: bitmap-mode VMs
    /// report their writes too.
    pub fentry_active: bool,
    /// Bitmap harvests that must enter after a read (or a request) before
    /// they vouch for it: 1, or 2 on hosts with Intel PML, where a write
    /// reaches the bitmap at the vCPU's next exit ([`bitmap`]).
    pub harvest_lag: usize,
    next_epoch: u64,
    jobs: Vec<HashJob>,
    /// VMs removed, not yet reported by [`Registry::take_removed`].
    removed: Vec<u32>,
    pub stats: RegistryStats,
}

/// Page `page` was (or may have been) written: its hash no longer counts,
/// and it gets a new generation in `state`. Its generation, if the page
/// exists.
fn forget(
    contents: &mut ContentTable,
    counts: &mut VmContentCounts,
    table: &mut PageTable,
    page: u32,
    state: PageState,
) -> Option<u32> {
    table.update(page, |entry| {
        if entry.content != pages::NO_CONTENT {
            contents.remove_page(counts, entry.content);
            entry.content = pages::NO_CONTENT;
        }
        entry.bump(state)
    })
}

fn entry_before(entry: u32, reset: u32) -> bool {
    (reset.wrapping_sub(entry) as i32) > 0
}

impl Registry {
    pub fn new(fentry_active: bool) -> Self {
        Self {
            fentry_active,
            harvest_lag: 1,
            ..Self::default()
        }
    }

    pub fn vms(&self) -> impl Iterator<Item = &Vm> {
        self.vms.values()
    }

    pub fn vm(&self, pid: u32) -> Option<&Vm> {
        self.vms.get(&pid)
    }

    /// For a hash list: takes a new mark of slot `slot_id` of VM `pid` (if
    /// it still has `epoch`) and returns it with the page ranges that
    /// changed since the mark `since` (see `PageTable::mark`); every page
    /// without `since`.
    pub fn mark_slot(
        &mut self,
        pid: u32,
        slot_id: u32,
        epoch: u64,
        since: Option<u64>,
    ) -> Option<(u64, Vec<(u32, u32)>)> {
        let slot = self
            .vms
            .get_mut(&pid)?
            .slots
            .get_mut(&slot_id)
            .filter(|slot| slot.epoch == epoch)?;
        let mark = slot.pages.mark();
        let ranges = match since {
            Some(since) => slot.pages.changed_since(since),
            None => vec![(0, slot.pages.len() as u32)],
        };
        Some((mark, ranges))
    }

    /// Hash jobs made by the changes so far.
    pub fn take_jobs(&mut self) -> Vec<HashJob> {
        std::mem::take(&mut self.jobs)
    }

    /// A VM that ran before the agent: listed, but unsynced from `now_ns`
    /// (its slots are learnt at their next registration).
    pub fn adopt(&mut self, pid: u32, now_ns: u64) {
        self.vms.entry(pid).or_insert_with(|| {
            let mut vm = Vm::new(
                pid,
                Discovery::Adopted,
                SyncState::Unsynced {
                    since_ns: now_ns,
                    barrier: None,
                    harvested: Default::default(),
                },
            );
            vm.note = Some(
                "started before the agent: waiting for its next memory-slot registration".into(),
            );
            vm
        });
    }

    /// A QEMU guest without KVM whose RAM is shared memory: listed with one
    /// unlogged slot per RAM mapping, so its pages are rescanned and served
    /// unverified. A VM the eBPF tracking knows is left alone; one whose
    /// mappings changed gets new slots (and loses its hashes).
    pub fn adopt_shared_ram(&mut self, guest: &SharedRamGuest) {
        let mut regions = guest.regions.clone();
        regions.sort_by(|a, b| (&a.path, a.offset).cmp(&(&b.path, b.offset)));
        if let Some(known) = self.vms.get(&guest.pid) {
            let same =
                known.discovery == Discovery::SharedMemory
                    && known.slots.len() == regions.len()
                    && known.slots.values().zip(&regions).all(|(slot, region)| {
                        slot.uaddr == region.uaddr && slot.size == region.size
                    });
            if known.discovery != Discovery::SharedMemory || same {
                return;
            }
            self.remove_vm(guest.pid);
        }
        let mut vm = Vm::new(guest.pid, Discovery::SharedMemory, SyncState::Synced);
        vm.note = Some(
            "QEMU without KVM, RAM in shared memory: no write reports, pages rescanned (unverified)"
                .into(),
        );
        // Guest-physical addresses are not known from outside QEMU: a slot's
        // `gpa` is its place in the guest's RAM mappings laid end to end.
        let mut gpa = 0;
        for (id, region) in regions.iter().enumerate() {
            self.next_epoch += 1;
            let slot = Slot::new(
                id as u32,
                gpa,
                region.size,
                region.uaddr,
                0,
                self.next_epoch,
            );
            vm.slots.insert(slot.id, slot);
            gpa += region.size;
        }
        self.vms.insert(guest.pid, vm);
    }

    /// Shared-memory guests no longer found by the last scan (QEMU exited,
    /// or started using KVM): forgotten.
    pub fn drop_shared_ram_except(&mut self, found: &[u32]) {
        let gone: Vec<u32> = self
            .vms
            .values()
            .filter(|vm| vm.discovery == Discovery::SharedMemory && !found.contains(&vm.pid))
            .map(|vm| vm.pid)
            .collect();
        for pid in gone {
            self.remove_vm(pid);
        }
    }

    /// How the pages of `slot` are kept.
    pub fn tracking(&self, vm: &Vm, slot: &Slot) -> Tracking {
        slot_tracking(vm, slot)
    }

    /// Applies one event from the kernel. An event that does not decode is
    /// counted in [`RegistryStats::events_rejected`] and changes nothing.
    pub fn apply(&mut self, raw: &Event) {
        match KernelEvent::try_from(raw) {
            Ok(event) => self.apply_decoded(raw.pid(), raw.ktime_ns(), &event),
            Err(err) => {
                if self.stats.events_rejected == 0 {
                    log::warn!("{err}");
                }
                self.stats.events_rejected += 1;
            }
        }
    }

    /// Applies one decoded event of process `pid`, made at `ktime_ns`.
    fn apply_decoded(&mut self, pid: u32, ktime_ns: u64, event: &KernelEvent) {
        *self.stats.events.entry(event.name()).or_insert(0) += 1;
        match *event {
            KernelEvent::VmCreated { fd } => return self.vm_created(pid, fd),
            KernelEvent::ProcessExit => return self.remove_vm(pid),
            _ => {}
        }
        if !self.vms.contains_key(&pid) {
            // A VM created before the agent and missed by its scan.
            self.stats.events_unknown_vm += 1;
            self.adopt(pid, ktime_ns);
        }
        let vm = self.vms.get_mut(&pid).unwrap();
        match *event {
            KernelEvent::SlotSet { region, .. } => self.slot_set(pid, region),
            KernelEvent::CapEnabled { cap, arg0, .. } => cap_enabled(vm, cap, arg0),
            KernelEvent::DirtyRingPush {
                ring,
                entry,
                slot,
                offset,
            } => self.ring_push(pid, ring, entry, slot, offset),
            KernelEvent::DirtyRingReset {
                ring,
                reset_index,
                dirty_index,
            } => self.ring_reset(pid, ring, reset_index, dirty_index),
            KernelEvent::ResetRingsBegin { .. } => {
                vm.reset_batch = Some((ktime_ns, HashMap::new()))
            }
            KernelEvent::ResetRingsEnd { .. } => self.reset_batch_end(pid),
            KernelEvent::DirtyLogGet {
                slot,
                enter_ns,
                bitmap_pages,
                ..
            } => self.dirty_log_get(pid, slot, enter_ns, bitmap_pages),
            KernelEvent::DirtyLogClear {
                slot,
                first_page,
                num_pages,
                enter_ns,
                bitmap_pages,
                ..
            } => {
                // Only manual protection clears (an adopted VM's mode was not
                // seen being enabled).
                if matches!(vm.dirty_mode, DirtyMode::Unknown | DirtyMode::Bitmap { .. }) {
                    vm.dirty_mode = DirtyMode::Bitmap {
                        manual_protect: true,
                    };
                }
                if vm.harvests_bitmaps(self.fentry_active) {
                    self.harvest_clear(pid, slot, enter_ns, first_page, num_pages, bitmap_pages);
                }
            }
            KernelEvent::DirtyGfn { gfn } => self.dirty_gfn(pid, gfn, ktime_ns),
            KernelEvent::WriteFault { gpa } => self.write_fault(pid, gpa),
            // Handled above.
            KernelEvent::VmCreated { .. } | KernelEvent::ProcessExit => {}
        }
    }

    /// Events of `pid` (or of every VM, for `None`) may have been lost at
    /// `since_ns`.
    pub fn note_loss(&mut self, pid: Option<u32>, since_ns: u64) {
        let pids: Vec<u32> = match pid {
            Some(pid) => vec![pid],
            None => self.vms.keys().copied().collect(),
        };
        match pid {
            Some(_) => self.stats.losses_attributed += 1,
            None => self.stats.losses_unattributed += 1,
        }
        for pid in pids {
            let Some(vm) = self.vms.get_mut(&pid) else {
                continue;
            };
            vm.stats.losses += 1;
            vm.bitmaps.clear();
            for slot in vm.slots.values_mut() {
                slot.confirming.clear();
            }
            vm.sync = SyncState::Unsynced {
                since_ns,
                barrier: None,
                harvested: Default::default(),
            };
            vm.note =
                Some("events were lost: pages unknown until the dirty rings are reset".into());
            for slot in vm.slots.values_mut() {
                for page in 0..slot.pages.len() as u32 {
                    if slot
                        .pages
                        .get(page)
                        .is_some_and(|p| p.state() != PageState::Dirty)
                    {
                        forget(
                            &mut self.contents,
                            &mut vm.counts,
                            &mut slot.pages,
                            page,
                            PageState::Unknown,
                        );
                    }
                }
            }
        }
    }

    pub fn remove_vm(&mut self, pid: u32) {
        if let Some(vm) = self.vms.remove(&pid) {
            self.contents.remove_vm(vm.counts);
            self.removed.push(pid);
        }
    }

    /// Where one hashed copy of each content of `ids` lives among the VMs
    /// `pids`: content id -> (pid, userspace address of the page). One pass
    /// over those VMs' pages.
    pub fn locate_contents(
        &self,
        pids: &[u32],
        ids: impl IntoIterator<Item = crate::content::ContentId>,
    ) -> HashMap<crate::content::ContentId, (u32, u64)> {
        let mut wanted: std::collections::HashSet<_> = ids.into_iter().collect();
        let mut found = HashMap::with_capacity(wanted.len());
        for vm in pids.iter().filter_map(|pid| self.vms.get(pid)) {
            for slot in vm.slots.values() {
                for (index, page) in slot.pages.iter().enumerate() {
                    if page.content != pages::NO_CONTENT && wanted.remove(&page.content) {
                        let uaddr = slot.uaddr + (index * crate::page::PAGE_SIZE) as u64;
                        found.insert(page.content, (vm.pid, uaddr));
                        if wanted.is_empty() {
                            return found;
                        }
                    }
                }
            }
        }
        found
    }

    /// Gives the VMs that have no name yet the one `name_of` finds (the
    /// registry does no I/O: the tracker passes a `/proc` reader).
    pub fn name_new_vms(&mut self, name_of: impl Fn(u32) -> String) {
        for vm in self.vms.values_mut().filter(|vm| vm.comm.is_empty()) {
            vm.comm = name_of(vm.pid);
        }
    }

    /// VMs removed since the last call (their memory mappings, held
    /// elsewhere, must be dropped too, or their RAM is never freed).
    pub fn take_removed(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.removed)
    }

    /// Updates every VM's dirty rate; `seconds` since the last call.
    pub fn sample_rates(&mut self, seconds: f64) {
        for vm in self.vms.values_mut() {
            let delta = vm.stats.dirty_events - vm.stats.last_dirty_events;
            vm.stats.last_dirty_events = vm.stats.dirty_events;
            vm.stats.dirty_per_sec = delta as f64 / seconds.max(1e-3);
        }
    }

    /// Removes the VMs whose process no longer exists (a missed exit
    /// event), as `alive` tells; returns their pids.
    pub fn reap_gone(&mut self, alive: impl Fn(u32) -> bool) -> Vec<u32> {
        let gone: Vec<u32> = self
            .vms
            .keys()
            .copied()
            .filter(|pid| !alive(*pid))
            .collect();
        for pid in &gone {
            self.remove_vm(*pid);
        }
        gone
    }

    fn vm_created(&mut self, pid: u32, fd: u32) {
        if let Some(old) = self.vms.get(&pid)
            && old.discovery == Discovery::AtCreation
            && !old.slots.is_empty()
        {
            let vm = self.vms.get_mut(&pid).unwrap();
            vm.note = Some(format!(
                "the process created another VM (fd {fd}): only one VM per process is tracked"
            ));
            vm.sync = SyncState::Unsynced {
                since_ns: u64::MAX,
                barrier: None,
                harvested: Default::default(),
            };
            return;
        }
        self.remove_vm(pid);
        let mut vm = Vm::new(pid, Discovery::AtCreation, SyncState::Synced);
        vm.vm_fd = Some(fd);
        self.vms.insert(pid, vm);
    }

    fn slot_set(&mut self, pid: u32, region: SlotRegion) {
        self.next_epoch += 1;
        let epoch = self.next_epoch;
        let vm = self.vms.get_mut(&pid).unwrap();
        if vm.discovery == Discovery::Adopted {
            vm.note = None;
        }
        let id = region.slot;
        if let Some(old) = vm.slots.get_mut(&id)
            && old.gpa == region.gpa
            && old.size == region.size
            && old.uaddr == region.uaddr
            && region.size != 0
        {
            // Only the flags changed (typically dirty logging switched on or off).
            let was_logged = old.logged();
            old.flags = region.flags;
            if old.logged() && !was_logged {
                // KVM write-protects every page now: what is read from here on
                // is valid until the next report.
                old.epoch = epoch;
                old.checksums = Vec::new();
                for page in 0..old.pages.len() as u32 {
                    forget(
                        &mut self.contents,
                        &mut vm.counts,
                        &mut old.pages,
                        page,
                        PageState::Unknown,
                    );
                }
            } else if !old.logged() {
                old.confirming.clear();
                old.harvests = [None; 2];
                for page in 0..old.pages.len() as u32 {
                    old.pages.update(page, |entry| {
                        if matches!(entry.state(), PageState::Clean | PageState::Confirming) {
                            entry.set_state(PageState::Unverified);
                        }
                    });
                }
            }
        } else {
            if let Some(old) = vm.slots.remove(&id) {
                for page in old.pages.iter() {
                    if page.content != pages::NO_CONTENT {
                        self.contents.remove_page(&mut vm.counts, page.content);
                    }
                }
            }
            if region.size == 0 {
                return;
            }
            let mut slot = Slot::new(
                id,
                region.gpa,
                region.size,
                region.uaddr,
                region.flags,
                epoch,
            );
            // Writes reported before the slot was known (an adopted VM).
            for ring in vm.rings.values_mut() {
                for pending in ring.pending.iter_mut().filter(|p| p.slot == id) {
                    if let Some(generation) = slot
                        .pages
                        .update(pending.page, |page| page.bump(PageState::Dirty))
                    {
                        pending.generation = generation;
                    }
                }
            }
            slot.pages.shrink_to_fit();
            vm.slots.insert(id, slot);
        }
        let vm = &self.vms[&pid];
        let initially_dirty = vm.initially_set
            && vm.harvests_bitmaps(self.fentry_active)
            && vm.slots.get(&id).is_some_and(|slot| slot.logged());
        if !initially_dirty {
            // (With KVM_DIRTY_LOG_INITIALLY_SET every page of a newly logged
            // slot is dirty until a CLEAR protects and queues it.)
            self.queue_full_pass(pid, id);
        }
    }

    /// Queues every page of a slot that wants a hash, if the slot is tracked.
    fn queue_full_pass(&mut self, pid: u32, slot_id: u32) {
        let vm = &self.vms[&pid];
        let Some(slot) = vm.slots.get(&slot_id) else {
            return;
        };
        if self.tracking(vm, slot) != Tracking::Tracked {
            return;
        }
        self.jobs.push(HashJob {
            pid,
            slot: slot_id,
            epoch: slot.epoch,
            pages: JobPages::Range {
                first: 0,
                count: slot.pages.len() as u32,
            },
            purpose: Purpose::Track,
        });
    }

    /// `entry` of vCPU ring `ring` reports page `offset` of `slot_id`.
    fn ring_push(&mut self, pid: u32, ring: u32, entry: u32, slot_id: u32, offset: u64) {
        let vm = self.vms.get_mut(&pid).unwrap();
        vm.stats.dirty_events += 1;
        if vm.dirty_mode == DirtyMode::Unknown || matches!(vm.dirty_mode, DirtyMode::Bitmap { .. })
        {
            vm.dirty_mode = DirtyMode::Ring;
        }
        let ring = vm.rings.entry(ring).or_default();
        let page_index = offset as u32;
        let Some(slot) = vm.slots.get_mut(&slot_id) else {
            // Unknown slot (adopted VM): remember it for when the slot appears.
            ring.pending.push_back(PendingEntry {
                entry,
                slot: slot_id,
                page: page_index,
                generation: u32::MAX,
            });
            return;
        };
        let already_reset = ring
            .last_reset
            .is_some_and(|reset| entry_before(entry, reset));
        // The reset overtook this event on another CPU: the page is
        // write-protected again already.
        let state = if already_reset {
            PageState::Queued
        } else {
            PageState::Dirty
        };
        let Some(generation) = forget(
            &mut self.contents,
            &mut vm.counts,
            &mut slot.pages,
            page_index,
            state,
        ) else {
            return;
        };
        if already_reset {
            let epoch = slot.epoch;
            self.queue_pages(pid, slot_id, epoch, vec![(page_index, generation)]);
        } else {
            ring.pending.push_back(PendingEntry {
                entry,
                slot: slot_id,
                page: page_index,
                generation,
            });
        }
    }

    /// Entries of `ring_id` below `reset` are write-protected again.
    fn ring_reset(&mut self, pid: u32, ring_id: u32, reset: u32, dirty_index: u32) {
        let vm = self.vms.get_mut(&pid).unwrap();
        if vm.dirty_mode == DirtyMode::Unknown {
            vm.dirty_mode = DirtyMode::Ring;
        }
        if let Some((_, batch)) = &mut vm.reset_batch {
            batch.insert(ring_id, (reset, dirty_index));
        }
        let ring = vm.rings.entry(ring_id).or_default();
        ring.last_reset = Some(reset);
        let mut ready: BTreeMap<u32, Vec<(u32, u32)>> = BTreeMap::new();
        while let Some(front) = ring.pending.front() {
            if !entry_before(front.entry, reset) {
                break;
            }
            let pending = ring.pending.pop_front().unwrap();
            let Some(slot) = vm.slots.get_mut(&pending.slot) else {
                continue;
            };
            let queued = slot.pages.update(pending.page, |page| {
                let due =
                    page.generation() == pending.generation && page.state() == PageState::Dirty;
                if due {
                    page.set_state(PageState::Queued);
                }
                due
            });
            if queued == Some(true) {
                ready
                    .entry(pending.slot)
                    .or_default()
                    .push((pending.page, pending.generation));
            }
        }
        let epochs: Vec<u64> = ready.keys().map(|id| vm.slots[id].epoch).collect();
        for ((slot_id, pages), epoch) in ready.into_iter().zip(epochs) {
            self.queue_pages(pid, slot_id, epoch, pages);
        }
    }

    fn queue_pages(&mut self, pid: u32, slot_id: u32, epoch: u64, pages: Vec<(u32, u32)>) {
        let vm = &self.vms[&pid];
        let slot = &vm.slots[&slot_id];
        if self.tracking(vm, slot) != Tracking::Tracked {
            return;
        }
        self.jobs.push(HashJob {
            pid,
            slot: slot_id,
            epoch,
            pages: JobPages::List(pages),
            purpose: Purpose::Track,
        });
    }

    fn reset_batch_end(&mut self, pid: u32) {
        let vm = self.vms.get_mut(&pid).unwrap();
        let Some((begin_ns, batch)) = vm.reset_batch.take() else {
            return;
        };
        let SyncState::Unsynced {
            since_ns, barrier, ..
        } = &mut vm.sync
        else {
            return;
        };
        if begin_ns <= *since_ns {
            return;
        }
        let barrier = barrier.get_or_insert_with(|| {
            batch
                .iter()
                .filter(|(_, (reset, dirty))| reset != dirty)
                .map(|(ring, (_, dirty))| (*ring, *dirty))
                .collect()
        });
        barrier.retain(|ring, needed| match batch.get(ring) {
            Some((reset, _)) => entry_before(*reset, *needed),
            None => true,
        });
        if barrier.is_empty() {
            self.resync(pid);
        }
    }

    /// Nothing missed can still be pending: pages that are not waiting for a
    /// reset are hashed afresh.
    fn resync(&mut self, pid: u32) {
        let vm = self.vms.get_mut(&pid).unwrap();
        vm.sync = SyncState::Synced;
        vm.stats.resyncs += 1;
        if vm
            .note
            .as_deref()
            .is_some_and(|note| !note.starts_with("the process created"))
        {
            vm.note = None;
        }
        let slots: Vec<u32> = vm.slots.keys().copied().collect();
        for slot in slots {
            self.queue_full_pass(pid, slot);
        }
    }

    /// `KVM_GET_DIRTY_LOG` of `slot_id`, which entered the kernel at
    /// `enter_ns`, succeeded; its bitmap came for `bitmap_pages` pages.
    fn dirty_log_get(&mut self, pid: u32, slot_id: u32, enter_ns: u64, bitmap_pages: u32) {
        let vm = self.vms.get_mut(&pid).unwrap();
        if vm.dirty_mode == DirtyMode::Unknown {
            vm.dirty_mode = DirtyMode::Bitmap {
                manual_protect: false,
            };
        }
        let DirtyMode::Bitmap { manual_protect } = vm.dirty_mode else {
            return;
        };
        if vm.harvests_bitmaps(self.fentry_active) {
            self.harvest_get(pid, slot_id, enter_ns, bitmap_pages, manual_protect);
        } else {
            self.harvest_reported_writes(pid, slot_id, enter_ns);
        }
        let vm = self.vms.get_mut(&pid).unwrap();
        if let SyncState::Unsynced {
            since_ns,
            harvested,
            ..
        } = &mut vm.sync
            && enter_ns > *since_ns
        {
            // Bitmap mode resyncs once every logged slot was harvested (and
            // so write-protected) after the moment something was missed.
            harvested.insert(slot_id);
            let all = vm
                .slots
                .values()
                .filter(|s| s.logged())
                .all(|s| harvested.contains(&s.id));
            if all {
                self.resync(pid);
            }
        }
    }

    /// Bitmap mode with `mark_page_dirty_in_slot` events: the GET of
    /// `slot_id` entered at `enter_ns` re-protected the pages whose writes
    /// were reported before it; they are read again.
    fn harvest_reported_writes(&mut self, pid: u32, slot_id: u32, enter_ns: u64) {
        let vm = self.vms.get_mut(&pid).unwrap();
        // Writes reported before the ioctl started are covered; writes during
        // it may not be.
        let Some(slot) = vm.slots.get_mut(&slot_id) else {
            return;
        };
        let mut ready = Vec::new();
        slot.pending_bitmap.retain(|(page, generation, ktime)| {
            if *ktime >= enter_ns {
                return true;
            }
            let queued = slot.pages.update(*page, |entry| {
                let due = entry.generation() == *generation && entry.state() == PageState::Dirty;
                if due {
                    entry.set_state(PageState::Queued);
                }
                due
            });
            if queued == Some(true) {
                ready.push((*page, *generation));
            }
            false
        });
        let epoch = slot.epoch;
        if !ready.is_empty() {
            self.queue_pages(pid, slot_id, epoch, ready);
        }
    }

    /// KVM marked guest frame `gfn` dirty at `ktime_ns` (bitmap mode).
    fn dirty_gfn(&mut self, pid: u32, gfn: u64, ktime_ns: u64) {
        let vm = self.vms.get_mut(&pid).unwrap();
        if vm.dirty_mode == DirtyMode::Ring {
            // The ring push reports the same write, with its re-protection point.
            return;
        }
        vm.stats.dirty_events += 1;
        let Some((slot_id, page_index)) = vm.locate_gpa(gfn << crate::page::PAGE_SHIFT) else {
            return;
        };
        let slot = vm.slots.get_mut(&slot_id).unwrap();
        if let Some(generation) = forget(
            &mut self.contents,
            &mut vm.counts,
            &mut slot.pages,
            page_index,
            PageState::Dirty,
        ) {
            slot.pending_bitmap.push((page_index, generation, ktime_ns));
        }
    }

    fn write_fault(&mut self, pid: u32, gpa: u64) {
        let vm = self.vms.get_mut(&pid).unwrap();
        let Some((slot_id, page_index)) = vm.locate_gpa(gpa) else {
            return;
        };
        let slot = &vm.slots[&slot_id];
        if slot_tracking(vm, slot) == Tracking::Tracked {
            // The dirty log reports this write with its re-protection point.
            return;
        }
        let vm = self.vms.get_mut(&pid).unwrap();
        let slot = vm.slots.get_mut(&slot_id).unwrap();
        forget(
            &mut self.contents,
            &mut vm.counts,
            &mut slot.pages,
            page_index,
            PageState::Unknown,
        );
    }

    /// Jobs for the bounded-rate rescan of untracked slots: at most
    /// `budget_pages` pages over all of them.
    pub fn rescan_jobs(&mut self, budget_pages: u32) -> Vec<HashJob> {
        let mut jobs = Vec::new();
        let mut candidates = Vec::new();
        for vm in self.vms.values() {
            for slot in vm.slots.values() {
                if self.tracking(vm, slot) == Tracking::Untracked {
                    candidates.push((vm.pid, slot.id));
                }
            }
        }
        if candidates.is_empty() {
            return jobs;
        }
        let share = (budget_pages / candidates.len() as u32).max(1);
        for (pid, slot_id) in candidates {
            let slot = self
                .vms
                .get_mut(&pid)
                .unwrap()
                .slots
                .get_mut(&slot_id)
                .unwrap();
            let total = slot.pages.len() as u32;
            if total == 0 {
                continue;
            }
            let first = slot.rescan_cursor % total;
            let count = share.min(total - first);
            slot.rescan_cursor = (first + count) % total;
            jobs.push(HashJob {
                pid,
                slot: slot_id,
                epoch: slot.epoch,
                pages: JobPages::Range { first, count },
                purpose: Purpose::Rescan,
            });
        }
        jobs
    }

    /// What to read for `job`, or `None` if the job is stale.
    pub fn plan(&self, job: &HashJob) -> Option<ReadPlan> {
        let vm = self.vms.get(&job.pid)?;
        let slot = vm
            .slots
            .get(&job.slot)
            .filter(|slot| slot.epoch == job.epoch)?;
        let wanted = |page: u32| {
            let entry = slot.pages.get(page)?;
            match job.purpose {
                Purpose::Track => entry
                    .state()
                    .wants_hash()
                    .then_some((page, entry.generation())),
                Purpose::Rescan => {
                    (entry.state() != PageState::Dirty).then_some((page, entry.generation()))
                }
            }
        };
        let pages: Vec<(u32, u32)> = match &job.pages {
            JobPages::Range { first, count } => (*first..first.saturating_add(*count))
                .filter_map(wanted)
                .collect(),
            JobPages::List(list) => list
                .iter()
                .filter(|(page, generation)| {
                    slot.pages
                        .get(*page)
                        .is_some_and(|entry| entry.generation() == *generation)
                })
                .filter_map(|(page, _)| wanted(*page))
                .collect(),
        };
        if pages.is_empty() {
            return None;
        }
        let checks = match job.purpose {
            Purpose::Track => Vec::new(),
            Purpose::Rescan => pages
                .iter()
                .map(|(page, _)| {
                    let entry = slot.pages.get(*page);
                    let known = entry.filter(|entry| entry.content != self::pages::NO_CONTENT);
                    match (known, slot.checksums.get(*page as usize)) {
                        (Some(_), Some(&checksum)) => ChangeCheck {
                            checksum,
                            unchanged: false,
                        },
                        _ => ChangeCheck::default(),
                    }
                })
                .collect(),
        };
        Some(ReadPlan {
            pid: job.pid,
            uaddr: slot.uaddr,
            pages,
            read_end_ns: u64::MAX,
            checks,
        })
    }

    /// Commits hashes read for `plan`; `hashes[i]` belongs to `plan.pages[i]`
    /// (`None`: the page could not be read, or a rescan found it unchanged:
    /// `plan.checks[i].unchanged`).
    pub fn commit(&mut self, job: &HashJob, plan: &ReadPlan, hashes: &[Option<PageHash>]) {
        let Some(vm) = self.vms.get_mut(&job.pid) else {
            return;
        };
        let synced = vm.sync == SyncState::Synced;
        let Some(slot) = vm
            .slots
            .get(&job.slot)
            .filter(|slot| slot.epoch == job.epoch)
        else {
            return;
        };
        let tracking = slot_tracking(vm, slot);
        // Hashes of a bitmap-harvested slot wait for a harvest that entered
        // after the read ([`bitmap`]).
        let confirm = slot.logged() && vm.harvests_bitmaps(self.fentry_active);
        let new_state = match (job.purpose, tracking) {
            (Purpose::Track, Tracking::Tracked) if synced && confirm => PageState::Confirming,
            (Purpose::Track, Tracking::Tracked) if synced => PageState::Clean,
            (Purpose::Rescan, Tracking::Untracked) => PageState::Unverified,
            _ => return,
        };
        let vm = self.vms.get_mut(&job.pid).unwrap();
        let slot = vm.slots.get_mut(&job.slot).unwrap();
        if !plan.checks.is_empty() && slot.checksums.len() != slot.pages.len() {
            slot.checksums = vec![0; slot.pages.len()];
        }
        let confirming = &mut slot.confirming;
        let checksums = &mut slot.checksums;
        for (index, ((page_index, generation), hash)) in plan.pages.iter().zip(hashes).enumerate() {
            slot.pages.update(*page_index, |page| {
                let eligible = match job.purpose {
                    Purpose::Track => page.state().wants_hash(),
                    Purpose::Rescan => page.state() != PageState::Dirty,
                };
                if page.generation() != *generation || !eligible {
                    self.stats.hashes_dropped_stale += 1;
                    return;
                }
                let check = plan.checks.get(index);
                let Some(hash) = hash else {
                    // Unchanged since its content was hashed (unreadable
                    // pages are neither).
                    if check.is_some_and(|c| c.unchanged) && page.content != pages::NO_CONTENT {
                        page.set_state(new_state);
                    }
                    return;
                };
                if let (Some(check), Some(kept)) = (check, checksums.get_mut(*page_index as usize))
                {
                    *kept = check.checksum;
                }
                if new_state == PageState::Confirming {
                    confirming.push((*page_index, *generation, plan.read_end_ns));
                }
                let rehash = page.state() == PageState::Queued;
                if page.content != pages::NO_CONTENT {
                    if self.contents.get(page.content).hash == *hash {
                        page.set_state(new_state);
                        return;
                    }
                    self.contents.remove_page(&mut vm.counts, page.content);
                }
                page.content = self.contents.add_page(&mut vm.counts, hash);
                page.set_state(new_state);
                if rehash {
                    vm.stats.pages_rehashed += 1;
                    self.stats.pages_rehashed += 1;
                }
            });
        }
        vm.stats.pages_hashed += plan.pages.len() as u64;
        self.stats.pages_hashed += plan.pages.len() as u64;
    }
}

/// How the pages of `slot` are kept.
fn slot_tracking(vm: &Vm, slot: &Slot) -> Tracking {
    if slot.read_only() {
        // The guest cannot write it: a page read once stays valid.
        return match vm.sync {
            SyncState::Synced => Tracking::Tracked,
            SyncState::Unsynced { .. } => Tracking::Syncing,
        };
    }
    if !slot.logged() {
        return Tracking::Untracked;
    }
    let reported = match vm.dirty_mode {
        DirtyMode::Ring => true,
        // Write by write (fexit), or from the harvested bitmaps.
        DirtyMode::Bitmap { .. } => true,
        DirtyMode::Unknown => return Tracking::Syncing,
        DirtyMode::None => return Tracking::Untracked,
    };
    match (reported, &vm.sync) {
        (false, _) => Tracking::Untracked,
        (true, SyncState::Synced) => Tracking::Tracked,
        (true, SyncState::Unsynced { .. }) => Tracking::Syncing,
    }
}

/// `KVM_ENABLE_CAP` of `cap` with `args[0]` = `arg0` succeeded.
fn cap_enabled(vm: &mut Vm, cap: u32, arg0: u64) {
    match cap {
        ioctl::KVM_CAP_DIRTY_LOG_RING | ioctl::KVM_CAP_DIRTY_LOG_RING_ACQ_REL => {
            vm.dirty_mode = DirtyMode::Ring
        }
        ioctl::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
            if arg0 & ioctl::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE != 0 =>
        {
            if let DirtyMode::Bitmap { .. } | DirtyMode::Unknown = vm.dirty_mode {
                vm.dirty_mode = DirtyMode::Bitmap {
                    manual_protect: true,
                };
            }
            vm.initially_set = arg0 & ioctl::KVM_DIRTY_LOG_INITIALLY_SET != 0;
        }
        _ => {}
    }
}

#[cfg(test)]
pub(crate) mod tests;
