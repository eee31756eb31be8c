use std::io::Read;

use proptest::prelude::*;

mod multifd;

use super::{
    format::{PAGE_SIZE, ram, section},
    synth::{self, Record, StreamSpec, build, page_content},
    *,
};

/// Collects what the parser hands out and checks the sink contract as it
/// goes: a page arrives exactly where it is in the stream, never before the
/// preamble.
#[derive(Default)]
struct Collect {
    out: Vec<u8>,
    pages: Vec<(String, u64, u64)>,
    preamble: Option<(usize, Preamble)>,
}

impl Sink for Collect {
    fn bytes(&mut self, bytes: &[u8]) -> Result<(), SinkError> {
        self.out.extend_from_slice(bytes);
        Ok(())
    }

    fn page(&mut self, page: Page<'_>) -> Result<(), SinkError> {
        assert_eq!(
            page.stream_offset,
            self.out.len() as u64,
            "page out of place"
        );
        assert!(self.preamble.is_some(), "a page before the preamble");
        self.pages
            .push((page.block.to_string(), page.offset, page.stream_offset));
        self.out.extend_from_slice(page.data);
        Ok(())
    }

    fn preamble(&mut self, preamble: &Preamble) -> Result<(), SinkError> {
        assert!(self.preamble.is_none(), "preamble twice");
        self.preamble = Some((self.out.len(), preamble.clone()));
        Ok(())
    }
}

/// Hands out the input in reads of the given sizes (cycled), to cross the
/// parser's buffer boundaries everywhere.
struct Trickle<'a> {
    data: &'a [u8],
    sizes: Vec<usize>,
    next: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let size = self.sizes[self.next % self.sizes.len()].max(1);
        self.next += 1;
        let n = size.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fn run_with(
    bytes: &[u8],
    options: Options,
    sizes: Vec<usize>,
) -> (Collect, Result<Summary, StreamError>) {
    let mut sink = Collect::default();
    let reader = Trickle {
        data: bytes,
        sizes,
        next: 0,
    };
    let result = parse(reader, &mut sink, &options);
    (sink, result)
}

fn run(bytes: &[u8]) -> (Collect, Result<Summary, StreamError>) {
    run_with(bytes, Options::default(), vec![usize::MAX])
}

fn pass_options() -> Options {
    Options {
        unsupported: Unsupported::PassThrough,
    }
}

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/src/qemu_stream/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    zstd::decode_all(std::fs::File::open(&path).unwrap()).unwrap()
}

fn full_spec() -> StreamSpec {
    StreamSpec {
        chunks: vec![
            vec![
                Record::Page {
                    block: 0,
                    page: 0,
                    seed: 1,
                },
                Record::Zero { block: 0, page: 1 },
                Record::Page {
                    block: 1,
                    page: 3,
                    seed: 2,
                },
                Record::Page {
                    block: 1,
                    page: 4,
                    seed: 0,
                },
            ],
            vec![
                Record::Xbzrle {
                    block: 0,
                    page: 0,
                    data: vec![1, 2, 3],
                },
                Record::Compressed {
                    block: 0,
                    page: 2,
                    data: vec![0x78; 100],
                },
                Record::Page {
                    block: 0,
                    page: 5,
                    seed: 1,
                },
            ],
            vec![Record::Page {
                block: 1,
                page: 63,
                seed: 9,
            }],
        ],
        ..StreamSpec::default()
    }
}

