//! What a running or finished migration reports about itself.
//!
//! `pagefp migrate send|receive` posts a [`MigrationReport`] to the local
//! agent (`POST /v1/migrations`, JSON) when it starts, about once a second,
//! and when it ends; the agent keeps the latest report per `id` and exports
//! them as metrics. The same struct is printed with `--json` at the end.

use serde::{Deserialize, Serialize};

/// Which end of a migration a report comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Source,
    Destination,
}

/// How pages travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Mode {
    /// Like QEMU's default pre-copy: zero pages detected, others raw.
    #[serde(rename = "baseline")]
    Baseline,
    /// Zero pages, template references, raw pages.
    #[serde(rename = "templates")]
    Templates,
    /// Templates, and the remaining full pages zstd-compressed.
    #[serde(rename = "templates+zstd")]
    TemplatesZstd,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Baseline => "baseline",
            Mode::Templates => "templates",
            Mode::TemplatesZstd => "templates+zstd",
        }
    }

    pub fn uses_templates(self) -> bool {
        !matches!(self, Mode::Baseline)
    }

    pub fn uses_zstd(self) -> bool {
        matches!(self, Mode::TemplatesZstd)
    }
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "baseline" => Ok(Mode::Baseline),
            "templates" => Ok(Mode::Templates),
            "templates+zstd" | "templates-zstd" => Ok(Mode::TemplatesZstd),
            other => Err(format!(
                "unknown migration mode {other:?}: use baseline, templates or templates+zstd"
            )),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a migration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Connecting,
    Negotiating,
    Precopy,
    StopAndCopy,
    Verifying,
    Completed,
    Failed,
}

impl Phase {
    pub fn finished(self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed)
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::Connecting => "connecting",
            Phase::Negotiating => "negotiating",
            Phase::Precopy => "precopy",
            Phase::StopAndCopy => "stop_and_copy",
            Phase::Verifying => "verifying",
            Phase::Completed => "completed",
            Phase::Failed => "failed",
        }
    }
}

/// Pages or bytes by page encoding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByEncoding {
    pub zero: u64,
    pub template: u64,
    /// Raw 4 KiB pages.
    pub full: u64,
    /// Full pages sent zstd-compressed (bytes: compressed size).
    pub zstd: u64,
}

impl ByEncoding {
    pub fn total(&self) -> u64 {
        self.zero + self.template + self.full + self.zstd
    }
}

/// One migration, as one end sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// Chosen by the source, shared by both ends.
    pub id: String,
    pub role: Role,
    pub mode: Mode,
    /// The local VMM's pid (the source VM, or the destination VMM).
    pub vm_pid: u32,
    /// The local VMM's process name.
    pub vm_name: String,
    /// The other end's address.
    pub peer: String,
    pub phase: Phase,
    /// Pre-copy round (1 = the first pass over all memory).
    pub round: u32,
    /// Wall-clock start, Unix milliseconds.
    pub started_unix_ms: u64,
    pub elapsed_seconds: f64,
    /// Guest memory size.
    pub mem_bytes: u64,
    /// Estimated bytes still to send (source; 0 at the destination).
    pub remaining_bytes: u64,
    /// Pages the guest dirtied per second during the last round.
    pub dirty_pages_per_second: f64,
    /// Everything written to (source) or read from (destination) the link.
    pub wire_bytes: u64,
    /// Bytes of the template negotiation (included in `wire_bytes`).
    pub negotiation_bytes: u64,
    /// Source: seconds the negotiation took, from listing the VM's
    /// contents to the agreed set (site fetches included).
    #[serde(default)]
    pub negotiation_seconds: f64,
    /// CPU seconds this end's process used so far (all its threads).
    #[serde(default)]
    pub cpu_seconds: f64,
    /// Pages by encoding, all rounds.
    pub pages: ByEncoding,
    /// Wire bytes by encoding, all rounds (page headers included).
    pub bytes: ByEncoding,
    /// Templates both ends agreed on.
    pub templates_agreed: u64,
    /// From pausing the VM to the destination resuming it.
    pub downtime_ms: Option<f64>,
    /// The destination memory was checked byte-identical to the source.
    pub verified: bool,
    pub error: Option<String>,
    /// Bytes of template catalogs the destination loaded, moved there ahead
    /// of time (`pagefp templates import`), not part of `wire_bytes`.
    #[serde(default)]
    pub catalog_bytes: u64,
    /// Pages sent while the VM was paused.
    #[serde(default)]
    pub final_pages: u64,
    /// Where the downtime went (milliseconds). Source: the agent's final
    /// hash list, the last pages, its own digest, waiting for the
    /// destination's check and state load, the go/resumed exchange.
    /// Destination: reading back what the final round wrote, unmapping
    /// guest memory, loading the VM state.
    #[serde(default)]
    pub downtime_parts_ms: Vec<(String, f64)>,
    /// Source: when each step ended, seconds from the start (connected,
    /// negotiated, each round sent and acknowledged, paused, verified,
    /// resumed): where the migration's time went.
    #[serde(default)]
    pub timeline: Vec<(String, f64)>,
    /// The link was TLS 1.3 with both ends authenticated.
    #[serde(default)]
    pub tls: bool,
    /// How the link was secured (cipher and peer certificate, or plaintext).
    #[serde(default)]
    pub channel: String,
    /// `templates+zstd`: which full-page frames were compressed, and why.
    #[serde(default)]
    pub compression: Option<String>,
    /// How the templates were agreed: `offer` (the destination listed its
    /// catalog) or `query` (the source listed the VM's contents and the
    /// destination said which it can rebuild), and why.
    #[serde(default)]
    pub negotiation: Option<String>,
    /// Destination: template pages fetched from the site store for this
    /// migration (each checked against its hash).
    #[serde(default)]
    pub site: Option<SiteFetch>,
}

/// What a destination got from the site store during the negotiation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SiteFetch {
    /// Contents asked for (held by neither this host's catalogs nor VMs).
    pub asked: u64,
    /// Pages fetched and checked.
    pub pages: u64,
    /// Bytes read from the store.
    pub bytes: u64,
    /// Pages the store lacked or returned wrong.
    pub missing: u64,
    /// Pages of shards that failed (a node down or slow) or not fetched by
    /// the deadline: sent in full.
    pub failed: u64,
    /// Some shard's master failed and its replicas were read instead.
    #[serde(default)]
    pub from_replicas: bool,
    pub seconds: f64,
    /// The store could not be reached at all (the reason).
    pub error: Option<String>,
}

impl MigrationReport {
    /// A migration at its start: nothing sent, nothing known of the memory.
    pub fn new(id: String, role: Role, mode: Mode, vm_pid: u32, peer: String) -> Self {
        Self {
            id,
            role,
            mode,
            vm_pid,
            vm_name: crate::procfs::process_name(vm_pid),
            peer,
            phase: Phase::Connecting,
            round: 0,
            started_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64,
            elapsed_seconds: 0.0,
            mem_bytes: 0,
            remaining_bytes: 0,
            dirty_pages_per_second: 0.0,
            wire_bytes: 0,
            negotiation_bytes: 0,
            negotiation_seconds: 0.0,
            cpu_seconds: 0.0,
            pages: ByEncoding::default(),
            bytes: ByEncoding::default(),
            templates_agreed: 0,
            downtime_ms: None,
            verified: false,
            error: None,
            catalog_bytes: 0,
            final_pages: 0,
            downtime_parts_ms: Vec::new(),
            timeline: Vec::new(),
            tls: false,
            channel: String::new(),
            compression: None,
            negotiation: None,
            site: None,
        }
    }
}
