//! Whether a frame of pages is worth compressing, and at which zstd level
//! (`--zstd auto`: the default of `migrate send`'s `templates+zstd` for its
//! full-page frames, and of `qemu-proxy send` for its chunks).
//!
//! Compressing pays when the link, not the CPU, limits the migration: with
//! `threads` encoding threads compressing at `z` raw bytes per second each
//! to a ratio `r`, the pages flow at min(threads·z, link / r) raw bytes per
//! second; raw, at `link`. So a frame is compressed when threads·z and
//! link / r both beat the link by a margin, at the level (the configured
//! one, or one of zstd's faster ones down to -5) for which that minimum is
//! largest: a fast link gets a fast level. The link's rate is what the
//! sending thread sees: bytes written per second spent writing (writes
//! block when the link or the pacing is the limit). The compressor's rate
//! and ratio are measured per level on the frames it compresses, and one
//! frame in [`SAMPLE_EVERY`] is compressed anyway, at each level in turn,
//! so that they stay current.

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

/// Levels tried besides the configured one: zstd's fast negative levels
/// trade ratio for speed, which pays on fast links.
const FAST_LEVELS: [i32; 3] = [1, -1, -5];

/// What one level does here.
#[derive(Debug)]
struct Level {
    level: i32,
    /// Raw bytes per second one thread compresses.
    rate: Option<f64>,
    /// Compressed ÷ raw size.
    ratio: Option<f64>,
    /// Frames compressed at this level.
    frames: u64,
}

#[derive(Debug, Default)]
struct Estimates {
    /// Strongest first.
    levels: Vec<Level>,
    /// Seconds the link took per byte, averaged over time (not over
    /// rates: a migration's first sample, which the socket buffers take at
    /// memory speed, would otherwise hide a slow link for dozens of
    /// samples).
    link_cost: Option<f64>,
}

impl Estimates {
    /// Bytes per second the link takes.
    fn link_rate(&self) -> Option<f64> {
        self.link_cost.map(|cost| 1.0 / cost)
    }
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
    /// The configured level (`--zstd-level`): what `always` uses.
    level: i32,
    estimates: Mutex<Estimates>,
    frames: AtomicU64,
    compressed: AtomicU64,
}

