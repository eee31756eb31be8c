//! The network below both WAN protocols: connecting and accepting, TLS 1.3
//! with mutual authentication ([`tls`]), and the bounded duplex stream both
//! protocols run on ([`channel`]).

pub mod channel;
pub mod pki;
pub mod tls;

use std::{
    io::Read as _,
    net::{TcpListener, TcpStream, ToSocketAddrs as _},
    os::{
        fd::{AsFd as _, BorrowedFd},
        unix::net::UnixStream,
    },
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
pub use channel::{Channel, ChannelReader, ChannelWriter, Protection};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// The bounds of one migration's WAN connection, for every end.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct Timeouts {
    /// Longest wait for the peer to send or to take what is sent, in
    /// seconds: a peer that stalls longer fails the migration (before "go"
    /// the source VM keeps running).
    #[arg(long = "io-timeout-s", value_name = "S", default_value_t = DEFAULT_IO_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub io_timeout_s: u64,
    /// The whole migration must end within this many seconds of the
    /// connection, however the peer paces its bytes.
    #[arg(long = "deadline-s", value_name = "S", default_value_t = DEFAULT_DEADLINE.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    pub deadline_s: u64,
}

impl Timeouts {
    pub fn io_timeout(&self) -> Duration {
        Duration::from_secs(self.io_timeout_s)
    }

    pub fn deadline(&self) -> Duration {
        Duration::from_secs(self.deadline_s)
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            io_timeout_s: DEFAULT_IO_TIMEOUT.as_secs(),
            deadline_s: DEFAULT_DEADLINE.as_secs(),
        }
    }
}

