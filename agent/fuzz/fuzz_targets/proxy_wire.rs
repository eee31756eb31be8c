//! Fuzzes what each proxy reads from the other. The first byte picks the
//! side: even, the receive proxy (preamble, Hello, chunks (plain or zstd,
//! RAW and TEMPLATE ops, digest) and End); odd, the send proxy's
//! return-path relay (ReturnPath frames, then Done). Whatever the input:
//! no panic, a chunk never decodes past its limits and only when its digest
//! matches, a template op yields exactly the template's page, and the relay
//! hands QEMU exactly the ReturnPath payloads it read.
//!
//! `cargo +nightly fuzz run proxy_wire`

#![no_main]

use libfuzzer_sys::fuzz_target;

use agent_parts::{page, transport};

use transport::qemu_proxy::{self as wire, End, FrameReader, Hello, Kind, MAX_CHUNK_STREAM};

/// Two template pages the chunk ops may name (index 0 and 1).
static TEMPLATES: [[u8; page::PAGE_SIZE]; 2] = [[0xA5; page::PAGE_SIZE], [0x5A; page::PAGE_SIZE]];

/// The chunk digests' seed (the seeds in `fuzz/seeds/proxy_wire` use it).
const DIGEST_SEED: u64 = 0;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    if mode & 1 == 1 {
        let mut to_qemu = Vec::new();
        let result = wire::relay_return_path(&mut FrameReader::new(data), &mut to_qemu);
        if let Ok((_, relayed)) = result {
            assert_eq!(relayed, to_qemu.len() as u64);
        }
        assert!(to_qemu.len() <= data.len());
        return;
    }
    let mut reader = FrameReader::new(data);
    if reader.preamble().is_err() {
        return;
    }
    let mut stream = 0u64;
    while let Ok(frame) = reader.frame() {
        match frame.kind {
            Kind::Hello => {
                let _ = frame.json::<Hello>();
            }
            Kind::Chunk => {
                let mut used = 0u64;
                if let Ok(bytes) = wire::decode_chunk(&frame, DIGEST_SEED, stream, |index| {
                    used += 1;
                    TEMPLATES.get(index as usize)
                }) {
                    assert!(bytes.len() <= MAX_CHUNK_STREAM + page::PAGE_SIZE);
                    assert!(bytes.len() as u64 >= used * page::PAGE_SIZE as u64);
                    stream += bytes.len() as u64;
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
