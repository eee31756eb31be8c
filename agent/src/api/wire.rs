//! The compact binary hash list (`GET /v1/vms/{pid}/hashes`), for migration
//! tooling. Little-endian, fixed-size records, read with `bytemuck`.
//!
//! ```text
//! HashListHeader (32 bytes) then `count` × PageRecord (48 bytes), in guest
//! physical address order.
//! ```

use bytemuck::{Pod, Zeroable};

pub const HASH_LIST_MAGIC: [u8; 4] = *b"PFHL";
pub const HASH_LIST_VERSION: u32 = 1;

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

/// Splits a binary hash list into its header and records.
pub fn parse_hash_list(bytes: &[u8]) -> Result<(HashListHeader, Vec<PageRecord>), String> {
    let header_len = size_of::<HashListHeader>();
    if bytes.len() < header_len {
        return Err(format!("hash list too short: {} bytes", bytes.len()));
    }
    let header: HashListHeader = bytemuck::pod_read_unaligned(&bytes[..header_len]);
    if header.magic != HASH_LIST_MAGIC || header.version != HASH_LIST_VERSION {
        return Err("not a pagefp hash list of version 1".into());
    }
    let body = &bytes[header_len..];
    if body.len() as u64 != header.count * size_of::<PageRecord>() as u64 {
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
    Ok((header, records))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_round_trip() {
        assert_eq!(size_of::<HashListHeader>(), 32);
        assert_eq!(size_of::<PageRecord>(), 48);
        let header = HashListHeader {
            magic: HASH_LIST_MAGIC,
            version: 1,
            pid: 9,
            page_size: 4096,
            count: 1,
            taken_ns: 5,
        };
        let record = PageRecord {
            gpa: 4096,
            hash: [7; 32],
            state: state::CLEAN,
            zero: 0,
            _pad: [0; 6],
        };
        let mut bytes = bytemuck::bytes_of(&header).to_vec();
        bytes.extend_from_slice(bytemuck::bytes_of(&record));
        assert_eq!(parse_hash_list(&bytes).unwrap(), (header, vec![record]));
        assert!(parse_hash_list(&bytes[..40]).is_err());
    }
}
