//! What the agent knows about migrations on this host: the latest report of
//! each (posted by `pagefp migrate send|receive` to `POST /v1/migrations`
//! when they start, about once a second, and when they end), and the
//! counters, histograms and gauges exported as metrics.
//!
//! Reports may repeat, arrive out of order, or stop: a migration is counted
//! as started once per (id, role); completed or failed once, when its phase
//! first becomes terminal (later reports of it change nothing); page and
//! byte counters grow by the increase over the largest value already
//! counted, so a stale report never counts twice. A migration whose
//! reporting process exits without a final report counts as failed.

use std::collections::{HashMap, HashSet, VecDeque};

use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    core::Collector,
};

use crate::api::report::{ByEncoding, MigrationReport, Mode, Phase, Role};

/// Finished migrations kept for `GET /v1/migrations`.
pub const HISTORY: usize = 100;
/// Finished migrations remembered (beyond [`HISTORY`]) so that their late
/// reports are still recognised and ignored.
const REMEMBERED: usize = 4096;
/// Migrations in progress at once; more are refused (they would make the
/// per-migration series unbounded).
pub const MAX_RUNNING: usize = 256;
const MAX_ID: usize = 128;
const MAX_TEXT: usize = 4096;

const ROLES: [Role; 2] = [Role::Source, Role::Destination];
const MODES: [Mode; 3] = [Mode::Baseline, Mode::Templates, Mode::TemplatesZstd];
const ENCODINGS: [&str; 4] = ["zero", "template", "full", "zstd"];
/// Phases of a running migration (`pagefp_migration_phase`).
const RUNNING_PHASES: [Phase; 5] = [
    Phase::Connecting,
    Phase::Negotiating,
    Phase::Precopy,
    Phase::StopAndCopy,
    Phase::Verifying,
];

pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Source => "source",
        Role::Destination => "destination",
    }
}

/// Why a report was not taken.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The report itself is wrong.
    Invalid(String),
    /// It contradicts earlier reports of the same migration.
    Conflict(String),
    /// Too many migrations are running.
    TooMany(String),
}

impl Refused {
    pub fn message(&self) -> &str {
        match self {
            Refused::Invalid(m) | Refused::Conflict(m) | Refused::TooMany(m) => m,
        }
    }
}

/// The process that posts a migration's reports (from the API socket's
/// peer credentials); its start time tells a reused pid apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reporter {
    pub pid: u32,
    start_ticks: Option<u64>,
}

impl Reporter {
    pub fn new(pid: u32) -> Self {
        Self {
            pid,
            start_ticks: proc_start(pid).map(|(ticks, _)| ticks),
        }
    }

    /// The process still runs (and is not a zombie).
    pub fn alive(&self) -> bool {
        match proc_start(self.pid) {
            Some((ticks, zombie)) => !zombie && self.start_ticks.is_none_or(|t| t == ticks),
            None => false,
        }
    }
}

/// (start time in clock ticks, zombie or dead) of a process.
fn proc_start(pid: u32) -> Option<(u64, bool)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name (field 2) may hold spaces and parentheses: fields 3.. follow
    // the last ')'.
    let mut fields = stat.get(stat.rfind(')')? + 2..)?.split(' ');
    let state = fields.next()?;
    // Field 22 (starttime) is the 20th after the state (field 3).
    let ticks = fields.nth(18)?.parse().ok()?;
    Some((ticks, state == "Z" || state == "X"))
}

type Key = (String, Role);

struct Entry {
    report: MigrationReport,
    reporter: Option<Reporter>,
    /// Largest values already added to the counters.
    counted_pages: ByEncoding,
    counted_bytes: ByEncoding,
    counted_negotiation: u64,
}

pub struct MigrationBook {
    entries: HashMap<Key, Entry>,
    /// Finished migrations in `entries`, oldest first.
    finished: VecDeque<Key>,
    /// Finished migrations dropped from `entries`, oldest first.
    forgotten: VecDeque<Key>,
    forgotten_set: HashSet<Key>,
    pub started: IntCounterVec,
    pub completed: IntCounterVec,
    pub failed: IntCounterVec,
    pub pages: IntCounterVec,
    pub bytes: IntCounterVec,
    pub negotiation: IntCounterVec,
    pub duration: HistogramVec,
    pub downtime: HistogramVec,
}

