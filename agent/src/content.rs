//! Host-wide occurrence counts of page contents.
//!
//! Every distinct content (blake3 hash) seen in any VM gets a small integer id,
//! so a page costs 4 bytes for its content and the 32-byte hash is stored once.
//! Counts are exact: they change in step with the page tables.

use std::hash::{BuildHasherDefault, Hasher};

use hashbrown::{HashMap, HashTable};

/// A blake3 hash of one 4 KiB page.
pub type PageHash = [u8; 32];

/// A template's id in both WAN protocols (native migration and the QEMU
/// proxies): the full blake3 hash of its page. All 32 bytes, so that
/// site-wide catalogs of millions of templates stay far from collisions.
pub type TemplateId = PageHash;
/// Bytes of a [`TemplateId`] on the wire.
pub const TEMPLATE_ID_LEN: usize = std::mem::size_of::<TemplateId>();

/// The id of a content in a [`ContentTable`].
pub type ContentId = u32;

/// The zero page's id, in every table: it is interned first and never
/// released, so a page's content tells at once whether it is all zero.
pub const ZERO_CONTENT: ContentId = 0;

/// blake3 of 4096 zero bytes.
pub fn zero_page_hash() -> PageHash {
    static ZERO: std::sync::OnceLock<PageHash> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| *blake3::hash(&[0u8; crate::page::PAGE_SIZE]).as_bytes())
}

/// What is known about one content.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ContentInfo {
    pub hash: PageHash,
    /// Pages holding this content, over all VMs.
    pub pages: u32,
    /// VMs holding at least one page of this content.
    pub vms: u32,
}

/// Per-VM page counts by content. A VM owns one and hands it to the table on
/// every change, so the table can keep `vms` exact.
#[derive(Debug, Default)]
pub struct VmContentCounts {
    counts: HashMap<ContentId, u32, BuildHasherDefault<IdHasher>>,
}

impl VmContentCounts {
    pub fn distinct(&self) -> usize {
        self.counts.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (ContentId, u32)> + '_ {
        self.counts.iter().map(|(id, n)| (*id, *n))
    }
}

/// Entries are stored in fixed chunks, allocated exactly: a growing table
/// never holds twice the memory it needs, as a doubling `Vec` would.
const CHUNK: usize = 1 << 14;

#[derive(Debug, Default)]
struct Entries {
    chunks: Vec<Box<[ContentInfo]>>,
    len: usize,
}

impl Entries {
    fn push(&mut self, info: ContentInfo) {
        if self.len == self.chunks.len() * CHUNK {
            self.chunks
                .push(vec![ContentInfo::default(); CHUNK].into_boxed_slice());
        }
        self.chunks[self.len / CHUNK][self.len % CHUNK] = info;
        self.len += 1;
    }

    fn len(&self) -> usize {
        self.len
    }

    fn capacity(&self) -> usize {
        self.chunks.len() * CHUNK
    }

    fn iter(&self) -> impl Iterator<Item = &ContentInfo> + '_ {
        self.chunks
            .iter()
            .flat_map(|chunk| chunk.iter())
            .take(self.len)
    }
}

impl std::ops::Index<usize> for Entries {
    type Output = ContentInfo;

    fn index(&self, index: usize) -> &ContentInfo {
        &self.chunks[index / CHUNK][index % CHUNK]
    }
}

impl std::ops::IndexMut<usize> for Entries {
    fn index_mut(&mut self, index: usize) -> &mut ContentInfo {
        &mut self.chunks[index / CHUNK][index % CHUNK]
    }
}

/// Interned page contents with their counts.
#[derive(Debug)]
pub struct ContentTable {
    entries: Entries,
    free: Vec<ContentId>,
    index: HashTable<ContentId>,
    /// Bumped on every change; template selection caches on it.
    epoch: u64,
    /// What changed since the site publisher last looked (off unless a
    /// site store is configured).
    journal: Option<Journal>,
}

/// Most changes a journal holds before it gives up and asks for a resync.
pub const JOURNAL_MAX: usize = 1 << 22;

