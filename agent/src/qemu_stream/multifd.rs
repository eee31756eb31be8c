//! A parser for one of QEMU's multifd channels (the `multifd` capability:
//! besides the main stream, `multifd-channels` extra connections carry the
//! RAM pages). Deep enough to find the 4 KiB payload of every page of an
//! uncompressed packet; byte-exact for everything else.
//!
//! The layout, from `migration/multifd.c` (7.2) and `migration/multifd.h`,
//! `multifd-nocomp.c` (9.0 to 10.0), checked against streams QEMU 7.2 and
//! 10.0 wrote here; all integers big-endian:
//!
//! ```text
//! MultiFDInit_t, 64 bytes: be32 MULTIFD_MAGIC, be32 version 1, 16 bytes
//!   uuid, u8 channel id, 7 + 32 bytes reserved
//! then packets, each MultiFDPacket_t of 320 + 8 × 128 bytes (QEMU reads
//!   exactly this many: 128 = 512 KiB / 4 KiB pages per packet):
//!   be32 magic, be32 version 1, be32 flags (SYNC 0x1; compression in bits
//!   1..=5: 0 none, 1 zlib, 2 zstd, 4 QPL, 8 UADK, 16 QATzip; bit 6
//!   DEVICE_STATE, QEMU 10.0, VFIO only), be32 pages_alloc (<= 128),
//!   be32 normal_pages, be32 next_packet_size, be64 packet_num,
//!   be32 zero_pages (QEMU 9.0+, `zero-page-detection=multifd`; 0 before),
//!   be32 + 3 × be64 reserved, char ramblock[256] (NUL-terminated),
//!   be64 offset[128]: normal pages first, then zero pages
//! followed, uncompressed, by normal_pages × 4096 bytes of page data, in
//! offset order; compressed, by next_packet_size bytes of the method's
//! stream (carried unchanged: pages inside are not deduplicated).
//! ```
//!
//! A packet with the SYNC flag marks the end of a dirty-bitmap round: the
//! destination's main thread waits for one on every channel when its main
//! stream says so (EOS in 7.2, `RAM_SAVE_FLAG_MULTIFD_FLUSH` from 8.0 on).
//! Sync packets of 9.0+ have `pages_alloc` 0.
//!
//! Anything else (another version, a device-state packet, more pages than
//! a packet holds) passes through unchanged from its first byte on: once a
//! channel's bytes went out nothing can be refused, and passing through is
//! always exact.

use std::io::Read;

use super::{
    error::{Place, StreamError},
    format::{MULTIFD_MAGIC, PAGE_SIZE},
    input::Input,
    parser::{PassThrough, Sink, fill, hand_page},
};

/// `MULTIFD_VERSION`, in both the hello and every packet.
pub const VERSION: u32 = 1;
/// `sizeof(MultiFDInit_t)`.
pub const INIT_LEN: usize = 64;
/// Pages one packet can carry: `MULTIFD_PACKET_SIZE` (512 KiB) ÷ 4 KiB.
pub const PACKET_PAGES: usize = 128;
/// `sizeof(MultiFDPacket_t)` without its offsets.
pub const PACKET_FIXED: usize = 320;
/// What QEMU writes and reads per packet header: the fixed part and room
/// for [`PACKET_PAGES`] offsets, used or not.
pub const PACKET_LEN: usize = PACKET_FIXED + 8 * PACKET_PAGES;
/// `MULTIFD_FLAG_SYNC`.
pub const FLAG_SYNC: u32 = 1;
/// `MULTIFD_FLAG_COMPRESSION_MASK` (5 bits from bit 1, QEMU 9.1+; 3 bits
/// in 7.2, where the other two are always 0).
pub const COMPRESSION_MASK: u32 = 0x1f << 1;
/// `MULTIFD_FLAG_DEVICE_STATE` (QEMU 10.0: VFIO device state on multifd).
pub const FLAG_DEVICE_STATE: u32 = 1 << 6;

/// The compression of a channel's packets (`multifd-compression`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Zlib,
    Zstd,
    Qpl,
    Uadk,
    Qatzip,
}

