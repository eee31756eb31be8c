//! Whether a frame of full pages is worth compressing (`--zstd auto`, the
//! default of `templates+zstd`).
//!
//! Compressing pays when the link, not the CPU, limits the migration: with
//! `threads` encoding threads compressing at `z` raw bytes per second each
//! to a ratio `r`, the pages flow at min(threads·z, link / r) raw bytes per
//! second; raw, at `link`. So a frame is compressed when threads·z and
//! link / r both beat the link by a margin. The link's rate is what the
//! sending thread sees: bytes written per second spent writing (writes
//! block when the link or the pacing is the limit). The compressor's rate
//! and ratio are measured on the frames it compresses, and one frame in
//! [`SAMPLE_EVERY`] is compressed anyway so that they stay current.

use std::sync::{
    Mutex,
    atomic::{AtomicU64, Ordering},
};

use serde::{Deserialize, Serialize};

/// When full-page frames are compressed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ZstdPolicy {
    /// When it saves more link time than it costs CPU, measured as it runs.
    #[default]
    Auto,
    /// Every frame.
    Always,
}

/// One frame in this many is compressed whatever the estimate says.
pub const SAMPLE_EVERY: u64 = 16;
/// Bytes of writes the sender adds up before it reports the link's rate.
pub const LINK_SAMPLE_BYTES: usize = 4 << 20;
/// Compression must beat the link by this factor.
const MARGIN: f64 = 1.2;
/// Weight of a new measurement in the running estimates.
const WEIGHT: f64 = 0.2;

#[derive(Debug, Default)]
struct Estimates {
    /// Raw bytes per second one thread compresses.
    zstd_rate: Option<f64>,
    /// Compressed ÷ raw size.
    ratio: Option<f64>,
    /// Bytes per second the link took.
    link_rate: Option<f64>,
}

fn blend(old: Option<f64>, new: f64) -> Option<f64> {
    Some(old.map_or(new, |old| old + WEIGHT * (new - old)))
}

/// The running estimates, shared by the encoding threads and the sending
/// thread.
#[derive(Debug)]
pub struct Gauge {
    policy: ZstdPolicy,
    threads: f64,
    estimates: Mutex<Estimates>,
    frames: AtomicU64,
    compressed: AtomicU64,
}

impl Gauge {
    pub fn new(policy: ZstdPolicy, threads: usize) -> Self {
        Self {
            policy,
            threads: threads.max(1) as f64,
            estimates: Mutex::new(Estimates::default()),
            frames: AtomicU64::new(0),
            compressed: AtomicU64::new(0),
        }
    }

    /// The estimates; a thread that panicked while updating them left
    /// numbers, never a broken state, so a poisoned lock is taken as is.
    fn estimates(&self) -> std::sync::MutexGuard<'_, Estimates> {
        self.estimates
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether to compress the next frame.
    pub fn should_compress(&self) -> bool {
        let frame = self.frames.fetch_add(1, Ordering::Relaxed);
        if self.policy == ZstdPolicy::Always || frame.is_multiple_of(SAMPLE_EVERY) {
            return true;
        }
        let e = self.estimates();
        match (e.zstd_rate, e.ratio, e.link_rate) {
            (Some(zstd), Some(ratio), Some(link)) => {
                self.threads * zstd > MARGIN * link && ratio * MARGIN < 1.0
            }
            // Nothing measured yet: compress, and measure.
            _ => true,
        }
    }

    /// A frame of `raw` bytes compressed to `compressed` in `cpu_ns` of
    /// the thread's CPU time.
    pub fn compressed(&self, raw: usize, compressed: usize, cpu_ns: u64) {
        self.compressed.fetch_add(1, Ordering::Relaxed);
        if raw == 0 || cpu_ns == 0 {
            return;
        }
        let mut e = self.estimates();
        e.zstd_rate = blend(e.zstd_rate, raw as f64 / (cpu_ns as f64 / 1e9));
        e.ratio = blend(e.ratio, compressed as f64 / raw as f64);
    }

    /// The sending thread wrote `bytes` in `wall_ns`.
    pub fn wrote(&self, bytes: usize, wall_ns: u64) {
        if bytes < 1 << 20 || wall_ns == 0 {
            // Less than a socket buffer says nothing of the link: the
            // sender adds writes up to [`LINK_SAMPLE_BYTES`].
            return;
        }
        let mut e = self.estimates();
        e.link_rate = blend(e.link_rate, bytes as f64 / (wall_ns as f64 / 1e9));
    }

    /// What was chosen, for the report.
    pub fn describe(&self) -> String {
        let e = self.estimates();
        let mb = |v: Option<f64>| v.map_or("?".to_owned(), |v| format!("{:.0}", v / 1e6));
        format!(
            "{:?}: {} of {} full-page frames compressed (link {} MB/s, zstd {} MB/s per thread x {}, ratio {})",
            self.policy,
            self.compressed.load(Ordering::Relaxed),
            self.frames.load(Ordering::Relaxed),
            mb(e.link_rate),
            mb(e.zstd_rate),
            self.threads,
            e.ratio.map_or("?".to_owned(), |r| format!("{r:.2}")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(gauge: &Gauge, zstd_mb: f64, ratio: f64, link_mb: f64) {
        let raw = 256 << 10;
        for _ in 0..50 {
            let ns = (raw as f64 / (zstd_mb * 1e6) * 1e9) as u64;
            gauge.compressed(raw, (raw as f64 * ratio) as usize, ns);
            let sample = LINK_SAMPLE_BYTES;
            gauge.wrote(sample, (sample as f64 / (link_mb * 1e6) * 1e9) as u64);
        }
    }

    fn share_compressed(gauge: &Gauge) -> f64 {
        let n = 160;
        (0..n).filter(|_| gauge.should_compress()).count() as f64 / n as f64
    }

    #[test]
    fn a_slow_link_gets_compressed_frames() {
        let gauge = Gauge::new(ZstdPolicy::Auto, 1);
        measured(&gauge, 300.0, 0.4, 12.0);
        assert_eq!(share_compressed(&gauge), 1.0);
    }

    #[test]
    fn a_fast_link_gets_raw_frames_but_samples() {
        let gauge = Gauge::new(ZstdPolicy::Auto, 1);
        measured(&gauge, 300.0, 0.4, 1200.0);
        let share = share_compressed(&gauge);
        assert!((share - 1.0 / SAMPLE_EVERY as f64).abs() < 0.01, "{share}");
    }

    #[test]
    fn incompressible_pages_go_raw_and_more_threads_compress_more() {
        let gauge = Gauge::new(ZstdPolicy::Auto, 1);
        measured(&gauge, 300.0, 0.95, 12.0);
        assert!(share_compressed(&gauge) < 0.1);
        let gauge = Gauge::new(ZstdPolicy::Auto, 4);
        measured(&gauge, 300.0, 0.4, 500.0);
        assert_eq!(share_compressed(&gauge), 1.0);
    }

    #[test]
    fn always_compresses_every_frame() {
        let gauge = Gauge::new(ZstdPolicy::Always, 1);
        measured(&gauge, 300.0, 0.99, 1200.0);
        assert_eq!(share_compressed(&gauge), 1.0);
    }
}