/// The contents whose VM count changed, and the hashes released, since the
/// journal was last drained. A VM count changes when a VM gains its first
/// or loses its last page of a content, far less often than pages change.
#[derive(Debug, Default)]
struct Journal {
    touched: Vec<ContentId>,
    released: Vec<PageHash>,
    overflowed: bool,
}

impl Journal {
    fn full(&mut self) -> bool {
        if self.touched.len() + self.released.len() >= JOURNAL_MAX {
            self.touched = Vec::new();
            self.released = Vec::new();
            self.overflowed = true;
        }
        self.overflowed
    }
}

/// What a site publisher sends: each content this host now holds whose VM
/// count changed (hash, VMs holding it), and the contents it no longer
/// holds. `resync`: the list is every content held, and whatever was
/// published before is to be replaced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ContentChanges {
    pub held: Vec<(PageHash, u32)>,
    pub released: Vec<PageHash>,
    pub resync: bool,
}

impl ContentChanges {
    pub fn is_empty(&self) -> bool {
        self.held.is_empty() && self.released.is_empty() && !self.resync
    }
}

fn hash_key(hash: &PageHash) -> u64 {
    // blake3 output is uniform: its first eight bytes are a good table hash.
    u64::from_le_bytes(hash[..8].try_into().unwrap())
}

impl Default for ContentTable {
    fn default() -> Self {
        let mut table = Self {
            entries: Entries::default(),
            free: Vec::new(),
            index: HashTable::default(),
            epoch: 0,
            journal: None,
        };
        let zero = table.intern(&zero_page_hash());
        debug_assert_eq!(zero, ZERO_CONTENT);
        table
    }
}

impl ContentTable {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Distinct contents currently held by at least one page.
    pub fn len(&self) -> usize {
        let unused_zero = usize::from(self.entries[ZERO_CONTENT as usize].pages == 0);
        self.entries.len() - self.free.len() - unused_zero
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, id: ContentId) -> &ContentInfo {
        &self.entries[id as usize]
    }

    pub fn lookup(&self, hash: &PageHash) -> Option<ContentId> {
        let entries = &self.entries;
        self.index
            .find(hash_key(hash), |id| entries[*id as usize].hash == *hash)
            .copied()
    }

