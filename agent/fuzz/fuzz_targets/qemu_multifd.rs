//! Fuzzes the parser of QEMU's multifd channels: whatever the input, no
//! panic, the bytes and pages handed out are exactly the input (all of it
//! on success), and every page is the 4096 bytes at its place.
//!
//! `cargo +nightly fuzz run qemu_multifd -- -max_len=65536`, seeds in
//! `seeds/qemu_multifd/`.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code, unused_imports)]
#[path = "../../src/qemu_stream/mod.rs"]
mod qemu_stream;
mod trickle;

use trickle::Trickle;
use qemu_stream::{Page, Sink, SinkError, StreamError, multifd::parse_channel};

#[derive(Default)]
struct Check {
    out: Vec<u8>,
}

impl Sink for Check {
    fn bytes(&mut self, bytes: &[u8]) -> Result<(), SinkError> {
        self.out.extend_from_slice(bytes);
        Ok(())
    }

    fn page(&mut self, page: Page<'_>) -> Result<(), SinkError> {
        assert_eq!(page.stream_offset, self.out.len() as u64, "page out of place");
        self.out.extend_from_slice(page.data);
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the read size.
    let Some((&mode, input)) = data.split_first() else {
        return;
    };
    let size = if mode == 0 { usize::MAX } else { usize::from(mode) };
    let mut sink = Check::default();
    let result = parse_channel(Trickle { data: input, size }, &mut sink);
    assert!(input.starts_with(&sink.out), "output is not the input");
    match result {
        Ok(summary) => {
            assert_eq!(sink.out.len(), input.len());
            assert_eq!(summary.stream_bytes, input.len() as u64);
        }
        Err(StreamError::Sink(_) | StreamError::Io { .. }) => panic!("no sink or I/O errors here"),
        Err(_) => {}
    }
});
