//! QEMU's multifd channels through the proxies (the `multifd` capability:
//! `multifd-channels` connections besides the main stream, carrying the
//! RAM pages). Each channel gets a WAN connection of its own, so channels
//! flow and stall independently, as they do between two QEMUs:
//!
//! - the send proxy takes every further connection to its address, tells a
//!   multifd channel by its first four bytes, parses it
//!   ([`crate::qemu_stream::multifd`]) and sends it deduplicated against
//!   the main connection's offer;
//! - the receive proxy accepts those connections (authenticated like the
//!   main one, and presenting the main connection's session), rebuilds
//!   each channel and connects it to the destination QEMU once the main
//!   stream's connection is there (QEMU 7.2 takes its first connection as
//!   the main stream).
//!
//! Every chunk is checked against its digest before QEMU gets it, on every
//! channel, so the destination never loads a page the source did not send.
//! A channel that fails fails the migration.

use std::sync::Mutex;

use super::ProxyReport;
use crate::qemu_stream::{
    SinkError,
    multifd::{self, ChannelSummary},
};

mod receive;
mod send;

pub use receive::{MainConnected, ReceiveChannels, ReceiveLink};
pub use send::{ChannelCounts, SendChannels, SendLink};

/// What the multifd channels of one migration carried, summed.
#[derive(Clone, Debug, Default)]
pub struct ChannelTotals {
    pub channels: u32,
    pub stream_bytes: u64,
    pub wire_bytes: u64,
    pub pages: u64,
    pub template_pages: u64,
    pub zero_pages: u64,
    pub compressed_pages: u64,
    pub compression: Option<multifd::Compression>,
    pub pass_through: Option<String>,
}

impl ChannelTotals {
    fn add_summary(&mut self, summary: &ChannelSummary) {
        self.pages += summary.pages;
        self.zero_pages += summary.zero_pages;
        self.compressed_pages += summary.compressed_pages;
        self.compression = self.compression.or(summary.compression);
        if let Some(pass) = &summary.pass_through {
            self.pass_through.get_or_insert_with(|| {
                format!(
                    "multifd channel {} from byte {}: {}",
                    summary.id, pass.offset, pass.reason
                )
            });
        }
    }
}

/// The first failure of any channel, for the main stream to stop on.
#[derive(Default)]
pub struct Failure(Mutex<Option<String>>);

impl Failure {
    fn set(&self, why: String) {
        self.lock().get_or_insert(why);
    }

    /// A relay that panicked while holding the lock left the reason as it
    /// was: still the one to report.
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn check(&self) -> Result<(), SinkError> {
        match &*self.lock() {
            None => Ok(()),
            Some(why) => Err(why.clone().into()),
        }
    }
}

/// The migration's report: the main stream's, failed if it or any channel
/// failed, with the channels' share added.
pub fn merge(
    main: anyhow::Result<ProxyReport>,
    totals: &ChannelTotals,
    failure: &Failure,
) -> anyhow::Result<ProxyReport> {
    use anyhow::Context as _;
    let mut report = main?;
    failure
        .check()
        .map_err(|e| anyhow::anyhow!(e))
        .context("a multifd channel failed")?;
    report.channels += totals.channels;
    report.stream_bytes += totals.stream_bytes;
    report.wire_bytes += totals.wire_bytes;
    report.pages += totals.pages;
    report.template_pages += totals.template_pages;
    report.zero_pages += totals.zero_pages;
    report.compressed_pages += totals.compressed_pages;
    if let Some(compression) = totals.compression {
        report.multifd_compression = Some(compression.name().into());
    }
    if report.pass_through.is_none() {
        report.pass_through = totals.pass_through.clone();
    }
    Ok(report)
}
