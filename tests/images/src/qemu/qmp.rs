//! A small blocking QMP client: one connection, one command at a time.
//!
//! [`Qmp::new`] reads the greeting and negotiates capabilities; every
//! [`Qmp::execute`] writes one command and returns its `return` value.
//! Asynchronous events (`{"event": ...}`) arriving in between are skipped.
//! A QMP error becomes a [`QmpError`] (find it with `downcast_ref`), whose
//! message names the command, QEMU's error class and its description.

use std::{
    io::{BufRead, BufReader, Write},
    ops::Index,
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

/// How long one command may take before [`Qmp::execute`] gives up
/// (`pmemsave` of a large guest under load is the slowest we issue).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// QEMU refused a command.
#[derive(Debug, thiserror::Error)]
#[error("QEMU refused `{command}`: {desc} ({class})")]
pub struct QmpError {
    pub command: String,
    /// QMP's error class, e.g. `GenericError`, `CommandNotFound`.
    pub class: String,
    pub desc: String,
}

/// A QMP connection, capabilities negotiated.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

/// `query-status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmStatus {
    /// `running`, `paused`, `inmigrate`, `postmigrate`, `prelaunch`, ...
    pub status: String,
    pub running: bool,
}

/// `query-migrate`: the figures we use, typed, and QEMU's whole answer in
/// `raw`. Indexing (`info["ram"]["transferred"]`) reads `raw`.
#[derive(Clone, Debug)]
pub struct MigrationInfo {
    /// `none`, `setup`, `active`, `device`, `completed`, `failed`,
    /// `cancelled`, ... (empty when QEMU gave none).
    pub status: String,
    /// Milliseconds since the migration started (`total-time`).
    pub total_time_ms: Option<u64>,
    /// Milliseconds the guest was stopped (`downtime`, once completed).
    pub downtime_ms: Option<u64>,
    pub ram: Option<RamStats>,
    /// `error-desc`, when it failed.
    pub error: Option<String>,
    pub raw: Value,
}

/// The `ram` member of `query-migrate`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RamStats {
    /// Bytes sent so far (all RAM records, headers included).
    pub transferred: u64,
    /// Guest RAM size in bytes.
    pub total: u64,
    pub remaining: u64,
    /// Pages sent in full.
    pub normal: u64,
    /// Pages sent as zero pages (QEMU calls them `duplicate`).
    pub duplicate: u64,
    pub normal_bytes: u64,
    /// Megabits per second, QEMU's own estimate.
    pub mbps: f64,
    /// Dirty-bitmap syncs (rounds).
    pub dirty_sync_count: u64,
}

impl MigrationInfo {
    fn from_value(raw: Value) -> Self {
        let number = |v: &Value| v.as_u64();
        let ram = raw.get("ram").map(|ram| RamStats {
            transferred: number(&ram["transferred"]).unwrap_or(0),
            total: number(&ram["total"]).unwrap_or(0),
            remaining: number(&ram["remaining"]).unwrap_or(0),
            normal: number(&ram["normal"]).unwrap_or(0),
            duplicate: number(&ram["duplicate"]).unwrap_or(0),
            normal_bytes: number(&ram["normal-bytes"]).unwrap_or(0),
            mbps: ram["mbps"].as_f64().unwrap_or(0.0),
            dirty_sync_count: number(&ram["dirty-sync-count"]).unwrap_or(0),
        });
        Self {
            status: raw["status"].as_str().unwrap_or_default().to_owned(),
            total_time_ms: number(&raw["total-time"]),
            downtime_ms: number(&raw["downtime"]),
            ram,
            error: raw["error-desc"].as_str().map(str::to_owned),
            raw,
        }
    }

    pub fn completed(&self) -> bool {
        self.status == "completed"
    }
}

impl Index<&str> for MigrationInfo {
    type Output = Value;

    /// A member of QEMU's answer (`Value::Null` when absent).
    fn index(&self, key: &str) -> &Value {
        &self.raw[key]
    }
}

