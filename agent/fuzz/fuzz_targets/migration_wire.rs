//! Fuzzes what a native migration receiver reads from its peer: the
//! preamble, frames (length, flags, CRC), zstd page bodies, page records,
//! offers, digests and JSON messages. Whatever the input: no panic, memory
//! bounded by the protocol's limits, and every full page record exactly one
//! page long.
//!
//! `cargo +nightly fuzz run migration_wire`

#![no_main]

use libfuzzer_sys::fuzz_target;

use agent_parts::{page, transport};

use transport::migration::{
    self as wire, FrameReader, Hello, Kind, MAX_PAYLOAD, PageRecord, Ready, RoundEnd,
};

fuzz_target!(|data: &[u8]| {
    let mut reader = FrameReader::new(data);
    if reader.preamble().is_err() {
        return;
    }
    while let Ok(frame) = reader.frame() {
        assert!(frame.payload.len() <= MAX_PAYLOAD);
        match frame.kind {
            Kind::Pages => {
                let Ok(body) = wire::body(&frame) else { continue };
                assert!(body.len() <= MAX_PAYLOAD, "decompressed past the cap");
                for record in wire::parse_pages(&body) {
                    match record {
                        Ok(PageRecord::Full { data, .. }) => assert_eq!(data.len(), page::PAGE_SIZE),
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            }
            Kind::Offer => {
                if let Ok(ids) = wire::decode_offer(&frame) {
                    assert!(ids.len() <= wire::MAX_OFFER);
                }
            }
            Kind::Verify => {
                let _ = wire::decode_digest(&frame);
            }
            Kind::Hello => {
                if let Ok(hello) = frame.json::<Hello>() {
                    let _ = hello.total_pages();
                }
            }
            Kind::RoundEnd | Kind::RoundAck => {
                let _ = frame.json::<RoundEnd>();
            }
            Kind::Ready => {
                let _ = frame.json::<Ready>();
            }
            _ => {
                let _ = frame.json::<serde_json::Value>();
            }
        }
    }
});
