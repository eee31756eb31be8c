//! One authenticated, duplex byte stream to a WAN peer: TLS 1.3 over TCP,
//! or plain TCP when the operator asked for it by name. It splits into a
//! reader and a writer that can be used from different threads at once
//! (TLS state is shared under a lock that is never held while waiting for
//! the network), and both honour an idle timeout and an overall deadline, so
//! no read or write ever waits without a bound.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, TcpStream},
    os::fd::AsFd as _,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use nix::poll::PollFlags;

/// Plaintext the TLS session buffers before a write waits for the socket.
const TLS_BUFFER: usize = 1 << 20;

/// How the stream is protected, for logs and reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Protection {
    /// TLS 1.3 with a verified peer certificate.
    Tls {
        cipher: String,
        /// Names in the peer's certificate (CN first, then DNS SANs).
        peer_names: Vec<String>,
    },
    /// Plain TCP: `--insecure-plaintext` was given.
    InsecurePlaintext,
}

impl Protection {
    pub fn is_tls(&self) -> bool {
        matches!(self, Protection::Tls { .. })
    }

    /// One line for logs and reports.
    pub fn describe(&self) -> String {
        match self {
            Protection::Tls { cipher, peer_names } => format!(
                "TLS 1.3 {cipher}, peer certificate {}",
                peer_names.first().map_or("(no name)", String::as_str)
            ),
            Protection::InsecurePlaintext => {
                "INSECURE plain TCP (--insecure-plaintext): anyone on the path can read and forge guest memory".into()
            }
        }
    }
}

struct Shared {
    tcp: TcpStream,
    /// None: plain TCP.
    tls: Option<Mutex<rustls::Connection>>,
}

/// A connected, authenticated stream; [`Channel::split`] gives its halves.
pub struct Channel {
    shared: Arc<Shared>,
    pub peer: String,
    pub protection: Protection,
}

/// When a read or write gives up.
#[derive(Clone, Copy, Debug, Default)]
struct Limits {
    /// Longest wait without progress.
    idle: Option<Duration>,
    /// The last moment of any wait.
    deadline: Option<Instant>,
}

impl Limits {
    /// The deadline of a wait that starts now.
    fn wait_until(&self, started: Instant) -> Option<Instant> {
        let idle = self.idle.map(|idle| started + idle);
        match (idle, self.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

pub struct ChannelReader {
    shared: Arc<Shared>,
    limits: Limits,
}

pub struct ChannelWriter {
    shared: Arc<Shared>,
    limits: Limits,
}

impl Channel {
    /// Wraps a TCP stream whose TLS handshake (if any) is complete.
    pub(super) fn new(
        tcp: TcpStream,
        tls: Option<rustls::Connection>,
        peer: String,
        protection: Protection,
    ) -> io::Result<Self> {
        tcp.set_nonblocking(true)?;
        tcp.set_nodelay(true)?;
        if let Some(tls) = &tls {
            debug_assert!(!tls.is_handshaking());
        }
        Ok(Self {
            shared: Arc::new(Shared {
                tcp,
                tls: tls.map(|mut tls| {
                    tls.set_buffer_limit(Some(TLS_BUFFER));
                    Mutex::new(tls)
                }),
            }),
            peer,
            protection,
        })
    }

    /// The two halves, each with `idle` as its timeout.
    pub fn split(self, idle: Option<Duration>) -> (ChannelReader, ChannelWriter) {
        let limits = Limits {
            idle,
            deadline: None,
        };
        (
            ChannelReader {
                shared: self.shared.clone(),
                limits,
            },
            ChannelWriter {
                shared: self.shared,
                limits,
            },
        )
    }
}

impl ChannelReader {
    /// Longest wait for the peer's next bytes.
    pub fn set_idle_timeout(&mut self, idle: Option<Duration>) {
        self.limits.idle = idle;
    }

    /// No read waits past `deadline`.
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.limits.deadline = deadline;
    }
}

impl ChannelWriter {
    /// Longest wait for the peer to take more bytes.
    pub fn set_idle_timeout(&mut self, idle: Option<Duration>) {
        self.limits.idle = idle;
    }

    /// No write waits past `deadline`.
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.limits.deadline = deadline;
    }

    /// Ends this side's stream (TLS close_notify, then TCP FIN), best effort.
    pub fn finish(&mut self) {
        if let Some(tls) = &self.shared.tls {
            lock(tls).send_close_notify();
            let _ = self.flush();
        }
        let _ = self.shared.tcp.shutdown(Shutdown::Write);
    }
}

fn lock(tls: &Mutex<rustls::Connection>) -> MutexGuard<'_, rustls::Connection> {
    // A panic elsewhere while holding the lock leaves the session unusable
    // anyway; the next TLS call reports that.
    tls.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Waits until `tcp` is ready for `flags`, or fails with `TimedOut` at `until`.
pub(super) fn wait(tcp: &TcpStream, flags: PollFlags, until: Option<Instant>) -> io::Result<()> {
    if super::wait_ready(&[tcp.as_fd()], flags, until)? {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the peer made no progress within the timeout",
        ))
    }
}