impl Compression {
    fn from_flags(flags: u32) -> Option<Self> {
        Some(match (flags & COMPRESSION_MASK) >> 1 {
            0 => Compression::None,
            1 => Compression::Zlib,
            2 => Compression::Zstd,
            4 => Compression::Qpl,
            8 => Compression::Uadk,
            16 => Compression::Qatzip,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
            Compression::Qpl => "qpl",
            Compression::Uadk => "uadk",
            Compression::Qatzip => "qatzip",
        }
    }
}

/// What one channel carried.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChannelSummary {
    pub stream_bytes: u64,
    /// The channel id of the hello (`MultiFDInit_t.id`).
    pub id: u8,
    pub packets: u64,
    pub syncs: u64,
    /// Uncompressed pages handed to the sink as [`Page`]s.
    pub pages: u64,
    /// Pages of compressed packets, carried unchanged.
    pub compressed_pages: u64,
    /// Zero pages named by offset (QEMU 9.0+; no data travels for them).
    pub zero_pages: u64,
    /// The compression of the last packet with pages.
    pub compression: Option<Compression>,
    pub pass_through: Option<PassThrough>,
}

/// Whether a connection's first four bytes are a multifd channel's.
pub fn is_multifd(first: [u8; 4]) -> bool {
    u32::from_be_bytes(first) == MULTIFD_MAGIC
}

/// Parses one multifd channel from `reader` into `sink`, to its end.
pub fn parse_channel<R: Read, S: Sink + ?Sized>(
    reader: R,
    sink: &mut S,
) -> Result<ChannelSummary, StreamError> {
    let mut channel = Channel {
        input: Input::new(reader, INPUT_CAPACITY),
        sink,
        summary: ChannelSummary::default(),
    };
    channel.run()?;
    channel.summary.stream_bytes = channel.input.offset();
    Ok(channel.summary)
}

const INPUT_CAPACITY: usize = 256 << 10;

struct Channel<'s, R, S: ?Sized> {
    input: Input<R>,
    sink: &'s mut S,
    summary: ChannelSummary,
}

/// A packet header's fields the parser uses.
struct Header {
    flags: u32,
    pages_alloc: u32,
    normal: u32,
    zero: u32,
    next_packet_size: u32,
    block: String,
}

impl Header {
    fn read(bytes: &[u8; PACKET_LEN]) -> (u32, u32, Self) {
        let be32 = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
        let name = &bytes[64..320];
        let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        let header = Header {
            flags: be32(8),
            pages_alloc: be32(12),
            normal: be32(16),
            next_packet_size: be32(20),
            zero: be32(32),
            block: String::from_utf8_lossy(&name[..len]).into_owned(),
        };
        (be32(0), be32(4), header)
    }

    fn offset(bytes: &[u8; PACKET_LEN], page: usize) -> u64 {
        let at = PACKET_FIXED + 8 * page;
        u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap())
    }
}

