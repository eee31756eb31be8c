//! The sender's per-page work, in parallel: reading guest memory, the zero
//! check, blake3, the template lookup and the compression of full-page
//! frames run on worker threads, batch by batch, while the sender's thread
//! writes the batches already done, in order. A worker reads a page into
//! its frame's buffer directly, hashes it there and (compression off) that
//! buffer is the frame's body: no other copy.
//!
//! Batches are handed to the workers round robin and taken back in the same
//! order, each worker holding at most [`IN_FLIGHT`] of them: memory stays
//! bounded and the order is the pages' order without a reorder buffer.

use std::collections::HashMap;

use anyhow::Context as _;
use crossbeam::channel;

use super::vm_memory::SourceMemory;
use crate::{
    compression::Gauge,
    content::{PageHash, TemplateId},
    page::is_zero_page,
    transport::migration::PagesBuilder,
};

/// Full pages per frame (256 KiB): compressed as one zstd frame.
pub const FULL_PAGES_PER_FRAME: usize = 64;
/// Pages per batch: four full-page frames.
const BATCH_PAGES: usize = 4 * FULL_PAGES_PER_FRAME;
/// Batches each worker may hold (queued and done) at once.
const IN_FLIGHT: usize = 2;

/// The agent's word on a page: its state was clean with this hash.
pub trait PageHints: Sync {
    fn clean_hash(&self, page: u32) -> Option<PageHash>;
}

/// What the workers need, shared read-only.
pub struct Encoder<'a, H: PageHints> {
    pub memory: &'a SourceMemory,
    pub hints: &'a H,
    /// Templates the destination offered, by id: empty when templates are off.
    pub offer: &'a HashMap<TemplateId, u32>,
    pub zero_hash: PageHash,
    /// zstd level for full-page frames, and when to use it; `None`: raw.
    pub zstd: Option<&'a Gauge>,
    pub threads: usize,
}

/// How one page travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Small {
    Zero(u32),
    Template { page: u32, index: u32 },
}

/// A frame of full pages, ready to write.
pub struct FullFrame {
    pub pages: u64,
    /// The body is zstd-compressed.
    pub zstd: bool,
    pub body: Vec<u8>,
}

/// One batch, encoded.
#[derive(Default)]
pub struct Batch {
    /// Each page of the batch with the content the destination will hold.
    pub held: Vec<(u32, PageHash)>,
    /// Zero and template pages, in page order.
    pub small: Vec<Small>,
    pub frames: Vec<FullFrame>,
}

impl<H: PageHints> Encoder<'_, H> {
    /// Encodes `pages` batch by batch and gives each batch to `write`, in
    /// order. The first error (of a worker or of `write`) stops the rest.
    pub fn run(
        &self,
        pages: &[u32],
        mut write: impl FnMut(Batch) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let batches: Vec<&[u32]> = pages.chunks(BATCH_PAGES).collect();
        let threads = self.threads.clamp(1, batches.len().max(1));
        std::thread::scope(|scope| {
            let mut inputs = Vec::with_capacity(threads);
            let mut outputs = Vec::with_capacity(threads);
            for worker in 0..threads {
                let (in_tx, in_rx) = channel::bounded::<&[u32]>(IN_FLIGHT);
                let (out_tx, out_rx) = channel::bounded(IN_FLIGHT);
                inputs.push(in_tx);
                outputs.push(out_rx);
                std::thread::Builder::new()
                    .name(format!("pagefp-encode-{worker}"))
                    .spawn_scoped(scope, move || {
                        for batch in in_rx {
                            if out_tx.send(self.encode(batch)).is_err() {
                                return;
                            }
                        }
                    })
                    .context("starting an encoding thread")?;
            }
            // Batch k goes to worker k % threads; at most IN_FLIGHT batches
            // per worker are handed out beyond the one being written.
            let mut handed = 0;
            for k in 0..batches.len() {
                while handed < batches.len() && handed < k + threads * IN_FLIGHT {
                    inputs[handed % threads]
                        .send(batches[handed])
                        .map_err(|_| anyhow::anyhow!("an encoding thread stopped"))?;
                    handed += 1;
                }
                let batch = outputs[k % threads]
                    .recv()
                    .map_err(|_| anyhow::anyhow!("an encoding thread stopped"))??;
                write(batch)?;
            }
            // Dropping the channels here ends the workers before the scope
            // joins them, on success and on error alike.
            Ok(())
        })
    }

    fn encode(&self, pages: &[u32]) -> anyhow::Result<Batch> {
        let mut batch = Batch {
            held: Vec::with_capacity(pages.len()),
            ..Batch::default()
        };
        let mut full = PagesBuilder::default();
        for &page in pages {
            // Clean pages the agent vouches for: zero and templates need no read.
            if let Some(hash) = self.hints.clean_hash(page) {
                if hash == self.zero_hash {
                    batch.held.push((page, hash));
                    batch.small.push(Small::Zero(page));
                    continue;
                }
                if let Some(&index) = self.offer.get(&hash) {
                    batch.held.push((page, hash));
                    batch.small.push(Small::Template { page, index });
                    continue;
                }
            }
            // Everything else is read (into the frame) and checked here.
            let data = full.full_in_place(page);
            self.memory.read(page, data)?;
            if is_zero_page(data) {
                full.pop_full();
                batch.held.push((page, self.zero_hash));
                batch.small.push(Small::Zero(page));
                continue;
            }
            let hash = *blake3::hash(data).as_bytes();
            batch.held.push((page, hash));
            if let Some(&index) = self.offer.get(&hash) {
                full.pop_full();
                batch.small.push(Small::Template { page, index });
            } else if full.records >= FULL_PAGES_PER_FRAME {
                batch.frames.push(self.frame(&mut full)?);
            }
        }
        if !full.is_empty() {
            batch.frames.push(self.frame(&mut full)?);
        }
        Ok(batch)
    }

    /// The frame of the full pages in `full` (then emptied): compressed if
    /// the gauge says it pays and it came out smaller.
    fn frame(&self, full: &mut PagesBuilder) -> anyhow::Result<FullFrame> {
        let pages = full.records as u64;
        if let Some(gauge) = self.zstd
            && let Some(body) = gauge.compress(&full.buf).context("compressing pages")?
            && body.len() < full.buf.len()
        {
            full.clear();
            return Ok(FullFrame {
                pages,
                zstd: true,
                body,
            });
        }
        let frame = FullFrame {
            pages,
            zstd: false,
            body: std::mem::take(&mut full.buf),
        };
        full.clear();
        Ok(frame)
    }
}
