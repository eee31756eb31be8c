//! The query negotiation both protocols speak, instead of a whole-catalog
//! offer: the destination asks for the VM's distinct contents and answers
//! which of them it can rebuild, so what crosses the link grows with the
//! VM, not with the catalog.
//!
//! ```text
//! S→R Hello       announces n contents the source can list (n > 0)
//! R→S want        empty: "send them"
//! S→R hashes      up to Queries::QUERY_CHUNK distinct 32-byte hashes
//! R→S held        one bit per hash of the last hashes frame (bit i % 8 of
//!                 byte i / 8), set when the destination can rebuild it;
//!                 exactly ceil(count / 8) bytes, bits past count clear
//!  ... hashes / held until n hashes were sent
//! ```
//!
//! The held hashes, in the order sent, are the templates: wire index 0, 1,
//! ... The source still sends a reference only for a page whose content it
//! hashed at send time and found among them.

use std::{
    collections::HashMap,
    io::{Read, Write},
};

use super::{Frame, FrameReader, FrameWriter, Protocol, WireError};
use crate::content::TemplateId;

/// Most contents a source may list: 256 GiB of distinct guest pages (each
/// one held costs the destination a page of memory until the migration
/// ends).
pub const MAX_LISTED: u64 = 1 << 26;

/// The kinds a protocol gives the query's three messages.
pub struct QueryKinds<K> {
    pub want: K,
    pub hashes: K,
    pub held: K,
}

/// A protocol that speaks the query negotiation.
pub trait Queries: Protocol {
    const QUERY: QueryKinds<Self::Kind>;
    /// Most hashes one hashes frame holds (its payload fits one frame).
    const QUERY_CHUNK: usize = Self::MAX_PAYLOAD / 32;
}

/// Source side, once the destination sent `want`: lists `contents`
/// (distinct hashes) chunk by chunk; the templates agreed, by content,
/// with their wire index.
pub fn ask<P: Queries, R: Read, W: Write>(
    reader: &mut FrameReader<P, R>,
    writer: &mut FrameWriter<P, W>,
    contents: &[TemplateId],
) -> Result<HashMap<TemplateId, u32>, WireError> {
    let mut agreed = HashMap::new();
    // Every held flag takes the next wire index, a repeated hash too.
    let mut index = 0u32;
    for chunk in contents.chunks(P::QUERY_CHUNK) {
        writer.frame(P::QUERY.hashes, 0, chunk.as_flattened())?;
        writer.flush()?;
        let held = decode_held(&reader.expect(P::QUERY.held)?, chunk.len())?;
        for (hash, _) in chunk.iter().zip(held).filter(|(_, held)| *held) {
            agreed.entry(*hash).or_insert(index);
            index += 1;
        }
    }
    Ok(agreed)
}

/// Destination side: sends `want`, then answers each hashes frame with
/// `holds(hashes)` (one flag per hash) until the `asked` hashes the source
/// announced came. A source that sends more, none, or not whole hashes is
/// refused.
pub fn answer<P: Queries, R: Read, W: Write>(
    reader: &mut FrameReader<P, R>,
    writer: &mut FrameWriter<P, W>,
    asked: u64,
    mut holds: impl FnMut(&[TemplateId]) -> Vec<bool>,
) -> Result<(), WireError> {
    if asked > MAX_LISTED {
        return Err(WireError::Malformed {
            kind: "Hello".into(),
            offset: 0,
            what: format!("{asked} contents to list: more than the {MAX_LISTED} a query may hold"),
        });
    }
    writer.frame(P::QUERY.want, 0, &[])?;
    writer.flush()?;
    let mut received = 0u64;
    while received < asked {
        let frame = reader.expect(P::QUERY.hashes)?;
        let hashes = super::hashes(&frame.payload)
            .filter(|hashes| !hashes.is_empty() && hashes.len() <= P::QUERY_CHUNK)
            .ok_or_else(|| {
                frame.malformed(format!(
                    "not a whole number of 32-byte hashes, 1 to {}",
                    P::QUERY_CHUNK
                ))
            })?;
        received += hashes.len() as u64;
        if received > asked {
            return Err(frame.malformed(format!("more than the {asked} hashes announced")));
        }
        let held = holds(&hashes);
        debug_assert_eq!(held.len(), hashes.len());
        writer.frame(P::QUERY.held, 0, &encode_held(&held))?;
        writer.flush()?;
    }
    Ok(())
}

/// A held payload: one bit per flag.
pub fn encode_held(held: &[bool]) -> Vec<u8> {
    let mut bits = vec![0u8; held.len().div_ceil(8)];
    for (i, _) in held.iter().enumerate().filter(|(_, held)| **held) {
        bits[i / 8] |= 1 << (i % 8);
    }
    bits
}

/// A held frame answering `count` hashes: which were held. Its length must
/// be exact and bits past `count` clear.
pub fn decode_held<K: std::fmt::Debug>(
    frame: &Frame<K>,
    count: usize,
) -> Result<Vec<bool>, WireError> {
    if frame.payload.len() != count.div_ceil(8) {
        return Err(frame.malformed(format!(
            "{} bytes answer {count} hashes (expected {})",
            frame.payload.len(),
            count.div_ceil(8)
        )));
    }
    let held: Vec<bool> = (0..count)
        .map(|i| frame.payload[i / 8] & (1 << (i % 8)) != 0)
        .collect();
    if !count.is_multiple_of(8) && frame.payload[count / 8] >> (count % 8) != 0 {
        return Err(frame.malformed("bits set past the hashes asked"));
    }
    Ok(held)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: Vec<u8>) -> Frame<u8> {
        Frame {
            kind: 14,
            flags: 0,
            payload,
            offset: 0,
        }
    }

    #[test]
    fn held_bits_round_trip_and_stray_bits_are_refused() {
        let held = [true, false, false, true, true, false, false, false, true];
        let bits = encode_held(&held);
        assert_eq!(bits, vec![0b0001_1001, 0b1]);
        assert_eq!(decode_held(&frame(bits.clone()), 9).unwrap(), held);
        assert!(
            decode_held(&frame(bits.clone()), 8).is_err(),
            "one byte too many"
        );
        assert!(decode_held(&frame(vec![0b0001_1001, 0b11]), 9).is_err());
        assert!(decode_held(&frame(Vec::new()), 0).unwrap().is_empty());
        for count in [1usize, 7, 8, 9, 1000] {
            let held: Vec<bool> = (0..count).map(|i| i % 3 == 0).collect();
            assert_eq!(
                decode_held(&frame(encode_held(&held)), count).unwrap(),
                held
            );
        }
    }

    #[test]
    fn the_largest_hashes_frame_fits_each_protocol() {
        use crate::transport::{migration::Migration, qemu_proxy::QemuProxy};
        assert_eq!(Migration::QUERY_CHUNK * 32, Migration::MAX_PAYLOAD);
        assert_eq!(QemuProxy::QUERY_CHUNK * 32, QemuProxy::MAX_PAYLOAD);
    }
}
