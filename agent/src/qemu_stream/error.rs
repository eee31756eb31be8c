//! What can go wrong reading QEMU's stream, always with where.

use std::{fmt, io};

/// Where in the stream's structure the parser was.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Place {
    /// Before any section (file header), or between sections.
    #[default]
    TopLevel,
    /// The configuration section (`QEMU_VM_CONFIGURATION`).
    Configuration,
    /// A `QEMU_VM_COMMAND`.
    Command,
    /// Inside a section with this id and name (the name is `?` for a
    /// `PART`/`END` whose `START` the parser did not see).
    Section { id: u32, name: String },
    /// A multifd channel (its id, once its hello was read).
    Multifd { id: Option<u8> },
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::TopLevel => Ok(()),
            Place::Configuration => write!(f, " in the configuration section"),
            Place::Command => write!(f, " in a command"),
            Place::Section { id, name } => write!(f, " in section {id} ({name:?})"),
            Place::Multifd { id: None } => write!(f, " in a multifd channel"),
            Place::Multifd { id: Some(id) } => write!(f, " in multifd channel {id}"),
        }
    }
}

/// Why the parser stopped. Truncation and corruption are errors; nothing
/// the parser does not understand is ever guessed at.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("reading the QEMU migration stream failed at byte {offset}: {source}")]
    Io {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error(
        "the QEMU migration stream ends at byte {offset}{place}, where {expected} was expected (did the source QEMU cancel or fail the migration?)"
    )]
    Truncated {
        offset: u64,
        place: Place,
        expected: &'static str,
    },
    #[error(
        "not a QEMU migration stream: it starts with {found:02x?}, not \"QEVM\" (is the source QEMU's `migrate tcp:` pointed at this proxy?)"
    )]
    NotQemu { found: [u8; 4] },
    #[error(
        "QEMU migration stream version {0} is not supported (QEMU 2.x and later write version 3)"
    )]
    Version(u32),
    #[error(
        "malformed QEMU migration stream at byte {offset}{place}: expected {expected}, found {found}"
    )]
    Malformed {
        offset: u64,
        place: Place,
        expected: &'static str,
        found: String,
    },
    #[error(
        "refusing this migration (nothing was sent): {feature} at byte {offset}{place}. {advice}"
    )]
    Unsupported {
        offset: u64,
        place: Place,
        feature: String,
        advice: &'static str,
    },
    /// The consumer of the parsed stream failed (e.g. the WAN connection).
    #[error("{0}")]
    Sink(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl StreamError {
    /// The stream offset the error is about, if it has one.
    pub fn offset(&self) -> Option<u64> {
        match self {
            StreamError::Io { offset, .. }
            | StreamError::Truncated { offset, .. }
            | StreamError::Malformed { offset, .. }
            | StreamError::Unsupported { offset, .. } => Some(*offset),
            StreamError::NotQemu { .. } | StreamError::Version(_) => Some(0),
            StreamError::Sink(_) => None,
        }
    }
}
