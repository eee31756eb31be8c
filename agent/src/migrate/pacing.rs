//! A bandwidth limit for the migration stream, like QEMU's `max-bandwidth`:
//! a token bucket in front of the socket.

use std::{
    io::{self, Write},
    time::{Duration, Instant},
};

/// Bytes that may go out at once after an idle spell.
const BURST: f64 = 256.0 * 1024.0;

pub struct Paced<W: Write> {
    inner: W,
    /// Bytes per second; `None`: unlimited.
    rate: Option<f64>,
    tokens: f64,
    last: Instant,
}

impl<W: Write> Paced<W> {
    pub fn new(inner: W, bytes_per_sec: Option<u64>) -> Self {
        Self {
            inner,
            rate: bytes_per_sec.map(|r| r.max(1) as f64),
            tokens: BURST,
            last: Instant::now(),
        }
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    fn wait_for(&mut self, bytes: usize) {
        let Some(rate) = self.rate else { return };
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(BURST);
        self.last = now;
        self.tokens -= bytes as f64;
        if self.tokens < 0.0 {
            std::thread::sleep(Duration::from_secs_f64(-self.tokens / rate));
        }
    }
}

impl<W: Write> Write for Paced<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Pace in bucket-sized steps so one large frame is spread out too.
        let chunk = buf.len().min(64 * 1024);
        self.wait_for(chunk);
        let written = self.inner.write(&buf[..chunk])?;
        if written < chunk && self.rate.is_some() {
            self.tokens += (chunk - written) as f64;
        }
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_spreads_writes_over_time() {
        let mut paced = Paced::new(Vec::new(), Some(4 << 20));
        let start = Instant::now();
        paced.write_all(&vec![0u8; 256 * 1024 + (1 << 20)]).unwrap();
        // 256 KiB of burst, then 1 MiB at 4 MiB/s: about 250 ms.
        assert!(start.elapsed() >= Duration::from_millis(200));
        assert_eq!(paced.get_ref().len(), 256 * 1024 + (1 << 20));
    }
}
