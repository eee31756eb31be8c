//! Fuzzes what the receive proxy reads from the send proxy: the preamble,
//! frames, Hello, chunks (plain or zstd, RAW and TEMPLATE ops) and End.
//! Whatever the input: no panic, a chunk never decodes past its limits, and
//! a template op yields exactly the template's page.
//!
//! `cargo +nightly fuzz run proxy_wire`

#![no_main]

use libfuzzer_sys::fuzz_target;

use agent_parts::{page, transport};

use transport::qemu_proxy::{self as wire, End, FrameReader, Hello, Kind, MAX_CHUNK_STREAM};

/// Two template pages the chunk ops may name (index 0 and 1).
static TEMPLATES: [[u8; page::PAGE_SIZE]; 2] = [[0xA5; page::PAGE_SIZE], [0x5A; page::PAGE_SIZE]];

fuzz_target!(|data: &[u8]| {
    let mut reader = FrameReader::new(data);
    if reader.preamble().is_err() {
        return;
    }
    while let Ok(frame) = reader.frame() {
        match frame.kind {
            Kind::Hello => {
                let _ = frame.json::<Hello>();
            }
            Kind::Chunk => {
                let mut used = 0u64;
                if let Ok(bytes) = wire::decode_chunk(&frame, |index| {
                    used += 1;
                    TEMPLATES.get(index as usize)
                }) {
                    assert!(bytes.len() <= MAX_CHUNK_STREAM + page::PAGE_SIZE);
                    assert!(bytes.len() as u64 >= used * page::PAGE_SIZE as u64);
                }
            }
            Kind::Offer => {
                if let Ok(ids) = wire::decode_offer(&frame) {
                    assert!(ids.len() <= wire::OFFER_PER_FRAME);
                }
            }
            Kind::End => {
                let _ = frame.json::<End>();
            }
            _ => {
                let _ = frame.json::<serde_json::Value>();
            }
        }
    }
});
