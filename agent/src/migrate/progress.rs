//! Where a migration shows how it goes: a progress bar on a terminal, a log
//! line per round otherwise, and reports to the local agent, which exports
//! them as metrics (best effort: a migration never fails because the agent
//! is away).

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::PathBuf,
    time::{Duration, Instant},
};

use indicatif::{ProgressBar, ProgressStyle};

use crate::api::report::{MigrationReport, Phase};

/// Reports sent to the agent at most this often (besides phase changes).
const REPORT_EVERY: Duration = Duration::from_secs(1);

pub struct Progress {
    bar: Option<ProgressBar>,
    agent: Option<PathBuf>,
    last_post: Option<Instant>,
    last_phase: Option<Phase>,
    agent_warned: bool,
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
            agent,
            last_post: None,
            last_phase: None,
            agent_warned: false,
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
            self.post(report);
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

    fn post(&mut self, report: &MigrationReport) {
        let Some(socket) = &self.agent else { return };
        if let Err(err) = post_report(socket, report)
            && !self.agent_warned
        {
            {
                log::warn!(
                    "cannot report migration progress to the agent at {} ({err}); its metrics will miss this migration",
                    socket.display()
                );
                self.agent_warned = true;
            }
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

/// One `POST /v1/migrations` over the agent's Unix socket.
fn post_report(socket: &PathBuf, report: &MigrationReport) -> std::io::Result<()> {
    let body = serde_json::to_vec(report).map_err(std::io::Error::other)?;
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "POST /v1/migrations HTTP/1.1\r\nHost: pagefp\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(&body)?;
    let mut answer = Vec::new();
    stream.take(64 << 10).read_to_end(&mut answer)?;
    let status = answer
        .split(|b| *b == b' ')
        .nth(1)
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or(0);
    if !(200..300).contains(&status) {
        return Err(std::io::Error::other(format!(
            "the agent answered {}",
            String::from_utf8_lossy(answer.split(|b| *b == b'\r').next().unwrap_or_default())
        )));
    }
    Ok(())
}
