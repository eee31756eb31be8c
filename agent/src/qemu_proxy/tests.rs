//! The proxy pair over loopback, with synthetic QEMU streams and a fake
//! destination that records what it gets.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use super::{
    ProxyReport,
    receive::{ReceiveOptions, receive},
    send::{SendOptions, send},
};
use crate::{
    catalog::store::TemplateStore,
    net::{Timeouts, pki::test_security},
    qemu_stream::{
        Options, Unsupported,
        format::{PAGE_SIZE, section},
        synth::{Built, Record, StreamSpec, build, page_content},
    },
    transport::{
        WireError,
        qemu_proxy::{self as wire, ChunkBuilder, Frame, FrameReader, FrameWriter, Kind},
    },
};

fn free_addr() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

struct Outcome {
    sent: anyhow::Result<ProxyReport>,
    received: anyhow::Result<ProxyReport>,
    /// What the destination got, if anything connected to it.
    destination: Option<Vec<u8>>,
}

/// Runs the pair: `qemu` writes the source stream to the send proxy.
fn run_pair(
    templates: TemplateStore,
    zstd: bool,
    unsupported: Unsupported,
    qemu: impl FnOnce(&str) + Send + 'static,
) -> Outcome {
    run_pair_after(templates, zstd, unsupported, |_| {}, qemu)
}

/// [`run_pair`], with `strays(wan)` run once the receive proxy listens and
/// before the send proxy starts.
fn run_pair_after(
    templates: TemplateStore,
    zstd: bool,
    unsupported: Unsupported,
    strays: impl FnOnce(&str),
    qemu: impl FnOnce(&str) + Send + 'static,
) -> Outcome {
    let wan = free_addr();
    let local = free_addr();
    let (client, server) = test_security();
    let dest = TcpListener::bind("127.0.0.1:0").unwrap();
    let dest_addr = dest.local_addr().unwrap().to_string();
    dest.set_nonblocking(true).unwrap();
    let proxies_done = Arc::new(AtomicBool::new(false));
    let done = proxies_done.clone();
    let destination = thread::spawn(move || {
        loop {
            // Read before accepting: a connection made before the proxies
            // ended is still found.
            let finished = done.load(Ordering::SeqCst);
            match dest.accept() {
                Ok((mut stream, _)) => {
                    stream.set_nonblocking(false).unwrap();
                    let mut got = Vec::new();
                    let _ = stream.read_to_end(&mut got);
                    return Some(got);
                }
                Err(_) if !finished => thread::sleep(Duration::from_millis(10)),
                Err(_) => return None,
            }
        }
    });
    let receiver = {
        let options = ReceiveOptions {
            listen: wan.clone(),
            qemu: dest_addr,
            timeout: Some(Duration::from_secs(20)),
            timeouts: Timeouts::default(),
            security: server,
        };
        thread::spawn(move || receive(&options, &templates))
    };
    thread::sleep(Duration::from_millis(100));
    strays(&wan);
    let sender = {
        let options = SendOptions {
            listen: local.clone(),
            to: wan,
            zstd,
            parser: Options { unsupported },
            timeout: Some(Duration::from_secs(20)),
            timeouts: Timeouts::default(),
            security: client,
        };
        thread::spawn(move || send(&options))
    };
    thread::sleep(Duration::from_millis(100));
    qemu(&local);
    let sent = sender.join().unwrap();
    let received = receiver.join().unwrap();
    proxies_done.store(true, Ordering::SeqCst);
    Outcome {
        sent,
        received,
        destination: destination.join().unwrap(),
    }
}

/// A connection to the send proxy, which binds in its own thread: retried
/// until it listens.
fn connect(local: &str) -> TcpStream {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match TcpStream::connect(local) {
            Ok(stream) => return stream,
            Err(_) if std::time::Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("the send proxy never listened on {local}: {e}"),
        }
    }
}