#[test]
fn synthetic_stream_round_trips_with_every_page_in_place() {
    for footers in [true, false] {
        for configuration in [true, false] {
            let spec = StreamSpec {
                footers,
                configuration,
                ignore_shared: configuration,
                uuid: configuration.then_some([7; 16]),
                ..full_spec()
            };
            let built = build(&spec);
            let (sink, result) = run(&built.bytes);
            let summary = result.unwrap();
            assert_eq!(sink.out, built.bytes);
            let expected: Vec<_> = built
                .pages
                .iter()
                .map(|p| (p.block.clone(), p.offset, p.stream_offset))
                .collect();
            assert_eq!(sink.pages, expected);
            assert_eq!(summary.pages, 5);
            assert_eq!(summary.zero_pages, 1);
            assert_eq!(summary.xbzrle_pages, 1);
            assert_eq!(summary.compressed_pages, 1);
            assert_eq!(summary.ram_chunks, 4);
            assert!(summary.ram_complete);
            assert_eq!(summary.pass_through, None);
            assert_eq!(summary.stream_bytes, built.bytes.len() as u64);
            let preamble = &summary.preamble;
            assert_eq!(preamble.ram_section, Some(2));
            assert_eq!(preamble.blocks.len(), 2);
            assert_eq!(preamble.blocks[1].length, 64 << 12);
            assert_eq!(preamble.blocks[1].address, configuration.then_some(1 << 32));
            assert_eq!(preamble.uuid, configuration.then_some([7; 16]));
            if configuration {
                assert_eq!(preamble.machine.as_deref(), Some("pc-i440fx-7.2"));
                assert_eq!(preamble.capabilities, ["x-ignore-shared"]);
            }
        }
    }
}

/// Real QEMU 7.2 streams (`migrate "exec:cat > FILE"` from a BIOS-only
/// guest, `-m 16`): the parser's counts are QEMU's own (`query-migrate`:
/// `ram.normal`, `ram.duplicate`).
#[test]
fn real_qemu_streams_round_trip_with_qemus_counts() {
    for (name, pages, zero, machine_blocks, capabilities) in [
        ("bios16.qemu.zst", 115, 4115, 6, &[][..]),
        ("shared16.qemu.zst", 50, 80, 6, &["x-ignore-shared"][..]),
    ] {
        let bytes = fixture(name);
        for sizes in [vec![usize::MAX], vec![1, 4095, 7, 65536, 3]] {
            let (sink, result) = run_with(&bytes, Options::default(), sizes);
            let summary = result.unwrap();
            assert!(sink.out == bytes, "{name}: output differs from the stream");
            assert_eq!((summary.pages, summary.zero_pages), (pages, zero), "{name}");
            assert!(summary.ram_complete, "{name}");
            assert_eq!(summary.pass_through, None, "{name}");
            let preamble = &summary.preamble;
            assert_eq!(preamble.machine.as_deref(), Some("pc-i440fx-7.2"));
            assert_eq!(
                preamble.blocks.len(),
                machine_blocks,
                "{name}: {:?}",
                preamble.blocks
            );
            assert_eq!(preamble.capabilities, capabilities);
            let total: u64 = preamble.blocks.iter().map(|b| b.length).sum();
            assert!(total >= 16 << 20, "{name}: {total}");
            for (block, offset, _) in &sink.pages {
                let b = preamble.blocks.iter().find(|b| &b.name == block).unwrap();
                assert!(
                    *offset < b.length,
                    "{name}: page {offset:#x} outside {block}"
                );
            }
        }
    }
}

#[test]
fn the_preamble_is_announced_before_the_first_chunk() {
    let built = build(&full_spec());
    let (sink, result) = run(&built.bytes);
    result.unwrap();
    let (at, preamble) = sink.preamble.unwrap();
    // Everything up to and including the first PART's type byte.
    assert_eq!(built.bytes[at - 1], section::PART);
    assert_eq!(preamble.sections, [(2, "ram".to_string())]);
    assert!(at < built.pages[0].stream_offset as usize);
}

fn with_config_then(extra: &[u8]) -> Vec<u8> {
    let built = build(&StreamSpec::default());
    // Header (8) + configuration (1 + 4 + 13).
    let mut bytes = built.bytes[..26].to_vec();
    bytes.extend_from_slice(extra);
    bytes.extend_from_slice(&built.bytes[26..]);
    bytes
}

