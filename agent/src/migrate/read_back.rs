//! The destination's read-back: the digest of every chunk of its memory,
//! read from the memory the VMM will run, after the last write into the
//! chunk (the Verify check compares them with the source's).
//!
//! Chunks are read on a thread of their own while pages still arrive, from
//! a second, read-only mapping of the same files, so that little is left
//! to read while the VM is paused. The main thread, which does every write,
//! keeps the book ([`ChunkDigests`]): each write into a chunk forgets its
//! digest and bumps its generation; a chunk is asked for at its current
//! generation, between writes; an answer is taken only if the generation
//! is still the one asked for. Every write issued before the question
//! completed before it (the main thread writes, then asks), and none came
//! after, so the digest taken is that of the chunk as it is.

use std::{
    collections::VecDeque,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use crossbeam::channel::{Receiver, Sender, TryRecvError};

use super::{
    digest::{DigestKey, chunk_digest},
    vm_memory::SourceMemory,
};
use crate::page::PAGE_SIZE;

/// A chunk written less than this long ago is not read yet during a
/// round: more of its pages are likely on the way.
pub const QUIET: Duration = Duration::from_millis(30);
/// Chunks asked for at a time during a round (at a round's end, all).
pub const IN_FLIGHT: usize = 2;

/// Every chunk's digest as read back after the last write into it.
pub struct ChunkDigests {
    pub chunk_pages: u32,
    /// `None`: not read since it was last written.
    pub digests: Vec<Option<[u8; 32]>>,
    /// Bumped by every write into the chunk.
    generations: Vec<u64>,
    /// When the chunk was last written.
    written: Vec<Option<Instant>>,
    /// The generation the chunk was asked for at, if it was.
    asked: Vec<Option<u64>>,
    /// Chunks to read, in the order of their first write since they were
    /// last taken from here (every chunk at first); `queued` marks them.
    pending: VecDeque<u32>,
    queued: Vec<bool>,
    /// The chunk of the last page of the latest write.
    front: u32,
    /// Answers dropped because the chunk was written after the question.
    pub discarded: u64,
}

impl ChunkDigests {
    pub fn new(total_pages: u64, chunk_pages: u32) -> Self {
        let chunk_pages = chunk_pages.max(1);
        let chunks = total_pages.div_ceil(u64::from(chunk_pages)) as usize;
        Self {
            chunk_pages,
            digests: vec![None; chunks],
            generations: vec![0; chunks],
            written: vec![None; chunks],
            asked: vec![None; chunks],
            pending: (0..chunks as u32).collect(),
            queued: vec![true; chunks],
            front: 0,
            discarded: 0,
        }
    }

    /// Pages `[first, first + count)` are about to be written: their
    /// chunks' digests must be read again.
    pub fn forget(&mut self, first: u32, count: u32) {
        if count == 0 {
            return;
        }
        let now = Instant::now();
        let last = first.saturating_add(count - 1);
        self.front = last / self.chunk_pages;
        for chunk in first / self.chunk_pages..=last / self.chunk_pages {
            let index = chunk as usize;
            // Beyond the memory: the write is refused.
            if index >= self.digests.len() {
                break;
            }
            self.digests[index] = None;
            self.generations[index] += 1;
            self.written[index] = Some(now);
            if !self.queued[index] {
                self.queued[index] = true;
                self.pending.push_back(chunk);
            }
        }
    }

    /// Chunks not read since their last write.
    pub fn missing(&self) -> usize {
        self.digests.iter().filter(|d| d.is_none()).count()
    }

    /// Up to `limit` chunks to ask for now, with their generations: not
    /// read since their last write, not asked for since, and either not
    /// written in the last `quiet` or passed by the writes (the latest
    /// one lies two chunks or more beyond). Taken in the order they were
    /// first written, up to the first one not ready (in a round, pages
    /// come in about the order of their addresses); work in proportion to
    /// the chunks asked for.
    ///
    /// In a first round the sender's batches go in page order and each
    /// spans fewer pages than a chunk, so a chunk two behind the latest
    /// write gets no more writes in the round; template pages, written at
    /// memory speed, would otherwise wait `quiet` and pile up for the
    /// pause. A later round's sparse pages may still come back to a
    /// passed chunk: its answer is then dropped and the chunk read again
    /// (a wasted read, never a wrong digest).
    pub fn to_ask(&mut self, quiet: Duration, limit: usize) -> Vec<(u32, u64)> {
        let now = Instant::now();
        let mut ask = Vec::new();
        while ask.len() < limit
            && let Some(&chunk) = self.pending.front()
        {
            let index = chunk as usize;
            let passed = self.front > chunk.saturating_add(1);
            if !passed && self.written[index].is_some_and(|at| now - at < quiet) {
                break;
            }
            self.pending.pop_front();
            self.queued[index] = false;
            let generation = self.generations[index];
            if self.digests[index].is_none() && self.asked[index] != Some(generation) {
                self.asked[index] = Some(generation);
                ask.push((chunk, generation));
            }
        }
        ask
    }

    /// Takes the digest read for `chunk` at `generation`, unless the chunk
    /// was written since.
    pub fn answer(&mut self, chunk: u32, generation: u64, digest: [u8; 32]) {
        let chunk = chunk as usize;
        if self.generations.get(chunk) == Some(&generation) {
            self.digests[chunk] = Some(digest);
        } else {
            self.discarded += 1;
        }
    }
}

/// A chunk read back: (chunk, generation asked for, its digest).
type Answer = (u32, u64, anyhow::Result<[u8; 32]>);

/// The thread that reads chunks back.
pub struct BackgroundReader {
    questions: Option<Sender<(u32, u64)>>,
    answers: Receiver<Answer>,
    thread: Option<JoinHandle<()>>,
    in_flight: usize,
    /// Chunks it read.
    pub read: u64,
}

impl BackgroundReader {
    /// Reads chunks of `chunk_pages` pages of `memory` as asked.
    pub fn start(memory: SourceMemory, key: DigestKey) -> anyhow::Result<Self> {
        let (questions, asked) = crossbeam::channel::unbounded::<(u32, u64)>();
        let (answered, answers) = crossbeam::channel::unbounded();
        let chunk_pages = key.chunk_pages.max(1);
        let thread = std::thread::Builder::new()
            .name("pagefp-read-back".into())
            .spawn(move || {
                let zero = key.page(&[0; PAGE_SIZE]);
                let mut buf = vec![0u8; PAGE_SIZE];
                let total = memory.layout.pages();
                let check =
                    |page: u32, buf: &mut [u8]| memory.with_page(page, buf, |d| key.page(d));
                for (chunk, generation) in asked {
                    let first = chunk.saturating_mul(chunk_pages).min(total);
                    let count = chunk_pages.min(total - first);
                    let holes = memory.holes_in(first, count);
                    let is_hole = |page: u32| holes.get((page - first) as usize) == Some(&true);
                    let digest =
                        chunk_digest(first..first + count, zero, is_hole, &check, &mut buf);
                    // What the read mapped is not left for the final unmap.
                    memory.drop_page_tables_in(first, count);
                    if answered.send((chunk, generation, digest)).is_err() {
                        break;
                    }
                }
            })
            .context("starting the read-back thread")?;
        Ok(Self {
            questions: Some(questions),
            answers,
            thread: Some(thread),
            in_flight: 0,
            read: 0,
        })
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn ask(&mut self, chunk: u32, generation: u64) {
        if let Some(questions) = &self.questions
            && questions.send((chunk, generation)).is_ok()
        {
            self.in_flight += 1;
        }
    }

    /// Hands every answer ready now to `book`.
    pub fn collect(&mut self, book: &mut ChunkDigests) -> anyhow::Result<()> {
        loop {
            match self.answers.try_recv() {
                Ok(answer) => self.take(answer, book)?,
                Err(TryRecvError::Empty) => return Ok(()),
                Err(TryRecvError::Disconnected) => {
                    anyhow::ensure!(self.in_flight == 0, "the read-back thread ended early");
                    return Ok(());
                }
            }
        }
    }

    /// Waits for every chunk asked for, hands the answers to `book`, and
    /// ends the thread (and its mapping).
    pub fn finish(mut self, book: &mut ChunkDigests) -> anyhow::Result<()> {
        self.questions = None;
        while self.in_flight > 0 {
            let answer = self
                .answers
                .recv()
                .context("the read-back thread ended early")?;
            self.take(answer, book)?;
        }
        Ok(())
    }

    fn take(
        &mut self,
        (chunk, generation, digest): Answer,
        book: &mut ChunkDigests,
    ) -> anyhow::Result<()> {
        self.in_flight -= 1;
        self.read += 1;
        book.answer(chunk, generation, digest?);
        Ok(())
    }
}

impl Drop for BackgroundReader {
    fn drop(&mut self) {
        // No more questions: the thread ends after the one it reads.
        self.questions = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_forgets_the_digest_of_every_chunk_it_touches() {
        let forgotten = |first, count| {
            let mut book = ChunkDigests::new(32, 8);
            book.digests = vec![Some([1u8; 32]); 4];
            book.forget(first, count);
            book.digests.iter().map(Option::is_none).collect::<Vec<_>>()
        };
        assert_eq!(forgotten(7, 1), [true, false, false, false]);
        assert_eq!(forgotten(7, 2), [true, true, false, false]);
        assert_eq!(forgotten(8, 16), [false, true, true, false]);
        assert_eq!(forgotten(0, 0), [false; 4]);
        // A run reaching past the memory forgets up to its end.
        assert_eq!(forgotten(30, u32::MAX), [false, false, false, true]);
    }

    #[test]
    fn an_answer_to_a_chunk_written_after_the_question_is_dropped() {
        let mut book = ChunkDigests::new(16, 4);
        // Never written: asked for at once, in order.
        assert_eq!(
            book.to_ask(Duration::from_secs(60), 2),
            vec![(0, 0), (1, 0)]
        );
        book.forget(0, 16);
        // Just written: not asked during a round, asked at its end.
        assert_eq!(book.to_ask(Duration::from_secs(60), 8), vec![]);
        let asked = book.to_ask(Duration::ZERO, 8);
        assert_eq!(asked, vec![(2, 1), (3, 1), (0, 1), (1, 1)]);
        // Asked once per generation.
        assert_eq!(book.to_ask(Duration::ZERO, 8), vec![]);
        book.forget(5, 1);
        book.answer(0, 1, [7; 32]);
        book.answer(1, 1, [7; 32]);
        assert_eq!(book.digests[0], Some([7; 32]));
        assert_eq!(book.digests[1], None, "written after the question");
        assert_eq!(book.discarded, 1);
        // Written again: asked again, at the new generation.
        assert_eq!(book.to_ask(Duration::ZERO, 1), vec![(1, 2)]);
        assert_eq!(book.missing(), 3);
        // An answer to an older question of a chunk asked again is dropped.
        book.answer(1, 1, [9; 32]);
        assert_eq!(book.digests[1], None);
        book.answer(1, 2, [9; 32]);
        assert_eq!(book.digests[1], Some([9; 32]));
    }

    #[test]
    fn a_chunk_written_too_recently_holds_back_those_written_after_it() {
        let mut book = ChunkDigests::new(16, 4);
        assert_eq!(book.to_ask(Duration::ZERO, 8).len(), 4);
        book.forget(8, 1);
        std::thread::sleep(Duration::from_millis(40));
        book.forget(0, 1);
        book.forget(8, 1);
        // Chunk 2 was first written first, and again just now.
        assert_eq!(book.to_ask(QUIET, 8), vec![]);
        assert_eq!(book.to_ask(Duration::ZERO, 8), vec![(2, 2), (0, 1)]);
    }

    #[test]
    fn a_chunk_the_writes_have_passed_is_ready_at_once() {
        let mut book = ChunkDigests::new(16, 4);
        assert_eq!(book.to_ask(Duration::ZERO, 8).len(), 4);
        book.forget(0, 2);
        assert_eq!(book.to_ask(QUIET, 8), vec![], "just written");
        // The next chunk's write does not pass chunk 0 yet.
        book.forget(4, 1);
        assert_eq!(book.to_ask(QUIET, 8), vec![]);
        // A write two chunks on does; chunk 1 (written after 0) is not
        // passed yet.
        book.forget(9, 3);
        assert_eq!(book.to_ask(QUIET, 8), vec![(0, 1)]);
        // A write coming back to a passed chunk queues it again, and the
        // answer to the question before it is dropped.
        book.forget(1, 1);
        book.answer(0, 1, [7; 32]);
        assert_eq!(book.digests[0], None);
        assert_eq!(book.discarded, 1);
        // Chunk 1 is passed now; chunk 2 (last written one chunk behind
        // the front) is not, and holds back chunk 0 queued after it.
        book.forget(15, 1);
        assert_eq!(book.to_ask(QUIET, 8), vec![(1, 1)]);
        assert_eq!(book.to_ask(Duration::ZERO, 8), vec![(2, 1), (0, 2), (3, 1)]);
    }
}
