//! Tracking by dirty bitmaps: VMs whose VMM harvests KVM's dirty bitmap
//! (`KVM_GET_DIRTY_LOG`, and `KVM_CLEAR_DIRTY_LOG` with manual protection,
//! QEMU's default) where no event reports each write (no fexit).
//!
//! The eBPF program copies every bitmap at `sys_exit_ioctl` (chunks, then the
//! ioctl's event). KVM keeps one bit per page of a logged slot: set by the
//! first write after the page was write-protected, cleared (and the page
//! protected again) only by a CLEAR whose mask has it, or by a GET without
//! manual protection. So, with every GET and CLEAR seen:
//!
//! - a CLEAR (or a non-manual GET) whose mask (bitmap) has page P protects
//!   it: P's hash is dropped and P is read again after the ioctl returned;
//! - a manual GET whose bitmap has P: P was written, it waits for a CLEAR;
//! - a read of P is *confirmed* by a GET that entered after the read ended
//!   and shows P's bit clear: from the last time P's bit was cleared to that
//!   GET's entry, P was not written. Had P's bit been cleared after the read
//!   began, that was a CLEAR, a GET or a slot change the agent saw, which
//!   gave P a new generation and dropped the read. So the hash equals P's
//!   content from before the read to that GET's entry.
//! - a confirmed page stays clean while every later GET shows it clear; it
//!   is *served* clean only if the slot's last GET entered after the request
//!   arrived (the API waits for one, up to a deadline): a hash list is then
//!   true at the moment it was asked for, as for the dirty ring.
//!
//! Pages a bitmap did not cover (the ring buffer was full, a bitmap larger
//! than the eBPF side copies, a slot the eBPF side did not know) become
//! unknown.

use agent_common::{
    BitmapChunk, BitmapOf,
    bitmap::{BITMAP_CHUNK_PAGES, BITMAP_CHUNK_WORDS},
};

use super::{Registry, Tracking, forget, pages::PageState};

/// Chunks kept for ioctls whose event has not come (it was lost, which the
/// loss records also say): past this many, the oldest go.
const MAX_PENDING_CHUNKS: usize = 4096;

/// One chunk of a dirty bitmap, kept until its ioctl's event.
#[derive(Clone, Debug)]
pub struct PendingBitmap {
    of: BitmapOf,
    slot: u32,
    enter_ns: u64,
    first_page: u64,
    words: Box<[u64]>,
}

/// The bitmap of one ioctl, from its chunks: bit `i` stands for page
/// `first_page + i`.
struct Bits {
    first_page: u64,
    /// Pages covered from `first_page` (chunks missing from the middle are
    /// not covered either: `present`).
    pages: u64,
    words: Vec<u64>,
    present: Vec<bool>,
}

impl Bits {
    fn covers(&self, page: u64) -> bool {
        let Some(offset) = page.checked_sub(self.first_page) else {
            return false;
        };
        offset < self.pages
            && self
                .present
                .get((offset / u64::from(BITMAP_CHUNK_PAGES)) as usize)
                .copied()
                .unwrap_or(false)
    }

    /// Every page of `0..pages` (or of the range) is covered.
    fn complete(&self, pages: u64) -> bool {
        self.pages >= pages && self.present.iter().all(|present| *present)
    }

    fn is_set(&self, page: u64) -> bool {
        let offset = page - self.first_page;
        self.words
            .get((offset / 64) as usize)
            .is_some_and(|word| word & (1 << (offset % 64)) != 0)
    }

    /// Pages whose bit is set, ascending.
    fn set_pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.words
            .iter()
            .enumerate()
            .flat_map(move |(index, &word)| {
                let base = self.first_page + index as u64 * 64;
                let mut rest = word;
                std::iter::from_fn(move || {
                    if rest == 0 {
                        return None;
                    }
                    let bit = rest.trailing_zeros();
                    rest &= rest - 1;
                    Some(base + u64::from(bit))
                })
            })
    }
}