impl Default for MigrationBook {
    fn default() -> Self {
        Self::new()
    }
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> HistogramVec {
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &["mode"])
        .expect("valid metric")
}

impl MigrationBook {
    pub fn new() -> Self {
        let book = Self {
            entries: HashMap::new(),
            finished: VecDeque::new(),
            forgotten: VecDeque::new(),
            forgotten_set: HashSet::new(),
            started: counter(
                "pagefp_migrations_started_total",
                "Migrations started on this host, by role (source, destination) and mode",
                &["role", "mode"],
            ),
            completed: counter(
                "pagefp_migrations_completed_total",
                "Migrations completed (memory verified, destination resumed)",
                &["role", "mode"],
            ),
            failed: counter(
                "pagefp_migrations_failed_total",
                "Migrations that failed, or whose process ended without a final report (the source VM kept running)",
                &["role", "mode"],
            ),
            pages: counter(
                "pagefp_migration_pages_total",
                "Guest pages sent (source) or received (destination), by encoding",
                &["role", "encoding"],
            ),
            bytes: counter(
                "pagefp_migration_wire_bytes_total",
                "Wire bytes of migrated pages (record headers included), by encoding",
                &["role", "encoding"],
            ),
            negotiation: counter(
                "pagefp_migration_negotiation_wire_bytes_total",
                "Wire bytes of template negotiations (the offers and answers before the pages)",
                &["role"],
            ),
            duration: histogram(
                "pagefp_migration_duration_seconds",
                "Duration of completed migrations, first connection to the destination resumed (source side)",
                vec![
                    0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
                ],
            ),
            downtime: histogram(
                "pagefp_migration_downtime_seconds",
                "Time the VM was paused in completed migrations (source side)",
                vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0,
                ],
            ),
        };
        // Every known label combination exists from the start (at 0), so
        // `rate()` and `increase()` see the first migration too.
        for role in ROLES.map(role_name) {
            for mode in MODES.map(Mode::name) {
                book.started.with_label_values(&[role, mode]);
                book.completed.with_label_values(&[role, mode]);
                book.failed.with_label_values(&[role, mode]);
            }
            for encoding in ENCODINGS {
                book.pages.with_label_values(&[role, encoding]);
                book.bytes.with_label_values(&[role, encoding]);
            }
            book.negotiation.with_label_values(&[role]);
        }
        for mode in MODES.map(Mode::name) {
            book.duration.with_label_values(&[mode]);
            book.downtime.with_label_values(&[mode]);
        }
        book
    }

    /// Takes one report, posted by `reporter` (when known).
    pub fn record(
        &mut self,
        report: MigrationReport,
        reporter: Option<Reporter>,
    ) -> Result<(), Refused> {
        validate(&report).map_err(Refused::Invalid)?;
        let key: Key = (report.id.clone(), report.role);
        if self.forgotten_set.contains(&key) {
            return Ok(());
        }
        let is_new = !self.entries.contains_key(&key);
        if is_new {
            if !report.phase.finished() && self.running().count() >= MAX_RUNNING {
                return Err(Refused::TooMany(format!(
                    "{MAX_RUNNING} migrations are already running on this host; report {} again when one has ended",
                    report.id
                )));
            }
            self.started
                .with_label_values(&[role_name(report.role), report.mode.name()])
                .inc();
            self.entries.insert(
                key.clone(),
                Entry {
                    report: report.clone(),
                    reporter,
                    counted_pages: ByEncoding::default(),
                    counted_bytes: ByEncoding::default(),
                    counted_negotiation: 0,
                },
            );
        }
        let entry = self.entries.get_mut(&key).expect("inserted above");
        if !is_new && entry.report.phase.finished() {
            // Final already: later or repeated reports change nothing.
            return Ok(());
        }
        if entry.report.mode != report.mode {
            return Err(Refused::Conflict(format!(
                "migration {} ({}) was reported in mode {}, now in mode {}",
                report.id,
                role_name(report.role),
                entry.report.mode,
                report.mode
            )));
        }
        let role = role_name(report.role);
        add_increase(&self.pages, role, &report.pages, &mut entry.counted_pages);
        add_increase(&self.bytes, role, &report.bytes, &mut entry.counted_bytes);
        if report.negotiation_bytes > entry.counted_negotiation {
            self.negotiation
                .with_label_values(&[role])
                .inc_by(report.negotiation_bytes - entry.counted_negotiation);
            entry.counted_negotiation = report.negotiation_bytes;
        }
        if reporter.is_some() {
            entry.reporter = reporter;
        }
        // An older report (it went out earlier) does not replace a newer one.
        if report.phase.finished() || report.elapsed_seconds >= entry.report.elapsed_seconds {
            let finished = report.phase.finished();
            entry.report = report;
            if finished {
                self.finish(key);
            }
        }
        Ok(())
    }

    /// Counts the outcome of a migration whose phase just became terminal.
    fn finish(&mut self, key: Key) {
        let report = &self.entries[&key].report;
        let (role, mode) = (role_name(report.role), report.mode.name());
        match report.phase {
            Phase::Completed => {
                self.completed.with_label_values(&[role, mode]).inc();
                if report.role == Role::Source {
                    self.duration
                        .with_label_values(&[mode])
                        .observe(report.elapsed_seconds);
                    if let Some(ms) = report.downtime_ms {
                        self.downtime
                            .with_label_values(&[mode])
                            .observe(ms / 1000.0);
                    }
                }
            }
            _ => self.failed.with_label_values(&[role, mode]).inc(),
        }
        self.finished.push_back(key);
        while self.finished.len() > HISTORY {
            let Some(old) = self.finished.pop_front() else {
                break;
            };
            self.entries.remove(&old);
            self.forgotten_set.insert(old.clone());
            self.forgotten.push_back(old);
        }
        while self.forgotten.len() > REMEMBERED {
            if let Some(old) = self.forgotten.pop_front() {
                self.forgotten_set.remove(&old);
            }
        }
    }

    /// Migrations whose reporting process is gone without a final report
    /// become failed.
    pub fn sweep(&mut self) {
        let abandoned: Vec<(Key, u32)> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.report.phase.finished())
            .filter_map(|(key, e)| {
                let reporter = e.reporter?;
                (!reporter.alive()).then(|| (key.clone(), reporter.pid))
            })
            .collect();
        for (key, pid) in abandoned {
            let entry = self.entries.get_mut(&key).expect("listed above");
            log::warn!(
                "migration {} ({}): its process (pid {pid}) ended without a final report; counted as failed",
                key.0,
                role_name(key.1)
            );
            entry.report.error = Some(format!(
                "the migration process (pid {pid}) ended without a final report; last phase: {}",
                entry.report.phase.name()
            ));
            entry.report.phase = Phase::Failed;
            self.finish(key);
        }
    }

    /// Running migrations first (oldest first), then finished ones (newest first).
    pub fn reports(&self) -> Vec<&MigrationReport> {
        let mut all: Vec<&MigrationReport> = self.entries.values().map(|e| &e.report).collect();
        all.sort_by(|a, b| {
            let order = a.phase.finished().cmp(&b.phase.finished());
            order.then(if a.phase.finished() {
                b.started_unix_ms.cmp(&a.started_unix_ms)
            } else {
                a.started_unix_ms.cmp(&b.started_unix_ms)
            })
        });
        all
    }

    /// Migrations still going.
    pub fn running(&self) -> impl Iterator<Item = &MigrationReport> {
        self.entries
            .values()
            .map(|e| &e.report)
            .filter(|r| !r.phase.finished())
    }

    /// Every metric of the book: the counters and histograms, and gauges of
    /// the migrations running now (built afresh, so the series of a
    /// migration end with it).
    pub fn collectors(&self) -> Result<Vec<Box<dyn Collector>>, prometheus::Error> {
        let labels = &["id", "role", "vm"];
        let gauge = |name: &str, help: &str| GaugeVec::new(Opts::new(name, help), labels);
        let int_gauge = |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), labels);
        let running = IntGauge::new(
            "pagefp_migrations_running",
            "Migrations in progress on this host (both roles)",
        )?;
        let remaining = gauge(
            "pagefp_migration_remaining_bytes",
            "Estimated bytes a running migration still has to send (source; 0 at the destination)",
        )?;
        let transferred = int_gauge(
            "pagefp_migration_transferred_bytes",
            "Bytes a running migration has sent (source) or received (destination) so far",
        )?;
        let memory = int_gauge(
            "pagefp_migration_memory_bytes",
            "Guest memory size of a running migration",
        )?;
        let dirty = gauge(
            "pagefp_migration_dirty_pages_per_second",
            "Pages the guest of a running migration dirtied per second during its last round",
        )?;
        let round = int_gauge(
            "pagefp_migration_round",
            "Pre-copy round of a running migration (1 = the first pass over all memory)",
        )?;
        let start = gauge(
            "pagefp_migration_start_time_seconds",
            "Start of a running migration, seconds since the Unix epoch",
        )?;
        let phase = IntGaugeVec::new(
            Opts::new(
                "pagefp_migration_phase",
                "Phase of a running migration: 1 for the current phase, 0 for the others",
            ),
            &["id", "role", "vm", "phase"],
        )?;
        for report in self.running() {
            let vm = report.vm_pid.to_string();
            let values = [report.id.as_str(), role_name(report.role), vm.as_str()];
            remaining
                .with_label_values(&values)
                .set(report.remaining_bytes as f64);
            transferred
                .with_label_values(&values)
                .set(clamp_i64(report.wire_bytes));
            memory
                .with_label_values(&values)
                .set(clamp_i64(report.mem_bytes));
            dirty
                .with_label_values(&values)
                .set(report.dirty_pages_per_second);
            round
                .with_label_values(&values)
                .set(i64::from(report.round));
            start
                .with_label_values(&values)
                .set(report.started_unix_ms as f64 / 1000.0);
            for candidate in RUNNING_PHASES {
                phase
                    .with_label_values(&[values[0], values[1], values[2], candidate.name()])
                    .set(i64::from(candidate == report.phase));
            }
        }
        running.set(self.running().count() as i64);
        Ok(vec![
            Box::new(self.started.clone()),
            Box::new(self.completed.clone()),
            Box::new(self.failed.clone()),
            Box::new(self.pages.clone()),
            Box::new(self.bytes.clone()),
            Box::new(self.negotiation.clone()),
            Box::new(self.duration.clone()),
            Box::new(self.downtime.clone()),
            Box::new(running),
            Box::new(remaining),
            Box::new(transferred),
            Box::new(memory),
            Box::new(dirty),
            Box::new(round),
            Box::new(start),
            Box::new(phase),
        ])
    }
}

