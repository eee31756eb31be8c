//! Small TCP helpers shared by the migration receiver and the QEMU proxies.

use std::{
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::bail;

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
                if Instant::now() >= deadline {
                    bail!("no connection within {} s", timeout.as_secs());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e.into()),
        }
    }
}
