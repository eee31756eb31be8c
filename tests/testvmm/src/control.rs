//! The control socket: one JSON request per line, one JSON answer per line,
//! several requests per connection, connections served concurrently (one
//! thread each). One vCPU thread runs the guest: a `run` request's ops or a
//! loop, one chunk at a time.
//!
//! The messages are typed in [`crate::protocol`]: the migration commands
//! (`info`, `pause`, `resume`, `save_state`, `load_state`, `exit`) are the
//! product's `agent::migrate::vmm::protocol::VmRequest`, the others this
//! VMM's [`crate::protocol::TestRequest`].
//!
//! | request | answer (besides `"ok": true`) |
//! |---|---|
//! | `{"cmd":"info"}` | pid, mem_bytes, pages, dirty, ring_entries, harvest, slots, memory, state, loop_running, loop_iterations, run_pending |
//! | `{"cmd":"run","ops":[...]}` | pages_written, harvested, entries, ring_full_exits, seconds (once the ops ran) |
//! | `{"cmd":"start_loop","ops":[...][,"interval_ms":N]}` | (nothing; iterations start at least N ms apart) |
//! | `{"cmd":"stop_loop"}` | iterations, pages_written, seconds (the loop stops after the chunk in progress; a paused one where it is) |
//! | `{"cmd":"harvest"[,"list":true]}` | harvested, entries[, pages] |
//! | `{"cmd":"reregister"}` | (the RAM and code slots are registered again, unchanged) |
//! | `{"cmd":"checksums"[,"first":F][,"count":C]}` | hashes: blake3 hex per RAM page |
//! | `{"cmd":"pause"}` | paused: true, once the vCPU is out of KVM_RUN (the op it was in is suspended, not abandoned) |
//! | `{"cmd":"resume"}` | (the vCPU goes on exactly where it stopped) |
//! | `{"cmd":"save_state"}` | state: hex blob of the paused VM's vCPU and work (see [`super::snapshot`]) |
//! | `{"cmd":"load_state","state":S}` | (incoming VM: checks S, registers its memory with KVM, restores the vCPU and work; stays paused) |
//! | `{"cmd":"exit"}` | then the process exits 0 and removes the socket |
//!
//! `state` is `running`, `paused` or `incoming`. `pause` stops the vCPU
//! promptly even in the middle of a long op (it kicks the vCPU thread out of
//! KVM_RUN: `immediate_exit` plus a signal) and is idempotent, as is
//! `resume`. While paused, `run` and `start_loop` are refused; `info`,
//! `checksums`, `harvest`, `stop_loop`, `save_state` and `exit` work. A `run`
//! request paused in the middle waits for `resume` (or migrates: see below).
//!
//! `memory` lists every region of guest memory: the RAM slots and the
//! read-only code slot (`slot`, `gpa`, `size`, `uaddr`, `read_only`), each
//! inside a sealed memfd mapping that `/proc/PID/map_files/START-END` opens
//! (see [`super::map_files`]). `slots` gives the RAM slots with their KVM flags.
//!
//! Migration: pause the source, copy every `memory` region into a VMM
//! started with `--incoming` (same `--mem-mib` and `--slots`; its memory is
//! zeroed and not registered with KVM, its state `incoming`), send the
//! source's `save_state` blob to its `load_state`, then `resume` it: a loop
//! goes on from the op and page where it stopped, a `run` request's
//! remaining ops finish in the background (`run_pending` until then). `exit`
//! discards an incoming VMM at any point, and ends a paused source after
//! success (a `run` request still waiting there is answered with an error).
//!
//! Ops: `{"op":"random","first","count","seed"}`, `{"op":"copy","src","first","count"}`,
//! `{"op":"zero","first","count"}`, `{"op":"touch","first","count","value"}`,
//! `{"op":"stride","first","count","step","value"}`. `harvested` counts
//! distinct pages; `entries` the dirty-ring entries behind them. A bad request
//! gets `{"ok":false,"error":"..."}` and the VMM keeps serving.