/// Connections whose handshake may run at once; more wait in the backlog.
const MAX_HANDSHAKES: usize = 16;
/// Default overall deadline of one migration (`--deadline-s`): a peer that
/// drips bytes cannot hold either end longer.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(24 * 3600);
/// Default longest wait without progress (`--io-timeout-s`).
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for one TCP connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts one connection, giving up after `timeout` (none: wait forever).
pub fn accept_within(
    listener: &TcpListener,
    timeout: Option<Duration>,
) -> anyhow::Result<TcpStream> {
    let Some(timeout) = timeout else {
        return Ok(listener.accept()?.0);
    };
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if !wait_ready(&[listener.as_fd()], PollFlags::POLLIN, Some(deadline))? {
                    bail!("no connection within {} s", timeout.as_secs());
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Waits until one of `fds` is ready for `flags` (`true`) or `until`
/// passes (`false`; none: forever). A wakeup, not a sleep: a connection or
/// a byte is taken the moment it arrives.
pub(crate) fn wait_ready(
    fds: &[BorrowedFd<'_>],
    flags: PollFlags,
    until: Option<Instant>,
) -> std::io::Result<bool> {
    loop {
        let timeout = match until {
            None => PollTimeout::NONE,
            Some(until) => {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(false);
                }
                // Whole milliseconds, rounded up so a wait never spins.
                let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
            }
        };
        let mut polled: Vec<PollFd<'_>> = fds.iter().map(|fd| PollFd::new(*fd, flags)).collect();
        match poll(&mut polled, timeout) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => return Ok(true),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Connects to `to` (HOST:PORT) and secures the connection; retries a
/// refused connect for `retry_for` (a receiver that is still starting).
pub fn connect(to: &str, client: &tls::Client, retry_for: Duration) -> anyhow::Result<Channel> {
    client.secure(connect_tcp(to, retry_for)?, to)
}

/// A plain TCP connection to `to` (HOST:PORT), retried for `retry_for`
/// while it is refused (a peer that is still starting).
pub fn connect_tcp(to: &str, retry_for: Duration) -> anyhow::Result<TcpStream> {
    let give_up = Instant::now() + retry_for;
    loop {
        match connect_once(to) {
            Ok(tcp) => return Ok(tcp),
            Err(e) if Instant::now() < give_up => {
                log::debug!("{to} not ready: {e:#}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e),
        }
    }
}

fn connect_once(to: &str) -> anyhow::Result<TcpStream> {
    let addrs: Vec<_> = to
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {to:?}: give HOST:PORT"))?
        .collect();
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    bail!(
        "cannot connect to {to}: {}",
        last.map_or("no address".into(), |e| e.to_string())
    )
}

/// A listening socket that hands out only authenticated connections.
pub struct SecureListener {
    listener: TcpListener,
    server: tls::Server,
    in_flight: Arc<AtomicUsize>,
    done: mpsc::Receiver<(String, anyhow::Result<Channel>)>,
    done_tx: mpsc::Sender<(String, anyhow::Result<Channel>)>,
    /// A handshake thread writes a byte to `woken_by` when it sent its
    /// result: `accept` waits on `woken` and the listener together.
    woken: UnixStream,
    woken_by: Arc<UnixStream>,
}

impl SecureListener {
    pub fn bind(addr: &str, server: tls::Server) -> anyhow::Result<Self> {
        let listener =
            TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
        listener.set_nonblocking(true)?;
        let (done_tx, done) = mpsc::channel();
        let (woken, woken_by) =
            UnixStream::pair().context("creating the handshake threads' wakeup socket")?;
        woken.set_nonblocking(true)?;
        woken_by.set_nonblocking(true)?;
        Ok(Self {
            listener,
            server,
            in_flight: Arc::new(AtomicUsize::new(0)),
            done,
            done_tx,
            woken,
            woken_by: Arc::new(woken_by),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// The next connection that completes authentication, waiting until
    /// `deadline` (none: forever). Connections that fail it (no TLS, wrong
    /// CA, wrong name, silent) are dropped with a warning; their handshakes
    /// run side by side (up to [`MAX_HANDSHAKES`], each bounded by the
    /// handshake timeout), so a slow one does not hold up the genuine peer.
    pub fn accept(&self, deadline: Option<Instant>, waiting_for: &str) -> anyhow::Result<Channel> {
        loop {
            // Wakeups of finished handshakes; their results follow.
            let mut drained = [0u8; 64];
            while matches!((&self.woken).read(&mut drained), Ok(n) if n > 0) {}
            while let Ok((peer, result)) = self.done.try_recv() {
                match result {
                    Ok(channel) => {
                        log::info!("{peer} connected: {}", channel.protection.describe());
                        return Ok(channel);
                    }
                    Err(err) => log::warn!("refused a connection from {peer}: {err:#}"),
                }
            }
            let full = self.in_flight.load(Ordering::Relaxed) >= MAX_HANDSHAKES;
            let accepted = if full {
                // Later connections wait in the backlog, in order.
                Err(std::io::ErrorKind::WouldBlock.into())
            } else {
                self.listener.accept()
            };
            match accepted {
                Ok((tcp, addr)) => self.start_handshake(tcp, addr.to_string()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let woken = self.woken.as_fd();
                    let listener = self.listener.as_fd();
                    let fds: &[BorrowedFd<'_>] = if full { &[woken] } else { &[woken, listener] };
                    if !wait_ready(fds, PollFlags::POLLIN, deadline)? {
                        bail!("{waiting_for} did not connect and authenticate in time");
                    }
                }
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    log::warn!("accepting a connection failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn start_handshake(&self, tcp: TcpStream, peer: String) {
        if self.in_flight.load(Ordering::Relaxed) >= MAX_HANDSHAKES {
            log::warn!(
                "dropped a connection from {peer}: {MAX_HANDSHAKES} handshakes already running"
            );
            return;
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let (server, in_flight, done, wake) = (
            self.server.clone(),
            self.in_flight.clone(),
            self.done_tx.clone(),
            self.woken_by.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("tls-handshake".into())
            .spawn(move || {
                let result = server.secure(tcp, peer.clone());
                in_flight.fetch_sub(1, Ordering::Relaxed);
                let _ = done.send((peer, result));
                // Full only if `accept` has not drained it for 200 KiB of
                // wakeups: it is awake then anyway.
                let _ = std::io::Write::write(&mut &*wake, &[1]);
            });
        if let Err(e) = spawned {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            log::warn!("cannot start a handshake thread: {e}");
        }
    }
}

#[cfg(test)]
mod tests;