fn clamp_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Adds to `counter` what `new` has beyond `counted`, per encoding.
fn add_increase(counter: &IntCounterVec, role: &str, new: &ByEncoding, counted: &mut ByEncoding) {
    for (encoding, new, counted) in [
        ("zero", new.zero, &mut counted.zero),
        ("template", new.template, &mut counted.template),
        ("full", new.full, &mut counted.full),
        ("zstd", new.zstd, &mut counted.zstd),
    ] {
        if new > *counted {
            counter
                .with_label_values(&[role, encoding])
                .inc_by(new - *counted);
            *counted = new;
        }
    }
}

/// What makes a report unusable, if anything.
fn validate(report: &MigrationReport) -> Result<(), String> {
    let id_ok = !report.id.is_empty()
        && report.id.len() <= MAX_ID
        && report
            .id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if !id_ok {
        return Err(format!(
            "a migration report needs an id of 1 to {MAX_ID} characters out of A-Z a-z 0-9 - _ . : (got {:?})",
            truncated(&report.id)
        ));
    }
    for (field, value) in [
        ("elapsed_seconds", report.elapsed_seconds),
        ("dirty_pages_per_second", report.dirty_pages_per_second),
        ("downtime_ms", report.downtime_ms.unwrap_or(0.0)),
    ] {
        if !value.is_finite() || value < 0.0 {
            return Err(format!(
                "{field} of migration {} must be a finite number >= 0, not {value}",
                report.id
            ));
        }
    }
    for (field, text) in [
        ("vm_name", report.vm_name.as_str()),
        ("peer", report.peer.as_str()),
        ("error", report.error.as_deref().unwrap_or("")),
    ] {
        if text.len() > MAX_TEXT {
            return Err(format!(
                "{field} of migration {} is longer than {MAX_TEXT} bytes",
                report.id
            ));
        }
    }
    if report.downtime_parts_ms.len() > 64 {
        return Err(format!(
            "downtime_parts_ms of migration {} has more than 64 parts",
            report.id
        ));
    }
    Ok(())
}

