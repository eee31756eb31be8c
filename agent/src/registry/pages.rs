//! The state of every page of one memory slot.

use crate::content::ContentId;

/// What the agent knows about a page's content.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum PageState {
    /// Never hashed, or something may have been missed.
    Unknown = 0,
    /// The hash is valid: the page was read after its last write became
    /// visible to the agent and after KVM write-protected it again.
    Clean = 1,
    /// Written; the agent waits until KVM write-protects it again.
    Dirty = 2,
    /// Write-protected again; a rehash is queued.
    Queued = 3,
    /// Hashed, but the VM is not dirty-tracked: the content may have changed
    /// since. Whoever uses the hash must confirm it.
    Unverified = 4,
}

impl PageState {
    fn from_bits(bits: u32) -> Self {
        match bits & 0x7 {
            1 => Self::Clean,
            2 => Self::Dirty,
            3 => Self::Queued,
            4 => Self::Unverified,
            _ => Self::Unknown,
        }
    }

    /// May a hash read now be committed for a page in this state?
    pub fn wants_hash(self) -> bool {
        matches!(self, Self::Unknown | Self::Queued | Self::Unverified)
    }
}

/// No content known.
pub const NO_CONTENT: ContentId = ContentId::MAX;

/// One page: its content id and (generation << 3 | state). The generation
/// changes on every write the agent learns of, so a hash read before that
/// write is never committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageEntry {
    pub content: ContentId,
    meta: u32,
}

impl Default for PageEntry {
    fn default() -> Self {
        Self {
            content: NO_CONTENT,
            meta: 0,
        }
    }
}

impl PageEntry {
    pub fn state(&self) -> PageState {
        PageState::from_bits(self.meta)
    }

    pub fn generation(&self) -> u32 {
        self.meta >> 3
    }

    pub fn set_state(&mut self, state: PageState) {
        self.meta = (self.meta & !0x7) | state as u32;
    }

    /// A write was reported: new generation, in `state`.
    pub fn bump(&mut self, state: PageState) -> u32 {
        let generation = self.generation().wrapping_add(1) & (u32::MAX >> 3);
        self.meta = (generation << 3) | state as u32;
        generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_and_generation_pack() {
        let mut page = PageEntry::default();
        assert_eq!((page.state(), page.generation()), (PageState::Unknown, 0));
        assert_eq!(page.bump(PageState::Dirty), 1);
        page.set_state(PageState::Queued);
        assert_eq!((page.state(), page.generation()), (PageState::Queued, 1));
        for _ in 0..(1u64 << 29) / 4096 {
            page.bump(PageState::Dirty);
        }
        assert_eq!(page.state(), PageState::Dirty);
    }
}