use std::{
    io::{BufReader, Write},
    os::unix::{
        fs::PermissionsExt,
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use serde::Serialize;
use serde_json::Value;

use super::{
    Cursor, LoopState, RunReport, TestVm, Work,
    kick::Kicker,
    protocol::{
        self as wire, Ack, Checksums, HarvestReport, LineRead, LoopReport, MAX_LINE_BYTES, Paused,
        Reply, Request, SavedState, TestRequest, TestVmInfo, VmInfo, VmRequest, VmState,
    },
    signals,
    workload::Op,
};
/// How long `exit` waits for a `run` request it cut short to be answered.
const EXIT_ANSWER_WAIT: Duration = Duration::from_secs(2);

/// What the vCPU thread and the control threads share, under one lock.
struct Ctl {
    phase: VmState,
    /// Requests that keep the vCPU from starting another step (stop_loop).
    holds: u32,
    /// The vCPU thread is in a step; `work` is out meanwhile.
    busy: bool,
    work: Option<Work>,
    /// What `info` says about the work, kept while the work is out.
    loop_running: bool,
    loop_iterations: u64,
    run_pending: bool,
    /// The loop stopped on this error; `stop_loop` reports it.
    failed: Option<String>,
    loop_started: Instant,
    iteration_started: Instant,
    /// The next loop iteration starts no earlier (`interval_ms`).
    not_before: Option<Instant>,
    /// Where the `run` request in progress waits for its report (None for
    /// a migrated run: nobody waits here).
    reply: Option<mpsc::Sender<anyhow::Result<RunReport>>>,
}

impl Ctl {
    /// The vCPU thread may run a step now (ignoring `not_before`).
    fn runnable(&self) -> bool {
        self.phase == VmState::Running
            && self.holds == 0
            && self.work.is_some()
            && self.failed.is_none()
    }
}

/// State shared by the connection threads and the vCPU thread. Lock order:
/// `ctl` before `vm`; nobody takes `ctl` while holding `vm`.
struct Shared {
    vm: Mutex<TestVm>,
    kicker: Arc<Kicker>,
    /// Control threads waiting for `vm`: the vCPU thread lets them in first.
    waiters: AtomicUsize,
    ctl: Mutex<Ctl>,
    changed: Condvar,
    /// Serialises `run` and `start_loop` requests (a run waits for the one
    /// before it to end).
    requests: Mutex<()>,
    /// `run` requests not answered yet (`exit` lets them answer first).
    unanswered_runs: AtomicUsize,
    /// The `info` answer; its changing fields are set when it is sent.
    info: TestVmInfo,
    socket: PathBuf,
}

pub struct Server {
    shared: Arc<Shared>,
}

impl Server {
    pub fn new(vm: TestVm, socket: &Path) -> Self {
        let phase = if vm.registered {
            VmState::Running
        } else {
            VmState::Incoming
        };
        let info = TestVmInfo {
            vm: VmInfo {
                pid: std::process::id(),
                state: phase,
                memory: vm.memory(),
            },
            mem_bytes: vm.config.mem_bytes as u64,
            pages: vm.pages(),
            dirty: vm.config.dirty,
            ring_entries: vm.config.ring_entries,
            harvest: vm.config.harvest,
            slots: vm.slots.clone(),
            loop_running: false,
            loop_iterations: 0,
            run_pending: false,
            loop_error: None,
        };
        let now = Instant::now();
        Self {
            shared: Arc::new(Shared {
                kicker: vm.kicker(),
                vm: Mutex::new(vm),
                waiters: AtomicUsize::new(0),
                ctl: Mutex::new(Ctl {
                    phase,
                    holds: 0,
                    busy: false,
                    work: None,
                    loop_running: false,
                    loop_iterations: 0,
                    run_pending: false,
                    failed: None,
                    loop_started: now,
                    iteration_started: now,
                    not_before: None,
                    reply: None,
                }),
                changed: Condvar::new(),
                requests: Mutex::new(()),
                unanswered_runs: AtomicUsize::new(0),
                info,
                socket: socket.to_path_buf(),
            }),
        }
    }

    /// Serves connections until an `exit` request, SIGTERM or SIGINT, all of
    /// which end the process with status 0.
    pub fn serve(self) -> anyhow::Result<()> {
        let socket = &self.shared.socket;
        // Before any thread starts, so that every thread blocks the signals.
        signals::exit_on_termination(socket.clone())?;
        let shared = self.shared.clone();
        std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || shared.vcpu_thread())
            .context("starting the vCPU thread")?;
        if socket.exists() {
            std::fs::remove_file(socket).with_context(|| {
                format!(
                    "removing the stale socket {} (is another VMM using it?)",
                    socket.display()
                )
            })?;
        }
        // Created 0600 from the start: no window where others may connect.
        let listener = {
            let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
            let bound = UnixListener::bind(socket);
            nix::sys::stat::umask(old);
            bound.with_context(|| format!("binding the control socket {}", socket.display()))?
        };
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
        log::info!("control socket {} ready", socket.display());
        for stream in listener.incoming() {
            let stream = match stream {
                Ok(stream) => stream,
                Err(err) => {
                    log::warn!("accept on the control socket: {err}");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            let shared = self.shared.clone();
            if let Err(err) = std::thread::Builder::new()
                .name("control".into())
                .spawn(move || shared.connection(stream))
            {
                log::warn!("cannot start a thread for a control connection: {err}");
            }
        }
        Ok(())
    }
}

impl Shared {
    fn connection(self: Arc<Self>, stream: UnixStream) {
        let Ok(mut writer) = stream.try_clone() else {
            return;
        };
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            match wire::read_line(&mut reader, &mut line) {
                Ok(LineRead::Line) => {}
                Ok(LineRead::Closed) | Err(_) => return,
                Ok(LineRead::TooLong) => {
                    let answer = wire::refusal(&format!(
                        "request longer than {MAX_LINE_BYTES} bytes: send one JSON object per line"
                    ));
                    let _ = writeln!(writer, "{answer}");
                    return;
                }
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let (answer, exit, run) = match Request::parse(&line) {
                Ok(request) => {
                    let exit = matches!(request, Request::Vm(VmRequest::Exit {}));
                    let run = matches!(request, Request::Ext(TestRequest::Run { .. }));
                    if run {
                        self.unanswered_runs.fetch_add(1, Ordering::SeqCst);
                    }
                    let answer = self
                        .answer(request)
                        .unwrap_or_else(|e| wire::refusal(&format!("{e:#}")));
                    (answer, exit, run)
                }
                Err(e) => (
                    wire::refusal(&format!(
                        "bad request: {e} (send one JSON object per line, e.g. {{\"cmd\":\"info\"}})"
                    )),
                    false,
                    false,
                ),
            };
            let written = writeln!(writer, "{answer}").and_then(|()| writer.flush());
            if run {
                self.unanswered_runs.fetch_sub(1, Ordering::SeqCst);
            }
            if exit {
                signals::exit_now(&self.socket);
            }
            if written.is_err() {
                return;
            }
        }
    }

    fn ctl(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, ctl: MutexGuard<'a, Ctl>, timeout: Duration) -> MutexGuard<'a, Ctl> {
        self.changed
            .wait_timeout(ctl, timeout)
            .unwrap_or_else(|e| e.into_inner())
            .0
    }

    /// Locks the VM ahead of the vCPU thread, kicking the vCPU out of
    /// KVM_RUN if it is in a step (it continues afterwards).
    fn lock_vm(&self) -> MutexGuard<'_, TestVm> {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        if self.ctl().busy {
            self.kicker.kick();
        }
        let vm = self.vm.lock().unwrap_or_else(|e| e.into_inner());
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        vm
    }

    /// Locks the VM for a caller that holds `ctl` and saw the vCPU idle
    /// (not busy, not runnable): nothing to kick, nobody to wait for long.
    fn lock_idle_vm(&self) -> MutexGuard<'_, TestVm> {
        self.vm.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the vCPU thread's step has ended and the work is back in
    /// `ctl`; `kick`: gets the vCPU out of KVM_RUN first (the chunk is
    /// suspended, to go on later), else lets the chunk finish. The caller has
    /// made the vCPU not runnable.
    fn quiesce<'a>(&self, mut ctl: MutexGuard<'a, Ctl>, kick: bool) -> MutexGuard<'a, Ctl> {
        while ctl.busy {
            if kick {
                self.kicker.kick();
            }
            ctl = self.wait(ctl, Duration::from_millis(20));
        }
        ctl
    }

    /// Runs the work in `ctl` whenever the VM runs; lives as long as the
    /// process (so the kicker may always signal it).
    fn vcpu_thread(self: Arc<Self>) {
        let _bound = self.kicker.bind();
        loop {
            let mut work = {
                let mut ctl = self.ctl();
                loop {
                    if ctl.runnable() {
                        match ctl.not_before {
                            Some(due) if Instant::now() < due => {
                                let left = due - Instant::now();
                                ctl = self.wait(ctl, left.min(Duration::from_millis(50)));
                                continue;
                            }
                            Some(_) => {
                                ctl.not_before = None;
                                ctl.iteration_started = Instant::now();
                            }
                            None => {}
                        }
                        break;
                    }
                    ctl = self.wait(ctl, Duration::from_millis(500));
                }
                ctl.busy = true;
                ctl.work.take().expect("runnable work")
            };
            // Let control requests (harvest, reregister, ...) in first.
            while self.waiters.load(Ordering::SeqCst) > 0 {
                std::thread::sleep(Duration::from_micros(100));
            }
            let result = {
                let mut vm = self.vm.lock().unwrap_or_else(|e| e.into_inner());
                match &mut work {
                    Work::Run(cursor) => vm.step(cursor),
                    Work::Loop(state) => vm.step_loop(state),
                }
            };
            let mut ctl = self.ctl();
            ctl.busy = false;
            match (result, work) {
                (Ok(true), Work::Run(cursor)) => {
                    ctl.run_pending = false;
                    match ctl.reply.take() {
                        Some(reply) => drop(reply.send(Ok(cursor.report))),
                        None => log::info!("the migrated run finished: {:?}", cursor.report),
                    }
                }
                (Err(err), Work::Run(_)) => {
                    ctl.run_pending = false;
                    match ctl.reply.take() {
                        Some(reply) => drop(reply.send(Err(err))),
                        None => log::warn!("the migrated run failed: {err:#}"),
                    }
                }
                (Ok(ended), Work::Loop(state)) => {
                    ctl.loop_iterations = state.iterations;
                    if ended {
                        let interval = Duration::from_millis(state.interval_ms);
                        ctl.not_before = Some(ctl.iteration_started + interval);
                    }
                    ctl.work = Some(Work::Loop(state));
                }
                (Ok(false), work) => ctl.work = Some(work),
                (Err(err), work) => {
                    log::warn!("the loop stopped on an error: {err:#}");
                    ctl.failed = Some(format!("{err:#}"));
                    ctl.work = Some(work);
                }
            }
            drop(ctl);
            self.changed.notify_all();
        }
    }

    /// The answer to `request` as a JSON object (a refusal is the error).
    fn answer(self: &Arc<Self>, request: Request) -> anyhow::Result<Value> {
        match request {
            Request::Vm(request) => self.answer_vm(request),
            Request::Ext(request) => self.answer_test(request),
        }
    }

    /// The migration commands (the product's protocol).
    fn answer_vm(self: &Arc<Self>, request: VmRequest) -> anyhow::Result<Value> {
        match request {
            VmRequest::Info {} => {
                let ctl = self.ctl();
                let mut info = self.info.clone();
                info.vm.state = ctl.phase;
                info.loop_running = ctl.loop_running;
                info.loop_iterations = ctl.loop_iterations;
                info.run_pending = ctl.run_pending;
                info.loop_error = ctl.failed.clone();
                drop(ctl);
                ok(&info)
            }
            VmRequest::Exit {} => {
                // A run request still waiting (paused, its VM migrated or
                // discarded) is answered with an error before the process ends.
                let reply = self.ctl().reply.take();
                if reply.is_some() {
                    drop(reply);
                    let deadline = Instant::now() + EXIT_ANSWER_WAIT;
                    while self.unanswered_runs.load(Ordering::SeqCst) > 0
                        && Instant::now() < deadline
                    {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                ok(&Ack {})
            }
            VmRequest::Pause {} => {
                let mut ctl = self.ctl();
                match ctl.phase {
                    VmState::Incoming => bail!(
                        "the incoming VM has no state loaded, nothing runs: send load_state (it stays paused)"
                    ),
                    VmState::Paused => {}
                    VmState::Running => {
                        ctl.phase = VmState::Paused;
                        drop(self.quiesce(ctl, true));
                    }
                }
                ok(&Paused { paused: true })
            }
            VmRequest::Resume {} => {
                let mut ctl = self.ctl();
                match ctl.phase {
                    VmState::Incoming => {
                        bail!("the incoming VM has no state yet: send load_state first")
                    }
                    VmState::Running => {}
                    VmState::Paused => {
                        ctl.phase = VmState::Running;
                        drop(ctl);
                        self.changed.notify_all();
                    }
                }
                ok(&Ack {})
            }
            VmRequest::SaveState {} => {
                let ctl = self.ctl();
                if ctl.phase != VmState::Paused {
                    bail!(
                        "save_state needs a paused VM (send pause first); this one is {}",
                        ctl.phase
                    );
                }
                let ctl = self.quiesce(ctl, true);
                let state = self.lock_idle_vm().save_snapshot(ctl.work.as_ref())?;
                ok(&SavedState { state })
            }
            VmRequest::LoadState { state } => {
                let mut ctl = self.ctl();
                if ctl.phase != VmState::Incoming {
                    bail!(
                        "load_state is for an incoming VM (pagefp-testvmm --incoming); this one is {}",
                        ctl.phase
                    );
                }
                let work = self.lock_idle_vm().load_snapshot(&state)?;
                let now = Instant::now();
                ctl.phase = VmState::Paused;
                ctl.loop_running = matches!(work, Some(Work::Loop(_)));
                ctl.loop_iterations = match &work {
                    Some(Work::Loop(state)) => state.iterations,
                    _ => 0,
                };
                ctl.run_pending = matches!(work, Some(Work::Run(_)));
                ctl.loop_started = now;
                ctl.iteration_started = now;
                ctl.work = work;
                ok(&Ack {})
            }
        }
    }

    /// The test VMM's workload commands.
    fn answer_test(self: &Arc<Self>, request: TestRequest) -> anyhow::Result<Value> {
        match request {
            TestRequest::Run { ops } => ok(&self.run(ops)?),
            TestRequest::StartLoop { ops, interval_ms } => {
                let _serial = self.requests.lock().unwrap_or_else(|e| e.into_inner());
                can_start(&self.ctl())?;
                if ops.is_empty() {
                    bail!("start_loop needs at least one op");
                }
                self.lock_vm().check_ops(&ops)?;
                let mut ctl = self.ctl();
                // Again: the VM may have been paused meanwhile.
                can_start(&ctl)?;
                let now = Instant::now();
                ctl.work = Some(Work::Loop(LoopState::new(ops, interval_ms)));
                ctl.loop_running = true;
                ctl.loop_iterations = 0;
                ctl.failed = None;
                ctl.loop_started = now;
                ctl.iteration_started = now;
                ctl.not_before = None;
                drop(ctl);
                self.changed.notify_all();
                ok(&Ack {})
            }
            TestRequest::StopLoop {} => {
                let (state, seconds) = self.stop_loop()?;
                ok(&LoopReport {
                    iterations: state.iterations,
                    pages_written: state.total_pages_written(),
                    seconds,
                })
            }
            TestRequest::Harvest { list } => {
                if self.ctl().phase == VmState::Incoming {
                    bail!(
                        "the incoming VM has no memory registered with KVM yet: send load_state first"
                    );
                }
                let harvested = self.lock_vm().harvest()?;
                ok(&HarvestReport {
                    harvested: harvested.pages.len() as u64,
                    entries: harvested.entries,
                    pages: list.then_some(harvested.pages),
                })
            }
            TestRequest::Reregister {} => {
                self.lock_vm().register_slots()?;
                ok(&Ack {})
            }
            TestRequest::Checksums { first, count } => {
                let _serial = self.quiet_vm()?;
                let vm = self.lock_vm();
                let first = first.unwrap_or(0);
                let count = count.unwrap_or(vm.pages().saturating_sub(first));
                ok(&Checksums {
                    hashes: vm.checksums(first, count)?,
                })
            }
        }
    }

    /// A `run` request: queues the ops for the vCPU thread and waits for
    /// their report.
    fn run(&self, ops: Vec<Op>) -> anyhow::Result<RunReport> {
        // Held until the report: the next run (or loop) waits for this one.
        let _serial = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        can_start(&self.ctl())?;
        self.lock_vm().check_ops(&ops)?;
        let (reply, report) = mpsc::channel();
        {
            let mut ctl = self.ctl();
            // Again: the VM may have been paused meanwhile.
            can_start(&ctl)?;
            ctl.work = Some(Work::Run(Cursor::new(ops)));
            ctl.run_pending = true;
            ctl.reply = Some(reply);
        }
        self.changed.notify_all();
        report.recv().map_err(|_| {
            anyhow!(
                "the VMM exited before this run finished (if its VM migrated, the run finishes on \
                 the destination)"
            )
        })?
    }

    /// Makes sure no guest writes happen while memory is read: fine while
    /// paused (or incoming); while running, waits for a `run` in progress and
    /// refuses if a loop runs. The guard keeps new runs out.
    fn quiet_vm(&self) -> anyhow::Result<Option<MutexGuard<'_, ()>>> {
        if self.ctl().phase != VmState::Running {
            return Ok(None);
        }
        let serial = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        let ctl = self.ctl();
        if ctl.phase == VmState::Running {
            if ctl.loop_running {
                bail!("a loop is running; send stop_loop first (or pause)");
            }
            if ctl.run_pending {
                bail!(
                    "a migrated run is still finishing (info shows run_pending): try again once it is false"
                );
            }
        }
        Ok(Some(serial))
    }

    /// Stops the loop once the chunk in progress ends (a paused loop: where
    /// it stopped); its final state and how long it ran.
    fn stop_loop(&self) -> anyhow::Result<(LoopState, f64)> {
        let mut ctl = self.ctl();
        if !ctl.loop_running {
            bail!("no loop is running; start one with start_loop");
        }
        // The chunk in progress finishes (no page is left half written).
        ctl.holds += 1;
        ctl = self.quiesce(ctl, false);
        ctl.holds -= 1;
        let work = ctl.work.take();
        ctl.loop_running = false;
        ctl.loop_iterations = 0;
        ctl.not_before = None;
        let failed = ctl.failed.take();
        let seconds = ctl.loop_started.elapsed().as_secs_f64();
        drop(ctl);
        self.changed.notify_all();
        if let Some(err) = failed {
            bail!("the loop stopped on an error: {err}");
        }
        match work {
            Some(Work::Loop(state)) => Ok((state, seconds)),
            _ => bail!("the loop left no state"),
        }
    }
}

/// Refuses to start new work unless the VM runs and is idle.
fn can_start(ctl: &Ctl) -> anyhow::Result<()> {
    match ctl.phase {
        VmState::Incoming => {
            bail!("the incoming VM has no state yet: send load_state, then resume")
        }
        VmState::Paused => bail!("the VM is paused: send resume first"),
        VmState::Running => {}
    }
    if ctl.loop_running {
        bail!("a loop is running; send stop_loop first");
    }
    if ctl.run_pending {
        bail!(
            "a migrated run is still finishing (info shows run_pending): try again once it is false"
        );
    }
    Ok(())
}

/// `answer` with `"ok": true`, as the JSON object the connection writes.
fn ok<T: Serialize>(answer: &T) -> anyhow::Result<Value> {
    Reply::Ok(answer)
        .to_value()
        .context("encoding the answer (a bug in the test VMM)")
}