#[test]
fn commands_are_refused_before_anything_is_sent() {
    for (cmd, data, what) in [(3u16, &[0u8; 16][..], "postcopy"), (8, &[][..], "COLO")] {
        let mut command = vec![section::COMMAND];
        command.extend_from_slice(&cmd.to_be_bytes());
        command.extend_from_slice(&(data.len() as u16).to_be_bytes());
        command.extend_from_slice(data);
        for options in [Options::default(), pass_options()] {
            let (sink, result) = run_with(&with_config_then(&command), options, vec![100]);
            let err = result.unwrap_err();
            let message = err.to_string();
            assert!(
                matches!(err, StreamError::Unsupported { offset: 26, .. }),
                "{message}"
            );
            assert!(
                message.contains(what) && message.contains("nothing was sent"),
                "{message}"
            );
            assert!(sink.preamble.is_none());
        }
    }
}

#[test]
fn a_real_qemu_10_stream_is_understood_to_the_end_of_ram() {
    // QEMU 10.0.2 (Debian bookworm-backports), BIOS only, 16 MiB, TCG,
    // `migrate exec:cat`: its SWITCHOVER_START comes before RAM's END.
    let bytes = fixture("bios16-qemu10.0.qemu.zst");
    for sizes in [vec![usize::MAX], vec![1, 4095, 7, 65536, 3]] {
        let (sink, result) = run_with(&bytes, Options::default(), sizes);
        let summary = result.unwrap();
        assert!(sink.out == bytes, "output differs from the stream");
        assert!(summary.ram_complete && summary.switchover_start);
        assert_eq!(summary.pass_through, None);
        assert!(summary.pages > 0 && sink.pages.len() as u64 == summary.pages);
        let machine = summary.preamble.machine.as_deref().unwrap_or("");
        assert!(machine.starts_with("pc-i440fx-10.0"), "{machine}");
    }
}

#[test]
fn qemu_10s_switchover_start_keeps_ram_deduplicated_to_its_end() {
    let mut spec = full_spec();
    spec.chunks.push(vec![Record::Page {
        block: 0,
        page: 9,
        seed: 7,
    }]);
    spec.switchover_start = true;
    let built = build(&spec);
    let (sink, result) = run(&built.bytes);
    let summary = result.unwrap();
    assert!(summary.ram_complete && summary.switchover_start);
    assert!(summary.pass_through.is_none());
    // The page after the command is still a page, not passed-through bytes.
    assert_eq!(sink.pages.len(), built.pages.len());
    assert_eq!(sink.out, built.bytes);
    // Any other command there ends deduplication, with the reason.
    let at = built.tail_offset - 1;
    let mut other = built.bytes.clone();
    let command_at = other[..at]
        .windows(5)
        .rposition(|w| w == [section::COMMAND, 0, 11, 0, 0])
        .unwrap();
    other[command_at + 2] = 2;
    let (_, result) = run(&other);
    let summary = result.unwrap();
    let pass = summary.pass_through.unwrap();
    assert!(pass.reason.contains("command 2 (PING"), "{}", pass.reason);
}

#[test]
fn the_return_path_is_read_and_carried() {
    // What QEMU sends with `return-path` on: OPEN_RETURN_PATH, PING 1.
    let commands = [
        section::COMMAND,
        0,
        1,
        0,
        0,
        section::COMMAND,
        0,
        2,
        0,
        4,
        0,
        0,
        0,
        1,
    ];
    let bytes = with_config_then(&commands);
    let (sink, result) = run(&bytes);
    let summary = result.unwrap();
    assert!(summary.preamble.return_path);
    assert!(summary.ram_complete && summary.pass_through.is_none());
    assert_eq!(sink.out, bytes);
    assert!(!run(&with_config_then(&[])).1.unwrap().preamble.return_path);
}

#[test]
fn postcopy_is_named_after_its_return_path() {
    // What QEMU 7.2 sends with postcopy-ram: OPEN_RETURN_PATH, PING 1,
    // POSTCOPY_ADVISE (two be64 page sizes).
    let mut commands = vec![section::COMMAND, 0, 1, 0, 0];
    commands.extend_from_slice(&[section::COMMAND, 0, 2, 0, 4, 0, 0, 0, 1]);
    commands.extend_from_slice(&[section::COMMAND, 0, 3, 0, 16]);
    commands.extend_from_slice(&[0; 16]);
    let message = run(&with_config_then(&commands)).1.unwrap_err().to_string();
    assert!(
        message.contains("postcopy (command 3, POSTCOPY_ADVISE) at byte 40"),
        "{message}"
    );
    let mut packaged = vec![section::COMMAND, 0, 7, 0, 4, 0, 0, 0, 9];
    packaged.extend_from_slice(&[0; 9]);
    let message = run(&with_config_then(&packaged)).1.unwrap_err().to_string();
    assert!(message.contains("PACKAGED"), "{message}");
}

