//! Running `pagefp migrate send` and `receive` as the tests, the demo and the
//! benchmark do: real processes, optionally inside the namespaces of a
//! shaped link.

use std::{
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use agent::api::report::{MigrationReport, Mode};
use anyhow::{Context as _, bail};

use crate::{
    agent_process::{agent_binary, free_port},
    link_security::LinkSecurity,
    vmm_client::{VmmArgs, VmmProcess, testvmm_binary},
};

/// How one end of a migration ended.
#[derive(Debug)]
pub struct Outcome {
    pub success: bool,
    pub report: Option<MigrationReport>,
    pub stderr: String,
}

impl Outcome {
    pub fn report(&self) -> &MigrationReport {
        self.report
            .as_ref()
            .unwrap_or_else(|| panic!("no report; the command said:\n{}", self.stderr))
    }
}

/// What the receiver gets.
#[derive(Clone, Debug, Default)]
pub struct ReceiveSpec {
    pub listen: String,
    pub vmm_socket: PathBuf,
    pub catalogs: Vec<PathBuf>,
    pub agent_socket: Option<PathBuf>,
    pub local_templates: bool,
    pub no_resume: bool,
    pub timeout_s: u64,
    pub security: LinkSecurity,
    /// `--site-store` nodes (plaintext, on loopback).
    pub site_store: Vec<String>,
    /// `--negotiation` (`auto` if `None`).
    pub negotiation: Option<&'static str>,
    /// `--site-store-tls-dir` for `rediss://` nodes (`redis://` nodes are
    /// accepted with `--site-store-plaintext`).
    pub site_store_tls_dir: Option<PathBuf>,
}

/// What the sender does.
#[derive(Clone, Debug)]
pub struct SendSpec {
    pub pid: u32,
    pub vmm_socket: PathBuf,
    pub to: String,
    pub mode: Mode,
    pub agent_socket: PathBuf,
    pub max_bandwidth: Option<String>,
    pub downtime_ms: Option<u64>,
    pub max_rounds: Option<u32>,
    pub keep_source: bool,
    /// `--io-timeout-s`, if not the default.
    pub io_timeout_s: Option<u64>,
    /// `--threads` (encoding threads), if not the default.
    pub threads: Option<usize>,
    pub security: LinkSecurity,
}

impl SendSpec {
    /// Sends the VM `pid` (VMM control socket `vmm_socket`, the source
    /// host's agent at `agent_socket`) to `to` in `mode`; every other
    /// setting at its default (the source exits after the switch-over).
    pub fn new(pid: u32, vmm_socket: &Path, to: String, mode: Mode, agent_socket: &Path) -> Self {
        Self {
            pid,
            vmm_socket: vmm_socket.to_path_buf(),
            to,
            mode,
            agent_socket: agent_socket.to_path_buf(),
            max_bandwidth: None,
            downtime_ms: None,
            max_rounds: None,
            keep_source: false,
            io_timeout_s: None,
            threads: None,
            security: LinkSecurity::default(),
        }
    }
}

/// One `templates` migration of `source` (whose host's agent listens on
/// `agent_socket`) to a new incoming VMM of `mem_mib` (its socket in
/// `dir`), received as `receive` says (its `vmm_socket` is filled in) on
/// `listen` and sent to `to`, each end run through its `wrap` (a network
/// namespace). The source is kept (`--keep-source`) and resumed afterwards,
/// for the next run; `during` runs on its own thread as the sender starts.
pub struct KeptSourceMigration<'a> {
    pub dir: &'a Path,
    pub source: &'a VmmProcess,
    pub agent_socket: &'a Path,
    pub mem_mib: u32,
    pub receive: ReceiveSpec,
    pub to: String,
    pub wraps: (Option<Command>, Option<Command>),
    pub during: Option<Box<dyn FnOnce() + Send>>,
}

