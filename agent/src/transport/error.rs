//! Why a stream was refused or a frame could not be sent, for both
//! protocols; `protocol` is the [`super::Protocol::NAME`].

use std::io;

impl WireError {
    /// The error of a failed read or write on the byte stream; a socket
    /// timeout (`WouldBlock` or `TimedOut`) says the peer stalled.
    pub(super) fn io(
        protocol: &'static str,
        doing: &'static str,
        offset: u64,
        error: io::Error,
    ) -> Self {
        match error.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => WireError::Stalled {
                protocol,
                stalled: if doing == "writing" {
                    "took nothing this side wrote"
                } else {
                    "sent nothing"
                },
                offset,
            },
            _ => WireError::Io {
                protocol,
                doing,
                offset,
                error,
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error(
        "the {protocol} connection failed: the peer closed it while this side was reading {what} (stream offset {offset}); the peer's log says why"
    )]
    Closed {
        protocol: &'static str,
        what: &'static str,
        offset: u64,
    },
    #[error(
        "the {protocol} connection failed {doing} at stream offset {offset}: {error}; check the network path and the peer"
    )]
    Io {
        protocol: &'static str,
        doing: &'static str,
        offset: u64,
        error: io::Error,
    },
    #[error(
        "the {protocol} peer {stalled} for longer than the I/O timeout (stream offset {offset}): it is stalled, overloaded or unreachable; the peer's log says which"
    )]
    Stalled {
        protocol: &'static str,
        /// "took nothing this side wrote" or "sent nothing".
        stalled: &'static str,
        offset: u64,
    },
    #[error(
        "not a pagefp {protocol} stream (the first bytes are {found:02x?}); is the other end {peer}?"
    )]
    NotOurStream {
        protocol: &'static str,
        peer: &'static str,
        found: [u8; 8],
    },
    #[error(
        "{protocol} stream version {theirs} is not supported: this pagefp speaks version {ours}; upgrade both ends to the same pagefp release"
    )]
    Version {
        protocol: &'static str,
        theirs: u32,
        ours: u32,
    },
    #[error(
        "unknown {protocol} message kind {kind} at stream offset {offset}: the stream is corrupt or from another pagefp release; upgrade both ends to the same release"
    )]
    UnknownKind {
        protocol: &'static str,
        kind: u8,
        offset: u64,
    },
    #[error(
        "{protocol} message at stream offset {offset} announces {len} bytes, more than the {max} allowed: the stream is corrupt or from another pagefp release"
    )]
    TooLarge {
        protocol: &'static str,
        offset: u64,
        len: usize,
        max: usize,
    },
    #[error(
        "{protocol} message at stream offset {offset} has unknown flags or non-zero reserved bits (header {header:02x?}): the stream is corrupt or from another pagefp release"
    )]
    Reserved {
        protocol: &'static str,
        offset: u64,
        header: [u8; 4],
    },
    #[error(
        "checksum mismatch in the {protocol} {kind} message at stream offset {offset}: the data was corrupted in transit; check the network path, then retry"
    )]
    Checksum {
        protocol: &'static str,
        kind: String,
        offset: u64,
    },
    #[error("malformed {kind} message at stream offset {offset}: {what}")]
    Malformed {
        kind: String,
        offset: u64,
        what: String,
    },
    #[error(
        "expected {expected}, got {got} at stream offset {offset}: the {protocol} peer is out of step (another pagefp release?)"
    )]
    Unexpected {
        protocol: &'static str,
        expected: String,
        got: String,
        offset: u64,
    },
    #[error("the {protocol} peer aborted: {reason}")]
    PeerAborted {
        protocol: &'static str,
        reason: String,
    },
    #[error(
        "refusing to send a {len}-byte {kind} message: the {protocol} protocol carries at most {max} bytes per message (a pagefp bug; please report it)"
    )]
    PayloadTooLarge {
        protocol: &'static str,
        kind: String,
        len: usize,
        max: usize,
    },
    #[error(
        "refusing to send a {kind} message with flags {flags:#04x} the {protocol} protocol does not define (a pagefp bug; please report it)"
    )]
    UndefinedFlags {
        protocol: &'static str,
        kind: String,
        flags: u8,
    },
    #[error(
        "refusing to send {kind} as a {protocol} message: its kind number is reserved for Abort (a pagefp bug; please report it)"
    )]
    ReservedKind {
        protocol: &'static str,
        kind: String,
    },
    #[error("cannot encode the {protocol} {kind} message: {what} (a pagefp bug; please report it)")]
    Encode {
        protocol: &'static str,
        kind: String,
        what: String,
    },
}