#[test]
fn other_iterative_sections_are_refused_or_passed_through() {
    // Block migration's START before RAM's.
    let mut block = vec![section::START];
    block.extend_from_slice(&9u32.to_be_bytes());
    block.push(5);
    block.extend_from_slice(b"block");
    block.extend_from_slice(&0u32.to_be_bytes());
    block.extend_from_slice(&1u32.to_be_bytes());
    block.extend_from_slice(b"opaque block data");
    let bytes = with_config_then(&block);
    let (sink, result) = run(&bytes);
    let message = result.unwrap_err().to_string();
    assert!(
        message.contains("\"block\"") && message.contains("byte 26"),
        "{message}"
    );
    assert!(sink.preamble.is_none());

    let (sink, result) = run_with(&bytes, pass_options(), vec![13]);
    let summary = result.unwrap();
    assert_eq!(sink.out, bytes);
    assert_eq!(summary.pages, 0);
    let pass = summary.pass_through.unwrap();
    assert_eq!(pass.offset, 26);
    assert!(pass.reason.contains("block"), "{}", pass.reason);
    assert_eq!(sink.preamble.unwrap().1.pass_through, Some(pass));
}

#[test]
fn unknown_capabilities_and_subsections_are_refused() {
    let mut caps = vec![section::SUBSECTION, 26];
    caps.extend_from_slice(b"configuration/capabilities");
    caps.extend_from_slice(&1u32.to_be_bytes());
    caps.extend_from_slice(&1u32.to_be_bytes());
    caps.push(10);
    caps.extend_from_slice(b"mapped-ram");
    let mut sub = vec![section::SUBSECTION, 19];
    sub.extend_from_slice(b"configuration/other");
    sub.extend_from_slice(&1u32.to_be_bytes());
    for (extra, what) in [(caps, "\"mapped-ram\""), (sub, "\"configuration/other\"")] {
        let bytes = with_config_then(&extra);
        let message = run(&bytes).1.unwrap_err().to_string();
        assert!(
            message.contains(what) && message.contains("configuration section"),
            "{message}"
        );
        let (sink, result) = run_with(&bytes, pass_options(), vec![5]);
        assert!(result.unwrap().pass_through.is_some());
        assert_eq!(sink.out, bytes);
    }
}

#[test]
fn unknown_ram_records_after_the_preamble_pass_the_rest_through() {
    let spec = full_spec();
    let built = build(&spec);
    // The second chunk's first record (XBZRLE): make it a RAM_SAVE_FLAG_HOOK.
    let first_page = &built.pages[2];
    let second_chunk = built.bytes[first_page.stream_offset as usize + PAGE_SIZE..]
        .windows(5)
        .position(|w| w == [section::PART, 0, 0, 0, 2])
        .unwrap()
        + first_page.stream_offset as usize
        + PAGE_SIZE;
    let mut bytes = built.bytes.clone();
    let header_at = second_chunk + 5;
    bytes[header_at + 7] = (ram::HOOK | ram::CONTINUE) as u8;
    for options in [Options::default(), pass_options()] {
        let (sink, result) = run_with(&bytes, options, vec![1000]);
        let summary = result.unwrap();
        assert_eq!(sink.out, bytes);
        assert_eq!(summary.pages, 3, "the pages before it");
        let pass = summary.pass_through.unwrap();
        assert_eq!(pass.offset, header_at as u64);
        assert!(
            pass.reason.contains("HOOK (RDMA)") && pass.reason.contains("section 2"),
            "{}",
            pass.reason
        );
    }
}

