//! Where a migration shows how it goes: a progress bar on a terminal, a log
//! line per round otherwise, and reports to the local agent, which exports
//! them as metrics (best effort: a migration never fails because the agent
//! is away).

use std::{
    path::PathBuf,
    sync::{Arc, Condvar, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use indicatif::{ProgressBar, ProgressStyle};

use crate::api::{
    client,
    report::{MigrationReport, Phase},
};

/// Reports sent to the agent at most this often (besides phase changes).
const REPORT_EVERY: Duration = Duration::from_secs(1);

pub struct Progress {
    bar: Option<ProgressBar>,
    agent: Option<AgentReporter>,
    last_post: Option<Instant>,
    last_phase: Option<Phase>,
}

impl Progress {
    /// `show`: draw a progress bar (on a terminal only); `agent`: the
    /// agent's API socket to report to.
    pub fn new(show: bool, agent: Option<PathBuf>) -> Self {
        let bar = show.then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template("{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar
        });
        Self {
            bar,
            agent: agent.and_then(AgentReporter::start),
            last_post: None,
            last_phase: None,
        }
    }

    /// Shows `report`, and forwards it to the agent when due.
    pub fn update(&mut self, report: &MigrationReport) {
        if let Some(bar) = &self.bar {
            bar.set_prefix(format!("{} r{}", report.phase.name(), report.round));
            bar.set_length(report.wire_bytes + report.remaining_bytes);
            bar.set_position(report.wire_bytes);
            bar.set_message(format!(
                "dirty {:.0} pages/s, eta {}",
                report.dirty_pages_per_second,
                eta(report)
            ));
            if report.phase.finished() {
                bar.finish_and_clear();
            }
        }
        let phase_changed = self.last_phase != Some(report.phase);
        if phase_changed {
            log::info!(
                "migration {} ({}): {} round {}, {} bytes sent, {} to go",
                report.id,
                report.mode,
                report.phase.name(),
                report.round,
                report.wire_bytes,
                report.remaining_bytes
            );
        }
        let due = self.last_post.is_none_or(|t| t.elapsed() >= REPORT_EVERY);
        if phase_changed || due || report.phase.finished() {
            self.last_phase = Some(report.phase);
            self.last_post = Some(Instant::now());
            if let Some(agent) = &self.agent {
                agent.post(report);
            }
        }
    }

    /// Logs one round (when there is no progress bar to show it).
    pub fn round(&self, report: &MigrationReport, pages: u64, seconds: f64) {
        let line = format!(
            "round {}: {pages} pages in {seconds:.2} s; {} bytes sent in all, ~{} bytes to go, guest dirties {:.0} pages/s",
            report.round, report.wire_bytes, report.remaining_bytes, report.dirty_pages_per_second
        );
        match &self.bar {
            Some(bar) => bar.println(line),
            None => log::info!("{line}"),
        }
    }
}

fn eta(report: &MigrationReport) -> String {
    if report.elapsed_seconds <= 0.0 || report.wire_bytes == 0 {
        return "?".into();
    }
    let rate = report.wire_bytes as f64 / report.elapsed_seconds;
    format!("{:.1}s", report.remaining_bytes as f64 / rate)
}

/// Posts reports to the agent from a thread of its own, so that a migration
/// never waits for the agent (not even during stop-and-copy): a newer
/// report replaces one not sent yet, and the last one is delivered when the
/// migration's [`Progress`] is dropped (each post gives up after
/// [`client::POST_TIMEOUT`]).
struct AgentReporter {
    shared: Arc<(Mutex<Outbox>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Outbox {
    /// The newest report not sent yet, as JSON.
    next: Option<Vec<u8>>,
    closed: bool,
}

impl AgentReporter {
    fn start(socket: PathBuf) -> Option<Self> {
        let shared = Arc::new((Mutex::new(Outbox::default()), Condvar::new()));
        let thread = std::thread::Builder::new()
            .name("pagefp-report".into())
            .spawn({
                let shared = shared.clone();
                move || deliver(&socket, &shared)
            })
            .map_err(|e| log::warn!("cannot start the thread that reports to the agent: {e}"))
            .ok()?;
        Some(Self {
            shared,
            thread: Some(thread),
        })
    }

    fn post(&self, report: &MigrationReport) {
        match serde_json::to_vec(report) {
            Ok(body) => {
                self.shared.0.lock().unwrap().next = Some(body);
                self.shared.1.notify_one();
            }
            Err(e) => log::warn!("cannot encode the migration report: {e}"),
        }
    }
}

impl Drop for AgentReporter {
    fn drop(&mut self) {
        self.shared.0.lock().unwrap().closed = true;
        self.shared.1.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The reporter thread: sends the newest report until closed and empty.
fn deliver(socket: &std::path::Path, shared: &(Mutex<Outbox>, Condvar)) {
    let mut warned = false;
    loop {
        let body = {
            let mut outbox = shared
                .1
                .wait_while(shared.0.lock().unwrap(), |o| o.next.is_none() && !o.closed)
                .unwrap();
            match outbox.next.take() {
                Some(body) => body,
                None => return,
            }
        };
        if let Err(err) = client::post_json_blocking(socket, "/v1/migrations", &body)
            && !warned
        {
            log::warn!(
                "cannot report migration progress to the agent at {} ({err}); its metrics will miss this migration",
                socket.display()
            );
            warned = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead, BufReader, Read, Write},
        os::unix::net::UnixListener,
    };

    use super::*;
    use crate::api::report::{Mode, Role};

    fn report(phase: Phase, round: u32) -> MigrationReport {
        MigrationReport {
            phase,
            round,
            ..MigrationReport::new("m".into(), Role::Source, Mode::Templates, 1, "peer".into())
        }
    }

    /// A fake agent: answers every request 200 after `delay`, and hands the
    /// bodies it got to the test.
    fn fake_agent(delay: Duration) -> (PathBuf, std::sync::mpsc::Receiver<MigrationReport>) {
        let dir = std::env::temp_dir().join(format!(
            "pagefp-progress-{}-{}",
            std::process::id(),
            delay.as_millis()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream);
                    let mut length = 0;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if let Some(value) =
                            line.to_ascii_lowercase().strip_prefix("content-length:")
                        {
                            length = value.trim().parse().unwrap();
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).unwrap();
                    std::thread::sleep(delay);
                    let _ = tx.send(serde_json::from_slice(&body).unwrap());
                    let _ = reader.get_mut().write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
                    );
                });
            }
        });
        (path, rx)
    }

    #[test]
    fn the_last_report_reaches_the_agent_when_the_migration_ends() {
        let (socket, reports) = fake_agent(Duration::ZERO);
        let mut progress = Progress::new(false, Some(socket));
        progress.update(&report(Phase::Precopy, 1));
        progress.update(&report(Phase::StopAndCopy, 2));
        progress.update(&report(Phase::Completed, 2));
        drop(progress);
        let got: Vec<MigrationReport> = reports.try_iter().collect();
        assert_eq!(
            got.last().map(|r| r.phase),
            Some(Phase::Completed),
            "{got:?}"
        );
    }

    #[test]
    fn a_slow_agent_never_holds_up_the_migration() {
        let (socket, reports) = fake_agent(Duration::from_secs(3));
        let mut progress = Progress::new(false, Some(socket));
        let started = Instant::now();
        for round in 1..=3 {
            progress.update(&report(Phase::Precopy, round));
            progress.update(&report(Phase::StopAndCopy, round));
            // Time for the reporter to start a post that the agent sits on.
            std::thread::sleep(Duration::from_millis(100));
        }
        // At least one post of 3 s, had the migration made them itself.
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "updates waited for the agent: {:?}",
            started.elapsed()
        );
        progress.update(&report(Phase::Completed, 3));
        drop(progress);
        let got: Vec<MigrationReport> = reports.try_iter().collect();
        assert_eq!(
            got.last().map(|r| r.phase),
            Some(Phase::Completed),
            "{got:?}"
        );
        assert!(
            got.len() < 7,
            "intermediate reports are replaced: {}",
            got.len()
        );
    }
}
