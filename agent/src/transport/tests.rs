//! The codec alone, with a small protocol of its own.

use std::io::{self, Read};

use proptest::prelude::*;

use super::*;

struct Test;

crate::message_kinds! {
    enum TestKind {
        One = 1,
        Two = 2,
    }
}

const MAX: usize = 1024;

impl Protocol for Test {
    const NAME: &'static str = "test";
    const PEER: &'static str = "`the test peer`";
    const MAGIC: [u8; 8] = *b"PFTEST\0\0";
    const VERSION: u32 = 3;
    const MAX_PAYLOAD: usize = MAX;
    const FLAGS: u8 = 0b01;
    type Kind = TestKind;

    fn former_version(found: &[u8; PREAMBLE_LEN]) -> Option<u32> {
        (found[..4] == *b"OLD!").then(|| u32::from_le_bytes(found[4..8].try_into().unwrap()))
    }
}

/// A kind the writer refuses: its number is Abort's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Clash;

impl From<Clash> for u8 {
    fn from(_: Clash) -> u8 {
        ABORT
    }
}

impl TryFrom<u8> for Clash {
    type Error = u8;
    fn try_from(value: u8) -> Result<Self, u8> {
        (value == ABORT).then_some(Clash).ok_or(value)
    }
}

struct Clashing;

impl Protocol for Clashing {
    const NAME: &'static str = "clashing";
    const PEER: &'static str = "nobody";
    const MAGIC: [u8; 8] = *b"PFCLASH\0";
    const VERSION: u32 = 1;
    const MAX_PAYLOAD: usize = MAX;
    type Kind = Clash;
}

fn writer() -> FrameWriter<Test, Vec<u8>> {
    FrameWriter::new(Vec::new())
}

fn reader(bytes: &[u8]) -> FrameReader<Test, &[u8]> {
    FrameReader::new(bytes)
}

fn one_frame(kind: TestKind, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut w = writer();
    w.frame(kind, flags, payload).unwrap();
    w.into_inner()
}

#[test]
fn preamble_and_frames_round_trip_with_their_offsets() {
    let mut w = writer();
    w.preamble().unwrap();
    assert_eq!(
        w.frame(TestKind::One, 0, b"hello").unwrap(),
        5 + FRAME_OVERHEAD
    );
    w.frame(TestKind::Two, 1, &[7u8; MAX]).unwrap();
    w.frame(TestKind::One, 0, b"").unwrap();
    w.json(TestKind::Two, &Abort { reason: "x".into() })
        .unwrap();
    let bytes = w.into_inner();
    assert_eq!(&bytes[..8], b"PFTEST\0\0");
    assert_eq!(bytes[8..12], 3u32.to_le_bytes());
    let mut r = reader(&bytes);
    r.preamble().unwrap();
    let first = r.frame().unwrap();
    assert_eq!(
        (first.kind, first.flags, first.offset),
        (TestKind::One, 0, 12)
    );
    assert_eq!(first.payload, b"hello");
    assert_eq!(first.wire_len(), 17);
    let second = r.frame().unwrap();
    assert_eq!((second.kind, second.flags), (TestKind::Two, 1));
    assert_eq!(second.offset, 12 + 17);
    assert_eq!(second.payload, vec![7u8; MAX]);
    assert!(r.frame().unwrap().payload.is_empty());
    let json: Abort = r.expect(TestKind::Two).unwrap().json().unwrap();
    assert_eq!(json.reason, "x");
    assert_eq!(r.bytes, bytes.len() as u64);
    assert!(matches!(r.frame(), Err(WireError::Closed { .. })));
}

#[test]
fn a_frame_of_the_wrong_kind_is_unexpected() {
    let bytes = one_frame(TestKind::One, 0, b"");
    let err = reader(&bytes).expect(TestKind::Two).unwrap_err();
    assert!(matches!(err, WireError::Unexpected { .. }), "{err}");
    assert!(err.to_string().contains("expected Two, got One"), "{err}");
}

#[test]
fn a_corrupted_checksum_is_refused_with_the_offset() {
    let mut bytes = one_frame(TestKind::Two, 0, b"payload");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x80;
    let err = reader(&bytes).frame().unwrap_err();
    assert!(
        matches!(&err, WireError::Checksum { kind, offset: 0, .. } if kind == "Two"),
        "{err}"
    );
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
}

#[test]
fn every_truncation_is_the_peer_closing() {
    let mut w = writer();
    w.preamble().unwrap();
    w.frame(TestKind::One, 0, b"some bytes").unwrap();
    let bytes = w.into_inner();
    for cut in 0..bytes.len() {
        let mut r = reader(&bytes[..cut]);
        let err = r.preamble().and_then(|()| r.frame().map(drop)).unwrap_err();
        assert!(
            matches!(err, WireError::Closed { .. }),
            "cut at {cut}: {err}"
        );
    }
}