impl Gauge {
    /// `level` is the strongest level `auto` uses (and the one `always`
    /// uses); `auto` also tries the faster ones below it.
    pub fn new(policy: ZstdPolicy, threads: usize, level: i32) -> Self {
        let mut levels: Vec<i32> = std::iter::once(level)
            .chain(FAST_LEVELS.into_iter().filter(|fast| *fast < level))
            .collect();
        levels.dedup();
        Self {
            policy,
            threads: threads.max(1) as f64,
            level,
            estimates: Mutex::new(Estimates {
                levels: levels
                    .into_iter()
                    .map(|level| Level {
                        level,
                        rate: None,
                        ratio: None,
                        frames: 0,
                    })
                    .collect(),
                link_cost: None,
            }),
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

    /// The level to compress the next frame at, or `None` to send it raw.
    /// `auto` picks the level whose pages reach the destination fastest,
    /// min(threads × its rate, link ÷ its ratio), if that beats the link
    /// itself by the margin (the fastest level until the link's rate is
    /// known); every level is tried now and then so that its figures stay
    /// current.
    pub fn choose(&self) -> Option<i32> {
        let frame = self.frames.fetch_add(1, Ordering::Relaxed);
        if self.policy == ZstdPolicy::Always {
            return Some(self.level);
        }
        let e = self.estimates();
        if frame.is_multiple_of(SAMPLE_EVERY) {
            let turn = (frame / SAMPLE_EVERY) as usize % e.levels.len();
            return Some(e.levels[turn].level);
        }
        // Each level measured once before choosing.
        if let Some(unmeasured) = e.levels.iter().find(|l| l.rate.is_none()) {
            return Some(unmeasured.level);
        }
        // Nothing known of the link yet: the fastest level, which costs
        // least if the link turns out fast and still saves bytes if slow
        // (the strongest level here once took most of a fast migration's
        // CPU before the link had been measured).
        let Some(link) = e.link_rate() else {
            return e.levels.last().map(|l| l.level);
        };
        e.levels
            .iter()
            .filter_map(|l| Some((l.level, (self.threads * l.rate?).min(link / l.ratio?))))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .filter(|(_, delivered)| *delivered > MARGIN * link)
            .map(|(level, _)| level)
    }

    /// A frame of `raw` bytes compressed at `level` to `compressed` in
    /// `cpu_ns` of the thread's CPU time.
    pub fn compressed(&self, level: i32, raw: usize, compressed: usize, cpu_ns: u64) {
        self.compressed.fetch_add(1, Ordering::Relaxed);
        let mut e = self.estimates();
        let Some(entry) = e.levels.iter_mut().find(|l| l.level == level) else {
            return;
        };
        entry.frames += 1;
        if raw == 0 || cpu_ns == 0 {
            return;
        }
        entry.rate = blend(entry.rate, raw as f64 / (cpu_ns as f64 / 1e9));
        entry.ratio = blend(entry.ratio, compressed as f64 / raw as f64);
    }

    /// `raw` compressed at the level [`Gauge::choose`] picks, the time it
    /// took measured for the estimates; `None` when raw is the choice.
    pub fn compress(&self, raw: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
        let Some(level) = self.choose() else {
            return Ok(None);
        };
        let started = crate::clock::thread_cpu_ns();
        let compressed = compress_here(raw, level)?;
        let cpu_ns = crate::clock::thread_cpu_ns().saturating_sub(started);
        self.compressed(level, raw.len(), compressed.len(), cpu_ns);
        Ok(Some(compressed))
    }

    /// The sending thread wrote `bytes` in `wall_ns`.
    pub fn wrote(&self, bytes: usize, wall_ns: u64) {
        if bytes < 1 << 20 || wall_ns == 0 {
            // Less than a socket buffer says nothing of the link: the
            // sender adds writes up to [`LINK_SAMPLE_BYTES`].
            return;
        }
        let mut e = self.estimates();
        e.link_cost = blend(e.link_cost, (wall_ns as f64 / 1e9) / bytes as f64);
    }

    /// Frames compressed, and frames the gauge was asked about.
    pub fn frames(&self) -> (u64, u64) {
        (
            self.compressed.load(Ordering::Relaxed),
            self.frames.load(Ordering::Relaxed),
        )
    }

    /// What was chosen, for the report.
    pub fn describe(&self) -> String {
        let e = self.estimates();
        let mb = |v: Option<f64>| v.map_or("?".to_owned(), |v| format!("{:.0}", v / 1e6));
        let levels: Vec<String> = e
            .levels
            .iter()
            .map(|l| {
                format!(
                    "level {}: {} frames, {} MB/s per thread, ratio {}",
                    l.level,
                    l.frames,
                    mb(l.rate),
                    l.ratio.map_or("?".to_owned(), |r| format!("{r:.2}"))
                )
            })
            .collect();
        let (compressed, frames) = self.frames();
        format!(
            "{:?}: {compressed} of {frames} full-page frames compressed (link {} MB/s, {} threads; {})",
            self.policy,
            mb(e.link_rate()),
            self.threads,
            levels.join("; "),
        )
    }
}

thread_local! {
    /// This thread's zstd context, kept from frame to frame: a fresh one
    /// per frame allocated (and faulted in) its tables every 256 KiB.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// `raw` compressed at `level` with this thread's context.
fn compress_here(raw: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with_borrow_mut(|kept| {
        let compressor = match kept {
            Some(compressor) => {
                compressor.set_compression_level(level)?;
                compressor
            }
            None => kept.insert(zstd::bulk::Compressor::new(level)?),
        };
        compressor.compress(raw)
    })
}

/// Frame writes the gauge has not heard of yet: the sending thread adds
/// each one up and tells the gauge every [`LINK_SAMPLE_BYTES`].
#[derive(Debug, Default)]
pub struct LinkSample {
    bytes: usize,
    ns: u64,
}

impl LinkSample {
    /// A frame of `bytes` was written in `ns`.
    pub fn add(&mut self, gauge: &Gauge, bytes: usize, ns: u64) {
        self.bytes += bytes;
        self.ns += ns;
        if self.bytes >= LINK_SAMPLE_BYTES {
            gauge.wrote(self.bytes, self.ns);
            *self = Self::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames compressed at `level` at `zstd_mb` MB/s to `ratio`, and the
    /// link taking `link_mb` MB/s.
    fn measured(gauge: &Gauge, level: i32, zstd_mb: f64, ratio: f64, link_mb: f64) {
        let raw = 256 << 10;
        for _ in 0..50 {
            let ns = (raw as f64 / (zstd_mb * 1e6) * 1e9) as u64;
            gauge.compressed(level, raw, (raw as f64 * ratio) as usize, ns);
            let sample = LINK_SAMPLE_BYTES;
            gauge.wrote(sample, (sample as f64 / (link_mb * 1e6) * 1e9) as u64);
        }
    }

    /// Every level measured alike.
    fn all_levels(gauge: &Gauge, zstd_mb: f64, ratio: f64, link_mb: f64) {
        for level in [3, 1, -1, -5] {
            measured(gauge, level, zstd_mb, ratio, link_mb);
        }
    }

    /// How often each choice was made over 160 frames.
    fn choices(gauge: &Gauge) -> std::collections::HashMap<Option<i32>, usize> {
        let mut counts = std::collections::HashMap::new();
        for _ in 0..160 {
            *counts.entry(gauge.choose()).or_default() += 1;
        }
        counts
    }

    fn share_compressed(gauge: &Gauge) -> f64 {
        let counts = choices(gauge);
        1.0 - *counts.get(&None).unwrap_or(&0) as f64 / 160.0
    }

    #[test]
    fn the_ladder_runs_from_the_configured_level_down() {
        let levels = |level| {
            let gauge = Gauge::new(ZstdPolicy::Auto, 1, level);
            let e = gauge.estimates();
            e.levels.iter().map(|l| l.level).collect::<Vec<_>>()
        };
        assert_eq!(levels(3), [3, 1, -1, -5]);
        assert_eq!(levels(1), [1, -1, -5]);
        assert_eq!(levels(-3), [-3, -5]);
    }

    #[test]
    fn a_slow_link_gets_the_strongest_level() {
        let gauge = Gauge::new(ZstdPolicy::Auto, 1, 3);
        measured(&gauge, 3, 300.0, 0.4, 12.0);
        for fast in [1, -1, -5] {
            measured(&gauge, fast, 1500.0, 0.6, 12.0);
        }
        let counts = choices(&gauge);
        assert!(counts[&Some(3)] > 140, "{counts:?}");
        assert!(!counts.contains_key(&None));
    }

    #[test]
    fn a_fast_link_gets_a_fast_level() {
        let gauge = Gauge::new(ZstdPolicy::Auto, 1, 3);
        // Level 3 cannot keep up with 600 MB/s; level -5 can and still
        // halves the bytes.
        measured(&gauge, 3, 300.0, 0.4, 600.0);
        measured(&gauge, 1, 500.0, 0.45, 600.0);
        measured(&gauge, -1, 900.0, 0.5, 600.0);
        measured(&gauge, -5, 1500.0, 0.6, 600.0);
        let counts = choices(&gauge);
        assert!(counts[&Some(-5)] > 140, "{counts:?}");
    }

    #[test]
    fn a_faster_link_gets_raw_frames_but_samples() {
        let gauge = Gauge::new(ZstdPolicy::Auto, 1, 3);
        all_levels(&gauge, 300.0, 0.4, 1200.0);
        let share = share_compressed(&gauge);
        assert!((share - 1.0 / SAMPLE_EVERY as f64).abs() < 0.01, "{share}");
    }

    #[test]
    fn incompressible_pages_go_raw_and_more_threads_compress_more() {
        let gauge = Gauge::new(ZstdPolicy::Auto, 1, 3);
        all_levels(&gauge, 300.0, 0.95, 12.0);
        assert!(share_compressed(&gauge) < 0.1);
        let gauge = Gauge::new(ZstdPolicy::Auto, 4, 3);
        all_levels(&gauge, 300.0, 0.4, 500.0);
        assert_eq!(share_compressed(&gauge), 1.0);
    }

    #[test]
    fn each_level_is_measured_before_choosing() {
        let gauge = Gauge::new(ZstdPolicy::Auto, 1, 3);
        let first: Vec<Option<i32>> = (0..5).map(|_| gauge.choose()).collect();
        // Frame 0 samples the first level; nothing is measured yet, so
        // the others come first when unmeasured.
        assert_eq!(first, [Some(3), Some(3), Some(3), Some(3), Some(3)]);
        measured(&gauge, 3, 300.0, 0.4, 12.0);
        assert_eq!(gauge.choose(), Some(1));
    }

    #[test]
    fn until_the_link_is_measured_the_fastest_level_is_used() {
        let gauge = Gauge::new(ZstdPolicy::Auto, 1, 3);
        for level in [3, 1, -1, -5] {
            gauge.compressed(level, 256 << 10, 100 << 10, 1_000_000);
        }
        let counts = choices(&gauge);
        // Every frame but the samples (which go through the levels in
        // turn) is at -5, none raw.
        let samples = 160 / SAMPLE_EVERY as usize;
        assert!(counts[&Some(-5)] >= 160 - samples, "{counts:?}");
        assert!(!counts.contains_key(&None), "{counts:?}");
    }

    /// A migration's first sample goes into empty socket buffers at memory
    /// speed; three samples at the link's real 12 MB/s must outweigh it.
    #[test]
    fn a_fast_first_sample_does_not_hide_a_slow_link() {
        let gauge = Gauge::new(ZstdPolicy::Auto, 1, 3);
        for level in [3, 1, -1, -5] {
            gauge.compressed(level, 1 << 20, 1 << 19, 3_000_000);
        }
        let sample = LINK_SAMPLE_BYTES;
        gauge.wrote(sample, (sample as f64 / 1e9 * 1e9) as u64);
        assert!(share_compressed(&gauge) < 0.1, "a 1 GB/s link: raw");
        for _ in 0..3 {
            gauge.wrote(sample, (sample as f64 / 12e6 * 1e9) as u64);
        }
        assert!(share_compressed(&gauge) > 0.9, "{}", gauge.describe());
    }

    #[test]
    fn always_compresses_every_frame_at_the_configured_level() {
        let gauge = Gauge::new(ZstdPolicy::Always, 1, 7);
        all_levels(&gauge, 300.0, 0.99, 1200.0);
        let counts = choices(&gauge);
        assert_eq!(counts[&Some(7)], 160);
    }
}
