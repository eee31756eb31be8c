//! What the agent knows about migrations on this host: the latest report of
//! each (posted by `pagefp migrate send|receive` to `POST /v1/migrations`),
//! and the counters and histograms exported as metrics.
//!
//! Reports may repeat or arrive out of order: a migration is counted as
//! started once per (id, role), finished once when its phase first becomes
//! terminal; page and byte counters grow by the increase over the previous
//! report of the same migration.

use std::collections::{HashMap, VecDeque};

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};

use crate::migrate::report::{ByEncoding, MigrationReport, Phase, Role};

/// Finished migrations kept for `GET /v1/migrations`.
const HISTORY: usize = 100;

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Source => "source",
        Role::Destination => "destination",
    }
}

pub struct MigrationBook {
    latest: HashMap<(String, Role), MigrationReport>,
    finished: VecDeque<(String, Role)>,
    pub started: IntCounterVec,
    pub completed: IntCounterVec,
    pub failed: IntCounterVec,
    pub pages: IntCounterVec,
    pub bytes: IntCounterVec,
    pub duration: HistogramVec,
    pub downtime: HistogramVec,
}

impl Default for MigrationBook {
    fn default() -> Self {
        Self::new()
    }
}

impl MigrationBook {
    pub fn new() -> Self {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        Self {
            latest: HashMap::new(),
            finished: VecDeque::new(),
            started: counter(
                "pagefp_migrations_started_total",
                "Migrations started on this host",
                &["role", "mode"],
            ),
            completed: counter(
                "pagefp_migrations_completed_total",
                "Migrations completed (memory verified, destination resumed)",
                &["role", "mode"],
            ),
            failed: counter(
                "pagefp_migrations_failed_total",
                "Migrations that failed (the source VM kept running)",
                &["role", "mode"],
            ),
            pages: counter(
                "pagefp_migration_pages_total",
                "Guest pages migrated, by encoding",
                &["role", "encoding"],
            ),
            bytes: counter(
                "pagefp_migration_wire_bytes_total",
                "Bytes of migrated pages on the wire, by encoding",
                &["role", "encoding"],
            ),
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "pagefp_migration_duration_seconds",
                    "Duration of completed migrations (source side)",
                )
                .buckets(vec![
                    0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                ]),
                &["mode"],
            )
            .expect("valid metric"),
            downtime: HistogramVec::new(
                HistogramOpts::new(
                    "pagefp_migration_downtime_seconds",
                    "Time the VM was paused in completed migrations (source side)",
                )
                .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0]),
                &["mode"],
            )
            .expect("valid metric"),
        }
    }

    /// Takes one report; an error says what is wrong with it.
    pub fn record(&mut self, report: MigrationReport) -> Result<(), String> {
        if report.id.is_empty() || report.id.len() > 128 {
            return Err("a migration report needs an id of 1 to 128 characters".into());
        }
        let key = (report.id.clone(), report.role);
        let role = role_name(report.role);
        let mode = report.mode.name();
        let previous = self.latest.get(&key);
        if previous.is_some_and(|p| p.phase.finished()) {
            // Already final: later (or repeated) reports change nothing.
            return Ok(());
        }
        if previous.is_none() {
            self.started.with_label_values(&[role, mode]).inc();
            // Outcome series exist (at 0) from the first migration on.
            self.completed.with_label_values(&[role, mode]).inc_by(0);
            self.failed.with_label_values(&[role, mode]).inc_by(0);
        }
        let zero = ByEncoding::default();
        let (old_pages, old_bytes) = previous.map_or((zero, zero), |p| (p.pages, p.bytes));
        for (encoding, new, old) in encodings(&report.pages, &old_pages) {
            self.pages
                .with_label_values(&[role, encoding])
                .inc_by(new.saturating_sub(old));
        }
        for (encoding, new, old) in encodings(&report.bytes, &old_bytes) {
            self.bytes
                .with_label_values(&[role, encoding])
                .inc_by(new.saturating_sub(old));
        }
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
            Phase::Failed => self.failed.with_label_values(&[role, mode]).inc(),
            _ => {}
        }
        if report.phase.finished() {
            self.finished.push_back(key.clone());
            while self.finished.len() > HISTORY {
                if let Some(old) = self.finished.pop_front() {
                    self.latest.remove(&old);
                }
            }
        }
        self.latest.insert(key, report);
        Ok(())
    }

    /// Running migrations first, then finished ones, newest first.
    pub fn reports(&self) -> Vec<&MigrationReport> {
        let mut all: Vec<&MigrationReport> = self.latest.values().collect();
        all.sort_by(|a, b| {
            a.phase
                .finished()
                .cmp(&b.phase.finished())
                .then(b.started_unix_ms.cmp(&a.started_unix_ms))
        });
        all
    }

    /// Migrations still going.
    pub fn running(&self) -> impl Iterator<Item = &MigrationReport> {
        self.latest.values().filter(|r| !r.phase.finished())
    }
}

fn encodings<'a>(new: &'a ByEncoding, old: &'a ByEncoding) -> [(&'static str, u64, u64); 4] {
    [
        ("zero", new.zero, old.zero),
        ("template", new.template, old.template),
        ("full", new.full, old.full),
        ("zstd", new.zstd, old.zstd),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::report::Mode;

    fn report(id: &str, phase: Phase, template_pages: u64) -> MigrationReport {
        MigrationReport {
            id: id.into(),
            role: Role::Source,
            mode: Mode::Templates,
            vm_pid: 7,
            vm_name: "vmm".into(),
            peer: "dest:7000".into(),
            phase,
            round: 1,
            started_unix_ms: 1,
            elapsed_seconds: 3.0,
            mem_bytes: 1 << 20,
            remaining_bytes: 0,
            dirty_pages_per_second: 0.0,
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
            error: None,
            catalog_bytes: 0,
            final_pages: 0,
            downtime_parts_ms: Vec::new(),
        }
    }

    #[test]
    fn repeated_and_late_reports_count_once() {
        let mut book = MigrationBook::new();
        book.record(report("a", Phase::Precopy, 10)).unwrap();
        book.record(report("a", Phase::Precopy, 10)).unwrap();
        book.record(report("a", Phase::Precopy, 25)).unwrap();
        book.record(report("a", Phase::Completed, 30)).unwrap();
        book.record(report("a", Phase::Completed, 30)).unwrap();
        book.record(report("a", Phase::Precopy, 99)).unwrap();
        let get = |c: &IntCounterVec, l: &[&str]| c.with_label_values(l).get();
        assert_eq!(get(&book.started, &["source", "templates"]), 1);
        assert_eq!(get(&book.completed, &["source", "templates"]), 1);
        assert_eq!(get(&book.pages, &["source", "template"]), 30);
        assert_eq!(get(&book.bytes, &["source", "template"]), 270);
        assert_eq!(
            book.duration
                .with_label_values(&["templates"])
                .get_sample_count(),
            1
        );
        assert_eq!(book.running().count(), 0);
        book.record(report("b", Phase::Failed, 0)).unwrap();
        assert_eq!(get(&book.failed, &["source", "templates"]), 1);
        assert_eq!(book.reports().len(), 2);
        assert!(book.record(report("", Phase::Precopy, 0)).is_err());
    }
}