impl Registry {
    /// Keeps one chunk of a dirty bitmap for its ioctl's event. A chunk that
    /// does not decode is counted in `events_rejected` and dropped.
    pub fn apply_bitmap(&mut self, chunk: &mut BitmapChunk) {
        let bitmap = match chunk.decode() {
            Ok(bitmap) => bitmap,
            Err(err) => {
                if self.stats.events_rejected == 0 {
                    log::warn!("{err}");
                }
                self.stats.events_rejected += 1;
                return;
            }
        };
        *self.stats.events.entry("dirty_bitmap").or_insert(0) += 1;
        let Some(vm) = self.vms.get_mut(&bitmap.pid) else {
            return;
        };
        if vm.bitmaps.len() >= MAX_PENDING_CHUNKS {
            vm.bitmaps.remove(0);
        }
        vm.bitmaps.push(PendingBitmap {
            of: bitmap.of,
            slot: bitmap.slot,
            enter_ns: bitmap.enter_ns,
            first_page: bitmap.first_page,
            words: bitmap.words.into(),
        });
    }

    /// The chunks of the ioctl `of` of `slot` that entered at `enter_ns`,
    /// covering `pages` pages from `first_page`, taken out.
    fn take_bits(
        &mut self,
        pid: u32,
        of: BitmapOf,
        slot: u32,
        enter_ns: u64,
        first_page: u64,
        pages: u32,
    ) -> Bits {
        let chunks = u64::from(pages).div_ceil(u64::from(BITMAP_CHUNK_PAGES)) as usize;
        let mut bits = Bits {
            first_page,
            pages: u64::from(pages),
            words: vec![0; (pages as usize).div_ceil(64)],
            present: vec![false; chunks],
        };
        let Some(vm) = self.vms.get_mut(&pid) else {
            return bits;
        };
        vm.bitmaps.retain(|chunk| {
            if (chunk.of, chunk.slot, chunk.enter_ns) != (of, slot, enter_ns) {
                return true;
            }
            let Some(offset) = chunk.first_page.checked_sub(first_page) else {
                return false;
            };
            let index = offset / u64::from(BITMAP_CHUNK_PAGES);
            if offset % u64::from(BITMAP_CHUNK_PAGES) != 0 || index as usize >= chunks {
                return false;
            }
            let at = index as usize * BITMAP_CHUNK_WORDS;
            let end = (at + chunk.words.len()).min(bits.words.len());
            bits.words[at..end].copy_from_slice(&chunk.words[..end - at]);
            bits.present[index as usize] = true;
            false
        });
        bits
    }

    /// A `KVM_GET_DIRTY_LOG` of `slot_id`, entered at `enter_ns`, whose
    /// bitmap came for its first `bitmap_pages` pages.
    pub(super) fn harvest_get(
        &mut self,
        pid: u32,
        slot_id: u32,
        enter_ns: u64,
        bitmap_pages: u32,
        manual_protect: bool,
    ) {
        let bits = self.take_bits(pid, BitmapOf::Get, slot_id, enter_ns, 0, bitmap_pages);
        // Written pages: with manual protection they wait for a CLEAR;
        // without, this GET protected them again and they are read anew.
        let written = if manual_protect {
            PageState::Dirty
        } else {
            PageState::Queued
        };
        let Some(slot_pages) = self.vms[&pid].slots.get(&slot_id).map(|s| s.pages.len()) else {
            return;
        };
        let Some(queued) = self.forget_pages(pid, slot_id, &bits, written, slot_pages as u32)
        else {
            return;
        };
        let slot = self
            .vms
            .get_mut(&pid)
            .unwrap()
            .slots
            .get_mut(&slot_id)
            .unwrap();
        // Reads that ended before this GET entered (with PML, before the
        // one before it), of pages it shows unwritten, are confirmed.
        if slot.harvests[0].is_none_or(|latest| enter_ns > latest) {
            slot.harvests = [Some(enter_ns), slot.harvests[0]];
        }
        let vouching = slot.harvests[self.harvest_lag.clamp(1, 2) - 1];
        let pages = &mut slot.pages;
        slot.confirming.retain(|&(page, generation, read_end_ns)| {
            if vouching.is_none_or(|at| read_end_ns > at) {
                return true;
            }
            if bits.covers(u64::from(page)) && !bits.is_set(u64::from(page)) {
                pages.update(page, |entry| {
                    if entry.generation() == generation && entry.state() == PageState::Confirming {
                        entry.set_state(PageState::Clean);
                    }
                });
            }
            false
        });
        let epoch = slot.epoch;
        if written == PageState::Queued && !queued.is_empty() {
            self.queue_pages(pid, slot_id, epoch, queued);
        }
    }