/// A TLS failure as an I/O error that says what it means.
pub(super) fn tls_error(error: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, super::tls::explain(&error))
}

/// What [`send_queued`] did.
pub(super) struct Sent {
    /// Some bytes went out.
    pub progress: bool,
    /// Some are still queued (the socket is full).
    pub left: bool,
}

/// Sends what TLS has queued, without waiting.
pub(super) fn send_queued(conn: &mut rustls::Connection, tcp: &TcpStream) -> io::Result<Sent> {
    let mut progress = false;
    while conn.wants_write() {
        match conn.write_tls(&mut &*tcp) {
            Ok(_) => progress = true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Ok(Sent {
                    progress,
                    left: true,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Sent {
        progress,
        left: false,
    })
}

/// Reads what TCP has for TLS, without waiting: `Ok(false)` if nothing yet.
pub(super) fn receive_available(
    conn: &mut rustls::Connection,
    tcp: &TcpStream,
) -> io::Result<bool> {
    match conn.read_tls(&mut &*tcp) {
        Ok(n) => {
            let processed = conn.process_new_packets();
            // An alert for the peer (bad record, bad certificate...).
            let _ = send_queued(conn, tcp);
            processed.map_err(tls_error)?;
            if n == 0 && conn.is_handshaking() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection during the TLS handshake",
                ));
            }
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
        Err(e) => Err(e),
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let tcp = &self.shared.tcp;
        let until = self.limits.wait_until(Instant::now());
        loop {
            match &self.shared.tls {
                None => match (&*tcp).read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => return other,
                },
                Some(tls) => {
                    let mut conn = lock(tls);
                    match conn.reader().read(buf) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                            // TCP closed without TLS close_notify: a cut
                            // connection or a truncation attack.
                            return Ok(0);
                        }
                        other => return other,
                    }
                    if receive_available(&mut conn, tcp)? {
                        continue;
                    }
                }
            }
            wait(tcp, PollFlags::POLLIN, until)?;
        }
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let tcp = &self.shared.tcp;
        let until = self.limits.wait_until(Instant::now());
        loop {
            match &self.shared.tls {
                None => match (&*tcp).write(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => return other,
                },
                Some(tls) => {
                    let mut conn = lock(tls);
                    let taken = conn.writer().write(buf)?;
                    send_queued(&mut conn, tcp)?;
                    if taken > 0 {
                        return Ok(taken);
                    }
                }
            }
            wait(tcp, PollFlags::POLLOUT, until)?;
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        let Some(tls) = &self.shared.tls else {
            return Ok(());
        };
        let tcp = &self.shared.tcp;
        let mut until = self.limits.wait_until(Instant::now());
        loop {
            let sent = send_queued(&mut lock(tls), tcp)?;
            if !sent.left {
                return Ok(());
            }
            if sent.progress {
                until = self.limits.wait_until(Instant::now());
            }
            wait(tcp, PollFlags::POLLOUT, until)?;
        }
    }
}
