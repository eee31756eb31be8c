//! Fuzzes the QEMU migration stream parser: whatever the input, no panic,
//! the bytes and pages handed out are exactly the input (all of it on
//! success), every page is the 4096 bytes at its place, and a refusal
//! happens before the preamble is announced.
//!
//! `cargo +nightly fuzz run qemu_stream -- -max_len=65536`, seeds in
//! `seeds/qemu_stream/` (copy them into `corpus/qemu_stream/` first).

#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code, unused_imports)]
#[path = "../../src/qemu_stream/mod.rs"]
mod qemu_stream;
mod trickle;

use trickle::Trickle;
use qemu_stream::{Options, Page, Preamble, Sink, SinkError, StreamError, Unsupported, parse};

#[derive(Default)]
struct Check {
    out: Vec<u8>,
    preamble: bool,
}

impl Sink for Check {
    fn bytes(&mut self, bytes: &[u8]) -> Result<(), SinkError> {
        self.out.extend_from_slice(bytes);
        Ok(())
    }

    fn page(&mut self, page: Page<'_>) -> Result<(), SinkError> {
        assert!(self.preamble, "a page before the preamble");
        assert_eq!(
            page.stream_offset,
            self.out.len() as u64,
            "page out of place"
        );
        self.out.extend_from_slice(page.data);
        Ok(())
    }

    fn preamble(&mut self, _: &Preamble) -> Result<(), SinkError> {
        assert!(!self.preamble, "preamble twice");
        self.preamble = true;
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the options and the read size.
    let Some((&mode, input)) = data.split_first() else {
        return;
    };
    let options = Options {
        unsupported: if mode & 1 == 0 {
            Unsupported::Refuse
        } else {
            Unsupported::PassThrough
        },
    };
    let size = match mode >> 1 {
        0 => usize::MAX,
        n => usize::from(n),
    };
    let mut sink = Check::default();
    let result = parse(Trickle { data: input, size }, &mut sink, &options);
    assert!(input.starts_with(&sink.out), "output is not the input");
    match result {
        Ok(summary) => {
            assert_eq!(sink.out.len(), input.len());
            assert_eq!(summary.stream_bytes, input.len() as u64);
        }
        Err(StreamError::Unsupported { .. }) => assert!(!sink.preamble),
        Err(StreamError::Sink(_) | StreamError::Io { .. }) => panic!("no sink or I/O errors here"),
        Err(_) => {}
    }
});
