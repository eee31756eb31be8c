//! A user-space packet delayer: the round-trip time of a WAN, which this
//! kernel cannot add itself (no `netem`). Each of two network namespaces
//! gets a TUN device; a thread per direction reads the IP packets one
//! namespace's kernel sends out of its device, holds each for half the
//! round trip, and writes it into the other namespace's device. The
//! endpoints are ordinary kernel TCP sockets, so the window, slow start and
//! retransmissions behave as across a real WAN; the rate is shaped by `tc
//! tbf` on each TUN device, as on the veth links.
//!
//! The queue of each direction is bounded (like a router's): a packet
//! arriving when it is full is dropped, and TCP recovers as on a WAN.

use std::{
    collections::VecDeque,
    fs::File,
    io::{Read as _, Write as _},
    os::fd::AsFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// Bytes a direction holds in flight before it drops (far above the
/// bandwidth-delay product of the links the tests use: 100 Mbit/s × 25 ms
/// is 312 KiB).
const QUEUE_BYTES: usize = 16 << 20;
/// Larger than any packet a TUN device with a 64 KiB MTU can give.
const PACKET_MAX: usize = 65_536;

/// What a delayer did, for the test that checks it.
#[derive(Debug, Default)]
pub struct DelayCounters {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    pub dropped: AtomicU64,
}

/// Two forwarding threads between two TUN devices; stopped on drop.
pub struct Delayer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub counters: Arc<DelayCounters>,
}

impl Delayer {
    /// Forwards packets between `a` and `b`, each held `one_way` before it
    /// is delivered.
    pub fn start(a: File, b: File, one_way: Duration) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(DelayCounters::default());
        let a = Arc::new(a);
        let b = Arc::new(b);
        let mut threads = Vec::new();
        for (from, to, name) in [(a.clone(), b.clone(), "delay a->b"), (b, a, "delay b->a")] {
            let stop = stop.clone();
            let counters = counters.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(name.into())
                    .spawn(move || forward(&from, &to, one_way, &stop, &counters))
                    .context("starting a packet delay thread")?,
            );
        }
        Ok(Self {
            stop,
            threads,
            counters,
        })
    }
}

impl Drop for Delayer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// One direction: read what `from` gives, write it to `to` `delay` later,
/// in order.
fn forward(from: &File, to: &File, delay: Duration, stop: &AtomicBool, counters: &DelayCounters) {
    let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut queued = 0usize;
    let mut buffer = vec![0u8; PACKET_MAX];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        while queue.front().is_some_and(|(due, _)| *due <= now) {
            let Some((_, packet)) = queue.pop_front() else {
                break;
            };
            queued -= packet.len();
            // A TUN write delivers one packet; an error drops it, as a
            // link would.
            if (&*to).write(&packet).is_ok() {
                counters.packets.fetch_add(1, Ordering::Relaxed);
                counters
                    .bytes
                    .fetch_add(packet.len() as u64, Ordering::Relaxed);
            } else {
                counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Wake for the next packet due, or to look at `stop`.
        let wait = queue
            .front()
            .map_or(Duration::from_millis(50), |(due, _)| {
                due.saturating_duration_since(Instant::now())
            })
            .min(Duration::from_millis(50));
        let wait_ms = u16::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(50);
        let mut fds = [PollFd::new(from.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(wait_ms)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(_) => return,
        }
        let Ok(length) = (&*from).read(&mut buffer) else {
            return;
        };
        if queued + length > QUEUE_BYTES {
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        queued += length;
        queue.push_back((Instant::now() + delay, buffer[..length].to_vec()));
    }
}
