//! The compact binary hash list (`GET /v1/vms/{pid}/hashes`), for migration
//! tooling. Little-endian, fixed-size records, read with `bytemuck`.
//!
//! ```text
//! HashListHeader (40 bytes), the list's token (`token_len` bytes of
//! ASCII), then `count` × PageRecord (48 bytes), in guest physical address
//! order.
//! ```
//!
//! Asked with `?since=TOKEN` (the token of an earlier list of the same VM),
//! the agent may answer with a delta ([`FLAG_DELTA`]): the records of the
//! pages that may have changed since that list; every other page is as that
//! list said. It answers with a whole list whenever it cannot tell (another
//! agent instance, a slot added, removed or replaced, a slot whose clean
//! pages were not served clean in both lists).

use bytemuck::{Pod, Zeroable};

pub const HASH_LIST_MAGIC: [u8; 4] = *b"PFHL";
pub const HASH_LIST_VERSION: u32 = 2;
/// The records are a delta on the list whose token was given as `since`.
pub const FLAG_DELTA: u32 = 1;
/// Longest token an agent sends or accepts (it travels in a request line).
pub const MAX_TOKEN_LEN: usize = 16 << 10;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct HashListHeader {
    pub magic: [u8; 4],
    pub version: u32,
    pub pid: u32,
    pub page_size: u32,
    pub count: u64,
    /// `CLOCK_MONOTONIC` ns when the list was taken (after a sync).
    pub taken_ns: u64,
    /// [`FLAG_DELTA`] or 0.
    pub flags: u32,
    /// Bytes of the token after the header (at most [`MAX_TOKEN_LEN`]).
    pub token_len: u32,
}

/// A parsed hash list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HashList {
    pub header: HashListHeader,
    /// What to pass as `since` to ask for the changes after this list.
    pub token: String,
    pub records: Vec<PageRecord>,
}

impl HashList {
    pub fn is_delta(&self) -> bool {
        self.header.flags & FLAG_DELTA != 0
    }

    /// The list in its binary form.
    pub fn encode(header: &HashListHeader, token: &str, records: &[PageRecord]) -> Vec<u8> {
        let mut body =
            Vec::with_capacity(size_of::<HashListHeader>() + token.len() + size_of_val(records));
        body.extend_from_slice(bytemuck::bytes_of(header));
        body.extend_from_slice(token.as_bytes());
        body.extend_from_slice(bytemuck::cast_slice(records));
        body
    }
}

/// Page states on the wire (see `PageState`).
pub mod state {
    pub const UNKNOWN: u8 = 0;
    pub const CLEAN: u8 = 1;
    pub const DIRTY: u8 = 2;
    pub const UNVERIFIED: u8 = 3;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct PageRecord {
    pub gpa: u64,
    /// blake3 of the page; all zero unless `state` is clean or unverified.
    pub hash: [u8; 32],
    pub state: u8,
    /// 1 if the page is all zero.
    pub zero: u8,
    pub _pad: [u8; 6],
}

/// Splits a binary hash list into its header, token and records.
pub fn parse_hash_list(bytes: &[u8]) -> Result<HashList, String> {
    let header_len = size_of::<HashListHeader>();
    if bytes.len() < header_len {
        return Err(format!("hash list too short: {} bytes", bytes.len()));
    }
    let header: HashListHeader = bytemuck::pod_read_unaligned(&bytes[..header_len]);
    if header.magic != HASH_LIST_MAGIC || header.version != HASH_LIST_VERSION {
        return Err(format!(
            "not a pagefp hash list of version {HASH_LIST_VERSION}: the agent and this tool are of different releases"
        ));
    }
    let token_len = header.token_len as usize;
    if token_len > MAX_TOKEN_LEN || bytes.len() - header_len < token_len {
        return Err(format!(
            "hash list token of {token_len} bytes in a {}-byte list",
            bytes.len()
        ));
    }
    let token = std::str::from_utf8(&bytes[header_len..header_len + token_len])
        .ok()
        .filter(|t| t.is_ascii())
        .ok_or("hash list token is not ASCII")?
        .to_owned();
    let body = &bytes[header_len + token_len..];
    if body.len() as u64 != header.count.saturating_mul(size_of::<PageRecord>() as u64) {
        return Err(format!(
            "hash list body has {} bytes for {} records",
            body.len(),
            header.count
        ));
    }
    let records = body
        .chunks_exact(size_of::<PageRecord>())
        .map(bytemuck::pod_read_unaligned)
        .collect();
    Ok(HashList {
        header,
        token,
        records,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_round_trip() {
        assert_eq!(size_of::<HashListHeader>(), 40);
        assert_eq!(size_of::<PageRecord>(), 48);
        let token = "1f.2.3.4.1";
        let header = HashListHeader {
            magic: HASH_LIST_MAGIC,
            version: HASH_LIST_VERSION,
            pid: 9,
            page_size: 4096,
            count: 1,
            taken_ns: 5,
            flags: FLAG_DELTA,
            token_len: token.len() as u32,
        };
        let record = PageRecord {
            gpa: 4096,
            hash: [7; 32],
            state: state::CLEAN,
            zero: 0,
            _pad: [0; 6],
        };
        let bytes = HashList::encode(&header, token, &[record]);
        let list = parse_hash_list(&bytes).unwrap();
        assert_eq!(
            list,
            HashList {
                header,
                token: token.into(),
                records: vec![record]
            }
        );
        assert!(list.is_delta());
        for cut in [0, 39, 40, 49, bytes.len() - 1] {
            assert!(parse_hash_list(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut lying = header;
        lying.token_len = u32::MAX;
        assert!(parse_hash_list(&HashList::encode(&lying, token, &[record])).is_err());
        lying.token_len = token.len() as u32;
        lying.count = u64::MAX;
        assert!(parse_hash_list(&HashList::encode(&lying, token, &[record])).is_err());
    }
}