    /// All live contents.
    pub fn iter(&self) -> impl Iterator<Item = (ContentId, &ContentInfo)> + '_ {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, info)| info.pages > 0)
            .map(|(id, info)| (id as ContentId, info))
    }

    /// Counts one more page of `hash` in the VM owning `vm`; returns its id.
    pub fn add_page(&mut self, vm: &mut VmContentCounts, hash: &PageHash) -> ContentId {
        self.epoch += 1;
        let id = self.intern(hash);
        let in_vm = vm.counts.entry(id).or_insert(0);
        *in_vm += 1;
        let info = &mut self.entries[id as usize];
        info.pages += 1;
        if *in_vm == 1 {
            info.vms += 1;
            self.touched(id);
        }
        id
    }

    /// Forgets one page of content `id` in the VM owning `vm`.
    pub fn remove_page(&mut self, vm: &mut VmContentCounts, id: ContentId) {
        self.epoch += 1;
        let Some(in_vm) = vm.counts.get_mut(&id) else {
            debug_assert!(false, "content {id} not counted in this VM");
            return;
        };
        *in_vm -= 1;
        let vm_gone = *in_vm == 0;
        if vm_gone {
            vm.counts.remove(&id);
        }
        let info = &mut self.entries[id as usize];
        info.pages -= 1;
        if vm_gone {
            info.vms -= 1;
        }
        if info.pages == 0 {
            self.release(id);
        } else if vm_gone {
            self.touched(id);
        }
    }

    /// Forgets every page of a VM that is going away.
    pub fn remove_vm(&mut self, vm: VmContentCounts) {
        self.epoch += 1;
        for (id, n) in vm.counts {
            let info = &mut self.entries[id as usize];
            info.pages -= n;
            info.vms -= 1;
            if info.pages == 0 {
                self.release(id);
            } else {
                self.touched(id);
            }
        }
    }

    /// Starts recording changes for [`ContentTable::take_changes`]; the
    /// first take lists every content held.
    pub fn start_journal(&mut self) {
        self.journal = Some(Journal {
            overflowed: true,
            ..Journal::default()
        });
    }

    /// The changes since the last take (a resync after the journal
    /// overflowed, or on the first take); empty if the journal is off.
    pub fn take_changes(&mut self) -> ContentChanges {
        let Some(journal) = self.journal.as_mut() else {
            return ContentChanges::default();
        };
        let mut journal = std::mem::take(journal);
        let zero = self.entries[ZERO_CONTENT as usize].hash;
        let held = |(_, info): &(ContentId, &ContentInfo)| (info.hash, info.vms);
        if journal.overflowed {
            return ContentChanges {
                held: self
                    .iter()
                    .filter(|(_, info)| info.hash != zero)
                    .map(|entry| held(&entry))
                    .collect(),
                released: Vec::new(),
                resync: true,
            };
        }
        journal.touched.sort_unstable();
        journal.touched.dedup();
        ContentChanges {
            held: journal
                .touched
                .iter()
                .filter(|id| **id != ZERO_CONTENT)
                .map(|id| (*id, self.get(*id)))
                .filter(|(_, info)| info.pages > 0)
                .map(|entry| held(&entry))
                .collect(),
            released: journal.released,
            resync: false,
        }
    }

    fn touched(&mut self, id: ContentId) {
        if let Some(journal) = self.journal.as_mut()
            && !journal.full()
        {
            journal.touched.push(id);
        }
    }

    /// Bytes used by the table itself (not counting per-VM counts).
    pub fn heap_bytes(&self) -> usize {
        self.entries.capacity() * size_of::<ContentInfo>()
            + self.free.capacity() * size_of::<ContentId>()
            + self.index.capacity() * (size_of::<ContentId>() + 1)
            + self.journal.as_ref().map_or(0, |journal| {
                journal.touched.capacity() * size_of::<ContentId>()
                    + journal.released.capacity() * size_of::<PageHash>()
            })
    }

    /// The id of `hash`, a new one if it is not in the table: one probe
    /// of the index either way (a lookup then an insert probed it twice
    /// for every new content).
    fn intern(&mut self, hash: &PageHash) -> ContentId {
        use hashbrown::hash_table::Entry;
        let entries = &self.entries;
        let vacant = match self.index.entry(
            hash_key(hash),
            |id| entries[*id as usize].hash == *hash,
            |id| hash_key(&entries[*id as usize].hash),
        ) {
            Entry::Occupied(found) => return *found.get(),
            Entry::Vacant(vacant) => vacant,
        };
        let info = ContentInfo {
            hash: *hash,
            pages: 0,
            vms: 0,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.entries[id as usize] = info;
                id
            }
            None => {
                self.entries.push(info);
                (self.entries.len() - 1) as ContentId
            }
        };
        vacant.insert(id);
        id
    }

    fn release(&mut self, id: ContentId) {
        if id == ZERO_CONTENT {
            return;
        }
        let key = hash_key(&self.entries[id as usize].hash);
        if let Ok(slot) = self.index.find_entry(key, |candidate| *candidate == id) {
            slot.remove();
        }
        self.free.push(id);
        if let Some(journal) = self.journal.as_mut()
            && !journal.full()
        {
            journal.released.push(self.entries[id as usize].hash);
        }
    }
}