/// Hands out its bytes and remembers how many were asked for.
struct Counting<'a> {
    bytes: &'a [u8],
    asked: usize,
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.asked += buf.len();
        self.bytes.read(buf)
    }
}

#[test]
fn an_oversized_length_is_refused_before_the_payload_is_read() {
    for len in [MAX as u32 + 1, u32::MAX] {
        let mut header = vec![1u8, 0, 0, 0];
        header.extend_from_slice(&len.to_le_bytes());
        // Plenty of bytes behind the header: none of them may be touched.
        header.extend_from_slice(&[0u8; 64]);
        let mut r = FrameReader::<Test, _>::new(Counting {
            bytes: &header,
            asked: 0,
        });
        let err = r.frame().unwrap_err();
        assert!(
            matches!(err, WireError::TooLarge { len: l, max: MAX, offset: 0, .. } if l == len as usize),
            "{err}"
        );
        assert_eq!(
            r.get_ref().asked,
            FRAME_HEADER_LEN,
            "only the header was read"
        );
    }
}

#[test]
fn the_writer_refuses_what_the_reader_would_refuse_without_panicking() {
    let mut w = writer();
    let err = w.frame(TestKind::One, 0, &[0u8; MAX + 1]).unwrap_err();
    assert!(
        matches!(err, WireError::PayloadTooLarge { len, .. } if len == MAX + 1),
        "{err}"
    );
    let err = w.frame(TestKind::One, 0b10, b"").unwrap_err();
    assert!(
        matches!(err, WireError::UndefinedFlags { flags: 0b10, .. }),
        "{err}"
    );
    let err = w.json(TestKind::One, &"x".repeat(MAX)).unwrap_err();
    assert!(matches!(err, WireError::PayloadTooLarge { .. }), "{err}");
    assert!(w.into_inner().is_empty(), "nothing was written");
    let mut clashing = FrameWriter::<Clashing, _>::new(Vec::new());
    let err = clashing.frame(Clash, 0, b"").unwrap_err();
    assert!(matches!(err, WireError::ReservedKind { .. }), "{err}");
}

