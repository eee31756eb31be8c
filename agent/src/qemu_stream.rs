//! A streaming parser for QEMU's pre-copy migration stream (QEMU 7.2 as
//! Debian ships it), just deep enough to find the 4 KiB payloads of RAM
//! pages. Everything else is passed on byte for byte.
//!
//! What the stream looks like (from QEMU's `migration/savevm.c` and
//! `migration/ram.c`, read, not copied):
//!
//! ```text
//! be32 magic "QEVM", be32 version 3
//! sections: u8 type, ...
//!   START (1): be32 section id, u8 len + idstr, be32 instance, be32 version, data
//!   PART (2), END (3): be32 section id, data
//!   FULL (4): like START, one device's whole state (not self-delimiting)
//!   FOOTER (0x7e) + be32 section id after each section's data
//!   EOF (0), VMDESCRIPTION (6), CONFIGURATION (7), COMMAND (8)
//! RAM section data: records of be64 (offset | flags), flags in the low 12 bits:
//!   MEM_SIZE (0x04): offset = total bytes, then per block u8 len + idstr, be64 size
//!   PAGE (0x08) / ZERO (0x02): u8 len + idstr unless CONTINUE (0x20),
//!                              then 4096 bytes (PAGE) or one fill byte (ZERO)
//!   EOS (0x10): end of this chunk of RAM data
//! ```
//!
//! Device sections cannot be parsed without each device's description, so
//! the parser only follows what it understands: the header, the first
//! `START` of section `ram` (found by its header pattern), and RAM chunks
//! followed by `PART`/`END` of that same section. Anything else — another
//! section type between RAM chunks, an unknown RAM flag (XBZRLE, compressed
//! pages, multifd sync, RDMA hooks), the end of the RAM section — switches
//! it to pass-through for the rest of the stream: still byte-identical, just
//! without deduplication. The parser never emits a page it did not read
//! whole from a PAGE record.

use std::io::{self, Read};

pub const QEMU_VM_FILE_MAGIC: u32 = 0x5145_564d;
pub const QEMU_VM_FILE_VERSION: u32 = 3;
pub const TARGET_PAGE: usize = 4096;

const SECTION_START: u8 = 0x01;
const SECTION_PART: u8 = 0x02;
const SECTION_END: u8 = 0x03;
const SECTION_FOOTER: u8 = 0x7e;

const FLAG_ZERO: u64 = 0x02;
const FLAG_MEM_SIZE: u64 = 0x04;
const FLAG_PAGE: u64 = 0x08;
const FLAG_EOS: u64 = 0x10;
const FLAG_CONTINUE: u64 = 0x20;
const FLAGS_MASK: u64 = 0xfff;

/// How far into the stream the RAM section may start.
const MAX_SEARCH: usize = 4 << 20;

/// What the parser found next.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// Bytes to pass on unchanged.
    Bytes(Vec<u8>),
    /// The payload of a RAM page record (the record header went out in the
    /// preceding `Bytes`).
    Page(Box<[u8; TARGET_PAGE]>),
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("reading the QEMU migration stream failed at byte {offset}: {source}")]
    Io { offset: u64, source: io::Error },
    #[error(
        "not a QEMU migration stream (magic {0:#010x}, expected QEVM); is the source `migrate tcp:` pointed at the proxy?"
    )]
    Magic(u32),
    #[error(
        "QEMU migration stream version {0} is not supported (this proxy reads version {QEMU_VM_FILE_VERSION})"
    )]
    Version(u32),
    #[error("malformed RAM section at byte {offset}: {what}")]
    Malformed { offset: u64, what: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    /// Looking for the RAM section's START.
    Search,
    /// Inside RAM data.
    Ram,
    /// After a RAM chunk's EOS: footer, then the next section header.
    AfterChunk,
    /// The rest of the stream goes through unchanged.
    PassThrough,
    Done,
}

/// Why the parser stopped deduplicating (if it did).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PassThroughReason {
    RamSectionEnded,
    NoRamSection,
    Unsupported(String),
}

pub struct Parser<R: Read> {
    input: R,
    offset: u64,
    state: State,
    ram_section: u32,
    out: Vec<u8>,
    pub pages: u64,
    pub zero_pages: u64,
    pub pass_through: Option<PassThroughReason>,
    /// A page read, to hand out after its record header.
    pending_page: Option<Box<[u8; TARGET_PAGE]>>,
    /// Inside the RAM section's END chunk.
    ending: bool,
}

impl<R: Read> Parser<R> {
    pub fn new(input: R) -> Self {
        Self {
            input,
            offset: 0,
            state: State::Header,
            ram_section: 0,
            out: Vec::new(),
            pages: 0,
            zero_pages: 0,
            pass_through: None,
            pending_page: None,
            ending: false,
        }
    }