/// Hashes content ids for the per-VM maps (Fibonacci hashing: hashbrown needs
/// good high bits).
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u32(&mut self, value: u32) {
        self.0 = u64::from(value).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap as StdHashMap;

    use proptest::prelude::*;

    use super::*;

    fn h(n: u8) -> PageHash {
        [n; 32]
    }

    #[test]
    fn counts_pages_and_vms() {
        let mut table = ContentTable::new();
        let (mut a, mut b) = (VmContentCounts::default(), VmContentCounts::default());
        let x = table.add_page(&mut a, &h(1));
        table.add_page(&mut a, &h(1));
        table.add_page(&mut b, &h(1));
        assert_eq!(table.get(x).pages, 3);
        assert_eq!(table.get(x).vms, 2);
        table.remove_page(&mut a, x);
        assert_eq!((table.get(x).pages, table.get(x).vms), (2, 2));
        table.remove_page(&mut a, x);
        assert_eq!((table.get(x).pages, table.get(x).vms), (1, 1));
        table.remove_vm(b);
        assert!(table.is_empty());
        assert_eq!(table.lookup(&h(1)), None);
    }

    proptest! {
        /// Any sequence of page changes leaves counts equal to a recount.
        #[test]
        fn counts_match_a_recount(ops in prop::collection::vec((0usize..3, 0usize..16, 0u8..6), 1..300)) {
            let mut table = ContentTable::new();
            let mut vms: Vec<VmContentCounts> = (0..3).map(|_| VmContentCounts::default()).collect();
            // pages[vm][page] = Some((content byte, id))
            let mut pages = vec![vec![None; 16]; 3];
            for (vm, page, byte) in ops {
                if let Some((_, id)) = pages[vm][page].take() {
                    table.remove_page(&mut vms[vm], id);
                }
                if byte > 0 {
                    let id = table.add_page(&mut vms[vm], &h(byte));
                    pages[vm][page] = Some((byte, id));
                }
            }
            let mut expect: StdHashMap<u8, (u32, u32)> = StdHashMap::new();
            for vm_pages in &pages {
                let mut seen = std::collections::HashSet::new();
                for (byte, _) in vm_pages.iter().flatten() {
                    let e = expect.entry(*byte).or_default();
                    e.0 += 1;
                    if seen.insert(*byte) { e.1 += 1; }
                }
            }
            prop_assert_eq!(table.len(), expect.len());
            for (byte, (p, v)) in expect {
                let id = table.lookup(&h(byte)).unwrap();
                prop_assert_eq!((table.get(id).pages, table.get(id).vms), (p, v));
            }
        }
    }
    proptest! {
        /// A publisher that applies each take (released first, then held)
        /// ends with exactly the table's contents and VM counts.
        #[test]
        fn journal_takes_replay_to_the_table(
            ops in prop::collection::vec((0usize..3, 0usize..8, 0u8..5, any::<bool>()), 1..300),
            overflow_at in prop::option::of(0usize..300),
        ) {
            let mut table = ContentTable::new();
            table.start_journal();
            let mut vms: Vec<VmContentCounts> = (0..3).map(|_| VmContentCounts::default()).collect();
            let mut pages: Vec<Vec<Option<ContentId>>> = vec![vec![None; 8]; 3];
            let mut published: StdHashMap<PageHash, u32> = StdHashMap::new();
            let apply = |changes: ContentChanges, published: &mut StdHashMap<PageHash, u32>| {
                if changes.resync {
                    published.clear();
                }
                for hash in changes.released {
                    published.remove(&hash);
                }
                for (hash, vms) in changes.held {
                    published.insert(hash, vms);
                }
            };
            for (step, (vm, page, byte, take)) in ops.into_iter().enumerate() {
                if let Some(id) = pages[vm][page].take() {
                    table.remove_page(&mut vms[vm], id);
                }
                if byte > 0 {
                    pages[vm][page] = Some(table.add_page(&mut vms[vm], &h(byte)));
                } else if page == 0 {
                    let gone = std::mem::take(&mut vms[vm]);
                    pages[vm] = vec![None; 8];
                    table.remove_vm(gone);
                }
                if overflow_at == Some(step) {
                    table.journal.as_mut().unwrap().overflowed = true;
                }
                if take {
                    apply(table.take_changes(), &mut published);
                }
            }
            apply(table.take_changes(), &mut published);
            let zero = zero_page_hash();
            let expected: StdHashMap<PageHash, u32> = table
                .iter()
                .filter(|(_, info)| info.hash != zero)
                .map(|(_, info)| (info.hash, info.vms))
                .collect();
            prop_assert_eq!(published, expected);
        }
    }
}