/// Found by the fuzz target: a page in the setup section would reach the
/// sink before the preamble was accepted.
#[test]
fn pages_in_the_setup_section_are_not_understood() {
    let built = build(&StreamSpec::default());
    // The setup section's EOS: right before its footer.
    let eos = built
        .bytes
        .windows(13)
        .position(|w| w == [0, 0, 0, 0, 0, 0, 0, 0x10, section::FOOTER, 0, 0, 0, 2])
        .unwrap();
    let mut bytes = built.bytes[..eos].to_vec();
    bytes.extend_from_slice(&(ram::PAGE).to_be_bytes());
    bytes.extend_from_slice(b"\x06pc.ram");
    bytes.extend_from_slice(&[5; PAGE_SIZE]);
    bytes.extend_from_slice(&built.bytes[eos..]);
    let message = run(&bytes).1.unwrap_err().to_string();
    assert!(
        message.contains("in the setup section") && message.contains("nothing was sent"),
        "{message}"
    );
    let (sink, result) = run_with(&bytes, pass_options(), vec![usize::MAX]);
    assert!(result.unwrap().pass_through.is_some());
    assert_eq!(sink.out, bytes);
    assert!(sink.pages.is_empty());
}

#[test]
fn foreign_streams_are_refused_clearly() {
    let message = run(b"GET / HTTP/1.1\r\n\r\n").1.unwrap_err().to_string();
    assert!(message.contains("not a QEMU migration stream"), "{message}");
    let message = run(b"QEVM\0\0\0\x02\x01").1.unwrap_err().to_string();
    assert!(message.contains("version 2"), "{message}");
    let message = run(b"").1.unwrap_err().to_string();
    assert!(
        message.contains("ends at byte 0") && message.contains("file magic"),
        "{message}"
    );
}

/// Every cut point of a stream: an error saying where it ends, or (inside
/// the device state, which is not parsed) exactly the bytes that arrived.
#[test]
fn every_truncation_is_an_error_at_the_cut() {
    let built = build(&StreamSpec {
        blocks: vec![("pc.ram".into(), 16)],
        chunks: vec![
            vec![
                Record::Page {
                    block: 0,
                    page: 0,
                    seed: 1,
                },
                Record::Zero { block: 0, page: 1 },
                Record::Xbzrle {
                    block: 0,
                    page: 2,
                    data: vec![9; 20],
                },
            ],
            vec![Record::Compressed {
                block: 0,
                page: 3,
                data: vec![5; 30],
            }],
        ],
        ..StreamSpec::default()
    });
    for cut in 0..built.bytes.len() {
        let (sink, result) = run_with(&built.bytes[..cut], Options::default(), vec![3, 5000]);
        if cut < built.tail_offset {
            match result {
                Err(StreamError::Truncated { offset, .. }) => assert_eq!(offset, cut as u64),
                other => panic!("cut at {cut}: {other:?}"),
            }
            assert!(built.bytes.starts_with(&sink.out));
        } else {
            assert!(result.unwrap().ram_complete);
            assert_eq!(sink.out, &built.bytes[..cut]);
        }
    }
}

#[test]
fn sink_errors_stop_the_parser() {
    struct Failing;
    impl Sink for Failing {
        fn bytes(&mut self, _: &[u8]) -> Result<(), SinkError> {
            Ok(())
        }
        fn page(&mut self, _: Page<'_>) -> Result<(), SinkError> {
            Err("the WAN is gone".into())
        }
    }
    let built = build(&full_spec());
    let err = parse(&built.bytes[..], &mut Failing, &Options::default()).unwrap_err();
    assert!(matches!(err, StreamError::Sink(_)));
    assert_eq!(err.to_string(), "the WAN is gone");
}

// Property tests.

fn record(blocks: usize) -> impl Strategy<Value = Record> {
    let block = 0..blocks;
    prop_oneof![
        4 => (block.clone(), 0u64..16, 0u64..6).prop_map(|(block, page, seed)| Record::Page { block, page, seed }),
        2 => (block.clone(), 0u64..16).prop_map(|(block, page)| Record::Zero { block, page }),
        1 => (block.clone(), 0u64..16, prop::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(block, page, data)| Record::Xbzrle { block, page, data }),
        1 => (block, 0u64..16, prop::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(block, page, data)| Record::Compressed { block, page, data }),
    ]
}