/// A fake source QEMU writing `bytes`.
fn feed(bytes: Vec<u8>) -> impl FnOnce(&str) + Send + 'static {
    move |local: &str| {
        let mut qemu = connect(local);
        // A write error means the proxy refused: what some tests expect.
        for piece in bytes.chunks(100_000) {
            if qemu.write_all(piece).is_err() {
                return;
            }
        }
    }
}

fn spec(pages: u64) -> StreamSpec {
    let records = (0..pages)
        .map(|i| Record::Page {
            block: 0,
            page: i,
            seed: 1 + i % 10,
        })
        .chain((pages..pages + 50).map(|i| Record::Zero { block: 0, page: i }))
        .collect();
    StreamSpec {
        blocks: vec![("pc.ram".into(), 4096)],
        chunks: vec![
            records,
            vec![Record::Page {
                block: 0,
                page: 7,
                seed: 99,
            }],
        ],
        ..StreamSpec::default()
    }
}

#[test]
fn without_templates_the_stream_arrives_unchanged_at_about_its_size() {
    let built = build(&spec(300));
    let outcome = run_pair(
        TemplateStore::default(),
        false,
        Unsupported::Refuse,
        feed(built.bytes.clone()),
    );
    let sent = outcome.sent.unwrap();
    let received = outcome.received.unwrap();
    assert!(outcome.destination.unwrap() == built.bytes);
    assert_eq!(sent.stream_bytes, built.bytes.len() as u64);
    assert_eq!(received.stream_bytes, sent.stream_bytes);
    assert_eq!(
        (sent.pages, sent.template_pages, sent.zero_pages),
        (301, 0, 50)
    );
    assert!(sent.ram_complete);
    // Two preambles, a handful of frames and the control messages' JSON
    // (version 1, with 5-byte frame headers and 8-byte preambles, stayed
    // under 300 bytes; version 2 adds 3 bytes per frame, 4 per preamble).
    let overhead = sent.wire_bytes - sent.stream_bytes;
    assert!(overhead < 330, "framing overhead {overhead} bytes");
    assert_eq!(sent.wire_bytes, received.wire_bytes);
}

#[test]
fn strays_never_reach_the_destination_and_the_genuine_send_proxy_gets_through() {
    let built = build(&spec(100));
    let mut held = Vec::new();
    let outcome = run_pair_after(
        TemplateStore::default(),
        false,
        Unsupported::Refuse,
        |wan| {
            // Plain TCP: an HTTP request, then a connection that stays silent.
            let mut http = TcpStream::connect(wan).unwrap();
            http.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            held.push(http);
            held.push(TcpStream::connect(wan).unwrap());
            // A send proxy whose certificate is from another CA.
            let other =
                std::env::temp_dir().join(format!("pagefp-proxy-other-ca-{}", std::process::id()));
            crate::net::pki::make(&crate::net::pki::TestPki {
                out: other.clone(),
                server_names: vec!["localhost".into()],
                client_name: "intruder".into(),
                days: 1,
                ca_dir: None,
            })
            .unwrap();
            let intruder = crate::net::tls::Client::from_options(
                &crate::net::tls::ConnectSecurity::tls(&other, Some("localhost".into())),
            )
            .unwrap();
            let refused = crate::net::connect(wan, &intruder, Duration::ZERO);
            assert!(refused.is_err(), "a certificate from another CA got in");
        },
        feed(built.bytes.clone()),
    );
    let sent = outcome.sent.unwrap();
    let received = outcome.received.unwrap();
    assert!(sent.tls && received.tls);
    assert!(
        received.channel.contains("pagefp-client"),
        "{}",
        received.channel
    );
    assert!(outcome.destination.unwrap() == built.bytes);
    drop(held);
}

