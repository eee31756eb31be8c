//! The control socket: one JSON request per line, one JSON answer per line,
//! several requests per connection, connections served concurrently (one
//! thread each; the VM itself runs one command at a time).
//!
//! | request | answer (besides `"ok": true`) |
//! |---|---|
//! | `{"cmd":"info"}` | pid, mem_bytes, pages, dirty, ring_entries, harvest, slots, loop_running |
//! | `{"cmd":"run","ops":[...]}` | pages_written, harvested, entries, ring_full_exits, seconds |
//! | `{"cmd":"start_loop","ops":[...][,"interval_ms":N]}` | (nothing; iterations start at least N ms apart) |
//! | `{"cmd":"stop_loop"}` | iterations, pages_written, seconds |
//! | `{"cmd":"harvest"[,"list":true]}` | harvested, entries[, pages] |
//! | `{"cmd":"reregister"}` | (the RAM and code slots are registered again, unchanged) |
//! | `{"cmd":"checksums"[,"first":F][,"count":C]}` | hashes: blake3 hex per page |
//! | `{"cmd":"exit"}` | then the process exits 0 and removes the socket |
//! | `{"cmd":"pause"}` | (answers once the vCPU stopped: within one chunk of an op, a few ms) |
//! | `{"cmd":"resume"}` | (a loop carries on where it stopped; an incoming VM starts its migrated loop) |
//! | `{"cmd":"save_state"}` | state: the paused VM's vCPU registers and workload (see [`super::snapshot`]) |
//! | `{"cmd":"load_state","state":S}` | (incoming VM: checks S, registers memory with KVM, stays paused) |
//!
//! `info` also gives `state` (`running`, `paused` or `incoming`),
//! `loop_iterations` (of the current loop, migrated ones included) and `memory`:
//! the RAM regions a migration copies (`slot`, `gpa`, `size`, `uaddr`,
//! `read_only`), mapped from a sealed memfd that `/proc/PID/map_files` opens.
//! The read-only code slot is the same in every VMM and is not migrated.
//! With `--incoming` the VMM starts with zeroed RAM that KVM does not see
//! until `load_state`; `exit` discards it.
//!
//! Ops: `{"op":"random","first","count","seed"}`, `{"op":"copy","src","first","count"}`,
//! `{"op":"zero","first","count"}`, `{"op":"touch","first","count","value"}`,
//! `{"op":"stride","first","count","step","value"}`. `harvested` counts
//! distinct pages; `entries` the dirty-ring entries behind them. A bad request
//! gets `{"ok":false,"error":"..."}` and the VMM keeps serving.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::{
        fs::PermissionsExt,
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Cursor, LoopState, TestVm, signals, workload::Op};

/// Longest request line accepted.
const MAX_REQUEST_BYTES: u64 = 16 << 20;

// Commands without arguments are empty struct variants: serde ignores
// unknown fields next to the tag of a unit variant, even with deny_unknown_fields.
#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    Info {},
    Run {
        ops: Vec<Op>,
    },
    StartLoop {
        ops: Vec<Op>,
        #[serde(default)]
        interval_ms: u64,
    },
    StopLoop {},
    Harvest {
        #[serde(default)]
        list: bool,
    },
    Reregister {},
    Checksums {
        first: Option<u32>,
        count: Option<u32>,
    },
    Exit {},
    Pause {},
    Resume {},
    SaveState {},
    LoadState {
        state: String,
    },
}

struct Loop {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<anyhow::Result<()>>,
    started: Instant,
}

/// State shared by the connection threads and the loop thread.
struct Shared {
    vm: Mutex<TestVm>,
    /// Control threads waiting for `vm`; a running loop lets them in.
    waiters: AtomicUsize,
    running: Mutex<Option<Loop>>,
    loop_running: AtomicBool,
    /// The `info` answer without the loop state (it never changes).
    info: Value,
    socket: PathBuf,
    /// Paused by `pause` (or incoming, until `resume`); the vCPU runs no
    /// chunk while set.
    paused: Mutex<bool>,
    resumed: Condvar,
    /// A one-shot `run` request is in progress (its ops do not migrate).
    oneshot: AtomicBool,
}

pub struct Server {
    shared: Arc<Shared>,
}

impl Server {
    pub fn new(vm: TestVm, socket: &Path) -> Self {
        let memory: Vec<Value> = vm
            .slots
            .iter()
            .map(|s| json!({"slot": s.slot, "gpa": s.gpa, "size": s.size, "uaddr": s.uaddr, "read_only": false}))
            .collect();
        let incoming = !vm.registered;
        let info = json!({
            "ok": true,
            "memory": memory,
            "pid": std::process::id(),
            "mem_bytes": vm.config.mem_bytes,
            "pages": vm.pages(),
            "dirty": vm.config.dirty,
            "ring_entries": vm.config.ring_entries,
            "harvest": vm.config.harvest,
            "slots": vm.slots,
        });
        Self {
            shared: Arc::new(Shared {
                vm: Mutex::new(vm),
                waiters: AtomicUsize::new(0),
                running: Mutex::new(None),
                loop_running: AtomicBool::new(false),
                info,
                socket: socket.to_path_buf(),
                paused: Mutex::new(incoming),
                resumed: Condvar::new(),
                oneshot: AtomicBool::new(false),
            }),
        }
    }