fn spec() -> impl Strategy<Value = StreamSpec> {
    (
        any::<(bool, bool, bool, bool)>(),
        prop::collection::vec(prop::collection::vec(record(2), 0..6), 1..4),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..50), 0..3),
    )
        .prop_map(
            |((configuration, ignore_shared, uuid, footers), chunks, devices)| StreamSpec {
                configuration,
                ignore_shared: configuration && ignore_shared,
                uuid: (configuration && uuid).then_some([3; 16]),
                footers,
                blocks: vec![("pc.ram".into(), 16), ("/rom@etc/acpi/tables".into(), 16)],
                switchover_start: footers && devices.len() % 2 == 1,
                chunks,
                devices,
            },
        )
}

fn read_sizes() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(
        prop_oneof![1usize..16, 4000usize..5000, Just(usize::MAX)],
        1..5,
    )
}

/// What must hold for any input: no panic (the sink checks pages are in
/// place), the output is the input (all of it on success), and a failed
/// parse never called the preamble unless it got past it.
fn check_any(bytes: &[u8], options: Options, sizes: Vec<usize>) -> Result<(), TestCaseError> {
    let (sink, result) = run_with(bytes, options, sizes);
    prop_assert!(bytes.starts_with(&sink.out), "output is not the input");
    for (_, _, at) in &sink.pages {
        let at = *at as usize;
        prop_assert!(at + PAGE_SIZE <= sink.out.len());
    }
    match result {
        Ok(summary) => {
            prop_assert_eq!(sink.out.len(), bytes.len());
            prop_assert_eq!(summary.stream_bytes, bytes.len() as u64);
            prop_assert_eq!(summary.pages as usize, sink.pages.len());
        }
        Err(StreamError::Unsupported { .. }) => prop_assert!(sink.preamble.is_none()),
        Err(StreamError::Sink(_) | StreamError::Io { .. }) => {
            prop_assert!(false, "no sink or io errors here")
        }
        Err(_) => {}
    }
    Ok(())
}

proptest! {
    /// Any stream QEMU could write comes out identical, with exactly its pages.
    #[test]
    fn any_stream_round_trips(spec in spec(), sizes in read_sizes()) {
        let built = build(&spec);
        let (sink, result) = run_with(&built.bytes, Options::default(), sizes);
        let summary = result.unwrap();
        prop_assert!(sink.out == built.bytes);
        let expected: Vec<_> = built.pages.iter().map(|p| (p.block.clone(), p.offset, p.stream_offset)).collect();
        prop_assert_eq!(&sink.pages, &expected);
        for page in &built.pages {
            let at = page.stream_offset as usize;
            prop_assert!(sink.out[at..at + PAGE_SIZE] == page.data[..]);
        }
        prop_assert_eq!(summary.zero_pages, built.zero_pages);
        prop_assert_eq!(summary.xbzrle_pages, built.xbzrle_pages);
        prop_assert_eq!(summary.compressed_pages, built.compressed_pages);
        prop_assert!(summary.ram_complete);
    }

    /// Truncated streams: an error at the cut (before the device state), or
    /// the bytes that arrived; never a panic, never a page that was not whole.
    #[test]
    fn truncated_streams_fail_at_the_cut(spec in spec(), at in any::<prop::sample::Index>(), sizes in read_sizes()) {
        let built = build(&spec);
        let cut = at.index(built.bytes.len());
        let (sink, result) = run_with(&built.bytes[..cut], Options::default(), sizes.clone());
        if cut < built.tail_offset {
            let at_cut = matches!(result, Err(StreamError::Truncated { offset, .. }) if offset == cut as u64);
            prop_assert!(at_cut, "cut at {}: {:?}", cut, result);
        }
        prop_assert!(sink.pages.len() <= built.pages.len());
        for (found, expected) in sink.pages.iter().zip(&built.pages) {
            prop_assert_eq!(found.2, expected.stream_offset);
        }
        check_any(&built.bytes[..cut], Options::default(), sizes)?;
    }

    /// Corrupted streams (bytes flipped anywhere): an error, or the stream
    /// back unchanged with every page taken from its own place.
    #[test]
    fn corrupted_streams_never_give_other_bytes(
        spec in spec(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..), 1..4),
        pass in any::<bool>(),
        sizes in read_sizes(),
    ) {
        let mut bytes = build(&spec).bytes;
        for (at, xor) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= xor;
        }
        let options = if pass { pass_options() } else { Options::default() };
        check_any(&bytes, options, sizes)?;
    }

    /// Garbage after a valid header.
    #[test]
    fn garbage_never_panics(tail in prop::collection::vec(any::<u8>(), 0..3000), pass in any::<bool>()) {
        let mut bytes = b"QEVM\0\0\0\x03".to_vec();
        bytes.extend_from_slice(&tail);
        let options = if pass { pass_options() } else { Options::default() };
        check_any(&bytes, options, vec![7, 100])?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The real QEMU streams, truncated and corrupted at random places.
    #[test]
    fn real_streams_damaged(
        which in any::<bool>(),
        at in any::<prop::sample::Index>(),
        xor in any::<u8>(),
        cut in any::<bool>(),
    ) {
        let mut bytes = fixture(if which { "bios16.qemu.zst" } else { "shared16.qemu.zst" });
        let i = at.index(bytes.len());
        if cut {
            bytes.truncate(i);
        } else {
            bytes[i] ^= xor;
        }
        check_any(&bytes, Options::default(), vec![usize::MAX])?;
    }
}