impl Qmp {
    /// Reads the greeting from `stream` and negotiates capabilities.
    pub fn new(stream: UnixStream) -> anyhow::Result<Self> {
        stream.set_read_timeout(Some(COMMAND_TIMEOUT))?;
        let mut qmp = Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        // Under load QEMU has been seen to send an event (RESUME) ahead of
        // the greeting on a fresh connection: events are skipped.
        let greeting = loop {
            let message = qmp.read().context("reading the QMP greeting")?;
            if message.get("event").is_none() {
                break message;
            }
        };
        if greeting.get("QMP").is_none() {
            bail!("not a QMP greeting: {greeting}");
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Connects to the QMP socket at `path`, retrying until `timeout` (QEMU
    /// creates the socket shortly after it starts).
    pub fn connect(path: &Path, timeout: Duration) -> anyhow::Result<Self> {
        let deadline = Instant::now() + timeout;
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => return Self::new(stream),
                Err(err) if Instant::now() > deadline => {
                    return Err(err)
                        .with_context(|| format!("connecting to QMP at {}", path.display()));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn read(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => bail!("QEMU closed its QMP socket (did it exit?)"),
            Ok(_) => {}
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                bail!(
                    "QEMU did not answer on QMP within {} s",
                    COMMAND_TIMEOUT.as_secs()
                )
            }
            Err(err) => return Err(err).context("reading from QMP"),
        }
        serde_json::from_str(&line)
            .with_context(|| format!("QMP sent something that is not JSON: {line:?}"))
    }

    /// Runs `command` with `arguments` (a JSON object); its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> anyhow::Result<Value> {
        let mut request = json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        writeln!(self.writer, "{request}")
            .with_context(|| format!("sending `{command}` over QMP"))?;
        loop {
            let mut answer = self
                .read()
                .with_context(|| format!("waiting for QEMU's answer to `{command}`"))?;
            if let Some(value) = answer.get_mut("return") {
                return Ok(value.take());
            }
            if let Some(error) = answer.get("error") {
                return Err(QmpError {
                    command: command.to_owned(),
                    class: error["class"].as_str().unwrap_or("?").to_owned(),
                    desc: error["desc"].as_str().unwrap_or("?").to_owned(),
                }
                .into());
            }
            // An event (or anything else that is not our answer): skip it.
        }
    }

    /// Sends `command` without waiting for the answer (for `quit`, whose
    /// answer may be lost as QEMU exits).
    pub fn send(&mut self, command: &str) -> anyhow::Result<()> {
        writeln!(self.writer, "{}", json!({ "execute": command }))
            .with_context(|| format!("sending `{command}` over QMP"))
    }

    /// `query-status`.
    pub fn query_status(&mut self) -> anyhow::Result<VmStatus> {
        let answer = self.execute("query-status", None)?;
        Ok(VmStatus {
            status: answer["status"].as_str().unwrap_or("?").to_owned(),
            running: answer["running"].as_bool().unwrap_or(false),
        })
    }

    /// `query-status`'s status alone (`running`, `paused`, `inmigrate`, ...).
    pub fn status(&mut self) -> anyhow::Result<String> {
        Ok(self.query_status()?.status)
    }

    /// Pauses the vCPUs.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        self.execute("stop", None).map(drop)
    }

    /// Resumes the vCPUs.
    pub fn cont(&mut self) -> anyhow::Result<()> {
        self.execute("cont", None).map(drop)
    }

    /// Writes guest physical memory `[0, size)` into `path` (absolute: QEMU
    /// resolves relative paths against its own working directory).
    pub fn pmemsave(&mut self, path: &Path, size: u64) -> anyhow::Result<()> {
        self.pmemsave_at(path, 0, size)
    }

    /// Writes guest physical memory `[gpa, gpa + size)` into `path`.
    pub fn pmemsave_at(&mut self, path: &Path, gpa: u64, size: u64) -> anyhow::Result<()> {
        let filename = std::path::absolute(path)?;
        self.execute(
            "pmemsave",
            Some(json!({ "val": gpa, "size": size, "filename": filename })),
        )
        .map(drop)
    }

    /// Starts an outgoing migration to `uri` (`tcp:HOST:PORT`, `unix:PATH`, `exec:CMD`).
    ///
    /// QEMU reports a migration `failed` before it has cleaned the attempt
    /// up: until it unregisters the attempt's yank instance, a new `migrate`
    /// is refused with "duplicate yank instance", and QEMU 7.2 then stays
    /// in `setup` for good. So this first waits (up to 30 s) until no
    /// migration yank instance is left.
    /// Lifts QEMU's own migration bandwidth cap (32 MiB/s by default), so
    /// the link is the limit, with a 300 ms downtime limit.
    pub fn uncap_migration(&mut self) -> anyhow::Result<()> {
        self.execute(
            "migrate-set-parameters",
            Some(json!({"max-bandwidth": 10_000_000_000u64, "downtime-limit": 300})),
        )
        .map(drop)
    }

    pub fn migrate(&mut self, uri: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let instances = self.execute("query-yank", None)?;
            let busy = instances
                .as_array()
                .is_some_and(|list| list.iter().any(|i| i["type"] == "migration"));
            if !busy {
                break;
            }
            if Instant::now() > deadline {
                bail!("QEMU has not finished cleaning up its previous migration after 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.execute("migrate", Some(json!({ "uri": uri })))
            .map(drop)
    }

    /// Starts listening for an incoming migration (QEMU started with `-incoming defer`).
    pub fn migrate_incoming(&mut self, uri: &str) -> anyhow::Result<()> {
        self.execute("migrate-incoming", Some(json!({ "uri": uri })))
            .map(drop)
    }

    /// `migrate-set-parameters`, e.g. `json!({"max-bandwidth": 125_000_000, "downtime-limit": 300})`
    /// (`max-bandwidth` in bytes per second; QEMU's default is 32 MiB/s).
    pub fn migrate_set_parameters(&mut self, parameters: Value) -> anyhow::Result<()> {
        self.execute("migrate-set-parameters", Some(parameters))
            .map(drop)
    }

    /// `migrate-set-capabilities`, e.g. `&[("xbzrle", true)]`.
    pub fn migrate_set_capabilities(
        &mut self,
        capabilities: &[(&str, bool)],
    ) -> anyhow::Result<()> {
        let list: Vec<Value> = capabilities
            .iter()
            .map(|(capability, state)| json!({ "capability": capability, "state": state }))
            .collect();
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": list })),
        )
        .map(drop)
    }

    /// Continues a migration paused before its switchover, once: QEMU may
    /// still report `pre-switchover` just after `migrate-continue`, and a
    /// second one would be refused.
    pub fn continue_switchover(&mut self, continued: &mut bool) -> anyhow::Result<()> {
        if !*continued {
            self.execute("migrate-continue", Some(json!({"state": "pre-switchover"})))?;
            *continued = true;
        }
        std::thread::sleep(Duration::from_millis(10));
        Ok(())
    }

    /// `query-migrate`.
    pub fn query_migrate(&mut self) -> anyhow::Result<MigrationInfo> {
        Ok(MigrationInfo::from_value(
            self.execute("query-migrate", None)?,
        ))
    }

    /// Polls `query-migrate` until the migration completes (its last answer),
    /// fails or is cancelled (an error with QEMU's reason), or `timeout` passes.
    /// A migration paused before its switchover (`pause-before-switchover`)
    /// is continued, as libvirt does.
    pub fn wait_migration(&mut self, timeout: Duration) -> anyhow::Result<MigrationInfo> {
        let deadline = Instant::now() + timeout;
        let mut continued = false;
        loop {
            let info = self.query_migrate()?;
            match info.status.as_str() {
                "completed" => return Ok(info),
                "pre-switchover" => {
                    self.continue_switchover(&mut continued)?;
                    continue;
                }
                "failed" | "cancelled" => {
                    bail!(
                        "QEMU migration {}: {}",
                        info.status,
                        info.error.as_deref().unwrap_or("no reason given")
                    )
                }
                _ => {}
            }
            if Instant::now() > deadline {
                bail!(
                    "QEMU migration still {} after {} s: {}",
                    info.status,
                    timeout.as_secs(),
                    info.raw
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_info_reads_qemu_72_answers() {
        let raw = json!({
            "status": "completed", "total-time": 4321, "downtime": 12,
            "ram": {"transferred": 93000000, "total": 536870912, "remaining": 0,
                    "normal": 21416, "duplicate": 114174, "normal-bytes": 87719936,
                    "mbps": 170.5, "dirty-sync-count": 3}
        });
        let info = MigrationInfo::from_value(raw);
        assert!(info.completed());
        assert_eq!(info.total_time_ms, Some(4321));
        let ram = info.ram.unwrap();
        assert_eq!(
            (ram.normal, ram.duplicate, ram.dirty_sync_count),
            (21416, 114174, 3)
        );
        assert_eq!(info["ram"]["transferred"], 93000000);
        assert_eq!(info["status"], "completed");
        assert!(info["missing"].is_null());
        let failed = MigrationInfo::from_value(json!({"status": "failed", "error-desc": "boom"}));
        assert_eq!(failed.error.as_deref(), Some("boom"));
        assert!(failed.ram.is_none());
    }

    #[test]
    fn errors_name_the_command() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let mut lines = BufReader::new(theirs.try_clone().unwrap()).lines();
            writeln!(
                theirs,
                r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#
            )
            .unwrap();
            assert!(lines.next().unwrap().unwrap().contains("qmp_capabilities"));
            writeln!(theirs, r#"{{"return": {{}}}}"#).unwrap();
            assert!(lines.next().unwrap().unwrap().contains("query-status"));
            writeln!(theirs, r#"{{"event": "STOP", "timestamp": {{}}}}"#).unwrap();
            writeln!(
                theirs,
                r#"{{"return": {{"status": "paused", "running": false}}}}"#
            )
            .unwrap();
            assert!(lines.next().unwrap().unwrap().contains("bogus"));
            writeln!(theirs, r#"{{"error": {{"class": "CommandNotFound", "desc": "The command bogus has not been found"}}}}"#).unwrap();
        });
        let mut qmp = Qmp::new(ours).unwrap();
        assert_eq!(
            qmp.query_status().unwrap(),
            VmStatus {
                status: "paused".into(),
                running: false
            }
        );
        let err = qmp.execute("bogus", None).unwrap_err();
        let qmp_error = err.downcast_ref::<QmpError>().unwrap();
        assert_eq!(qmp_error.class, "CommandNotFound");
        assert!(err.to_string().contains("`bogus`"), "{err}");
        server.join().unwrap();
    }
}
