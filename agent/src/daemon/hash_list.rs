//! `GET /v1/vms/{pid}/hashes`: the VM's hash list, whole or as the changes
//! since an earlier list (`?since=TOKEN`, see [`crate::api::wire`]).
//!
//! A delta is exactly what a whole list taken at the same moment would
//! change in the earlier one, because:
//! - every change of a page goes through `PageTable::update`, which stamps
//!   the page's group with the table's current mark; each list takes a new
//!   mark per slot (under the registry lock, before it reads the slot) and
//!   names it in its token; the next list sends every group stamped at or
//!   after that mark, so a page left out changed neither before the earlier
//!   list read it (its read came after the mark) nor since;
//! - a record depends on more than the page: the slot (its epoch) and, for a
//!   slot tracked by its dirty bitmaps, whether a harvest followed the
//!   request. A slot is sent in delta only if the token names its epoch and
//!   both lists served its clean pages clean; the whole list comes back if
//!   the agent instance or the set of slots differs.

use std::{collections::HashMap, time::Duration};

use super::state::AppState;
use crate::{
    api::wire::{
        FLAG_DELTA, HASH_LIST_MAGIC, HASH_LIST_VERSION, HashListHeader, MAX_TOKEN_LEN, PageRecord,
        state,
    },
    content::zero_page_hash,
    page::PAGE_SIZE,
    registry::PageState,
};

/// Pages read per hold of the registry lock while a hash list is made: the
/// tracker and the hash workers wait at most this long for a reader.
pub const HASH_LIST_CHUNK: u32 = 16 << 10;

/// How long a hash list waits for the VMM's next dirty-bitmap harvest, for
/// VMs tracked by their bitmaps (`crate::registry::bitmap`): past it, their
/// clean pages are served unverified.
const HARVEST_WAIT: Duration = Duration::from_secs(2);

/// One slot as a list saw it: what the next list needs to send only the
/// changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SlotMark {
    id: u32,
    epoch: u64,
    /// The slot's page-table mark taken before the list read it.
    mark: u64,
    /// Every clean page of the slot was served clean.
    clean: bool,
}

/// What a list's token says: `INSTANCE` then `~ID.EPOCH.MARK.CLEAN` per
/// slot, numbers in hex.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Token {
    instance: u64,
    slots: Vec<SlotMark>,
}

impl Token {
    fn encode(&self) -> String {
        let mut text = format!("{:x}", self.instance);
        for slot in &self.slots {
            text.push_str(&format!(
                "~{:x}.{:x}.{:x}.{}",
                slot.id,
                slot.epoch,
                slot.mark,
                u8::from(slot.clean)
            ));
        }
        text
    }