    /// Bytes of the QEMU stream consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn io(&self, source: io::Error) -> StreamError {
        StreamError::Io {
            offset: self.offset,
            source,
        }
    }

    fn malformed(&self, what: impl Into<String>) -> StreamError {
        StreamError::Malformed {
            offset: self.offset,
            what: what.into(),
        }
    }

    /// Reads exactly `n` bytes, copied to the output.
    fn take(&mut self, n: usize) -> Result<&[u8], StreamError> {
        let start = self.out.len();
        self.out.resize(start + n, 0);
        let result = self.input.read_exact(&mut self.out[start..]);
        if let Err(e) = result {
            return Err(self.io(e));
        }
        self.offset += n as u64;
        Ok(&self.out[start..])
    }

    fn byte(&mut self) -> Result<u8, StreamError> {
        Ok(self.take(1)?[0])
    }

    fn be32(&mut self) -> Result<u32, StreamError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn be64(&mut self) -> Result<u64, StreamError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }

    fn idstr(&mut self) -> Result<(), StreamError> {
        let len = self.byte()? as usize;
        if len == 0 {
            return Err(self.malformed("empty RAM block name"));
        }
        self.take(len).map(drop)
    }

    fn flush(&mut self) -> Option<Piece> {
        (!self.out.is_empty()).then(|| Piece::Bytes(std::mem::take(&mut self.out)))
    }

    fn pass(&mut self, reason: PassThroughReason) {
        log::debug!("QEMU stream: passing the rest through ({reason:?})");
        self.pass_through = Some(reason);
        self.state = State::PassThrough;
    }

    /// The next piece; `None` at the end of the stream.
    pub fn next_piece(&mut self) -> Result<Option<Piece>, StreamError> {
        loop {
            if let Some(page) = self.pending_page.take() {
                return Ok(Some(Piece::Page(page)));
            }
            match self.state {
                State::Header => {
                    let magic = self.be32()?;
                    if magic != QEMU_VM_FILE_MAGIC {
                        return Err(StreamError::Magic(magic));
                    }
                    let version = self.be32()?;
                    if version != QEMU_VM_FILE_VERSION {
                        return Err(StreamError::Version(version));
                    }
                    self.state = State::Search;
                }
                State::Search => {
                    // START, be32 id, u8 3, "ram", be32 instance, be32 version
                    let searched = self.out.len();
                    let b = self.byte_or_eof()?;
                    let Some(_) = b else {
                        self.state = State::Done;
                        continue;
                    };
                    let n = self.out.len();
                    if n >= 17
                        && self.out[n - 17] == SECTION_START
                        && self.out[n - 12] == 3
                        && &self.out[n - 11..n - 8] == b"ram"
                    {
                        self.ram_section =
                            u32::from_be_bytes(self.out[n - 16..n - 12].try_into().unwrap());
                        self.state = State::Ram;
                    } else if searched > MAX_SEARCH {
                        self.pass(PassThroughReason::NoRamSection);
                    } else if self.out.len() >= 64 << 10 {
                        // Keep the window, ship the rest.
                        let keep = self.out.split_off(self.out.len() - 16);
                        let piece = Piece::Bytes(std::mem::replace(&mut self.out, keep));
                        return Ok(Some(piece));
                    }
                }
                State::Ram => {
                    let header = self.be64()?;
                    let flags = header & FLAGS_MASK;
                    let addr = header & !FLAGS_MASK;
                    if flags & FLAG_MEM_SIZE != 0 {
                        if flags != FLAG_MEM_SIZE {
                            return Err(
                                self.malformed(format!("MEM_SIZE with other flags {flags:#x}"))
                            );
                        }
                        let mut left = addr;
                        while left > 0 {
                            self.idstr()?;
                            let size = self.be64()?;
                            if size == 0 || size > left {
                                return Err(self.malformed(format!(
                                    "RAM block of {size} bytes with {left} left of the total"
                                )));
                            }
                            left -= size;
                        }
                    } else if flags & FLAG_EOS != 0 {
                        if flags != FLAG_EOS {
                            return Err(self.malformed(format!("EOS with other flags {flags:#x}")));
                        }
                        self.state = State::AfterChunk;
                    } else if flags & !FLAG_CONTINUE == FLAG_PAGE {
                        if flags & FLAG_CONTINUE == 0 {
                            self.idstr()?;
                        }
                        let piece = self.flush();
                        let mut page = Box::new([0u8; TARGET_PAGE]);
                        self.input
                            .read_exact(&mut page[..])
                            .map_err(|e| self.io(e))?;
                        self.offset += TARGET_PAGE as u64;
                        self.pages += 1;
                        // The record header first, then the page.
                        self.pending_page = Some(page);
                        if let Some(piece) = piece {
                            return Ok(Some(piece));
                        }
                        continue;
                    } else if flags & !FLAG_CONTINUE == FLAG_ZERO {
                        if flags & FLAG_CONTINUE == 0 {
                            self.idstr()?;
                        }
                        self.byte()?;
                        self.zero_pages += 1;
                    } else {
                        self.pass(PassThroughReason::Unsupported(format!(
                            "RAM record flags {flags:#x} (XBZRLE, compression, multifd or RDMA are not deduplicated)"
                        )));
                    }
                }
                State::AfterChunk => {
                    let Some(mut kind) = self.byte_or_eof()? else {
                        self.state = State::Done;
                        continue;
                    };
                    if kind == SECTION_FOOTER {
                        let id = self.be32()?;
                        if id != self.ram_section {
                            return Err(self.malformed(format!(
                                "footer of section {id} after RAM section {}",
                                self.ram_section
                            )));
                        }
                        match self.byte_or_eof()? {
                            Some(next) => kind = next,
                            None => {
                                self.state = State::Done;
                                continue;
                            }
                        }
                    }
                    match kind {
                        SECTION_PART | SECTION_END => {
                            let id = self.be32()?;
                            if id != self.ram_section {
                                self.pass(PassThroughReason::Unsupported(format!(
                                    "iterative section {id} besides RAM"
                                )));
                            } else if kind == SECTION_END {
                                self.state = State::Ram;
                                self.ending = true;
                            } else {
                                self.state = State::Ram;
                            }
                        }
                        _ => self.pass(PassThroughReason::RamSectionEnded),
                    }
                    if self.state == State::AfterChunk {
                        continue;
                    }
                }
                State::PassThrough => {
                    let start = self.out.len();
                    self.out.resize(start + (64 << 10), 0);
                    let n = loop {
                        match self.input.read(&mut self.out[start..]) {
                            Ok(n) => break n,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            Err(e) => return Err(self.io(e)),
                        }
                    };
                    self.out.truncate(start + n);
                    self.offset += n as u64;
                    if n == 0 {
                        self.state = State::Done;
                    }
                    if let Some(piece) = self.flush() {
                        return Ok(Some(piece));
                    }
                }
                State::Done => return Ok(self.flush()),
            }
            if self.ending && self.state == State::AfterChunk {
                // The END chunk's EOS: the RAM section is over.
                self.ending = false;
                self.pass(PassThroughReason::RamSectionEnded);
            }
        }
    }

    /// One byte, or `None` at a clean end of stream.
    fn byte_or_eof(&mut self) -> Result<Option<u8>, StreamError> {
        let mut b = [0u8; 1];
        loop {
            match self.input.read(&mut b) {
                Ok(0) => return Ok(None),
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io(e)),
            }
        }
        self.offset += 1;
        self.out.push(b[0]);
        Ok(Some(b[0]))
    }
}