#[test]
fn an_authenticated_peer_that_drips_its_opening_is_cut_and_the_next_gets_in() {
    let built = build(&spec(50));
    let started = std::time::Instant::now();
    let mut dripper = None;
    let outcome = run_pair_after(
        TemplateStore::default(),
        false,
        Unsupported::Refuse,
        |wan| {
            // A genuine certificate, then the preamble one byte every 2 s:
            // each read makes progress, only the opening deadline ends it.
            let (client, _) = test_security();
            let channel = crate::net::connect(wan, &client, Duration::ZERO).unwrap();
            dripper = Some(thread::spawn(move || {
                let (_reader, mut writer) = channel.split(Some(Duration::from_secs(30)));
                for byte in wire::MAGIC {
                    if writer
                        .write_all(&[byte])
                        .and_then(|()| writer.flush())
                        .is_err()
                    {
                        return;
                    }
                    thread::sleep(Duration::from_secs(2));
                }
            }));
            thread::sleep(Duration::from_millis(200));
        },
        feed(built.bytes.clone()),
    );
    assert!(outcome.received.is_ok(), "{:?}", outcome.received.err());
    assert!(outcome.sent.is_ok());
    assert!(outcome.destination.unwrap() == built.bytes);
    // Cut at the 10 s opening deadline, not after the whole 16 s drip.
    assert!(started.elapsed() < Duration::from_secs(16));
    dripper.unwrap().join().unwrap();
}

#[test]
fn an_offer_larger_than_the_limit_is_refused_by_the_send_proxy() {
    // A receive proxy (with a genuine certificate) that offers one frame
    // of template ids more than the limit.
    let (client, server) = test_security();
    let listener = crate::net::SecureListener::bind("127.0.0.1:0", server).unwrap();
    let wan = listener.local_addr().unwrap().to_string();
    let fake = thread::spawn(move || {
        let channel = listener.accept(None, "the send proxy").unwrap();
        let (reader, writer) = channel.split(Some(Duration::from_secs(20)));
        let mut writer = FrameWriter::new(std::io::BufWriter::new(writer));
        writer.preamble().unwrap();
        let ids = vec![[7u8; 32]; wire::OFFER_PER_FRAME];
        for _ in 0..=(wire::MAX_OFFER / wire::OFFER_PER_FRAME) {
            if writer
                .frame(Kind::Offer, 0, &wire::encode_offer(&ids))
                .is_err()
            {
                break;
            }
        }
        let _ = writer.flush();
        // Until the send proxy hangs up (closing with its hello unread
        // would reset the connection before the offer arrives).
        let _ = std::io::copy(&mut { reader }, &mut std::io::sink());
    });
    let local = free_addr();
    let options = SendOptions {
        listen: local.clone(),
        to: wan,
        zstd: false,
        parser: Options {
            unsupported: Unsupported::Refuse,
        },
        timeout: Some(Duration::from_secs(20)),
        timeouts: Timeouts::default(),
        security: client,
    };
    let sender = thread::spawn(move || send(&options));
    let _qemu = connect(&local);
    let err = sender.join().unwrap().unwrap_err();
    assert!(
        format!("{err:#}").contains("more than 1048576 templates"),
        "{err:#}"
    );
    let _ = fake.join();
}

#[test]
fn template_pages_travel_as_references_and_come_back_exact() {
    let built = build(&spec(300));
    // Seeds 1..=5 of the 10 the pages cycle through, and an unrelated page.
    let templates = || {
        let mut set = TemplateStore::default();
        for seed in [1, 2, 3, 4, 5, 1234] {
            set.add_page(&page_content(seed));
        }
        set
    };
    for zstd in [false, true] {
        let outcome = run_pair(
            templates(),
            zstd,
            Unsupported::Refuse,
            feed(built.bytes.clone()),
        );
        let sent = outcome.sent.unwrap();
        let received = outcome.received.unwrap();
        assert!(outcome.destination.unwrap() == built.bytes, "zstd {zstd}");
        assert_eq!(sent.template_pages, 150);
        assert_eq!(received.template_pages, 150);
        assert_eq!(sent.templates_offered, 6);
        assert!(
            sent.wire_bytes < built.bytes.len() as u64 * 6 / 10,
            "zstd {zstd}: {} of {}",
            sent.wire_bytes,
            built.bytes.len()
        );
    }
}

