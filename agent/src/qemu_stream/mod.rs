//! A streaming parser for QEMU's pre-copy migration stream, as QEMU 7.2
//! (Debian 12) to 10.0 (Debian 13) write it to `migrate tcp:`: deep enough
//! to find the 4 KiB payloads of RAM pages, byte-exact for everything else.
//! [`multifd`] reads the extra connections of the multifd capability. Self-contained
//! (std, `thiserror`, `log`) so the fuzz target can build it alone.
//!
//! The format, from QEMU 7.2's `migration/savevm.c` (stream and sections),
//! `migration/ram.c` (RAM records), `migration/vmstate.c` (subsections) and
//! `migration/qemu-file.c` (compressed pages); all integers big-endian:
//!
//! ```text
//! be32 "QEVM", be32 3                               qemu_savevm_state_header
//! [0x07 CONFIGURATION: be32 len, machine type,      vmstate_configuration
//!   subsections 0x05, u8 len, name, be32 version, fields:
//!   configuration/target-page-bits: be32
//!   configuration/capabilities: be32 n, n × (u8 len, name)
//!   configuration/uuid: 16 bytes]
//! [0x08 COMMAND: be16 cmd, be16 len, data]          qemu_savevm_command_send
//!                                                   (return path, postcopy, COLO)
//! setup: 0x01 START, be32 id, u8 len, idstr,        qemu_savevm_state_setup,
//!        be32 instance, be32 version, data,         save_section_header
//!        [0x7e FOOTER, be32 id]                     save_section_footer
//! iteration: 0x02 PART, be32 id, data, [footer]     qemu_savevm_state_iterate
//! completion: 0x03 END, be32 id, data, [footer]     ..._complete_precopy_iterable
//!   0x04 FULL (as START) per device, [footer]       ..._complete_precopy_non_iterable
//!   0x00 EOF, [0x06 VMDESCRIPTION, be32 len, JSON]
//!
//! RAM section data (ram_save_setup / _iterate / _complete), records of
//! be64 (offset in block | flags), flags in the low 12 bits, up to EOS:
//!   MEM_SIZE 0x04: offset = total bytes; per block u8 len, idstr, be64
//!            length [, be64 page size if postcopy] [, be64 address if
//!            x-ignore-shared], until the lengths add up to the total
//!   ZERO 0x02: [u8 len, idstr unless CONTINUE 0x20], u8 fill byte
//!   PAGE 0x08: [block], 4096 bytes                 save_normal_page
//!   XBZRLE 0x40: [block], u8 1, be16 len, data     save_xbzrle_page
//!   COMPRESS_PAGE 0x100: [block], be32 len (<= compressBound(4096)), zlib
//!   EOS 0x10: end of this section's RAM data
//! ```
//!
//! Device sections (FULL) are not self-delimiting: only the device's
//! vmstate description says how long they are. The parser therefore reads
//! the preamble (header, configuration, commands, setup sections), then the
//! RAM section's PART/END chunks, each bounded by its EOS; after the RAM
//! section's END, the device state, EOF and the VM description follow and
//! pass through unread. What it does not understand is either refused while
//! nothing has been sent ([`Unsupported::Refuse`], the default; the commands
//! of postcopy and COLO are always refused, the return path's are read) or, and always once
//! the preamble is over, passed through unchanged from there on.
//!
//! Guarantees (tested with property tests and fuzzed): every length is
//! checked and no allocation depends on the input; the bytes and pages a
//! [`Sink`] gets are exactly the input, in order; a page is only ever the
//! 4096 bytes of a complete `PAGE` record; truncation and corruption give
//! an error saying where (byte offset, section), never a panic.

mod error;
pub mod format;
mod input;
pub mod multifd;
mod parser;
/// Test-only: builds synthetic QEMU streams for the agent's unit tests (and,
/// with the `test-support` feature, for other crates' tests); not in the
/// shipped binary.
#[cfg(any(test, feature = "test-support"))]
pub mod synth;

pub use error::{Place, StreamError};
pub use parser::{
    Options, Page, PassThrough, Preamble, RamBlock, Sink, SinkError, Summary, Unsupported, parse,
};

#[cfg(test)]
mod tests;