/// Reassembles pieces into the original bytes (what the receiving proxy does).
pub fn reassemble(pieces: &[Piece]) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in pieces {
        match piece {
            Piece::Bytes(bytes) => out.extend_from_slice(bytes),
            Piece::Page(page) => out.extend_from_slice(&page[..]),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A stream shaped like QEMU 7.2's: header, configuration, RAM START
    /// with MEM_SIZE, PART chunks of pages, END, then device state.
    fn stream(chunks: &[Vec<(u8, u8)>], device_state: &[u8]) -> (Vec<u8>, Vec<[u8; TARGET_PAGE]>) {
        let mut s = Vec::new();
        let mut pages = Vec::new();
        s.extend_from_slice(&QEMU_VM_FILE_MAGIC.to_be_bytes());
        s.extend_from_slice(&QEMU_VM_FILE_VERSION.to_be_bytes());
        s.push(0x07);
        s.extend_from_slice(&13u32.to_be_bytes());
        s.extend_from_slice(b"pc-i440fx-7.2");
        s.push(SECTION_START);
        s.extend_from_slice(&2u32.to_be_bytes());
        s.push(3);
        s.extend_from_slice(b"ram");
        s.extend_from_slice(&0u32.to_be_bytes());
        s.extend_from_slice(&4u32.to_be_bytes());
        s.extend_from_slice(&((1u64 << 24) | FLAG_MEM_SIZE).to_be_bytes());
        s.push(6);
        s.extend_from_slice(b"pc.ram");
        s.extend_from_slice(&(1u64 << 24).to_be_bytes());
        s.extend_from_slice(&FLAG_EOS.to_be_bytes());
        s.push(SECTION_FOOTER);
        s.extend_from_slice(&2u32.to_be_bytes());
        for (i, chunk) in chunks.iter().enumerate() {
            s.push(if i + 1 == chunks.len() {
                SECTION_END
            } else {
                SECTION_PART
            });
            s.extend_from_slice(&2u32.to_be_bytes());
            for (j, (kind, fill)) in chunk.iter().enumerate() {
                let continued = if j == 0 { 0 } else { FLAG_CONTINUE };
                let addr = (j as u64) << 12;
                if kind % 2 == 0 {
                    s.extend_from_slice(&(addr | FLAG_PAGE | continued).to_be_bytes());
                    if continued == 0 {
                        s.push(6);
                        s.extend_from_slice(b"pc.ram");
                    }
                    let page = [*fill; TARGET_PAGE];
                    s.extend_from_slice(&page);
                    pages.push(page);
                } else {
                    s.extend_from_slice(&(addr | FLAG_ZERO | continued).to_be_bytes());
                    if continued == 0 {
                        s.push(6);
                        s.extend_from_slice(b"pc.ram");
                    }
                    s.push(0);
                }
            }
            s.extend_from_slice(&FLAG_EOS.to_be_bytes());
            s.push(SECTION_FOOTER);
            s.extend_from_slice(&2u32.to_be_bytes());
        }
        s.extend_from_slice(device_state);
        (s, pages)
    }

    fn parse_all(bytes: &[u8]) -> Result<(Vec<Piece>, Parser<&[u8]>), StreamError> {
        let mut parser = Parser::new(bytes);
        let mut pieces = Vec::new();
        while let Some(piece) = parser.next_piece()? {
            pieces.push(piece);
        }
        Ok((pieces, parser))
    }

    #[test]
    fn pages_are_found_and_everything_else_passes_through() {
        let chunks = vec![
            vec![(0, 1), (1, 0), (0, 2)],
            vec![(0, 3)],
            vec![(1, 0), (0, 4)],
        ];
        let (bytes, pages) = stream(&chunks, b"\x04device state\x00");
        let (pieces, parser) = parse_all(&bytes).unwrap();
        assert_eq!(reassemble(&pieces), bytes);
        let found: Vec<[u8; TARGET_PAGE]> = pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Page(page) => Some(**page),
                Piece::Bytes(_) => None,
            })
            .collect();
        assert_eq!(found, pages);
        assert_eq!((parser.pages, parser.zero_pages), (4, 2));
        assert_eq!(
            parser.pass_through,
            Some(PassThroughReason::RamSectionEnded)
        );
    }

    #[test]
    fn unknown_features_fall_back_to_pass_through() {
        let (mut bytes, _) = stream(&[vec![(0, 1)], vec![(0, 2)]], b"");
        // Turn the second chunk's page into an XBZRLE record.
        // Its header: before the block name (7), page, EOS (8) and footer (5).
        let at = bytes.len() - (8 + 7 + TARGET_PAGE + 8 + 5);
        bytes[at + 7] = 0x40;
        let (pieces, parser) = parse_all(&bytes).unwrap();
        assert_eq!(reassemble(&pieces), bytes);
        assert!(matches!(
            parser.pass_through,
            Some(PassThroughReason::Unsupported(_))
        ));
        assert!(Parser::new(&b"QEVX\0\0\0\x03"[..]).next_piece().is_err());
    }

    proptest! {
        /// Whatever QEMU-shaped stream, the pieces put together are the
        /// stream, and every page handed out is a page of the stream.
        #[test]
        fn round_trip(chunks in proptest::collection::vec(proptest::collection::vec((0u8..2, any::<u8>()), 1..6), 1..5),
                      device in proptest::collection::vec(any::<u8>(), 0..200)) {
            let (bytes, pages) = stream(&chunks, &device);
            let (pieces, _) = parse_all(&bytes).unwrap();
            prop_assert_eq!(reassemble(&pieces), bytes);
            let found = pieces.iter().filter(|p| matches!(p, Piece::Page(_))).count();
            prop_assert_eq!(found, pages.len());
        }

        /// Truncated or corrupted streams give an error or the same bytes
        /// back; never a panic, never different bytes.
        #[test]
        fn damage_is_an_error_or_harmless(chunks in proptest::collection::vec(proptest::collection::vec((0u8..2, any::<u8>()), 1..4), 1..4),
                                          at in any::<prop::sample::Index>(), xor in 1u8.., cut in any::<bool>()) {
            let (mut bytes, _) = stream(&chunks, b"\x04dev");
            let i = at.index(bytes.len());
            if cut { bytes.truncate(i) } else { bytes[i] ^= xor }
            if let Ok((pieces, _)) = parse_all(&bytes) {
                prop_assert_eq!(reassemble(&pieces), bytes);
            }
        }
    }
}