/// A stream that asks for postcopy (POSTCOPY_ADVISE: two be64 page sizes).
fn postcopy_stream() -> Vec<u8> {
    let built = build(&spec(10));
    let mut bytes = built.bytes[..26].to_vec();
    bytes.extend_from_slice(&[section::COMMAND, 0, 3, 0, 16]);
    bytes.extend_from_slice(&[0; 16]);
    bytes.extend_from_slice(&built.bytes[26..]);
    bytes
}

#[test]
fn a_refused_stream_never_reaches_the_destination() {
    let outcome = run_pair(
        TemplateStore::default(),
        true,
        Unsupported::Refuse,
        feed(postcopy_stream()),
    );
    let sent = format!("{:#}", outcome.sent.unwrap_err());
    assert!(
        sent.contains("postcopy") && sent.contains("nothing was sent"),
        "{sent}"
    );
    let received = format!("{:#}", outcome.received.unwrap_err());
    assert!(received.contains("postcopy"), "{received}");
    assert!(received.contains("not contacted"), "{received}");
    assert!(
        outcome.destination.is_none(),
        "the destination QEMU was contacted"
    );
}

/// QEMU 7.2 with multifd: its channels connect to the same address during
/// setup and carry the pages; the main stream alone looks complete.
#[test]
fn multifd_channels_are_refused_before_anything_is_sent() {
    let built = build(&spec(10));
    let preamble_end = built
        .bytes
        .windows(5)
        .position(|w| w == [section::PART, 0, 0, 0, 2])
        .unwrap();
    let bytes = built.bytes.clone();
    let outcome = run_pair(
        TemplateStore::default(),
        true,
        Unsupported::Refuse,
        move |local| {
            let mut qemu = connect(local);
            qemu.write_all(&bytes[..preamble_end]).unwrap();
            let mut channel = connect(local);
            channel.write_all(&0x1122_3344u32.to_be_bytes()).unwrap();
            thread::sleep(Duration::from_millis(300));
            let _ = qemu.write_all(&bytes[preamble_end..]);
        },
    );
    let sent = format!("{:#}", outcome.sent.unwrap_err());
    assert!(
        sent.contains("a multifd channel from")
            && sent.contains("switch the multifd capability off"),
        "{sent}"
    );
    assert!(format!("{:#}", outcome.received.unwrap_err()).contains("not contacted"));
    assert!(outcome.destination.is_none());
}

/// A channel that connects late (after the preamble): the stream's end is
/// never released to the destination.
#[test]
fn a_late_extra_connection_keeps_the_stream_end_from_the_destination() {
    let built = build(&spec(10));
    let bytes = built.bytes.clone();
    let outcome = run_pair(
        TemplateStore::default(),
        true,
        Unsupported::Refuse,
        move |local| {
            let mut qemu = connect(local);
            qemu.write_all(&bytes[..bytes.len() - 100]).unwrap();
            thread::sleep(Duration::from_millis(200));
            let _channel = connect(local);
            thread::sleep(Duration::from_millis(200));
            let _ = qemu.write_all(&bytes[bytes.len() - 100..]);
        },
    );
    let sent = format!("{:#}", outcome.sent.unwrap_err());
    assert!(sent.contains("a second connection from"), "{sent}");
    assert!(outcome.received.is_err());
    assert!(
        outcome.destination.is_none(),
        "the held-back end was released"
    );
}