fn truncated(text: &str) -> String {
    text.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(id: &str, phase: Phase, template_pages: u64, elapsed: f64) -> MigrationReport {
        MigrationReport {
            vm_name: "vmm".into(),
            phase,
            round: 1,
            started_unix_ms: 1,
            elapsed_seconds: elapsed,
            mem_bytes: 1 << 20,
            remaining_bytes: 1000,
            wire_bytes: 100,
            negotiation_bytes: 10,
            pages: ByEncoding {
                template: template_pages,
                ..ByEncoding::default()
            },
            bytes: ByEncoding {
                template: template_pages * 9,
                ..ByEncoding::default()
            },
            templates_agreed: 5,
            downtime_ms: Some(120.0),
            verified: phase == Phase::Completed,
            ..MigrationReport::new(
                id.into(),
                Role::Source,
                Mode::Templates,
                7,
                "dest:7000".into(),
            )
        }
    }

    fn get(counter: &IntCounterVec, labels: &[&str]) -> u64 {
        counter.with_label_values(labels).get()
    }

    /// The exposition of the book alone.
    fn exposition(book: &MigrationBook) -> String {
        let registry = prometheus::Registry::new();
        for collector in book.collectors().unwrap() {
            registry.register(collector).unwrap();
        }
        let mut out = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &registry.gather(),
            &mut out,
        )
        .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn repeated_late_and_out_of_order_reports_count_once() {
        let mut book = MigrationBook::new();
        book.record(report("a", Phase::Precopy, 10, 1.0), None)
            .unwrap();
        book.record(report("a", Phase::Precopy, 10, 1.0), None)
            .unwrap();
        book.record(report("a", Phase::Precopy, 25, 2.0), None)
            .unwrap();
        // An older report arriving late: nothing counted twice, and it does
        // not become the latest.
        book.record(report("a", Phase::Precopy, 10, 1.5), None)
            .unwrap();
        assert_eq!(get(&book.pages, &["source", "template"]), 25);
        assert_eq!(book.running().next().unwrap().elapsed_seconds, 2.0);
        book.record(report("a", Phase::Completed, 30, 3.0), None)
            .unwrap();
        book.record(report("a", Phase::Completed, 30, 3.0), None)
            .unwrap();
        book.record(report("a", Phase::Precopy, 99, 2.5), None)
            .unwrap();
        book.record(report("a", Phase::Failed, 99, 4.0), None)
            .unwrap();
        assert_eq!(get(&book.started, &["source", "templates"]), 1);
        assert_eq!(get(&book.completed, &["source", "templates"]), 1);
        assert_eq!(get(&book.failed, &["source", "templates"]), 0);
        assert_eq!(get(&book.pages, &["source", "template"]), 30);
        assert_eq!(get(&book.bytes, &["source", "template"]), 270);
        assert_eq!(get(&book.negotiation, &["source"]), 10);
        let duration = book.duration.with_label_values(&["templates"]);
        assert_eq!(duration.get_sample_count(), 1);
        assert_eq!(duration.get_sample_sum(), 3.0);
        let downtime = book.downtime.with_label_values(&["templates"]);
        assert_eq!(downtime.get_sample_sum(), 0.12);
        assert_eq!(book.running().count(), 0);

        book.record(report("b", Phase::Failed, 0, 1.0), None)
            .unwrap();
        assert_eq!(get(&book.failed, &["source", "templates"]), 1);
        assert_eq!(get(&book.started, &["source", "templates"]), 2);
        assert_eq!(book.reports().len(), 2);
    }

    #[test]
    fn both_roles_of_one_migration_are_two_entries() {
        let mut book = MigrationBook::new();
        let mut destination = report("m", Phase::Precopy, 4, 1.0);
        destination.role = Role::Destination;
        book.record(report("m", Phase::Precopy, 4, 1.0), None)
            .unwrap();
        book.record(destination.clone(), None).unwrap();
        assert_eq!(book.running().count(), 2);
        destination.phase = Phase::Completed;
        book.record(destination, None).unwrap();
        assert_eq!(get(&book.completed, &["destination", "templates"]), 1);
        assert_eq!(get(&book.completed, &["source", "templates"]), 0);
        // Only the source observes durations.
        assert_eq!(
            book.duration
                .with_label_values(&["templates"])
                .get_sample_count(),
            0
        );
    }

    #[test]
    fn malformed_and_conflicting_reports_are_refused() {
        let mut book = MigrationBook::new();
        for bad in [
            report("", Phase::Precopy, 0, 1.0),
            report(&"x".repeat(MAX_ID + 1), Phase::Precopy, 0, 1.0),
            report("a b", Phase::Precopy, 0, 1.0),
            report("quote\"", Phase::Precopy, 0, 1.0),
            report("neg", Phase::Precopy, 0, -1.0),
            report("nan", Phase::Precopy, 0, f64::NAN),
            MigrationReport {
                vm_name: "v".repeat(MAX_TEXT + 1),
                ..report("long", Phase::Precopy, 0, 1.0)
            },
        ] {
            assert!(
                matches!(book.record(bad.clone(), None), Err(Refused::Invalid(_))),
                "{:?}",
                bad.id
            );
        }
        assert_eq!(book.reports().len(), 0);
        book.record(report("a", Phase::Precopy, 0, 1.0), None)
            .unwrap();
        let other_mode = MigrationReport {
            mode: Mode::Baseline,
            ..report("a", Phase::Precopy, 0, 2.0)
        };
        assert!(matches!(
            book.record(other_mode, None),
            Err(Refused::Conflict(_))
        ));
    }

    #[test]
    fn running_migrations_are_bounded_and_history_is_kept_short() {
        let mut book = MigrationBook::new();
        for i in 0..MAX_RUNNING {
            book.record(report(&format!("r{i}"), Phase::Precopy, 0, 1.0), None)
                .unwrap();
        }
        assert!(matches!(
            book.record(report("one-more", Phase::Precopy, 0, 1.0), None),
            Err(Refused::TooMany(_))
        ));
        for i in 0..MAX_RUNNING {
            book.record(report(&format!("r{i}"), Phase::Completed, 0, 2.0), None)
                .unwrap();
        }
        assert_eq!(book.reports().len(), HISTORY);
        // A repeated final report of a migration dropped from the history
        // still counts nothing.
        book.record(report("r0", Phase::Completed, 0, 2.0), None)
            .unwrap();
        assert_eq!(
            get(&book.completed, &["source", "templates"]),
            MAX_RUNNING as u64
        );
        assert_eq!(
            get(&book.started, &["source", "templates"]),
            MAX_RUNNING as u64
        );
    }

    #[test]
    fn a_migration_whose_process_exited_counts_as_failed() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let reporter = Reporter::new(pid);
        let mut book = MigrationBook::new();
        book.record(report("gone", Phase::Precopy, 3, 1.0), Some(reporter))
            .unwrap();
        book.record(
            report("here", Phase::Precopy, 3, 1.0),
            Some(Reporter::new(std::process::id())),
        )
        .unwrap();
        child.wait().unwrap();
        assert!(!reporter.alive());
        book.sweep();
        assert_eq!(get(&book.failed, &["source", "templates"]), 1);
        let gone = book.reports().into_iter().find(|r| r.id == "gone").unwrap();
        assert_eq!(gone.phase, Phase::Failed);
        assert!(
            gone.error
                .as_ref()
                .unwrap()
                .contains("without a final report")
        );
        assert_eq!(book.running().count(), 1, "the live reporter's migration");
    }

    #[test]
    fn running_gauges_end_with_the_migration() {
        let mut book = MigrationBook::new();
        let text = exposition(&book);
        // Counters and histograms exist at 0 before any migration.
        assert!(
            text.contains("pagefp_migrations_started_total{mode=\"baseline\",role=\"source\"} 0"),
            "{text}"
        );
        assert!(text.contains("pagefp_migration_downtime_seconds_count{mode=\"templates\"} 0"));
        assert!(text.contains("pagefp_migrations_running 0"));
        assert!(!text.contains("pagefp_migration_remaining_bytes{"));

        book.record(report("live", Phase::Precopy, 3, 1.0), None)
            .unwrap();
        let text = exposition(&book);
        for line in [
            "pagefp_migrations_running 1",
            "pagefp_migration_remaining_bytes{id=\"live\",role=\"source\",vm=\"7\"} 1000",
            "pagefp_migration_round{id=\"live\",role=\"source\",vm=\"7\"} 1",
            "pagefp_migration_phase{id=\"live\",phase=\"precopy\",role=\"source\",vm=\"7\"} 1",
            "pagefp_migration_phase{id=\"live\",phase=\"verifying\",role=\"source\",vm=\"7\"} 0",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        book.record(report("live", Phase::Completed, 3, 2.0), None)
            .unwrap();
        let text = exposition(&book);
        assert!(text.contains("pagefp_migrations_running 0"));
        assert!(!text.contains("id=\"live\""), "{text}");
    }
}
