//! The guest page: its size, and the two facts about a page's bytes that
//! every layer asks (is it all zero, how is its hash written).

/// Guest page size (x86_64 base pages; KVM dirty logging and QEMU's RAM
/// migration both work in these).
pub const PAGE_SIZE: usize = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;

/// A page of zeros (what a hole in guest memory reads as).
pub static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

const _: () = assert!(1 << PAGE_SHIFT == PAGE_SIZE);

/// Is the page all zero? (Cheaper than hashing it.)
pub fn is_zero_page(page: &[u8]) -> bool {
    let (prefix, words, suffix) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets
        // the aligned middle part.
        unsafe { page.align_to::<u64>() }
    };
    prefix.iter().all(|b| *b == 0)
        && words.iter().all(|w| *w == 0)
        && suffix.iter().all(|b| *b == 0)
}

/// Lowercase hex of `bytes` (hashes in JSON, logs and file names).
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

/// A 32-byte hash as lowercase hex in serde formats: use with
/// `#[serde(with = "crate::page::hex32")]`.
pub mod hex32 {
    use serde::{Deserialize as _, Deserializer, Serializer, de::Error as _};

    pub fn serialize<S: Serializer>(hash: &[u8; 32], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&super::hex(hash))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<[u8; 32], D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        super::parse_hex32(&text)
            .ok_or_else(|| D::Error::custom(format!("`{text}` is not a hash (64 hex digits)")))
    }
}

/// The 32 bytes written as 64 hex digits in `text`.
pub fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut hash = [0u8; 32];
    for (byte, pair) in hash.iter_mut().zip(text.as_bytes().chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_zero_pages() {
        let mut page = vec![0u8; PAGE_SIZE];
        assert!(is_zero_page(&page));
        page[PAGE_SIZE - 1] = 1;
        assert!(!is_zero_page(&page));
    }

    #[test]
    fn hex_is_lowercase_two_digits_per_byte_and_parses_back() {
        assert_eq!(hex(&[0x00, 0xab, 0x7f]), "00ab7f");
        let hash: [u8; 32] = std::array::from_fn(|i| (i * 9) as u8);
        assert_eq!(parse_hex32(&hex(&hash)), Some(hash));
        assert_eq!(parse_hex32(&hex(&hash).to_uppercase()), Some(hash));
        assert_eq!(parse_hex32("00"), None);
        assert_eq!(parse_hex32(&"zz".repeat(32)), None);
        assert_eq!(parse_hex32(&"é".repeat(32)), None);
    }
}