#[test]
fn unsupported_features_can_be_passed_through() {
    // Block migration's START before RAM's.
    let built = build(&spec(10));
    let mut bytes = built.bytes[..26].to_vec();
    bytes.extend_from_slice(&[section::START, 0, 0, 0, 9, 5]);
    bytes.extend_from_slice(b"block");
    bytes.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1, 0xaa, 0xbb]);
    bytes.extend_from_slice(&built.bytes[26..]);
    let mut templates = TemplateStore::default();
    templates.add_page(&page_content(1));
    let outcome = run_pair(
        templates,
        true,
        Unsupported::PassThrough,
        feed(bytes.clone()),
    );
    let sent = outcome.sent.unwrap();
    assert!(outcome.destination.unwrap() == bytes);
    assert_eq!(
        sent.template_pages, 0,
        "nothing is deduplicated after what is not understood"
    );
    assert!(sent.pass_through.unwrap().contains("\"block\""));
    outcome.received.unwrap();
}

#[test]
fn a_stream_cut_short_fails_both_ends_and_qemu_never_sees_its_end() {
    let built: Built = build(&spec(100));
    let cut = built.pages[50].stream_offset as usize + 100;
    let outcome = run_pair(
        TemplateStore::default(),
        true,
        Unsupported::Refuse,
        feed(built.bytes[..cut].to_vec()),
    );
    let sent = format!("{:#}", outcome.sent.unwrap_err());
    assert!(
        sent.contains(&format!("ends at byte {cut}")) && sent.contains("RAM page"),
        "{sent}"
    );
    let received = format!("{:#}", outcome.received.unwrap_err());
    assert!(received.contains("ends at byte"), "{received}");
    // Less than the hold-back: nothing reached the destination.
    assert!(outcome.destination.is_none());
}

#[test]
fn not_a_qemu_stream_is_refused() {
    let outcome = run_pair(
        TemplateStore::default(),
        true,
        Unsupported::Refuse,
        feed(b"GET / HTTP/1.1\r\n\r\n".to_vec()),
    );
    let sent = format!("{:#}", outcome.sent.unwrap_err());
    assert!(sent.contains("not a QEMU migration stream"), "{sent}");
    assert!(outcome.received.is_err());
    assert!(outcome.destination.is_none());
}

// The wire format alone.

fn frame_of(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut writer = FrameWriter::new(&mut out);
    writer.frame(kind, 0, payload).unwrap();
    assert_eq!(writer.bytes, 12 + payload.len() as u64);
    out
}

fn read_frame(bytes: &[u8]) -> Result<Frame, WireError> {
    FrameReader::new(bytes).frame()
}

#[test]
fn frames_are_checked() {
    let bytes = frame_of(Kind::Done, br#"{"stream_bytes":5}"#);
    assert_eq!(read_frame(&bytes).unwrap().kind, Kind::Done);
    for i in 0..bytes.len() {
        let mut damaged = bytes.clone();
        damaged[i] ^= 0x10;
        assert!(read_frame(&damaged).is_err(), "flip at {i} went unnoticed");
    }
    assert!(read_frame(&bytes[..bytes.len() - 1]).is_err());
    let mut abort = Vec::new();
    FrameWriter::new(&mut abort).abort("no").unwrap();
    assert!(matches!(
        read_frame(&abort),
        Err(WireError::PeerAborted { reason, .. }) if reason == "no"
    ));
    // Flags are not defined in this protocol: refused both ways.
    assert!(matches!(
        FrameWriter::new(Vec::new()).frame(Kind::Chunk, 1, b""),
        Err(WireError::UndefinedFlags { .. })
    ));
    let mut flagged = bytes.clone();
    flagged[1] = 1;
    assert!(matches!(
        read_frame(&flagged),
        Err(WireError::Reserved { .. })
    ));
}

#[test]
fn kinds_round_trip_and_leave_abort_to_the_transport() {
    let known: Vec<u8> = (0..=u8::MAX)
        .filter(|&v| Kind::try_from(v).is_ok_and(|k| u8::from(k) == v))
        .collect();
    assert_eq!(known, vec![1, 2, 3, 4, 5, 6, 7, 8]);
    assert!(Kind::try_from(crate::transport::ABORT).is_err());
}

#[test]
fn preambles_of_both_versions_are_told_apart() {
    let mut bytes = Vec::new();
    FrameWriter::new(&mut bytes).preamble().unwrap();
    assert_eq!(&bytes[..8], b"PAGEFPQP");
    FrameReader::new(&bytes[..]).preamble().unwrap();
    // What a version 1 proxy sends: the old magic, its version, a frame.
    let mut v1 = b"PFQP".to_vec();
    v1.extend_from_slice(&1u32.to_le_bytes());
    v1.extend_from_slice(&[1, 20, 0, 0, 0]);
    let err = FrameReader::new(&v1[..])
        .preamble()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("version 1 is not supported") && err.contains("upgrade both ends"),
        "{err}"
    );
    // What a version 1 receive proxy answers to this side's preamble.
    let mut refusal = vec![7u8];
    let reason = br#"{"reason":"not a pagefp QEMU proxy on the other end"}"#;
    refusal.extend_from_slice(&(reason.len() as u32).to_le_bytes());
    refusal.extend_from_slice(reason);
    let err = FrameReader::new(&refusal[..])
        .preamble()
        .unwrap_err()
        .to_string();
    assert!(err.contains("version 1 is not supported"), "{err}");
    // The native migration protocol is not this one.
    let mut native = Vec::new();
    crate::transport::migration::FrameWriter::new(&mut native)
        .preamble()
        .unwrap();
    let err = FrameReader::new(&native[..])
        .preamble()
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a pagefp QEMU proxy stream"), "{err}");
}

