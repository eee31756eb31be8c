//! The multifd channel parser, on channels QEMU 7.2 and 10.0 wrote here and
//! on synthetic ones.

use proptest::prelude::*;

use super::{Trickle, fixture, run};
use crate::qemu_stream::{
    Page, Sink, SinkError, StreamError,
    format::PAGE_SIZE,
    multifd::{ChannelSummary, Compression, FLAG_DEVICE_STATE, PACKET_LEN, parse_channel},
    synth::{PacketSpec, multifd_channel},
};

/// What the channel parser hands out; pages must be exactly in place.
#[derive(Default)]
struct Collect {
    out: Vec<u8>,
    pages: Vec<(String, u64, u64)>,
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
        self.pages
            .push((page.block.to_string(), page.offset, page.stream_offset));
        self.out.extend_from_slice(page.data);
        Ok(())
    }
}

fn channel(bytes: &[u8], sizes: Vec<usize>) -> (Collect, Result<ChannelSummary, StreamError>) {
    let mut sink = Collect::default();
    let result = parse_channel(
        Trickle {
            data: bytes,
            sizes,
            next: 0,
        },
        &mut sink,
    );
    (sink, result)
}

/// QEMU 7.2 and 10.0 channels, uncompressed: every page found, in place,
/// the stream rebuilt exactly; 10.0 names its zero pages in the packets.
#[test]
fn real_channels_are_read_to_their_end() {
    for (version, zero_in_packets) in [("7.2", false), ("10.0", true)] {
        let mut pages = 0;
        let mut zero = 0;
        for (id, name) in [(0u8, "ch0"), (1, "ch1")] {
            let bytes = fixture(&format!("multifd16-qemu{version}-{name}.zst"));
            let (sink, result) = channel(&bytes, vec![usize::MAX]);
            let summary = result.unwrap();
            assert!(sink.out == bytes, "{version} {name}: not rebuilt exactly");
            assert_eq!(summary.stream_bytes, bytes.len() as u64);
            assert_eq!(summary.id, id);
            assert_eq!(summary.pass_through, None, "{version} {name}");
            assert!(summary.syncs >= 2, "{version} {name}: {summary:?}");
            assert_eq!(summary.pages, sink.pages.len() as u64);
            assert!(
                sink.pages
                    .iter()
                    .all(|(block, offset, _)| !block.is_empty() && offset % PAGE_SIZE as u64 == 0)
            );
            pages += summary.pages;
            zero += summary.zero_pages;
        }
        assert!(pages > 20, "QEMU {version}: {pages} pages over multifd");
        assert_eq!(
            zero > 0,
            zero_in_packets,
            "QEMU {version}: {zero} zero pages in packets"
        );
    }
}

/// QEMU 10.0 with `multifd-compression=zstd`: the packets are carried as
/// they are, their pages counted, none handed out.
#[test]
fn compressed_channels_are_carried_unchanged() {
    let mut compressed = 0;
    for name in ["ch0", "ch1"] {
        let bytes = fixture(&format!("multifd16-qemu10.0-zstd-{name}.zst"));
        let (sink, result) = channel(&bytes, vec![usize::MAX]);
        let summary = result.unwrap();
        assert!(sink.out == bytes);
        assert!(sink.pages.is_empty());
        assert_eq!(summary.pass_through, None);
        compressed += summary.compressed_pages;
        if summary.compressed_pages > 0 {
            assert_eq!(summary.compression, Some(Compression::Zstd));
        }
    }
    assert!(compressed > 20, "{compressed}");
}

/// The main streams of those migrations: no RAM page in them (they all went
/// over multifd), read to the end without passing anything through;
/// 10.0 marks its rounds with MULTIFD_FLUSH.
#[test]
fn main_streams_with_multifd_are_read_to_their_end() {
    for (name, flushes) in [
        ("multifd16-qemu7.2-main.zst", false),
        ("multifd16-qemu10.0-main.zst", true),
        ("multifd16-qemu10.0-zstd-main.zst", true),
    ] {
        let bytes = fixture(name);
        let (sink, result) = run(&bytes);
        let summary = result.unwrap();
        assert!(sink.out == bytes, "{name}");
        assert_eq!(summary.pass_through, None, "{name}");
        assert!(summary.ram_complete, "{name}");
        assert_eq!(summary.pages, 0, "{name}");
        assert_eq!(summary.multifd_flushes > 0, flushes, "{name}: {summary:?}");
    }
}

#[test]
fn a_main_stream_is_not_a_channel_and_a_channel_not_a_main_stream() {
    let main = fixture("multifd16-qemu7.2-main.zst");
    let (_, result) = channel(&main, vec![usize::MAX]);
    assert!(
        matches!(
            result,
            Err(StreamError::Malformed {
                expected: "MULTIFD_MAGIC",
                ..
            })
        ),
        "{result:?}"
    );
    let ch = fixture("multifd16-qemu7.2-ch0.zst");
    let (_, result) = run(&ch);
    let err = result.unwrap_err().to_string();
    assert!(err.contains("multifd channels"), "{err}");
}

/// A device-state packet (QEMU 10.0, VFIO) or any other packet the parser
/// does not know passes through from its first byte on, exactly.
#[test]
fn unknown_packets_pass_the_rest_through() {
    let spec = |seed| PacketSpec {
        block: "pc.ram".into(),
        pages: vec![(0x1000, seed)],
        ..PacketSpec::default()
    };
    let (mut bytes, _) = multifd_channel(3, &[spec(1), spec(2), spec(3)]);
    let second = 64 + PACKET_LEN + PAGE_SIZE;
    bytes[second + 11] |= FLAG_DEVICE_STATE as u8;
    let (sink, result) = channel(&bytes, vec![usize::MAX]);
    let summary = result.unwrap();
    assert!(sink.out == bytes);
    assert_eq!(summary.pages, 1);
    let pass = summary.pass_through.unwrap();
    assert_eq!(pass.offset, second as u64);
    assert!(pass.reason.contains("device-state"), "{}", pass.reason);
}

