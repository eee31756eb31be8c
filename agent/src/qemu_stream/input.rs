//! A buffered reader that knows its stream offset and can lend out
//! contiguous runs of bytes (a whole page without copying it).

use std::io::{self, Read};

pub(crate) struct Input<R> {
    reader: R,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Stream offset of `buf[start]`.
    offset: u64,
    eof: bool,
}

impl<R: Read> Input<R> {
    pub(crate) fn new(reader: R, capacity: usize) -> Self {
        Self {
            reader,
            buf: vec![0; capacity].into_boxed_slice(),
            start: 0,
            end: 0,
            offset: 0,
            eof: false,
        }
    }

    /// Stream offset of the next unconsumed byte.
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    pub(crate) fn available(&self) -> usize {
        self.end - self.start
    }

    /// Reads until `n` bytes are buffered (`n` at most the capacity) or the
    /// stream ends; how many are buffered.
    pub(crate) fn fill(&mut self, n: usize) -> io::Result<usize> {
        debug_assert!(n <= self.buf.len());
        if self.available() >= n {
            return Ok(self.available());
        }
        if self.start + n > self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while self.available() < n && !self.eof {
            match self.reader.read(&mut self.buf[self.end..]) {
                Ok(0) => self.eof = true,
                Ok(k) => self.end += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(self.available())
    }

    /// The buffered bytes.
    pub(crate) fn peek(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub(crate) fn consume(&mut self, n: usize) {
        assert!(n <= self.available());
        self.start += n;
        self.offset += n as u64;
    }
}