    /// Serves connections until an `exit` request, SIGTERM or SIGINT, all of
    /// which end the process with status 0.
    pub fn serve(self) -> anyhow::Result<()> {
        let socket = &self.shared.socket;
        // Before any thread starts, so that every thread blocks the signals.
        signals::exit_on_termination(socket.clone())?;
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
            line.clear();
            match reader
                .by_ref()
                .take(MAX_REQUEST_BYTES)
                .read_until(b'\n', &mut line)
            {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if !line.ends_with(b"\n") && line.len() as u64 >= MAX_REQUEST_BYTES {
                let answer = json!({"ok": false, "error": format!(
                    "request longer than {MAX_REQUEST_BYTES} bytes: send one JSON object per line")});
                let _ = writeln!(writer, "{answer}");
                return;
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let (answer, exit) = match serde_json::from_slice::<Request>(&line) {
                Ok(request) => {
                    let exit = matches!(request, Request::Exit {});
                    let answer = self
                        .answer(request)
                        .unwrap_or_else(|e| json!({"ok": false, "error": format!("{e:#}")}));
                    (answer, exit)
                }
                Err(e) => (
                    json!({"ok": false, "error": format!(
                        "bad request: {e} (send one JSON object per line, e.g. {{\"cmd\":\"info\"}})")}),
                    false,
                ),
            };
            let written = writeln!(writer, "{answer}").and_then(|()| writer.flush());
            if exit {
                signals::exit_now(&self.socket);
            }
            if written.is_err() {
                return;
            }
        }
    }

    /// Locks the VM ahead of a running loop's next iteration.
    fn lock_vm(&self) -> MutexGuard<'_, TestVm> {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let vm = self.vm.lock().unwrap_or_else(|e| e.into_inner());
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        vm
    }