#[test]
fn foreign_streams_and_other_versions_are_refused_clearly() {
    let err = reader(b"GET / HTTP/1.1\r\n").preamble().unwrap_err();
    assert!(matches!(err, WireError::NotOurStream { .. }), "{err}");
    assert!(
        err.to_string().contains("not a pagefp test stream"),
        "{err}"
    );
    assert!(err.to_string().contains("the test peer"), "{err}");
    let mut future = b"PFTEST\0\0".to_vec();
    future.extend_from_slice(&4u32.to_le_bytes());
    let err = reader(&future).preamble().unwrap_err().to_string();
    assert!(err.contains("version 4 is not supported"), "{err}");
    assert!(err.contains("upgrade both ends"), "{err}");
    let mut former = b"OLD!".to_vec();
    former.extend_from_slice(&1u32.to_le_bytes());
    former.extend_from_slice(b"rest");
    let err = reader(&former).preamble().unwrap_err();
    assert!(
        matches!(
            err,
            WireError::Version {
                theirs: 1,
                ours: 3,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn unknown_kinds_flags_and_reserved_bits_are_refused() {
    let good = one_frame(TestKind::One, 0, b"abc");
    let with = |at: usize, value: u8| {
        let mut bytes = good.clone();
        bytes[at] = value;
        reader(&bytes).frame().unwrap_err()
    };
    assert!(matches!(with(0, 9), WireError::UnknownKind { kind: 9, .. }));
    assert!(matches!(with(1, 0b10), WireError::Reserved { .. }));
    assert!(matches!(with(2, 1), WireError::Reserved { .. }));
    assert!(matches!(with(3, 1), WireError::Reserved { .. }));
}

#[test]
fn an_abort_is_an_error_with_the_peers_reason() {
    let mut w = writer();
    w.abort("disk full").unwrap();
    let bytes = w.into_inner();
    assert_eq!(bytes[0], ABORT);
    let err = reader(&bytes).frame().unwrap_err();
    assert!(
        matches!(&err, WireError::PeerAborted { reason, .. } if reason == "disk full"),
        "{err}"
    );
    assert!(err.to_string().contains("disk full"));
    // Also while a particular message is expected.
    assert!(matches!(
        reader(&bytes).expect(TestKind::One),
        Err(WireError::PeerAborted { .. })
    ));
    // A long reason is cut at a character boundary, and still arrives.
    let long = "é".repeat(MAX_ABORT_REASON);
    let mut w = FrameWriter::<Test, _>::new(Vec::new());
    // Over the test protocol's tiny maximum: refused, not sent cut short.
    assert!(w.abort(&long).is_err());
    let mut w = FrameWriter::<Roomy, _>::new(Vec::new());
    w.abort(&long).unwrap();
    let bytes = w.into_inner();
    let Err(WireError::PeerAborted { reason, .. }) =
        FrameReader::<Roomy, _>::new(&bytes[..]).frame()
    else {
        panic!("not an abort");
    };
    assert_eq!(reason.len(), MAX_ABORT_REASON);
    assert!(long.starts_with(&reason));
    // A payload that is not JSON is shown as text.
    let mut raw = vec![ABORT, 0, 0, 0, 2, 0, 0, 0, b'n', b'o'];
    let crc = crc32fast::hash(&raw);
    raw.extend_from_slice(&crc.to_le_bytes());
    assert!(matches!(
        reader(&raw).frame(),
        Err(WireError::PeerAborted { reason, .. }) if reason == "no"
    ));
    // An abort carries no flags.
    raw[1] = 1;
    assert!(matches!(
        reader(&raw).frame(),
        Err(WireError::Reserved { .. })
    ));
}

struct Roomy;

impl Protocol for Roomy {
    const NAME: &'static str = "roomy";
    const PEER: &'static str = "nobody";
    const MAGIC: [u8; 8] = *b"PFROOMY\0";
    const VERSION: u32 = 1;
    const MAX_PAYLOAD: usize = 1 << 20;
    type Kind = TestKind;
}

#[test]
fn connection_errors_say_where_the_stream_stopped() {
    struct Failing;
    impl Read for Failing {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset"))
        }
    }
    let err = FrameReader::<Test, _>::new(Failing).frame().unwrap_err();
    assert!(matches!(err, WireError::Io { offset: 0, .. }), "{err}");
    assert!(err.to_string().contains("reset"), "{err}");
}

#[test]
fn a_socket_timeout_says_the_peer_stalled() {
    struct Silent;
    impl Read for Silent {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }
    impl io::Write for Silent {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::TimedOut.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let err = FrameReader::<Test, _>::new(Silent).frame().unwrap_err();
    assert!(matches!(err, WireError::Stalled { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("sent nothing for longer than the I/O timeout"),
        "{err}"
    );
    let err = FrameWriter::<Test, _>::new(Silent)
        .frame(TestKind::One, 0, b"x")
        .unwrap_err();
    assert!(
        err.to_string().contains("took nothing this side wrote"),
        "{err}"
    );
}

proptest! {
    /// Any corruption of a frame is caught: by the checksum, the header
    /// checks, or a short read; never a panic, never a frame with other
    /// contents.
    #[test]
    fn corrupted_frames_are_refused(payload in proptest::collection::vec(any::<u8>(), 0..300),
                                    flags in 0u8..2,
                                    at in any::<prop::sample::Index>(),
                                    xor in 1u8..) {
        let mut bytes = one_frame(TestKind::Two, flags, &payload);
        let i = at.index(bytes.len());
        bytes[i] ^= xor;
        if let Ok(frame) = reader(&bytes).frame() {
            prop_assert!(false, "corrupted frame accepted: {frame:?}");
        }
    }

    #[test]
    fn truncated_frames_are_refused(payload in proptest::collection::vec(any::<u8>(), 0..300),
                                    cut in any::<prop::sample::Index>()) {
        let bytes = one_frame(TestKind::One, 0, &payload);
        let cut = cut.index(bytes.len());
        prop_assert!(reader(&bytes[..cut]).frame().is_err());
    }

    /// Arbitrary bytes never panic the reader, and whatever it accepts was
    /// a well-formed frame.
    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut r = reader(&bytes);
        while let Ok(frame) = r.frame() {
            prop_assert!(frame.payload.len() <= MAX);
        }
    }
}

#[test]
fn zstd_bombs_are_refused_within_their_caps() {
    // 64 MiB of zeros in about 2 KiB.
    let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 19).unwrap();
    assert!(bomb.len() < 64 << 10);
    // A native Pages frame: decompression stops one byte past 32 MiB.
    let frame = migration::Frame {
        kind: migration::Kind::Pages,
        flags: migration::FLAG_ZSTD,
        payload: bomb.clone(),
        offset: 12,
    };
    let err = migration::body(&frame).unwrap_err().to_string();
    assert!(err.contains("more than the maximum message size"), "{err}");
    // A proxy chunk announcing 4 MiB: never decompressed past that.
    let mut payload = vec![qemu_proxy::ENCODING_ZSTD];
    payload.extend_from_slice(&(qemu_proxy::MAX_DECODED as u32).to_le_bytes());
    payload.extend_from_slice(&bomb);
    payload.extend_from_slice(&[0; qemu_proxy::CHUNK_DIGEST_LEN]);
    let frame = qemu_proxy::Frame {
        kind: qemu_proxy::Kind::Chunk,
        flags: 0,
        payload,
        offset: 12,
    };
    let err = qemu_proxy::decode_chunk(&frame, 0, 0, |_| None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not decompress"), "{err}");
}
