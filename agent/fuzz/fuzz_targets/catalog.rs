//! Fuzzes the catalog file reader: whatever the file holds, no panic and no
//! allocation beyond what its length allows; a catalog that loads has every
//! page matching its hash, no zero or duplicate template, and saves back to
//! a file that loads to the same catalog.
//!
//! `cargo +nightly fuzz run catalog`

#![no_main]

use libfuzzer_sys::fuzz_target;

use agent_parts::{catalog, page};

fuzz_target!(|data: &[u8]| {
    let Ok(loaded) = catalog::Catalog::from_bytes(data) else {
        return;
    };
    let mut seen = std::collections::HashSet::new();
    for (index, hash) in loaded.hashes.iter().enumerate() {
        assert_eq!(blake3::hash(loaded.page(index)).as_bytes(), hash, "page {index}");
        assert!(!page::is_zero_page(loaded.page(index)), "a zero template");
        assert!(seen.insert(*hash), "a duplicate template");
    }
    let again = catalog::Catalog::from_bytes(&loaded.to_bytes().unwrap()).unwrap();
    assert_eq!(again.hashes, loaded.hashes);
    assert_eq!(again.pages, loaded.pages);
});