#[test]
fn page_contents_are_distinct_and_zero_is_zero() {
    assert!(page_content(0).iter().all(|b| *b == 0));
    assert_ne!(page_content(1), page_content(2));
    assert_eq!(page_content(5), page_content(5));
}

/// The fuzz target's seeds (`agent/fuzz/seeds/qemu_stream/`: a mode byte
/// for options and read size, then a stream) are the ones built here from
/// the parser's stream builder and fixtures. `PAGEFP_WRITE_FUZZ_SEEDS=1`
/// rewrites them after the builder or the fixtures changed.
#[test]
fn fuzz_seeds_are_current() {
    let dir = format!("{}/fuzz/seeds/qemu_stream", env!("CARGO_MANIFEST_DIR"));
    let small = StreamSpec {
        blocks: vec![("pc.ram".into(), 16), ("pc.bios".into(), 4)],
        chunks: vec![
            vec![
                Record::Page {
                    block: 0,
                    page: 1,
                    seed: 1,
                },
                Record::Zero { block: 0, page: 2 },
                Record::Xbzrle {
                    block: 1,
                    page: 0,
                    data: vec![1, 2, 3],
                },
            ],
            vec![Record::Compressed {
                block: 0,
                page: 3,
                data: vec![7; 9],
            }],
        ],
        ..StreamSpec::default()
    };
    let seeds = [
        ("synthetic", 0u8, build(&small).bytes),
        (
            "synthetic-shared-nofooter",
            13,
            build(&StreamSpec {
                ignore_shared: true,
                uuid: Some([1; 16]),
                footers: false,
                ..small.clone()
            })
            .bytes,
        ),
        (
            "no-configuration",
            1,
            build(&StreamSpec {
                configuration: false,
                ..small
            })
            .bytes,
        ),
        (
            "qemu-bios-start",
            0,
            fixture("bios16.qemu.zst")[..12_000].to_vec(),
        ),
        (
            "qemu-shared-start",
            7,
            fixture("shared16.qemu.zst")[..12_000].to_vec(),
        ),
    ];
    let seeds: Vec<_> = seeds
        .into_iter()
        .map(|(name, mode, bytes)| {
            let mut seed = vec![mode];
            seed.extend_from_slice(&bytes);
            (name, seed)
        })
        .collect();
    synth::check_seeds(&dir, &seeds);
}
