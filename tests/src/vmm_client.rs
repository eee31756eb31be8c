//! Driving `pagefp-testvmm` processes from tests, the demo and benchmarks.
//!
//! [`VmmProcess`] starts the binary, waits for its control socket and kills
//! and reaps it when dropped; its typed methods cover every control command
//! with the messages of [`crate::vmm::protocol`] (see [`crate::vmm::control`]
//! for the protocol); [`VmmProcess::request`] sends raw JSON, for tests of
//! what the VMM refuses. [`copy_guest_memory`]
//! copies one VMM's guest memory into another (an incoming one) through
//! `/proc/PID/map_files`, as a migration does.

use std::{
    io::{BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::vmm::protocol::{
    Ack, Checksums, LineRead, Paused, Reply, Request, SavedState, TestRequest, VmRequest,
};
pub use crate::vmm::{
    DirtyMode, Harvest, MemoryRegion, RunReport, SlotInfo,
    map_files::map_region,
    protocol::{HarvestReport, LoopReport, TestVmInfo as VmmInfo, VmState},
    workload::Op,
};

/// How long one request may take before the client gives up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// Command-line arguments of one VMM.
#[derive(Clone, Debug)]
pub struct VmmArgs {
    pub socket: PathBuf,
    pub mem_mib: u32,
    pub image: Option<PathBuf>,
    /// "ring", "bitmap" or "none".
    pub dirty: String,
    pub ring_entries: u32,
    /// "auto" or "manual".
    pub harvest: String,
    pub slots: u32,
    /// Start empty, waiting for a migration (`--incoming`).
    pub incoming: bool,
    /// Extra environment (e.g. the entry an agent's
    /// `--only-vms-with-env` selects).
    pub env: Vec<(String, String)>,
}

impl VmmArgs {
    /// `mem_mib` MiB of zeroed RAM in one slot, a 65536-entry dirty ring,
    /// harvested after every run.
    pub fn new(socket: impl Into<PathBuf>, mem_mib: u32) -> Self {
        Self {
            socket: socket.into(),
            mem_mib,
            image: None,
            dirty: "ring".into(),
            ring_entries: 65536,
            harvest: "auto".into(),
            slots: 1,
            incoming: false,
            env: Vec::new(),
        }
    }
}

/// The VMM refused a request (`"ok": false`).
#[derive(Debug, thiserror::Error)]
#[error("the VMM refused {request}: {error}")]
pub struct Refused {
    pub request: String,
    /// The VMM's `"error"` text.
    pub error: String,
}

/// Copies all of `source`'s guest memory (every region of `info.memory`,
/// the read-only code slot included) into `dest`, through
/// `/proc/PID/map_files`: what a migration does with an incoming VMM before
/// `load_state`. `source` should be paused. Returns the bytes copied.
pub fn copy_guest_memory(source: &VmmProcess, dest: &VmmProcess) -> anyhow::Result<u64> {
    let (from, to) = (source.info()?, dest.info()?);
    crate::vmm::map_files::copy_regions(from.vm.pid, &from.vm.memory, to.vm.pid, &to.vm.memory)
}

/// The VMM binary: `PAGEFP_TESTVMM`, or next to the running executable
/// (target/<profile>/ or target/<profile>/deps/..), built if missing.
pub fn testvmm_binary() -> PathBuf {
    if let Ok(path) = std::env::var("PAGEFP_TESTVMM") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current executable");
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("pagefp-testvmm");
        if candidate.is_file() {
            return candidate;
        }
    }
    crate::agent_process::build_binary("pagefp-testvmm", "pagefp-testvmm")
}

/// A running VMM, stopped (SIGTERM, then SIGKILL) and reaped on drop.
pub struct VmmProcess {
    child: Child,
    socket: PathBuf,
    stream: Mutex<BufReader<UnixStream>>,
}

impl VmmProcess {
    pub fn spawn(binary: &Path, args: &VmmArgs) -> anyhow::Result<Self> {
        if args.socket.exists() {
            bail!(
                "{} exists already: give every VMM its own socket",
                args.socket.display()
            );
        }
        let mut command = Command::new(binary);
        command
            .arg("--socket")
            .arg(&args.socket)
            .arg("--mem-mib")
            .arg(args.mem_mib.to_string())
            .arg("--dirty")
            .arg(&args.dirty)
            .arg("--ring-entries")
            .arg(args.ring_entries.to_string())
            .arg("--harvest")
            .arg(&args.harvest)
            .arg("--slots")
            .arg(args.slots.to_string());
        if let Some(image) = &args.image {
            command.arg("--image").arg(image);
        }
        if args.incoming {
            command.arg("--incoming");
        }
        command.envs(args.env.iter().map(|(k, v)| (k, v)));
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let mut child = command.spawn().with_context(|| {
            format!(
                "spawning {} (build it with `cargo build -p pagefp-testvmm`, or set PAGEFP_TESTVMM)",
                binary.display()
            )
        })?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            if let Ok(stream) = UnixStream::connect(&args.socket) {
                break stream;
            }
            if let Some(status) = child.try_wait()? {
                bail!("pagefp-testvmm exited during start ({status}); its error is printed above");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "pagefp-testvmm did not open {} within 30 s",
                    args.socket.display()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        Ok(Self {
            child,
            socket: args.socket.clone(),
            stream: Mutex::new(BufReader::new(stream)),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one line (a request, or anything a test wants refused) and
    /// reads the answer line.
    fn exchange(&self, line: &str) -> anyhow::Result<Vec<u8>> {
        let mut stream = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        writeln!(stream.get_mut(), "{line}").context("writing to the VMM")?;
        let mut answer = Vec::new();
        match crate::vmm::protocol::read_line(&mut *stream, &mut answer)
            .context("reading the VMM's answer (did it die or hang?)")?
        {
            LineRead::Line => Ok(answer),
            LineRead::Closed => bail!("the VMM closed its control socket"),
            LineRead::TooLong => bail!("the VMM's answer has no end of line"),
        }
    }

    /// Sends one raw request and reads its answer, whatever its `"ok"`.
    pub fn request(&self, request: &Value) -> anyhow::Result<Value> {
        let answer = self.exchange(&request.to_string())?;
        serde_json::from_slice(&answer).context("the VMM answered with bad JSON")
    }

    /// Sends a raw `request`; an `"ok": false` answer becomes a [`Refused`] error.
    pub fn call(&self, request: &Value) -> anyhow::Result<Value> {
        let answer = self.request(request)?;
        match Reply::<Value>::from_value(answer)? {
            Reply::Ok(answer) => Ok(answer),
            Reply::Refused(error) => Err(Refused {
                request: request.to_string(),
                error,
            }
            .into()),
        }
    }

    /// Sends a typed request and reads its typed answer; a refusal becomes
    /// a [`Refused`] error.
    fn send<T: DeserializeOwned>(&self, request: impl Into<Request>) -> anyhow::Result<T> {
        let request = request.into();
        let line = serde_json::to_string(&request)?;
        let answer = self.exchange(&line)?;
        match Reply::<T>::parse(&answer).with_context(|| format!("unexpected answer to {line}"))? {
            Reply::Ok(answer) => Ok(answer),
            Reply::Refused(error) => Err(Refused {
                request: line,
                error,
            }
            .into()),
        }
    }

    pub fn info(&self) -> anyhow::Result<VmmInfo> {
        self.send(VmRequest::Info {})
    }

    /// Runs `ops` once, in order (and harvests afterwards in auto mode).
    pub fn run(&self, ops: &[Op]) -> anyhow::Result<RunReport> {
        self.send(TestRequest::Run { ops: ops.to_vec() })
    }

    /// Runs `ops` over and over, iterations at least `interval_ms` apart.
    pub fn start_loop_every(&self, ops: &[Op], interval_ms: u64) -> anyhow::Result<()> {
        self.send::<Ack>(TestRequest::StartLoop {
            ops: ops.to_vec(),
            interval_ms,
        })
        .map(drop)
    }

    /// Runs `ops` over and over in the background until [`Self::stop_loop`].
    pub fn start_loop(&self, ops: &[Op]) -> anyhow::Result<()> {
        self.start_loop_every(ops, 0)
    }

    pub fn stop_loop(&self) -> anyhow::Result<LoopReport> {
        self.send(TestRequest::StopLoop {})
    }

    /// Harvests the dirty log now (and re-protects the pages).
    pub fn harvest(&self) -> anyhow::Result<HarvestReport> {
        self.send(TestRequest::Harvest { list: false })
    }

    /// As [`Self::harvest`], with the list of pages.
    pub fn harvest_list(&self) -> anyhow::Result<HarvestReport> {
        self.send(TestRequest::Harvest { list: true })
    }

    /// Registers every memory slot again, unchanged.
    pub fn reregister(&self) -> anyhow::Result<()> {
        self.send::<Ack>(TestRequest::Reregister {}).map(drop)
    }

    /// Stops the vCPU, even in the middle of an op; returns once it is out
    /// of KVM_RUN. Idempotent.
    pub fn pause(&self) -> anyhow::Result<()> {
        let answer: Paused = self.send(VmRequest::Pause {})?;
        if !answer.paused {
            bail!("the VMM answered pause with paused: false");
        }
        Ok(())
    }

    /// Lets the vCPU go on exactly where it stopped. Idempotent.
    pub fn resume(&self) -> anyhow::Result<()> {
        self.send::<Ack>(VmRequest::Resume {}).map(drop)
    }

    /// The paused VM's state blob, hex (see `vmm::snapshot`).
    pub fn save_state(&self) -> anyhow::Result<String> {
        Ok(self.send::<SavedState>(VmRequest::SaveState {})?.state)
    }

    /// Loads a state into an incoming VMM (whose memory was copied before);
    /// it stays paused.
    pub fn load_state(&self, state: &str) -> anyhow::Result<()> {
        self.send::<Ack>(VmRequest::LoadState {
            state: state.to_owned(),
        })
        .map(drop)
    }

    /// `running`, `paused` or `incoming`.
    pub fn state(&self) -> anyhow::Result<VmState> {
        Ok(self.info()?.vm.state)
    }

    /// Every region of guest memory (`info.memory`).
    pub fn memory(&self) -> anyhow::Result<Vec<MemoryRegion>> {
        Ok(self.info()?.vm.memory)
    }

    /// blake3 (lowercase hex) of every RAM page.
    pub fn checksums(&self) -> anyhow::Result<Vec<String>> {
        let answer: Checksums = self.send(TestRequest::Checksums {
            first: None,
            count: None,
        })?;
        Ok(answer.hashes)
    }

    /// blake3 (lowercase hex) of pages `first..first+count`.
    pub fn checksums_range(&self, first: u32, count: u32) -> anyhow::Result<Vec<String>> {
        let answer: Checksums = self.send(TestRequest::Checksums {
            first: Some(first),
            count: Some(count),
        })?;
        Ok(answer.hashes)
    }

    /// Asks the VMM to exit and waits up to 10 s for it.
    pub fn exit(mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.send::<Ack>(VmRequest::Exit {})?;
        self.wait_exit(Duration::from_secs(10))
            .context("the VMM answered `exit` but did not exit within 10 s")
    }

    /// Sends SIGTERM and waits up to 10 s for the process to exit.
    pub fn terminate(mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.signal(nix::sys::signal::Signal::SIGTERM)?;
        self.wait_exit(Duration::from_secs(10))
            .context("the VMM did not exit within 10 s of SIGTERM")
    }

    fn signal(&self, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).with_context(|| format!("sending {signal} to the VMM"))
    }

    /// Waits up to `timeout` for the process to exit by itself; its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SIGTERM first: the VMM removes its socket and exits.
            if self.signal(nix::sys::signal::Signal::SIGTERM).is_err()
                || self.wait_exit(Duration::from_secs(5)).is_none()
            {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}