fn packet() -> impl Strategy<Value = PacketSpec> {
    (
        any::<bool>(),
        prop::sample::select(vec!["pc.ram", "pc.bios", "/rom@etc/acpi/tables"]),
        prop::collection::vec((0u64..4096, 0u64..6), 0..5),
        prop::collection::vec(0u64..4096, 0..4),
        prop::option::weighted(0.2, prop::collection::vec(any::<u8>(), 0..300)),
    )
        .prop_map(|(sync, block, pages, zero, compressed)| PacketSpec {
            sync,
            block: block.into(),
            pages: pages
                .into_iter()
                .map(|(page, seed)| (page << 12, seed))
                .collect(),
            zero: zero.into_iter().map(|page| page << 12).collect(),
            compressed: compressed.map(|data| (2 << 1, data)),
        })
}

fn read_sizes() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(
        prop_oneof![1usize..16, 4000usize..5000, Just(usize::MAX)],
        1..4,
    )
}

proptest! {
    /// Any channel QEMU could write comes out identical, with exactly its
    /// uncompressed pages, in place.
    #[test]
    fn any_channel_round_trips(
        id in any::<u8>(),
        packets in prop::collection::vec(packet(), 0..6),
        sizes in read_sizes(),
    ) {
        let (bytes, expected) = multifd_channel(id, &packets);
        let (sink, result) = channel(&bytes, sizes);
        let summary = result.unwrap();
        prop_assert!(sink.out == bytes);
        prop_assert_eq!(summary.id, id);
        prop_assert_eq!(summary.packets, packets.len() as u64);
        prop_assert_eq!(summary.syncs, packets.iter().filter(|p| p.sync).count() as u64);
        let want: Vec<_> = expected.iter().map(|p| (p.block.clone(), p.offset, p.stream_offset)).collect();
        prop_assert_eq!(&sink.pages, &want);
        for page in &expected {
            let at = page.stream_offset as usize;
            prop_assert!(sink.out[at..at + PAGE_SIZE] == page.data[..]);
        }
        prop_assert_eq!(summary.pass_through, None);
    }

    /// Cut anywhere: a clean end only at a packet boundary, else an error
    /// at the cut; what arrived is handed out exactly, never a partial page.
    #[test]
    fn truncated_channels_fail_at_the_cut(
        packets in prop::collection::vec(packet(), 1..5),
        at in any::<prop::sample::Index>(),
        sizes in read_sizes(),
    ) {
        let (bytes, _) = multifd_channel(0, &packets);
        let cut = at.index(bytes.len());
        let (sink, result) = channel(&bytes[..cut], sizes);
        prop_assert!(bytes[..cut].starts_with(&sink.out));
        match result {
            Ok(summary) => prop_assert_eq!(summary.stream_bytes, cut as u64),
            Err(StreamError::Truncated { offset, .. }) => prop_assert_eq!(offset, cut as u64),
            Err(other) => prop_assert!(false, "cut at {}: {}", cut, other),
        }
    }

    /// Damaged anywhere: never a panic; whatever is handed out is exactly
    /// the input's beginning, pages in place.
    #[test]
    fn damaged_channels_never_panic(
        real in any::<bool>(),
        packets in prop::collection::vec(packet(), 1..4),
        at in any::<prop::sample::Index>(),
        xor in 1u8..,
    ) {
        let mut bytes = if real {
            fixture("multifd16-qemu10.0-ch1.zst")
        } else {
            multifd_channel(1, &packets).0
        };
        let i = at.index(bytes.len());
        bytes[i] ^= xor;
        let (sink, _) = channel(&bytes, vec![usize::MAX]);
        prop_assert!(bytes.starts_with(&sink.out));
    }
}

/// The `qemu_multifd` fuzz target's seeds: a mode byte (read size), then a
/// channel (the beginnings of real ones, and synthetic ones).
#[test]
fn multifd_fuzz_seeds_are_current() {
    let synthetic = multifd_channel(
        2,
        &[
            PacketSpec {
                block: "pc.ram".into(),
                pages: vec![(0x1000, 1), (0x3000, 2)],
                zero: vec![0x2000],
                ..PacketSpec::default()
            },
            PacketSpec {
                block: "pc.ram".into(),
                pages: vec![(0x5000, 3)],
                compressed: Some((2 << 1, vec![0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3])),
                ..PacketSpec::default()
            },
            PacketSpec {
                sync: true,
                ..PacketSpec::default()
            },
        ],
    )
    .0;
    let seed = |mode: u8, bytes: &[u8]| {
        let mut seed = vec![mode];
        seed.extend_from_slice(bytes);
        seed
    };
    let dir = format!("{}/fuzz/seeds/qemu_multifd", env!("CARGO_MANIFEST_DIR"));
    crate::qemu_stream::synth::check_seeds(
        &dir,
        &[
            ("synthetic", seed(0, &synthetic)),
            ("synthetic-trickle", seed(37, &synthetic)),
            (
                "qemu7.2-start",
                seed(0, &fixture("multifd16-qemu7.2-ch0.zst")[..12_000]),
            ),
            (
                "qemu10.0-start",
                seed(0, &fixture("multifd16-qemu10.0-ch1.zst")[..12_000]),
            ),
        ],
    );
}