impl<R: Read, S: Sink + ?Sized> Channel<'_, R, S> {
    fn run(&mut self) -> Result<(), StreamError> {
        if self.ensure(INIT_LEN)? < INIT_LEN {
            return Err(self.truncated("the 64-byte multifd hello (MultiFDInit_t)"));
        }
        let init = &self.input.peek()[..INIT_LEN];
        let magic: [u8; 4] = init[..4].try_into().unwrap();
        let version = u32::from_be_bytes(init[4..8].try_into().unwrap());
        if !is_multifd(magic) {
            return Err(StreamError::Malformed {
                offset: 0,
                place: Place::Multifd { id: None },
                expected: "MULTIFD_MAGIC",
                found: format!("{magic:02x?}"),
            });
        }
        self.summary.id = init[24];
        self.pass(INIT_LEN)?;
        if version != VERSION {
            return self.pass_rest(0, format!("multifd version {version} (this proxy reads 1)"));
        }
        loop {
            let mark = self.input.offset();
            if self.ensure(1)? == 0 {
                return Ok(());
            }
            if self.ensure(PACKET_LEN)? < PACKET_LEN {
                return Err(self.truncated("a multifd packet header"));
            }
            let bytes: &[u8; PACKET_LEN] = self.input.peek()[..PACKET_LEN].try_into().unwrap();
            let (magic, version, header) = Header::read(bytes);
            let mut offsets = [0u64; PACKET_PAGES];
            let normal = (header.normal as usize).min(PACKET_PAGES);
            for (page, offset) in offsets[..normal].iter_mut().enumerate() {
                *offset = Header::offset(bytes, page);
            }
            let pages = u64::from(header.normal) + u64::from(header.zero);
            let compression = Compression::from_flags(header.flags);
            let known_flags = header.flags & !(FLAG_SYNC | COMPRESSION_MASK) == 0;
            let odd = if magic != MULTIFD_MAGIC || version != VERSION {
                Some(format!(
                    "a packet with magic {magic:#010x}, version {version}"
                ))
            } else if header.flags & FLAG_DEVICE_STATE != 0 {
                Some("a device-state packet (VFIO)".to_string())
            } else if header.pages_alloc as usize > PACKET_PAGES
                || pages > u64::from(header.pages_alloc)
            {
                Some(format!(
                    "a packet of {} normal and {} zero pages in {} (at most {PACKET_PAGES})",
                    header.normal, header.zero, header.pages_alloc
                ))
            } else {
                None
            };
            let compression = match (odd, compression) {
                (None, Some(compression)) if known_flags => compression,
                (odd, _) => {
                    let reason =
                        odd.unwrap_or_else(|| format!("a packet with flags {:#x}", header.flags));
                    return self.pass_rest(mark, reason);
                }
            };
            self.summary.packets += 1;
            if header.flags & FLAG_SYNC != 0 {
                self.summary.syncs += 1;
            }
            self.summary.zero_pages += u64::from(header.zero);
            if header.normal > 0 {
                self.summary.compression = Some(compression);
            }
            self.pass(PACKET_LEN)?;
            if compression != Compression::None {
                // QEMU reads next_packet_size bytes only when there are
                // pages (`multifd_recv_thread`: `if (has_data)`).
                if header.normal > 0 {
                    self.forward(u64::from(header.next_packet_size), "compressed page data")?;
                    self.summary.compressed_pages += u64::from(header.normal);
                }
                continue;
            }
            for &offset in &offsets[..normal] {
                self.page(&header.block, offset)?;
            }
        }
    }

    /// One page's 4096 bytes, handed to the sink as a page.
    fn page(&mut self, block: &str, offset: u64) -> Result<(), StreamError> {
        if self.ensure(PAGE_SIZE)? < PAGE_SIZE {
            return Err(self.truncated("the 4096 bytes of a multifd page"));
        }
        hand_page(&mut self.input, self.sink, block, offset)?;
        self.summary.pages += 1;
        Ok(())
    }

    /// Hands the next `n` buffered bytes to the sink as they are.
    fn pass(&mut self, n: usize) -> Result<(), StreamError> {
        self.sink
            .bytes(&self.input.peek()[..n])
            .map_err(StreamError::Sink)?;
        self.input.consume(n);
        Ok(())
    }

    /// Passes `n` bytes on, in pieces (no allocation grows with `n`).
    fn forward(&mut self, mut n: u64, expected: &'static str) -> Result<(), StreamError> {
        while n > 0 {
            let want = n.min(INPUT_CAPACITY as u64) as usize;
            let have = self.ensure(want)?;
            if have == 0 {
                return Err(self.truncated(expected));
            }
            let take = have.min(want);
            self.pass(take)?;
            n -= take as u64;
        }
        Ok(())
    }

    /// Everything from here on passes through unchanged.
    fn pass_rest(&mut self, offset: u64, reason: String) -> Result<(), StreamError> {
        log::warn!(
            "multifd channel {}: passing everything from byte {offset} on through unchanged, without deduplication: {reason}",
            self.summary.id
        );
        self.summary.pass_through = Some(PassThrough { offset, reason });
        loop {
            let n = self.ensure(1)?;
            if n == 0 {
                return Ok(());
            }
            self.pass(n)?;
        }
    }

    /// Buffers at least `n` bytes unless the stream ends first (telling the
    /// sink before waiting); how many are buffered.
    fn ensure(&mut self, n: usize) -> Result<usize, StreamError> {
        fill(&mut self.input, self.sink, n)
    }

    fn truncated(&self, expected: &'static str) -> StreamError {
        StreamError::Truncated {
            offset: self.input.offset() + self.input.available() as u64,
            place: Place::Multifd {
                id: Some(self.summary.id),
            },
            expected,
        }
    }
}