    fn running(&self) -> MutexGuard<'_, Option<Loop>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn answer(self: &Arc<Self>, request: Request) -> anyhow::Result<Value> {
        let busy = || anyhow!("a loop is running; send stop_loop first");
        Ok(match request {
            Request::Info {} => {
                let mut info = self.info.clone();
                info["loop_running"] = self.loop_running.load(Ordering::SeqCst).into();
                info["state"] = self.state_name().into();
                info["loop_iterations"] = self
                    .lock_vm()
                    .workload
                    .as_ref()
                    .map_or(0, |w| w.iterations)
                    .into();
                info
            }
            Request::Run { ops } => {
                // Held while running: no loop can start meanwhile.
                let running = self.running();
                if running.is_some() {
                    return Err(busy());
                }
                if self.state_name() != "running" {
                    bail!("the VM is {}: send resume first", self.state_name());
                }
                self.lock_vm().check_ops(&ops)?;
                self.oneshot.store(true, Ordering::SeqCst);
                let mut cursor = Cursor::new(ops);
                let result = loop {
                    self.wait_while_paused(None);
                    match self.lock_vm().step(&mut cursor) {
                        Ok(true) => break Ok(cursor.report),
                        Ok(false) => {}
                        Err(err) => break Err(err),
                    }
                };
                self.oneshot.store(false, Ordering::SeqCst);
                let report = result?;
                drop(running);
                json!({"ok": true, "pages_written": report.pages_written,
                       "harvested": report.harvested, "entries": report.entries,
                       "ring_full_exits": report.ring_full_exits, "seconds": report.seconds})
            }
            Request::StartLoop { ops, interval_ms } => {
                let mut running = self.running();
                if running.is_some() {
                    return Err(busy());
                }
                if ops.is_empty() {
                    bail!("start_loop needs at least one op");
                }
                if self.state_name() != "running" {
                    bail!("the VM is {}: send resume first", self.state_name());
                }
                {
                    let mut vm = self.lock_vm();
                    vm.check_ops(&ops)?;
                    vm.workload = Some(LoopState {
                        cursor: Cursor::new(ops),
                        iterations: 0,
                        pages_written: 0,
                        interval_ms,
                    });
                }
                *running = Some(self.spawn_loop()?);
                self.loop_running.store(true, Ordering::SeqCst);
                json!({"ok": true})
            }
            Request::StopLoop {} => {
                let (iterations, written, seconds) = self.stop_loop()?;
                json!({"ok": true, "iterations": iterations, "pages_written": written, "seconds": seconds})
            }
            Request::Harvest { list } => {
                let harvested = self.lock_vm().harvest()?;
                let mut answer = json!({"ok": true, "harvested": harvested.pages.len(),
                                        "entries": harvested.entries});
                if list {
                    answer["pages"] = json!(harvested.pages);
                }
                answer
            }
            Request::Reregister {} => {
                self.lock_vm().register_slots()?;
                json!({"ok": true})
            }
            Request::Checksums { first, count } => {
                let running = self.running();
                if running.is_some() && self.state_name() == "running" {
                    return Err(anyhow!("a loop is running; send stop_loop first (or pause)"));
                }
                let vm = self.lock_vm();
                let first = first.unwrap_or(0);
                let count = count.unwrap_or(vm.pages().saturating_sub(first));
                let hashes = vm.checksums(first, count)?;
                drop(running);
                json!({"ok": true, "hashes": hashes})
            }
            Request::Exit {} => json!({"ok": true}),
            Request::Pause {} => {
                if self.state_name() == "incoming" {
                    bail!("the incoming VM has not been loaded: nothing runs");
                }
                *self.paused.lock().unwrap_or_else(|e| e.into_inner()) = true;
                // Taking the VM waits for the chunk the vCPU is running; after
                // that no chunk starts while paused.
                drop(self.lock_vm());
                json!({"ok": true, "paused": true})
            }
            Request::Resume {} => {
                if self.state_name() == "incoming" {
                    bail!("the incoming VM has no state yet: send load_state first");
                }
                let mut running = self.running();
                let migrated_loop = running.is_none() && self.lock_vm().workload.is_some();
                *self.paused.lock().unwrap_or_else(|e| e.into_inner()) = false;
                self.resumed.notify_all();
                if migrated_loop {
                    *running = Some(self.spawn_loop()?);
                    self.loop_running.store(true, Ordering::SeqCst);
                }
                json!({"ok": true})
            }
            Request::SaveState {} => {
                if self.state_name() != "paused" {
                    bail!("save_state needs a paused VM (send pause first); this one is {}", self.state_name());
                }
                if self.oneshot.load(Ordering::SeqCst) {
                    bail!("a run request is in progress and cannot migrate: wait for it, or use start_loop");
                }
                let state = self.lock_vm().save_snapshot()?;
                json!({"ok": true, "state": state})
            }
            Request::LoadState { state } => {
                if self.state_name() != "incoming" {
                    bail!("load_state is for an incoming VM (pagefp-testvmm --incoming); this one is {}", self.state_name());
                }
                self.lock_vm().load_snapshot(&state)?;
                json!({"ok": true})
            }
        })
    }

    /// `running`, `paused` or `incoming`.
    fn state_name(&self) -> &'static str {
        if !self.vm.lock().unwrap_or_else(|e| e.into_inner()).registered {
            "incoming"
        } else if *self.paused.lock().unwrap_or_else(|e| e.into_inner()) {
            "paused"
        } else {
            "running"
        }
    }

    /// Blocks while the VM is paused (or until `stop` is set).
    fn wait_while_paused(&self, stop: Option<&AtomicBool>) {
        let mut paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        while *paused && !stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
            paused = self
                .resumed
                .wait_timeout(paused, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Runs the VM's loop over and over on a thread of its own until
    /// stopped, pausing between chunks while the VM is paused.
    fn spawn_loop(self: &Arc<Self>) -> anyhow::Result<Loop> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let this = self.clone();
        let thread = std::thread::Builder::new()
            .name("vcpu-loop".into())
            .spawn(move || {
                let mut iteration_start = Instant::now();
                while !flag.load(Ordering::SeqCst) {
                    this.wait_while_paused(Some(&flag));
                    let (ended, interval) = {
                        let mut vm = this.vm.lock().unwrap_or_else(|e| e.into_inner());
                        // Checked under the lock: `pause` takes it to wait for us.
                        if *this.paused.lock().unwrap_or_else(|e| e.into_inner()) || flag.load(Ordering::SeqCst) {
                            continue;
                        }
                        let ended = vm.step_loop()?;
                        (ended, vm.workload.as_ref().map_or(0, |w| w.interval_ms))
                    };
                    if ended {
                        let due = iteration_start + Duration::from_millis(interval);
                        while Instant::now() < due && !flag.load(Ordering::SeqCst) {
                            std::thread::sleep((due - Instant::now()).min(Duration::from_millis(20)));
                        }
                        iteration_start = Instant::now();
                    }
                    // Let control requests (harvest, reregister) in between chunks.
                    while this.waiters.load(Ordering::SeqCst) > 0 {
                        std::thread::sleep(Duration::from_micros(100));
                    }
                }
                Ok(())
            })
            .context("starting the loop thread")?;
        Ok(Loop {
            stop,
            thread,
            started: Instant::now(),
        })
    }

    fn stop_loop(&self) -> anyhow::Result<(u64, u64, f64)> {
        // Held until the loop has ended: no other loop or run starts meanwhile.
        let mut guard = self.running();
        let running = guard
            .take()
            .ok_or_else(|| anyhow!("no loop is running; start one with start_loop"))?;
        running.stop.store(true, Ordering::SeqCst);
        self.resumed.notify_all();
        let result = running.thread.join();
        let seconds = running.started.elapsed().as_secs_f64();
        self.loop_running.store(false, Ordering::SeqCst);
        let workload = self.lock_vm().workload.take();
        drop(guard);
        result
            .map_err(|_| anyhow!("the loop thread panicked"))?
            .context("the loop stopped on an error")?;
        let workload = workload.context("the loop left no state")?;
        let written = workload.pages_written + workload.cursor.report.pages_written;
        Ok((workload.iterations, written, seconds))
    }
}