impl KeptSourceMigration<'_> {
    /// Both ends' outcomes, and whether every page is equal.
    pub fn run(self) -> anyhow::Result<(Outcome, Outcome, bool)> {
        let mut args = VmmArgs::new(
            self.dir.join(format!("c-{}.sock", free_port())),
            self.mem_mib,
        );
        args.incoming = true;
        let dest = VmmProcess::spawn(&testvmm_binary(), &args)?;
        let (send_wrap, receive_wrap) = self.wraps;
        let receiver = start_receiver(
            &ReceiveSpec {
                vmm_socket: dest.socket().to_path_buf(),
                no_resume: true,
                ..self.receive
            },
            receive_wrap,
        )?;
        let action = self.during.map(std::thread::spawn);
        let sent = send(
            &SendSpec {
                keep_source: true,
                ..SendSpec::new(
                    self.source.pid(),
                    self.source.socket(),
                    self.to,
                    Mode::Templates,
                    self.agent_socket,
                )
            },
            send_wrap,
        )?;
        let received = receiver.finish(Duration::from_secs(300));
        if let Some(action) = action {
            action
                .join()
                .map_err(|_| anyhow::anyhow!("the action during the migration panicked"))?;
        }
        let identical =
            sent.success && received.success && self.source.checksums()? == dest.checksums()?;
        self.source
            .request(&serde_json::json!({"cmd": "resume"}))
            .context("resuming the kept source")?;
        Ok((sent, received, identical))
    }
}

/// A receiver that is listening.
pub struct RunningReceiver {
    child: Child,
    stderr: mpsc::Receiver<String>,
}

/// Starts `pagefp migrate receive`; returns once it listens. `wrap` runs it
/// through another command (e.g. `ip netns exec NS`).
pub fn start_receiver(
    spec: &ReceiveSpec,
    wrap: Option<Command>,
) -> anyhow::Result<RunningReceiver> {
    let mut command = wrapped(wrap);
    command
        .args([
            "migrate",
            "receive",
            "--listen",
            &spec.listen,
            "--json",
            "--no-installed",
        ])
        .arg("--vmm-socket")
        .arg(&spec.vmm_socket)
        .args(["--timeout-s", &spec.timeout_s.max(1).to_string()])
        .args(spec.security.receive_args());
    for catalog in &spec.catalogs {
        command.arg("--templates").arg(catalog);
    }
    if let Some(socket) = &spec.agent_socket {
        command.arg("--agent-socket").arg(socket);
    }
    if spec.local_templates {
        command.arg("--local-templates");
    }
    if spec.no_resume {
        command.arg("--no-resume");
    }
    for node in &spec.site_store {
        command.args(["--site-store", node]);
    }
    if let Some(negotiation) = spec.negotiation {
        command.args(["--negotiation", negotiation]);
    }
    match &spec.site_store_tls_dir {
        Some(dir) => {
            command.arg("--site-store-tls-dir").arg(dir);
        }
        None if !spec.site_store.is_empty() => {
            command.arg("--site-store-plaintext");
        }
        None => {}
    }
    command
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().context("spawning pagefp migrate receive")?;
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut receiver = RunningReceiver { child, stderr: rx };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = String::new();
    loop {
        match receiver.stderr.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                let ready = line.contains("waiting for a migration on");
                seen.push_str(&line);
                seen.push('\n');
                if ready {
                    return Ok(receiver);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = receiver.child.wait()?;
                bail!("pagefp migrate receive exited ({status}) before listening:\n{seen}");
            }
        }
        if Instant::now() > deadline {
            bail!("pagefp migrate receive did not listen within 60 s:\n{seen}");
        }
    }
}

