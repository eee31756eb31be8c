//! The benchmark's WAN: a link between two network namespaces shaped to a
//! rate by `tc tbf`, with a round-trip time added by the TUN packet
//! delayer. Checked with real kernel TCP across it: the bytes arrive
//! intact, a connection takes at least the round trip to open, and a bulk
//! transfer takes at least what the rate allows (lower bounds the link
//! enforces, not speed targets).

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

use pagefp_tests::{
    netns::{ShapedLink, in_namespace},
    privileged,
};

const MBIT: u32 = 100;
const RTT_MS: u32 = 50;
const BYTES: usize = 4 << 20;

#[test]
fn a_delayed_link_adds_its_round_trip_and_keeps_its_rate() {
    if !privileged::check("a_delayed_link_adds_its_round_trip_and_keeps_its_rate") {
        return;
    }
    let link = ShapedLink::with_rtt("dly", 40, MBIT, RTT_MS).expect("creating the delayed link");
    let listen = format!("{}:7400", link.dest_ip);
    let listener = {
        let listen = listen.clone();
        in_namespace(&link.dest_ns, move || Ok(TcpListener::bind(&listen)?)).unwrap()
    };
    let server = std::thread::spawn(move || -> std::io::Result<[u8; 32]> {
        let (mut stream, _) = listener.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut received = Vec::with_capacity(BYTES);
        stream.read_to_end(&mut received)?;
        let hash = *blake3::hash(&received).as_bytes();
        stream.write_all(&hash)?;
        Ok(hash)
    });
    let data: Vec<u8> = (0..BYTES).map(|i| (i * 7 + i / 4096) as u8).collect();
    let expected = *blake3::hash(&data).as_bytes();
    let (connect, transfer, answer) = in_namespace(&link.source_ns, move || {
        let started = Instant::now();
        let mut stream = TcpStream::connect(&listen)?;
        let connect = started.elapsed();
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let started = Instant::now();
        stream.write_all(&data)?;
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut answer = [0u8; 32];
        stream.read_exact(&mut answer)?;
        Ok((connect, started.elapsed(), answer))
    })
    .expect("the transfer across the link");
    let received = server.join().unwrap().expect("the receiving end");
    let (packets, dropped) = link.delayed_packets().unwrap();
    let mbit_s = BYTES as f64 * 8.0 / transfer.as_secs_f64() / 1e6;
    eprintln!(
        "connect {connect:?}, {BYTES} bytes in {transfer:?} ({mbit_s:.1} Mbit/s), \
         {packets} packets delayed, {dropped} dropped"
    );
    assert_eq!(received, expected, "the bytes arrived changed");
    assert_eq!(answer, expected);
    // SYN and SYN-ACK each wait half the round trip.
    assert!(
        connect >= Duration::from_millis(RTT_MS.into()),
        "{connect:?}"
    );
    // tbf lets at most its bucket (10 ms of traffic, ≥ 64 KiB) through
    // above the rate; the answer adds one more round trip.
    let bucket = (u64::from(MBIT) * 125_000 / 100).max(64 << 10) as f64;
    let at_rate = (BYTES as f64 - bucket) / (f64::from(MBIT) * 125_000.0);
    assert!(
        transfer.as_secs_f64() >= at_rate,
        "{transfer:?} < {at_rate} s"
    );
    assert!(packets > (BYTES / 1500) as u64);
}
