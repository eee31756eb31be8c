//! Talking to the VMM whose VM migrates: pause, resume, save and load its
//! vCPU/device state, learn where its guest memory lives.
//!
//! pagefp speaks the JSON-lines control protocol of its test VMM
//! (`pagefp-testvmm`, see `tests/src/vmm/control.rs`): one request per line,
//! one answer per line, `{"ok":false,"error":...}` on failure. The state is
//! carried opaquely: the string the source's `save_state` returns is what the
//! destination's `load_state` gets.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use serde::Deserialize;
use serde_json::{Value, json};

/// One region of guest memory as the VMM maps it.
#[derive(Clone, Copy, Debug, Deserialize)]
pub struct VmmRegion {
    pub slot: u32,
    pub gpa: u64,
    pub size: u64,
    pub uaddr: u64,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Clone, Debug, Deserialize)]
pub struct VmmInfo {
    pub pid: u32,
    /// `running`, `paused` or `incoming`.
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub memory: Vec<VmmRegion>,
}

/// A connection to a VMM's control socket.
pub struct VmmControl {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl VmmControl {
    pub fn connect(path: &Path) -> anyhow::Result<Self> {
        let stream = UnixStream::connect(path).with_context(|| {
            format!(
                "cannot connect to the VMM control socket {}: is the VMM running? (--vmm-socket)",
                path.display()
            )
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(Self {
            path: path.to_path_buf(),
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    fn call(&mut self, request: Value) -> anyhow::Result<Value> {
        let cmd = request["cmd"].as_str().unwrap_or("?").to_string();
        let mut line = serde_json::to_vec(&request)?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .with_context(|| format!("sending {cmd:?} to the VMM at {}", self.path.display()))?;
        let mut answer = String::new();
        let n = self
            .reader
            .read_line(&mut answer)
            .with_context(|| format!("waiting for the VMM's answer to {cmd:?}"))?;
        if n == 0 {
            bail!(
                "the VMM at {} closed its control socket during {cmd:?}",
                self.path.display()
            );
        }
        let value: Value = serde_json::from_str(&answer)
            .with_context(|| format!("the VMM's answer to {cmd:?} is not JSON"))?;
        if value["ok"] != true {
            return Err(anyhow!(
                "the VMM refused {cmd:?}: {}",
                value["error"].as_str().unwrap_or("no reason given")
            ));
        }
        Ok(value)
    }

    pub fn info(&mut self) -> anyhow::Result<VmmInfo> {
        let value = self.call(json!({"cmd": "info"}))?;
        let info: VmmInfo = serde_json::from_value(value).context(
            "the VMM's `info` answer lacks pid/state/memory: is it a migratable pagefp-testvmm?",
        )?;
        if info.memory.is_empty() {
            bail!("the VMM reports no guest memory regions: it does not support migration");
        }
        Ok(info)
    }

    pub fn pause(&mut self) -> anyhow::Result<()> {
        self.call(json!({"cmd": "pause"})).map(drop)
    }

    pub fn resume(&mut self) -> anyhow::Result<()> {
        self.call(json!({"cmd": "resume"})).map(drop)
    }

    /// The paused VM's state, opaque.
    pub fn save_state(&mut self) -> anyhow::Result<Vec<u8>> {
        let value = self.call(json!({"cmd": "save_state"}))?;
        let state = value["state"]
            .as_str()
            .context("the VMM's save_state answer has no state string")?;
        Ok(state.as_bytes().to_vec())
    }

    pub fn load_state(&mut self, state: &[u8]) -> anyhow::Result<()> {
        let state = std::str::from_utf8(state).context("the VM state is not text")?;
        self.call(json!({"cmd": "load_state", "state": state}))
            .map(drop)
    }

    /// Ends the VMM process (after a migration, or to discard an incoming VM).
    pub fn exit(mut self) -> anyhow::Result<()> {
        self.call(json!({"cmd": "exit"})).map(drop)
    }
}