impl RunningReceiver {
    /// Waits for the receiver to end.
    pub fn finish(mut self, timeout: Duration) -> Outcome {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the receiver") {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stdout = String::new();
        if let Some(mut out) = self.child.stdout.take() {
            let _ = out.read_to_string(&mut stdout);
        }
        // The process has ended, but the thread reading its stderr may not
        // have passed on the last lines (the error is written just before
        // exit): read until the pipe closes, within a deadline.
        let mut lines = Vec::new();
        let drained_by = Instant::now() + Duration::from_secs(5);
        while let Some(left) = drained_by.checked_duration_since(Instant::now()) {
            match self.stderr.recv_timeout(left) {
                Ok(line) => lines.push(line),
                Err(_) => break,
            }
        }
        let mut stderr = lines.join("\n");
        if status.is_none() {
            stderr.push_str("\n(killed: did not finish in time)");
        }
        Outcome {
            success: status.is_some_and(|s| s.success()),
            report: last_json(&stdout),
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RunningReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `pagefp migrate send` to completion.
pub fn send(spec: &SendSpec, wrap: Option<Command>) -> anyhow::Result<Outcome> {
    let output = send_command(spec, wrap)
        .stdin(Stdio::null())
        .output()
        .context("running pagefp migrate send")?;
    Ok(outcome(&output))
}

/// The result of a finished `pagefp migrate send` or `receive`.
pub fn outcome(output: &std::process::Output) -> Outcome {
    let stdout = String::from_utf8_lossy(&output.stdout);
    Outcome {
        success: output.status.success(),
        report: last_json(&stdout),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The `pagefp migrate send` command line of `spec`, logging at info.
pub fn send_command(spec: &SendSpec, wrap: Option<Command>) -> Command {
    let mut command = wrapped(wrap);
    command
        .args(["migrate", "send", "--json", "--pid", &spec.pid.to_string()])
        .arg("--vmm-socket")
        .arg(&spec.vmm_socket)
        .args(["--to", &spec.to, "--mode", spec.mode.name()])
        .arg("--agent-socket")
        .arg(&spec.agent_socket)
        .args(spec.security.send_args());
    if let Some(bw) = &spec.max_bandwidth {
        command.args(["--max-bandwidth", bw]);
    }
    if let Some(ms) = spec.downtime_ms {
        command.args(["--downtime-ms", &ms.to_string()]);
    }
    if let Some(rounds) = spec.max_rounds {
        command.args(["--max-rounds", &rounds.to_string()]);
    }
    if spec.keep_source {
        command.arg("--keep-source");
    }
    if let Some(seconds) = spec.io_timeout_s {
        command.args(["--io-timeout-s", &seconds.to_string()]);
    }
    if let Some(threads) = spec.threads {
        command.args(["--threads", &threads.to_string()]);
    }
    command.env("RUST_LOG", "info");
    command
}

fn wrapped(wrap: Option<Command>) -> Command {
    match wrap {
        Some(mut command) => {
            command.arg(agent_binary());
            command
        }
        None => Command::new(agent_binary()),
    }
}

fn last_json(stdout: &str) -> Option<MigrationReport> {
    stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line.trim()).ok())
}

/// blake3 of every page of a file, for comparing memory with an image.
pub fn file_page_hashes(path: &Path) -> anyhow::Result<Vec<[u8; 32]>> {
    let bytes = std::fs::read(path)?;
    Ok(bytes
        .chunks(agent::page::PAGE_SIZE)
        .map(|page| *blake3::hash(page).as_bytes())
        .collect())
}

/// A TCP relay that cuts a migration at a chosen point: the "connection
/// lost at this phase" of the failure tests.
pub struct CuttingRelay {
    pub listen: String,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Which way the relay watches.
#[derive(Clone, Copy, Debug)]
pub enum Direction {
    SourceToDest,
    DestToSource,
}

/// Where the relay cuts both ways.
#[derive(Clone, Copy, Debug)]
pub enum Cut {
    /// Once more than this many bytes would pass.
    AfterBytes(u64),
    /// Just before the first message of this kind would pass.
    BeforeKind(agent::transport::migration::Kind),
    /// Just after the first message of this kind passed.
    AfterKind(agent::transport::migration::Kind),
    /// Just after the first message of this kind passed, with a TCP reset
    /// to the receiving side (its next write fails at once).
    ResetAfterKind(agent::transport::migration::Kind),
}

/// Resets `stream` now (a TCP RST, whatever other descriptors of it are
/// open): Linux disconnects a TCP socket that is connected to `AF_UNSPEC`.
fn reset_now(stream: &std::net::TcpStream) {
    use std::os::fd::AsRawFd;
    // SAFETY: an all-zero sockaddr is a valid AF_UNSPEC address.
    let unspec: libc::sockaddr = unsafe { std::mem::zeroed() };
    // SAFETY: a valid socket descriptor and an address of the size passed.
    unsafe {
        libc::connect(
            stream.as_raw_fd(),
            &raw const unspec,
            size_of::<libc::sockaddr>() as libc::socklen_t,
        );
    }
}

impl CuttingRelay {
    /// Relays one connection to `target`, cutting it in `direction` at `cut`.
    pub fn start(target: String, direction: Direction, cut: Cut) -> anyhow::Result<Self> {
        use std::net::{Shutdown, TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let listen = listener.local_addr()?.to_string();
        let thread = std::thread::spawn(move || {
            let Ok((source, _)) = listener.accept() else {
                return;
            };
            let Ok(dest) = TcpStream::connect(&target) else {
                return;
            };
            fn close(a: &TcpStream, b: &TcpStream) {
                let _ = a.shutdown(Shutdown::Both);
                let _ = b.shutdown(Shutdown::Both);
            }
            // Set when the cut begins: from then on the unwatched direction
            // carries nothing (the link is dead both ways at the cut, so an
            // answer to the last message passed never gets back).
            let cutting = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let stopped = cutting.clone();
            // Unwatched direction: plain copy until the cut.
            let plain = move |mut from: TcpStream, mut to: TcpStream| {
                use std::io::{Read, Write};
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = from.read(&mut buf) {
                    if n == 0
                        || stopped.load(std::sync::atomic::Ordering::SeqCst)
                        || to.write_all(&buf[..n]).is_err()
                    {
                        break;
                    }
                }
                close(&from, &to);
            };
            // Watched direction: frame by frame (after the source's preamble).
            let watched = move |mut from: TcpStream, mut to: TcpStream, preamble: usize| {
                use std::io::{Read, Write};
                let mut passed = 0u64;
                let forward = |bytes: &[u8], to: &mut TcpStream, passed: &mut u64| -> bool {
                    if let Cut::AfterBytes(limit) = cut {
                        let allowed = (limit.saturating_sub(*passed) as usize).min(bytes.len());
                        let ok = to.write_all(&bytes[..allowed]).is_ok();
                        *passed += allowed as u64;
                        return ok && allowed == bytes.len();
                    }
                    *passed += bytes.len() as u64;
                    to.write_all(bytes).is_ok()
                };
                let mut head = vec![0u8; preamble];
                if from.read_exact(&mut head).is_err() || !forward(&head, &mut to, &mut passed) {
                    return close(&from, &to);
                }
                loop {
                    let mut header = [0u8; 8];
                    if from.read_exact(&mut header).is_err() {
                        break;
                    }
                    let len = u32::from_le_bytes(header[4..8].try_into().unwrap()) as usize;
                    let mut frame = header.to_vec();
                    frame.resize(8 + len + 4, 0);
                    if from.read_exact(&mut frame[8..]).is_err() {
                        break;
                    }
                    let kind = header[0];
                    if matches!(cut, Cut::BeforeKind(k) if k as u8 == kind) {
                        break;
                    }
                    if matches!(cut, Cut::AfterKind(k) | Cut::ResetAfterKind(k) if k as u8 == kind)
                    {
                        cutting.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    if !forward(&frame, &mut to, &mut passed) {
                        break;
                    }
                    if matches!(cut, Cut::AfterKind(k) if k as u8 == kind) {
                        break;
                    }
                    if matches!(cut, Cut::ResetAfterKind(k) if k as u8 == kind) {
                        reset_now(&to);
                        break;
                    }
                }
                close(&from, &to);
            };
            let (s1, d1) = (source.try_clone().unwrap(), dest.try_clone().unwrap());
            match direction {
                Direction::SourceToDest => {
                    let other = std::thread::spawn(move || plain(d1, s1));
                    watched(source, dest, agent::transport::PREAMBLE_LEN);
                    let _ = other.join();
                }
                Direction::DestToSource => {
                    let other = std::thread::spawn(move || plain(s1, d1));
                    watched(dest, source, 0);
                    let _ = other.join();
                }
            }
        });
        Ok(Self {
            listen,
            thread: Some(thread),
        })
    }

    pub fn join(mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
