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
    send::{Listing, SendOptions, send},
};
use crate::{
    catalog::{agreement::Negotiation, store::TemplateStore},
    compression::ZstdPolicy,
    config::SiteStoreConfig,
    net::{Timeouts, pki::test_security},
    qemu_stream::{
        Options, Unsupported,
        format::{PAGE_SIZE, section},
        synth::{Built, PacketSpec, Record, StreamSpec, build, multifd_channel, page_content},
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
    /// What the destination got on its first connection, if any.
    destination: Option<Vec<u8>>,
    /// What it got on the others (multifd channels), in connection order.
    channels: Vec<Vec<u8>>,
}

/// Runs the pair: `qemu` writes the source stream to the send proxy.
fn run_pair(
    templates: TemplateStore,
    zstd: Option<ZstdPolicy>,
    unsupported: Unsupported,
    qemu: impl FnOnce(&str) + Send + 'static,
) -> Outcome {
    run_pair_negotiated(templates, zstd, unsupported, Listing::Nothing, |_| {}, qemu)
}

/// [`run_pair`], with `strays(wan)` run once the receive proxy listens and
/// before the send proxy starts.
fn run_pair_after(
    templates: TemplateStore,
    zstd: Option<ZstdPolicy>,
    unsupported: Unsupported,
    strays: impl FnOnce(&str),
    qemu: impl FnOnce(&str) + Send + 'static,
) -> Outcome {
    run_pair_negotiated(templates, zstd, unsupported, Listing::Nothing, strays, qemu)
}

/// [`run_pair_after`], the send proxy listing `listing` when asked.
fn run_pair_negotiated(
    templates: TemplateStore,
    zstd: Option<ZstdPolicy>,
    unsupported: Unsupported,
    listing: Listing,
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
        let mut readers = Vec::new();
        loop {
            // Read before accepting: a connection made before the proxies
            // ended is still found.
            let finished = done.load(Ordering::SeqCst);
            match dest.accept() {
                Ok((mut stream, _)) => {
                    stream.set_nonblocking(false).unwrap();
                    readers.push(thread::spawn(move || {
                        let mut got = Vec::new();
                        let _ = stream.read_to_end(&mut got);
                        got
                    }));
                }
                Err(_) if !finished => thread::sleep(Duration::from_millis(10)),
                Err(_) => break,
            }
        }
        readers
            .into_iter()
            .map(|r| r.join().unwrap())
            .collect::<Vec<_>>()
    });
    let receiver = {
        let options = ReceiveOptions {
            listen: wan.clone(),
            qemu: dest_addr,
            timeout: Some(Duration::from_secs(20)),
            timeouts: Timeouts::default(),
            security: server,
            negotiation: Negotiation::Auto,
            site: SiteStoreConfig::default(),
        };
        thread::spawn(move || receive(&options, templates))
    };
    thread::sleep(Duration::from_millis(100));
    strays(&wan);
    let sender = {
        let options = SendOptions {
            listen: local.clone(),
            to: wan,
            zstd,
            zstd_level: 3,
            parser: Options { unsupported },
            timeout: Some(Duration::from_secs(20)),
            timeouts: Timeouts::default(),
            security: client,
            listing,
        };
        thread::spawn(move || send(&options))
    };
    thread::sleep(Duration::from_millis(100));
    qemu(&local);
    let sent = sender.join().unwrap();
    let received = receiver.join().unwrap();
    proxies_done.store(true, Ordering::SeqCst);
    let mut connections = destination.join().unwrap().into_iter();
    Outcome {
        sent,
        received,
        destination: connections.next(),
        channels: connections.collect(),
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
        None,
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
    // Version 4 adds a digest per chunk and the session id, version 5 the
    // Hello's query_hashes, version 6 the digest seed (and 16-byte
    // digests); chunks of at most 256 KiB of ops: about 34 bytes each.
    assert!(overhead < 600, "framing overhead {overhead} bytes");
    assert_eq!(sent.wire_bytes, received.wire_bytes);
}