#[test]
fn offers_round_trip_and_bad_ones_are_refused() {
    let ids: Vec<_> = (0..3u8).map(|i| *blake3::hash(&[i]).as_bytes()).collect();
    let frame = read_frame(&frame_of(Kind::Offer, &wire::encode_offer(&ids))).unwrap();
    assert_eq!(wire::decode_offer(&frame).unwrap(), ids);
    let cut = Frame {
        kind: Kind::Offer,
        flags: 0,
        payload: vec![0; 33],
        offset: 0,
    };
    assert!(wire::decode_offer(&cut).is_err());
}

#[test]
fn chunks_decode_to_exactly_their_bytes() {
    let template = page_content(7);
    let page = |i: u32| (i == 0).then_some(&*template);
    for zstd in [false, true] {
        let mut chunk = ChunkBuilder::default();
        chunk.raw(b"header");
        chunk.template(0);
        chunk.raw(b"more");
        chunk.raw(b"!");
        let payload = chunk.finish(zstd).unwrap();
        let frame = Frame {
            kind: Kind::Chunk,
            flags: 0,
            payload,
            offset: 0,
        };
        let out = wire::decode_chunk(&frame, page).unwrap();
        let mut expected = b"header".to_vec();
        expected.extend_from_slice(&template[..]);
        expected.extend_from_slice(b"more!");
        assert_eq!(out, expected);
    }
    let bad = |payload: Vec<u8>| {
        let frame = Frame {
            kind: Kind::Chunk,
            flags: 0,
            payload,
            offset: 3,
        };
        wire::decode_chunk(&frame, page).unwrap_err().to_string()
    };
    let mut chunk = ChunkBuilder::default();
    chunk.template(1);
    assert!(bad(chunk.finish(false).unwrap()).contains("template 1 was not offered"));
    assert!(bad(vec![0, 6, 0, 0, 0, 1, 9, 0, 0, 0, 0]).contains("cut short"));
    assert!(bad(vec![0, 5, 0, 0, 0, 7, 0, 0, 0, 0]).contains("unknown op"));
    assert!(bad(vec![0, 0, 0, 0, 1]).contains("at most"));
    assert!(bad(vec![1, 4, 0, 0, 0, 1, 2, 3, 4]).contains("decompress"));
    // Too many template pages for one chunk.
    let mut chunk = ChunkBuilder::default();
    for _ in 0..=wire::MAX_CHUNK_STREAM / PAGE_SIZE {
        chunk.template(0);
    }
    assert!(bad(chunk.finish(true).unwrap()).contains("stands for more than"));
}
