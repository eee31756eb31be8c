//! Talking to the VMM whose VM migrates: pause, resume, save and load its
//! vCPU/device state, learn where its guest memory lives.
//!
//! The sender and the receiver see a VMM only through [`VmmControl`] (as
//! cloud-hypervisor's `vm-migration` traits do), so another backend (QEMU
//! over QMP, say) is one more implementation and one more arm in
//! [`connect`]. [`JsonLinesVmm`] is the implementation for VMMs that speak
//! pagefp's JSON-lines control protocol ([`protocol`]), such as its test VMM
//! `pagefp-testvmm`. The state is carried opaquely: the bytes the source's
//! `save_state` returns are what the destination's `load_state` gets.

pub mod protocol;

use std::{
    io::{BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use serde::de::DeserializeOwned;

use self::protocol::{Ack, LineRead, Paused, Reply, SavedState, VmRequest};
pub use self::protocol::{MemoryRegion, VmInfo, VmState};

/// Longest wait for one answer of the VMM (a pause waits for the vCPUs to
/// leave KVM_RUN; loading a state registers all guest memory with KVM).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// What migration asks of a VMM. Every call returns within a bounded time
/// or fails with an error that says what to check.
pub trait VmmControl {
    /// The VMM's pid, state and guest memory (at least one region).
    fn info(&mut self) -> anyhow::Result<VmInfo>;
    /// Stops the vCPUs; returns once they are out of KVM_RUN. Idempotent.
    fn pause(&mut self) -> anyhow::Result<()>;
    /// Lets the vCPUs go on where they stopped. Idempotent.
    fn resume(&mut self) -> anyhow::Result<()>;
    /// The paused VM's state, opaque.
    fn save_state(&mut self) -> anyhow::Result<Vec<u8>>;
    /// Loads `state` (from the source's [`Self::save_state`]) into an
    /// incoming VM whose memory was written; it stays paused.
    fn load_state(&mut self, state: &[u8]) -> anyhow::Result<()>;
    /// Ends the VMM process (after a migration, or to discard an incoming VM).
    fn exit(&mut self) -> anyhow::Result<()>;
}

/// Connects to the VMM whose control socket is `socket`.
pub fn connect(socket: &Path) -> anyhow::Result<Box<dyn VmmControl>> {
    Ok(Box::new(JsonLinesVmm::connect(socket)?))
}

/// A connection to a VMM's JSON-lines control socket.
pub struct JsonLinesVmm {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    line: Vec<u8>,
}

impl JsonLinesVmm {
    pub fn connect(path: &Path) -> anyhow::Result<Self> {
        let stream = UnixStream::connect(path).with_context(|| {
            format!(
                "cannot connect to the VMM control socket {}: is the VMM running? (--vmm-socket)",
                path.display()
            )
        })?;
        stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        stream.set_write_timeout(Some(ANSWER_TIMEOUT))?;
        Ok(Self {
            path: path.to_path_buf(),
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            line: Vec::new(),
        })
    }

    /// Sends `request`, reads its answer as `T`; a refusal is an error.
    fn call<T: DeserializeOwned>(&mut self, request: &VmRequest) -> anyhow::Result<T> {
        let cmd = request.name();
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .with_context(|| format!("sending {cmd:?} to the VMM at {}", self.path.display()))?;
        let read = protocol::read_line(&mut self.reader, &mut self.line).with_context(|| {
            format!(
                "waiting for the VMM's answer to {cmd:?} (at most {} s)",
                ANSWER_TIMEOUT.as_secs()
            )
        })?;
        match read {
            LineRead::Line => {}
            LineRead::Closed => bail!(
                "the VMM at {} closed its control socket during {cmd:?}",
                self.path.display()
            ),
            LineRead::TooLong => bail!(
                "the VMM's answer to {cmd:?} is longer than {} bytes: is {} a pagefp control socket?",
                protocol::MAX_LINE_BYTES,
                self.path.display()
            ),
        }
        match Reply::<T>::parse(&self.line)
            .with_context(|| format!("the VMM's answer to {cmd:?} is not the expected JSON"))?
        {
            Reply::Ok(answer) => Ok(answer),
            Reply::Refused(error) => Err(anyhow!("the VMM refused {cmd:?}: {error}")),
        }
    }
}

impl VmmControl for JsonLinesVmm {
    fn info(&mut self) -> anyhow::Result<VmInfo> {
        let info: VmInfo = self.call(&VmRequest::Info {}).context(
            "the VMM's `info` answer lacks pid/state/memory: is it a migratable pagefp-testvmm?",
        )?;
        if info.memory.is_empty() {
            bail!("the VMM reports no guest memory regions: it does not support migration");
        }
        Ok(info)
    }

    fn pause(&mut self) -> anyhow::Result<()> {
        let answer: Paused = self.call(&VmRequest::Pause {})?;
        if !answer.paused {
            bail!("the VMM answered `pause` without pausing: check its log");
        }
        Ok(())
    }

    fn resume(&mut self) -> anyhow::Result<()> {
        self.call::<Ack>(&VmRequest::Resume {}).map(drop)
    }

    fn save_state(&mut self) -> anyhow::Result<Vec<u8>> {
        let answer: SavedState = self.call(&VmRequest::SaveState {})?;
        Ok(answer.state.into_bytes())
    }

    fn load_state(&mut self, state: &[u8]) -> anyhow::Result<()> {
        let state = std::str::from_utf8(state)
            .context("the VM state is not text: the source VMM speaks another protocol")?;
        self.call::<Ack>(&VmRequest::LoadState {
            state: state.to_owned(),
        })
        .map(drop)
    }

    fn exit(&mut self) -> anyhow::Result<()> {
        self.call::<Ack>(&VmRequest::Exit {}).map(drop)
    }
}