#[test]
fn strays_never_reach_the_destination_and_the_genuine_send_proxy_gets_through() {
    let built = build(&spec(100));
    let mut held = Vec::new();
    let outcome = run_pair_after(
        TemplateStore::default(),
        None,
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
        None,
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
        zstd: None,
        zstd_level: 3,
        parser: Options {
            unsupported: Unsupported::Refuse,
        },
        timeout: Some(Duration::from_secs(20)),
        timeouts: Timeouts::default(),
        security: client,
        listing: Listing::Nothing,
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
    for zstd in [None, Some(ZstdPolicy::Always), Some(ZstdPolicy::Auto)] {
        let outcome = run_pair(
            templates(),
            zstd,
            Unsupported::Refuse,
            feed(built.bytes.clone()),
        );
        let sent = outcome.sent.unwrap();
        let received = outcome.received.unwrap();
        assert!(outcome.destination.unwrap() == built.bytes, "zstd {zstd:?}");
        assert_eq!(sent.template_pages, 150);
        assert_eq!(received.template_pages, 150);
        assert_eq!(sent.templates_offered, 6);
        assert!(
            sent.wire_bytes < built.bytes.len() as u64 * 6 / 10,
            "zstd {zstd:?}: {} of {}",
            sent.wire_bytes,
            built.bytes.len()
        );
    }
}

/// A send proxy that can list the VM's contents: the receive proxy, whose
/// catalog is larger than the list, asks instead of offering; only the
/// held contents become templates, numbered in the order listed, and the
/// stream arrives exact. Listed contents the receiver lacks, and pages not
/// listed, travel in full.
#[test]
fn a_listed_vm_is_asked_about_and_its_held_contents_travel_as_references() {
    let built = build(&spec(300));
    let mut templates = TemplateStore::default();
    // Seeds 2..=5 of the 10 the pages cycle through, and many others.
    for seed in (2..=5).chain(1000..1100) {
        templates.add_page(&page_content(seed));
    }
    // The source lists seeds 1..=4 (1 is not held; 5 is held, not listed).
    let listed = (1..=4)
        .map(|seed| *blake3::hash(&page_content(seed)[..]).as_bytes())
        .collect();
    let outcome = run_pair_negotiated(
        templates,
        Some(ZstdPolicy::Auto),
        Unsupported::Refuse,
        Listing::Given(listed),
        |_| {},
        feed(built.bytes.clone()),
    );
    let sent = outcome.sent.unwrap();
    let received = outcome.received.unwrap();
    assert!(outcome.destination.unwrap() == built.bytes);
    assert_eq!(
        sent.negotiation.as_deref(),
        Some("query: 3 of the VM's 4 contents held")
    );
    assert_eq!(sent.negotiation, received.negotiation);
    assert_eq!((sent.templates_offered, received.templates_offered), (3, 3));
    // 300 pages cycling through 10 seeds, 3 of them agreed.
    assert_eq!(sent.template_pages, 90);
    assert_eq!(received.template_pages, 90);
    assert!(received.site.is_none(), "no site store configured");
    assert!(
        sent.negotiation_bytes < 1000,
        "4 hashes and their bits, not the catalog: {} bytes",
        sent.negotiation_bytes
    );
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
        Some(ZstdPolicy::Auto),
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

/// A fake QEMU migrating with multifd: the main stream, then `channels`
/// (each a multifd channel's bytes) on connections of their own.
fn feed_multifd(main: Vec<u8>, channels: Vec<Vec<u8>>) -> impl FnOnce(&str) + Send + 'static {
    move |local: &str| {
        let mut qemu = connect(local);
        let writers: Vec<_> = channels
            .into_iter()
            .map(|bytes| {
                let mut channel = connect(local);
                thread::spawn(move || {
                    for piece in bytes.chunks(50_000) {
                        if channel.write_all(piece).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().unwrap();
        }
        for piece in main.chunks(100_000) {
            if qemu.write_all(piece).is_err() {
                return;
            }
        }
    }
}

fn multifd_spec(id: u8, seeds: std::ops::Range<u64>) -> Vec<PacketSpec> {
    let pages: Vec<_> = seeds.map(|seed| (seed << 12, seed)).collect();
    let mut packets: Vec<_> = pages
        .chunks(100)
        .map(|pages| PacketSpec {
            block: "pc.ram".into(),
            pages: pages.to_vec(),
            zero: vec![0x1000 * u64::from(id)],
            ..PacketSpec::default()
        })
        .collect();
    packets.push(PacketSpec {
        sync: true,
        ..PacketSpec::default()
    });
    packets
}

/// multifd: every channel reaches the destination exactly, on its own
/// connection after the main stream's, with pages the receiver holds sent
/// as references.
#[test]
fn multifd_channels_arrive_exactly_and_deduplicated() {
    let main = build(&spec(10)).bytes;
    let channels: Vec<_> = (0..3u8)
        .map(|id| {
            multifd_channel(
                id,
                &multifd_spec(id, 1 + 300 * u64::from(id)..300 * (1 + u64::from(id))),
            )
            .0
        })
        .collect();
    let mut templates = TemplateStore::default();
    for seed in (1..900).step_by(2) {
        templates.add_page(&page_content(seed));
    }
    let outcome = run_pair(
        templates,
        Some(ZstdPolicy::Auto),
        Unsupported::Refuse,
        feed_multifd(main.clone(), channels.clone()),
    );
    let sent = outcome.sent.unwrap();
    let received = outcome.received.unwrap();
    assert!(outcome.destination.unwrap() == main);
    let mut got = outcome.channels;
    got.sort_by_key(|bytes| bytes.get(24).copied());
    assert_eq!(got.len(), 3);
    for (got, want) in got.iter().zip(&channels) {
        assert!(got == want, "a multifd channel arrived changed");
    }
    assert_eq!((sent.channels, received.channels), (4, 4));
    let stream: u64 = main.len() as u64 + channels.iter().map(|c| c.len() as u64).sum::<u64>();
    assert_eq!((sent.stream_bytes, received.stream_bytes), (stream, stream));
    // 3 × 299 channel pages (seeds 1..300, 301..600, 601..900), the odd
    // ones offered,
    // and the main stream's 10 pages (seeds 1..=10).
    assert_eq!(sent.pages, 897 + 11);
    assert!(sent.template_pages >= 449, "{sent:?}");
    assert_eq!(sent.template_pages, received.template_pages);
    assert_eq!(sent.zero_pages, 50 + 3 * 3);
    assert!(sent.wire_bytes < stream * 6 / 10, "{sent:?}");
    assert_eq!(sent.multifd_compression.as_deref(), Some("none"));
}

/// A channel QEMU cuts mid-packet: the migration fails on both ends.
#[test]
fn a_multifd_channel_cut_short_fails_the_migration() {
    let main = build(&spec(10)).bytes;
    let (channel, pages) = multifd_channel(0, &multifd_spec(0, 1..200));
    let cut = pages[150].stream_offset as usize + 10;
    let outcome = run_pair(
        TemplateStore::default(),
        Some(ZstdPolicy::Auto),
        Unsupported::Refuse,
        feed_multifd(main, vec![channel[..cut].to_vec()]),
    );
    let sent = format!("{:#}", outcome.sent.unwrap_err());
    assert!(
        sent.contains("multifd channel") && sent.contains("ends at byte"),
        "{sent}"
    );
    assert!(outcome.received.is_err());
    // What the destination got of the channel was checked and is exactly
    // the beginning of it.
    for got in &outcome.channels {
        assert!(channel[..cut].starts_with(got));
    }
}

/// A connection to the send proxy that is not a multifd channel is closed;
/// the migration goes on.
#[test]
fn a_stray_connection_to_the_send_proxy_is_closed_and_the_migration_goes_on() {
    let built = build(&spec(10));
    let bytes = built.bytes.clone();
    let outcome = run_pair(
        TemplateStore::default(),
        Some(ZstdPolicy::Auto),
        Unsupported::Refuse,
        move |local| {
            let mut qemu = connect(local);
            qemu.write_all(&bytes[..bytes.len() - 100]).unwrap();
            let mut stray = connect(local);
            stray.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            thread::sleep(Duration::from_millis(200));
            let _ = qemu.write_all(&bytes[bytes.len() - 100..]);
            drop(qemu);
            let mut rest = Vec::new();
            let _ = stray.read_to_end(&mut rest);
        },
    );
    let sent = outcome.sent.unwrap();
    assert_eq!(sent.channels, 1);
    outcome.received.unwrap();
    assert!(outcome.destination.unwrap() == built.bytes);
    assert!(outcome.channels.is_empty());
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
        Some(ZstdPolicy::Auto),
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
fn a_stream_cut_short_fails_both_ends_and_qemu_gets_only_a_checked_beginning() {
    let built: Built = build(&spec(100));
    let cut = built.pages[50].stream_offset as usize + 100;
    let outcome = run_pair(
        TemplateStore::default(),
        Some(ZstdPolicy::Auto),
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
    // Only checked chunks reached the destination: a beginning of the
    // stream, short of the cut (QEMU fails the truncated migration).
    let got = outcome.destination.unwrap_or_default();
    assert!(got.len() < cut && built.bytes.starts_with(&got));
}

#[test]
fn not_a_qemu_stream_is_refused() {
    let outcome = run_pair(
        TemplateStore::default(),
        Some(ZstdPolicy::Auto),
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
    assert_eq!(known, vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
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

/// A chunk's ops compressed at zstd `level` (`None`: plain).
fn at(level: Option<i32>) -> impl FnOnce(&[u8]) -> std::io::Result<Option<Vec<u8>>> {
    move |ops| {
        level
            .map(|level| zstd::bulk::compress(ops, level))
            .transpose()
    }
}

/// The chunk digests' seed in these tests and the fuzz seeds (the fuzz
/// target decodes with it too).
const SEED: u64 = 0;

#[test]
fn chunks_decode_to_exactly_their_bytes() {
    let template = page_content(7);
    let other = page_content(8);
    let page = |i: u32| (i == 0).then_some(&*template);
    let frame = |payload| Frame {
        kind: Kind::Chunk,
        flags: 0,
        payload,
        offset: 3,
    };
    for zstd in [None, Some(3), Some(-5)] {
        let mut chunk = ChunkBuilder::new(SEED);
        chunk.raw(b"header");
        chunk.template(0, &template);
        chunk.raw(b"more");
        chunk.raw(b"!");
        let first = frame(chunk.finish(at(zstd)).unwrap());
        let mut expected = b"header".to_vec();
        expected.extend_from_slice(&template[..]);
        expected.extend_from_slice(b"more!");
        assert_eq!(wire::decode_chunk(&first, SEED, 0, page).unwrap(), expected);
        // The next chunk's digest covers its place in the stream.
        chunk.raw(b"tail");
        let second = frame(chunk.finish(at(zstd)).unwrap());
        assert_eq!(
            wire::decode_chunk(&second, SEED, expected.len() as u64, page).unwrap(),
            b"tail"
        );
        let moved = wire::decode_chunk(&second, SEED, 0, page)
            .unwrap_err()
            .to_string();
        assert!(moved.contains("differ from the source's"), "{moved}");
        // Another migration's seed: another digest.
        let reseeded = wire::decode_chunk(&second, SEED + 1, expected.len() as u64, page)
            .unwrap_err()
            .to_string();
        assert!(reseeded.contains("differ from the source's"), "{reseeded}");
    }
    let bad = |payload: Vec<u8>| {
        wire::decode_chunk(&frame(payload), SEED, 0, page)
            .unwrap_err()
            .to_string()
    };
    // A template whose page is not what the sender read: never delivered.
    let mut chunk = ChunkBuilder::new(SEED);
    chunk.template(0, &other);
    assert!(bad(chunk.finish(at(None)).unwrap()).contains("differ from the source's"));
    let mut chunk = ChunkBuilder::new(SEED);
    chunk.template(1, &template);
    assert!(bad(chunk.finish(at(None)).unwrap()).contains("template 1 was not offered"));
    let digest = [0u8; wire::CHUNK_DIGEST_LEN];
    let with_digest = |mut v: Vec<u8>| {
        v.extend_from_slice(&digest);
        v
    };
    assert!(bad(with_digest(vec![0, 6, 0, 0, 0, 1, 9, 0, 0, 0, 0])).contains("cut short"));
    assert!(bad(with_digest(vec![0, 5, 0, 0, 0, 7, 0, 0, 0, 0])).contains("unknown op"));
    assert!(bad(with_digest(vec![0, 0, 0, 0, 1])).contains("at most"));
    assert!(bad(with_digest(vec![1, 4, 0, 0, 0, 1, 2, 3, 4])).contains("decompress"));
    assert!(bad(vec![0, 0, 0, 0, 0]).contains("shorter than its header and digest"));
    // Too many template pages for one chunk.
    let mut chunk = ChunkBuilder::new(SEED);
    for _ in 0..=wire::MAX_CHUNK_STREAM / PAGE_SIZE {
        chunk.template(0, &template);
    }
    assert!(bad(chunk.finish(at(Some(3))).unwrap()).contains("stands for more than"));
}

/// What the receive proxy sends after its offer: return-path frames, Done.
fn return_path_session(payloads: &[Vec<u8>], delivered: u64) -> Vec<u8> {
    let mut writer = FrameWriter::new(Vec::new());
    for payload in payloads {
        writer.frame(Kind::ReturnPath, 0, payload).unwrap();
    }
    writer
        .json(
            Kind::Done,
            &wire::Done {
                stream_bytes: delivered,
            },
        )
        .unwrap();
    writer.into_inner()
}

proptest::proptest! {
    /// The return-path relay hands the source QEMU exactly the destination's
    /// bytes, in order, and ends at Done.
    #[test]
    fn the_return_path_relay_is_exact(
        payloads in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), 0..8),
        delivered in proptest::prelude::any::<u64>(),
    ) {
        let session = return_path_session(&payloads, delivered);
        let mut to_qemu = Vec::new();
        let (done, relayed) = wire::relay_return_path(&mut FrameReader::new(&session[..]), &mut to_qemu).unwrap();
        proptest::prop_assert_eq!(done.stream_bytes, delivered);
        proptest::prop_assert_eq!(to_qemu, payloads.concat());
        proptest::prop_assert_eq!(relayed, payloads.iter().map(|p| p.len() as u64).sum::<u64>());
    }

    /// Cut or damaged anywhere: an error (never a panic), and the source
    /// QEMU got a beginning of the destination's bytes, never other bytes.
    #[test]
    fn a_damaged_return_path_fails_cleanly(
        payloads in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 1..300), 1..6),
        at in proptest::prelude::any::<proptest::sample::Index>(),
        xor in 1u8..,
        cut in proptest::prelude::any::<bool>(),
    ) {
        let mut session = return_path_session(&payloads, 7);
        let i = at.index(session.len());
        if cut {
            session.truncate(i);
        } else {
            session[i] ^= xor;
        }
        let mut to_qemu = Vec::new();
        let result = wire::relay_return_path(&mut FrameReader::new(&session[..]), &mut to_qemu);
        proptest::prop_assert!(payloads.concat().starts_with(&to_qemu));
        proptest::prop_assert!(result.is_err() || !cut);
    }
}

#[test]
fn the_return_path_relay_refuses_other_messages() {
    let mut writer = FrameWriter::new(Vec::new());
    writer.frame(Kind::ReturnPath, 0, b"PONG").unwrap();
    writer.frame(Kind::Chunk, 0, b"x").unwrap();
    let session = writer.into_inner();
    let mut to_qemu = Vec::new();
    let err = wire::relay_return_path(&mut FrameReader::new(&session[..]), &mut to_qemu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("expected return-path bytes or Done"), "{err}");
    assert_eq!(to_qemu, b"PONG");
}

/// The fuzz targets' seeds for the proxies' wire (`agent/fuzz/seeds/`):
/// a whole session each way, built here so they follow the
/// protocol. `PAGEFP_WRITE_FUZZ_SEEDS=1` rewrites them.
#[test]
fn proxy_wire_fuzz_seeds_are_current() {
    let template = [0xA5u8; PAGE_SIZE];
    let mut chunk = ChunkBuilder::new(SEED);
    chunk.raw(b"QEVM\0\0\0\x03");
    chunk.template(0, &template);
    chunk.raw(&[0; 100]);
    let mut writer = FrameWriter::new(Vec::new());
    writer.preamble().unwrap();
    writer
        .json(
            Kind::Hello,
            &wire::Hello {
                sender: "pagefp-1".into(),
                zstd: true,
                multifd: None,
                query_hashes: 0,
            },
        )
        .unwrap();
    writer
        .frame(Kind::Chunk, 0, &chunk.finish(at(Some(3))).unwrap())
        .unwrap();
    chunk.raw(b"tail");
    writer
        .frame(Kind::Chunk, 0, &chunk.finish(at(None)).unwrap())
        .unwrap();
    writer
        .json(
            Kind::End,
            &wire::End {
                stream_bytes: 8 + 4096 + 100 + 4,
                channels: 2,
            },
        )
        .unwrap();
    // The mode byte: 0 reads as the receive proxy, 1 as the return-path relay.
    let mut receive = vec![0u8];
    receive.extend_from_slice(&writer.into_inner());
    let mut answers = vec![1u8];
    answers.extend_from_slice(&return_path_session(
        &[b"\0\x04\0\x04PONG".to_vec(), vec![0, 1, 0, 0]],
        4208,
    ));
    let dir = format!("{}/fuzz/seeds/proxy_wire", env!("CARGO_MANIFEST_DIR"));
    crate::qemu_stream::synth::check_seeds(&dir, &[("session", receive), ("return-path", answers)]);
}

/// QEMU pauses (waiting for the destination's answer) right after a chunk
/// filled up: that chunk went to the WAN's buffer, not the builder, and
/// must reach the receive proxy now, not when QEMU writes again (a
/// migration once stalled until the I/O timeout so).
#[test]
fn a_chunk_that_filled_just_before_qemu_paused_reaches_the_receiver() {
    use std::{io::BufReader, time::Instant};

    use super::{
        chunks::{Chunks, Wan},
        templates::Offered,
    };
    use crate::net::{SecureListener, connect};

    let (client, server) = test_security();
    let listener = SecureListener::bind("127.0.0.1:0", server).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let receiver = thread::spawn(move || {
        let channel = listener
            .accept(Some(Instant::now() + Duration::from_secs(5)), "the test")
            .unwrap();
        let (read_half, _write_half) = channel.split(Some(Duration::from_secs(5)));
        let mut reader = FrameReader::new(BufReader::new(read_half));
        reader.frame().map(|frame| frame.kind)
    });
    let channel = connect(&addr, &client, Duration::from_secs(5)).unwrap();
    let (_read_half, write_half) = channel.split(Some(Duration::from_secs(5)));
    let mut wan: Wan = FrameWriter::new(std::io::BufWriter::with_capacity(1 << 20, write_half));
    // A QEMU connection with nothing to read: QEMU waits.
    let qemu_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let _qemu_end = TcpStream::connect(qemu_listener.local_addr().unwrap()).unwrap();
    let (qemu, _) = qemu_listener.accept().unwrap();
    let offered = Offered::default();
    let mut chunks = Chunks::new(&mut wan, &offered, None, SEED);
    // 64 raw pages fill a chunk's 256 KiB of ops exactly: it is sent (into
    // the buffer) by the 64th page, and the builder is empty.
    for seed in 0..64 {
        chunks.page(&page_content(seed));
        chunks.send_if_full().unwrap();
    }
    chunks.send_when_idle(&qemu).unwrap();
    assert_eq!(
        receiver.join().unwrap().map_err(|e| e.to_string()),
        Ok(Kind::Chunk),
        "the full chunk stayed in the send proxy's buffer"
    );
}

/// QEMU sends in bursts and the proxy flushes at every pause: on a slow
/// link those flushes are where it waits, and the compression gauge must
/// see them. Chunks of half-compressible pages, flushed one by one, to a
/// receiver that reads about 16 MB/s: nearly all are compressed. (The
/// gauge once timed only the frame writes into the buffer, took the link
/// for a fast one and sent most chunks raw: a third were compressed.)
#[test]
fn flushes_at_qemus_pauses_count_as_link_time_for_compression() {
    use std::time::Instant;

    use super::{
        chunks::{Chunks, Wan},
        templates::Offered,
    };
    use crate::{
        compression::Gauge,
        net::{
            SecureListener, connect,
            tls::{Client, Server},
        },
    };

    let listener = SecureListener::bind("127.0.0.1:0", Server::Plaintext).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let receiver = thread::spawn(move || {
        let channel = listener
            .accept(Some(Instant::now() + Duration::from_secs(5)), "the test")
            .unwrap();
        let (mut read_half, _write_half) = channel.split(Some(Duration::from_secs(10)));
        let mut buf = vec![0u8; 64 << 10];
        let mut total = 0u64;
        loop {
            match read_half.read(&mut buf) {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n as u64,
            }
            // 64 KiB per 4 ms: about 16 MB/s.
            thread::sleep(Duration::from_millis(4));
        }
    });
    let channel = connect(&addr, &Client::Plaintext, Duration::from_secs(5)).unwrap();
    // The write half alone holds the connection: dropped, it closes it.
    let (_, write_half) = channel.split(Some(Duration::from_secs(10)));
    let mut wan: Wan = FrameWriter::new(std::io::BufWriter::with_capacity(1 << 20, write_half));
    let qemu_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let _qemu_end = TcpStream::connect(qemu_listener.local_addr().unwrap()).unwrap();
    let (qemu, _) = qemu_listener.accept().unwrap();
    let offered = Offered::default();
    let gauge = Gauge::new(ZstdPolicy::Auto, 1, 3);
    let mut chunks = Chunks::new(&mut wan, &offered, Some(&gauge), SEED);
    // 96 chunks of 64 pages (24 MiB): each page half random, half zeros.
    for chunk in 0..96u64 {
        for page in 0..64 {
            let mut data = page_content(chunk * 64 + page + 1);
            data[PAGE_SIZE / 2..].fill(0);
            chunks.page(&data);
        }
        chunks.send_if_full().unwrap();
        chunks.send_when_idle(&qemu).unwrap();
    }
    drop(chunks);
    drop(wan);
    let delivered = receiver.join().unwrap();
    let (compressed, frames) = gauge.frames();
    assert_eq!(frames, 96);
    assert!(
        compressed >= 80,
        "{}; {delivered} bytes delivered",
        gauge.describe()
    );
}