    /// Gives the pages set in `bits` of slot `slot_id` of VM `pid` a new
    /// generation in `state`, and makes unknown those of the ioctl's
    /// `range` pages that `bits` did not cover; the (page, generation) of
    /// the former, or `None` if there is no such slot.
    fn forget_pages(
        &mut self,
        pid: u32,
        slot_id: u32,
        bits: &Bits,
        state: PageState,
        range: u32,
    ) -> Option<Vec<(u32, u32)>> {
        let vm = self.vms.get_mut(&pid)?;
        let slot = vm.slots.get_mut(&slot_id)?;
        let slot_pages = slot.pages.len() as u64;
        let mut forget_page = |page: u64, state: PageState| {
            let page = u32::try_from(page).ok()?;
            forget(
                &mut self.contents,
                &mut vm.counts,
                &mut slot.pages,
                page,
                state,
            )
            .map(|generation| (page, generation))
        };
        let changed = bits
            .set_pages()
            .filter_map(|page| forget_page(page, state))
            .collect();
        // Pages of the range the bits did not cover: nothing is known of them.
        if !bits.complete(u64::from(range)) {
            let end = bits
                .first_page
                .saturating_add(u64::from(range))
                .min(slot_pages);
            for page in (bits.first_page..end).filter(|page| !bits.covers(*page)) {
                forget_page(page, PageState::Unknown);
            }
        }
        Some(changed)
    }

    /// A `KVM_CLEAR_DIRTY_LOG` of `num_pages` pages from `first_page` of
    /// `slot_id`, whose mask came for its first `bitmap_pages` pages: the
    /// pages in the mask are protected again, and read anew.
    pub(super) fn harvest_clear(
        &mut self,
        pid: u32,
        slot_id: u32,
        enter_ns: u64,
        first_page: u64,
        num_pages: u32,
        bitmap_pages: u32,
    ) {
        let bits = self.take_bits(
            pid,
            BitmapOf::Clear,
            slot_id,
            enter_ns,
            first_page,
            bitmap_pages.min(num_pages),
        );
        // Pages of the range whose mask bits did not come are unknown: the
        // CLEAR may have consumed a write the agent never learns of.
        let Some(queued) = self.forget_pages(pid, slot_id, &bits, PageState::Queued, num_pages)
        else {
            return;
        };
        let slot = &self.vms[&pid].slots[&slot_id];
        let epoch = slot.epoch;
        if !queued.is_empty() {
            self.queue_pages(pid, slot_id, epoch, queued);
        }
    }

    /// Whether the clean pages of slot `slot_id` of VM `pid` are true at
    /// `request_ns`: always, unless the slot is tracked by its bitmaps and
    /// its last harvest entered before `request_ns`.
    pub fn clean_at(&self, pid: u32, slot_id: u32, request_ns: u64) -> bool {
        let Some(vm) = self.vms.get(&pid) else {
            return false;
        };
        let Some(slot) = vm.slots.get(&slot_id) else {
            return false;
        };
        if !vm.harvests_bitmaps(self.fentry_active) || !slot.logged() {
            return true;
        }
        slot.harvests[self.harvest_lag.clamp(1, 2) - 1].is_some_and(|at| at >= request_ns)
    }

    /// Whether every tracked slot of VM `pid` serves its clean pages as
    /// true at `request_ns` (see [`Registry::clean_at`]).
    pub fn all_clean_at(&self, pid: u32, request_ns: u64) -> bool {
        let Some(vm) = self.vms.get(&pid) else {
            return true;
        };
        vm.slots.values().all(|slot| {
            self.tracking(vm, slot) != Tracking::Tracked || self.clean_at(pid, slot.id, request_ns)
        })
    }
}
