//! For the stream parsers' targets: hands out the input in reads of a size
//! the input chose, to cross the parsers' buffer boundaries everywhere.

use std::io::Read;

pub struct Trickle<'a> {
    pub data: &'a [u8],
    pub size: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.size.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}