    fn parse(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "`since` is not a hash list token (pass the token of an earlier list of this VM as it came): {:.80}",
                text
            )
        };
        if text.len() > MAX_TOKEN_LEN {
            return Err(bad());
        }
        let mut parts = text.split('~');
        let instance = u64::from_str_radix(parts.next().unwrap_or(""), 16).map_err(|_| bad())?;
        let slots = parts
            .map(|part| {
                let fields: Vec<&str> = part.split('.').collect();
                let [id, epoch, mark, clean] = fields.as_slice() else {
                    return Err(bad());
                };
                Ok(SlotMark {
                    id: u32::from_str_radix(id, 16).map_err(|_| bad())?,
                    epoch: u64::from_str_radix(epoch, 16).map_err(|_| bad())?,
                    mark: u64::from_str_radix(mark, 16).map_err(|_| bad())?,
                    clean: match *clean {
                        "0" => false,
                        "1" => true,
                        _ => return Err(bad()),
                    },
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { instance, slots })
    }
}

/// A hash list as the agent serves it.
pub struct Listed {
    pub header: HashListHeader,
    pub token: String,
    pub records: Vec<PageRecord>,
}

/// The hash list of VM `pid` (`None` if it is not known), whole, or the
/// changes since the list whose token is `since` where that can be told;
/// `Err` if `since` is not a token.
pub fn hash_list(
    state: &AppState,
    pid: u32,
    since: Option<&str>,
) -> Result<Option<Listed>, String> {
    let since = since.map(Token::parse).transpose()?;
    let request_ns = crate::clock::monotonic_ns();
    // Everything the kernel reported before this request is applied first;
    // a VM tracked by its dirty bitmaps also waits for its next harvest.
    if let Some(sync) = &state.sync {
        let deadline = std::time::Instant::now() + HARVEST_WAIT;
        loop {
            sync.sync();
            if state.registry.lock().unwrap().all_clean_at(pid, request_ns)
                || std::time::Instant::now() >= deadline
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let taken_ns = crate::clock::monotonic_ns();
    let Some((mut records, token, delta)) = hash_records(state, pid, request_ns, since.as_ref())
    else {
        return Ok(None);
    };
    records.sort_unstable_by_key(|r| r.gpa);
    let listed_ns = crate::clock::monotonic_ns();
    log::debug!(
        "hash list of pid {pid}: {} records{}; applying the kernel's events took {:.1} ms, listing them {:.1} ms",
        records.len(),
        if delta { " (changes only)" } else { "" },
        taken_ns.saturating_sub(request_ns) as f64 / 1e6,
        listed_ns.saturating_sub(taken_ns) as f64 / 1e6
    );
    // A VM of very many slots: a token that names none, so the next list
    // is whole (a longer one might not fit a request line).
    let mut token = token.encode();
    if token.len() > MAX_TOKEN_LEN {
        token = Token {
            instance: state.instance,
            slots: Vec::new(),
        }
        .encode();
    }
    Ok(Some(Listed {
        header: HashListHeader {
            magic: HASH_LIST_MAGIC,
            version: HASH_LIST_VERSION,
            pid,
            page_size: PAGE_SIZE as u32,
            count: records.len() as u64,
            taken_ns,
            flags: if delta { FLAG_DELTA } else { 0 },
            token_len: token.len() as u32,
        },
        token,
        records,
    }))
}

/// The records of VM `pid` (`None` if it is not known), read slot by slot
/// in chunks of [`HASH_LIST_CHUNK`] pages, each under its own short hold of
/// the registry lock, with the list's token and whether the records are a
/// delta on `since`. Each record is true at the moment its chunk was read;
/// pages of a slot replaced meanwhile are reported unknown, never clean.
/// Clean pages of a slot tracked by its bitmaps are served clean only if the
/// slot was harvested after `request_ns`, unverified otherwise.
fn hash_records(
    state: &AppState,
    pid: u32,
    request_ns: u64,
    since: Option<&Token>,
) -> Option<(Vec<PageRecord>, Token, bool)> {
    let slots: Vec<(u32, u64, u64, u32)> = {
        let registry = state.registry.lock().unwrap();
        let vm = registry.vm(pid)?;
        vm.slots
            .values()
            .map(|slot| (slot.id, slot.epoch, slot.gpa, slot.pages.len() as u32))
            .collect()
    };
    // A delta only on a list of the same slots, by this agent.
    let earlier: Option<HashMap<u32, SlotMark>> = since
        .filter(|token| {
            let mut theirs: Vec<(u32, u64)> = token.slots.iter().map(|s| (s.id, s.epoch)).collect();
            let mut ours: Vec<(u32, u64)> = slots.iter().map(|s| (s.0, s.1)).collect();
            theirs.sort_unstable();
            ours.sort_unstable();
            token.instance == state.instance && theirs == ours
        })
        .map(|token| token.slots.iter().map(|s| (s.id, *s)).collect());
    let zero = zero_page_hash();
    let mut records = Vec::new();
    let mut token = Token {
        instance: state.instance,
        slots: Vec::with_capacity(slots.len()),
    };
    for (id, epoch, gpa, pages) in slots {
        let record = |page: u32, state: u8, hash: [u8; 32]| PageRecord {
            gpa: gpa + u64::from(page) * PAGE_SIZE as u64,
            hash,
            state,
            zero: u8::from(matches!(state, state::CLEAN | state::UNVERIFIED) && hash == zero),
            _pad: [0; 6],
        };
        // The slot's mark, and which of its pages to read.
        let (mark, mut clean, ranges) = {
            let mut registry = state.registry.lock().unwrap();
            let clean = registry.clean_at(pid, id, request_ns);
            let since = earlier
                .as_ref()
                .and_then(|earlier| earlier.get(&id))
                .filter(|earlier| earlier.clean && clean)
                .map(|earlier| earlier.mark);
            match registry.mark_slot(pid, id, epoch, since) {
                Some((mark, ranges)) => (mark, clean, ranges),
                None => {
                    // Gone meanwhile: unknown, and the next list is whole.
                    records.extend((0..pages).map(|page| record(page, state::UNKNOWN, [0; 32])));
                    continue;
                }
            }
        };
        for (first, count) in ranges {
            // Grown a page at a time, a whole list's records were copied
            // and faulted in again at every doubling: listing 66560 pages
            // took 7.1-7.3 ms, reserved 1.2-2.0 ms.
            records.reserve(count as usize);
            let end = first + count;
            for chunk in (first..end).step_by(HASH_LIST_CHUNK as usize) {
                let chunk_end = chunk.saturating_add(HASH_LIST_CHUNK).min(end);
                let registry = state.registry.lock().unwrap();
                let slot = registry
                    .vm(pid)
                    .and_then(|vm| vm.slots.get(&id))
                    .filter(|slot| slot.epoch == epoch);
                let chunk_clean = registry.clean_at(pid, id, request_ns);
                clean &= chunk_clean;
                for page in chunk..chunk_end {
                    let Some(entry) = slot.and_then(|slot| slot.pages.get(page)) else {
                        // The slot (or the VM) went away meanwhile.
                        records.push(record(page, state::UNKNOWN, [0; 32]));
                        continue;
                    };
                    records.push(match entry.state() {
                        PageState::Clean if chunk_clean => record(
                            page,
                            state::CLEAN,
                            registry.contents.get(entry.content).hash,
                        ),
                        PageState::Clean | PageState::Confirming | PageState::Unverified => record(
                            page,
                            state::UNVERIFIED,
                            registry.contents.get(entry.content).hash,
                        ),
                        PageState::Dirty | PageState::Queued => record(page, state::DIRTY, [0; 32]),
                        PageState::Unknown => record(page, state::UNKNOWN, [0; 32]),
                    });
                }
            }
        }
        token.slots.push(SlotMark {
            id,
            epoch,
            mark,
            clean,
        });
    }
    Some((records, token, earlier.is_some()))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use agent_common::ioctl;
    use proptest::prelude::*;

    use super::*;
    use crate::registry::{
        Registry,
        tests::{
            PID, RingDriver, RingOp, clear, harvest, manual_protect_vm, push, ring_op, ring_vm,
            slot_set,
        },
    };

    /// What a client knows of every page: (state, hash) by gpa.
    type View = BTreeMap<u64, (u8, [u8; 32])>;

    fn agent(registry: Registry) -> AppState {
        let state = AppState::empty();
        *state.registry.lock().unwrap() = registry;
        state
    }

    fn list(state: &AppState, since: Option<&str>) -> Listed {
        hash_list(state, PID, since).unwrap().unwrap()
    }

    fn apply(view: &mut View, listed: &Listed) {
        if listed.header.flags & FLAG_DELTA == 0 {
            view.clear();
        }
        for r in &listed.records {
            view.insert(r.gpa, (r.state, r.hash));
        }
    }

    fn whole(state: &AppState) -> View {
        let mut view = View::new();
        apply(&mut view, &list(state, None));
        view
    }

    #[derive(Clone, Debug)]
    enum Op {
        Ring(RingOp),
        /// Slot 0 set again with this many pages (replaced unless 200).
        Resize(u64),
        /// Slot 1 added (or set again) or removed.
        Second(bool),
        /// A list since the last one; the next continues from its token
        /// (or from the whole list's).
        List(bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            10 => ring_op(200).prop_map(Op::Ring),
            1 => prop_oneof![Just(16u64), Just(200)].prop_map(Op::Resize),
            1 => any::<bool>().prop_map(Op::Second),
            4 => any::<bool>().prop_map(Op::List),
        ]
    }

    proptest! {
        #[test]
        fn a_delta_on_the_last_list_gives_the_whole_list(ops in prop::collection::vec(op(), 1..80)) {
            let state = agent(ring_vm(200));
            let first = list(&state, None);
            let mut view = View::new();
            apply(&mut view, &first);
            let mut token = first.token;
            let mut driver = RingDriver::new(200);
            for op in ops {
                let mut reg = state.registry.lock().unwrap();
                match op {
                    Op::Ring(op) => driver.apply(&mut reg, &op),
                    Op::Resize(pages) => {
                        reg.apply(&slot_set(0, ioctl::KVM_MEM_LOG_DIRTY_PAGES, 0, pages, 0x7000_0000));
                    }
                    Op::Second(present) => {
                        let pages = if present { 100 } else { 0 };
                        reg.apply(&slot_set(1, ioctl::KVM_MEM_LOG_DIRTY_PAGES, 1 << 30, pages, 0x9000_0000));
                    }
                    Op::List(from_delta) => {
                        drop(reg);
                        let delta = list(&state, Some(&token));
                        apply(&mut view, &delta);
                        let expected = whole(&state);
                        prop_assert_eq!(&view, &expected);
                        token = if from_delta {
                            delta.token
                        } else {
                            let again = list(&state, None);
                            view.clear();
                            apply(&mut view, &again);
                            again.token
                        };
                    }
                }
            }
        }
    }

    #[test]
    fn nothing_changed_lists_nothing_and_a_change_lists_its_group() {
        let state = agent(ring_vm(4096));
        RingDriver::new(4096).apply(&mut state.registry.lock().unwrap(), &RingOp::Hash(1));
        let first = list(&state, None);
        assert_eq!((first.header.count, first.header.flags), (4096, 0));
        let idle = list(&state, Some(&first.token));
        assert_eq!((idle.header.count, idle.header.flags), (0, FLAG_DELTA));
        state.registry.lock().unwrap().apply(&push(0, 1000));
        let written = list(&state, Some(&idle.token));
        assert_eq!(
            written.header.count,
            u64::from(crate::registry::pages::STAMP_PAGES)
        );
        assert!(
            written
                .records
                .iter()
                .any(|r| r.gpa == 1000 * 4096 && r.state == state::DIRTY)
        );
        // Another agent's token, or one naming other slots: a whole list.
        let other = Token {
            instance: state.instance ^ 1,
            ..Token::parse(&written.token).unwrap()
        };
        let listed = list(&state, Some(&other.encode()));
        assert_eq!((listed.header.count, listed.header.flags), (4096, 0));
        let mut fewer = Token::parse(&written.token).unwrap();
        fewer.slots.clear();
        let listed = list(&state, Some(&fewer.encode()));
        assert_eq!((listed.header.count, listed.header.flags), (4096, 0));
        assert!(hash_list(&state, PID, Some("garbage")).is_err());
    }

    #[test]
    fn a_vm_of_too_many_slots_for_a_token_gets_whole_lists() {
        let mut reg = ring_vm(1);
        for slot in 1..2000u32 {
            let gpa = u64::from(slot) << 20;
            reg.apply(&slot_set(slot, ioctl::KVM_MEM_LOG_DIRTY_PAGES, gpa, 1, gpa));
        }
        let state = agent(reg);
        let first = list(&state, None);
        assert!(first.token.len() <= MAX_TOKEN_LEN);
        assert!(Token::parse(&first.token).unwrap().slots.is_empty());
        let next = list(&state, Some(&first.token));
        assert_eq!((next.header.count, next.header.flags), (2000, 0));
    }

    #[test]
    fn a_bitmap_slot_is_listed_whole_unless_both_lists_served_it_clean() {
        let pages = 64;
        let mut reg = manual_protect_vm(pages);
        let all: Vec<u64> = (0..pages).collect();
        harvest(&mut reg, 20, pages as u32, pages as u32, &all);
        clear(&mut reg, 30, 0, pages as u32, &all);
        for job in reg.take_jobs() {
            let mut plan = reg.plan(&job).unwrap();
            plan.read_end_ns = 35;
            let hashes = vec![Some([1; 32]); plan.pages.len()];
            reg.commit(&job, &plan, &hashes);
        }
        // Confirmed by a harvest after the read, but before the requests.
        harvest(&mut reg, 40, pages as u32, pages as u32, &[]);
        let state = agent(reg);
        // No harvest after the requests: clean pages served unverified.
        let first = list(&state, None);
        assert!(first.records.iter().all(|r| r.state != state::CLEAN));
        let second = list(&state, Some(&first.token));
        assert_eq!(
            (second.header.count, second.header.flags),
            (pages, FLAG_DELTA)
        );
        // Harvests after every request from now on: served clean, but the
        // earlier list did not, so this one is whole again.
        let later = crate::clock::monotonic_ns() + 3_600_000_000_000;
        for at in [later, later + 10] {
            harvest(
                &mut state.registry.lock().unwrap(),
                at,
                pages as u32,
                pages as u32,
                &[],
            );
        }
        let third = list(&state, Some(&second.token));
        assert_eq!(third.header.count, pages);
        assert!(third.records.iter().any(|r| r.state == state::CLEAN));
        // Both clean: only what changed.
        let fourth = list(&state, Some(&third.token));
        assert_eq!((fourth.header.count, fourth.header.flags), (0, FLAG_DELTA));
        let mut view = View::new();
        apply(&mut view, &third);
        apply(&mut view, &fourth);
        assert_eq!(view, whole(&state));
    }

    #[test]
    fn tokens_round_trip_and_garbage_is_refused() {
        let token = Token {
            instance: 0xdead_beef_0123,
            slots: vec![
                SlotMark {
                    id: 3,
                    epoch: 17,
                    mark: 2,
                    clean: true,
                },
                SlotMark {
                    id: 0,
                    epoch: u64::MAX,
                    mark: 0,
                    clean: false,
                },
            ],
        };
        assert_eq!(Token::parse(&token.encode()), Ok(token));
        for garbage in [
            "",
            "zz",
            "1~2.3.4",
            "1~2.3.4.5",
            "1~2.3.4.1.9",
            "1~~",
            "1~fffffffff.1.1.1",
            &"a".repeat(MAX_TOKEN_LEN + 1),
        ] {
            assert!(Token::parse(garbage).is_err(), "{garbage:.20}");
        }
    }
}
