//! The control socket: one JSON request per line, one JSON answer per line.
//!
//! | request | answer (besides `"ok": true`) |
//! |---|---|
//! | `{"cmd":"info"}` | pid, mem_bytes, pages, dirty, ring_entries, harvest, slots |
//! | `{"cmd":"run","ops":[...]}` | pages_written, harvested, ring_full_exits, seconds |
//! | `{"cmd":"start_loop","ops":[...]}` / `{"cmd":"stop_loop"}` | iterations, pages_written, seconds |
//! | `{"cmd":"harvest"}` | harvested |
//! | `{"cmd":"reregister"}` | the RAM slots are registered again, unchanged |
//! | `{"cmd":"checksums"[,"first":F,"count":C]}` | hashes: blake3 hex per page |
//! | `{"cmd":"exit"}` | then the process exits |
//!
//! Ops: `{"op":"random","first","count","seed"}`, `{"op":"copy","src","first","count"}`,
//! `{"op":"zero","first","count"}`, `{"op":"touch","first","count","value"}`,
//! `{"op":"stride","first","count","step","value"}`. A bad request gets
//! `{"ok":false,"error":"..."}` and the VMM keeps serving.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{
        fs::PermissionsExt,
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Instant,
};

use serde::Deserialize;
use serde_json::{Value, json};

use super::{TestVm, workload::Op};

#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    Info,
    Run {
        ops: Vec<Op>,
    },
    StartLoop {
        ops: Vec<Op>,
    },
    StopLoop,
    Harvest,
    Reregister,
    Checksums {
        first: Option<u32>,
        count: Option<u32>,
    },
    Exit,
}

struct Loop {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<anyhow::Result<(u64, u64)>>,
    started: Instant,
}

pub struct Server {
    vm: Arc<Mutex<TestVm>>,
    running: Option<Loop>,
    socket: PathBuf,
}

impl Server {
    pub fn new(vm: TestVm, socket: &Path) -> Self {
        Self {
            vm: Arc::new(Mutex::new(vm)),
            running: None,
            socket: socket.to_path_buf(),
        }
    }

    /// Serves connections one after another until an `exit` request.
    pub fn serve(mut self) -> anyhow::Result<()> {
        let _ = std::fs::remove_file(&self.socket);
        let listener = UnixListener::bind(&self.socket)?;
        std::fs::set_permissions(&self.socket, std::fs::Permissions::from_mode(0o600))?;
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            if self.connection(stream) {
                break;
            }
        }
        let _ = std::fs::remove_file(&self.socket);
        Ok(())
    }

    /// Returns true when asked to exit.
    fn connection(&mut self, stream: UnixStream) -> bool {
        let Ok(mut writer) = stream.try_clone() else {
            return false;
        };
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return false };
            if line.trim().is_empty() {
                continue;
            }
            let (answer, exit) = match serde_json::from_str::<Request>(&line) {
                Ok(request) => {
                    let exit = matches!(request, Request::Exit);
                    (
                        self.answer(request)
                            .unwrap_or_else(|e| json!({"ok": false, "error": format!("{e:#}")})),
                        exit,
                    )
                }
                Err(e) => (
                    json!({"ok": false, "error": format!("bad request: {e}")}),
                    false,
                ),
            };
            if writeln!(writer, "{answer}").is_err() {
                return exit;
            }
            if exit {
                self.stop_loop().ok();
                return true;
            }
        }
        false
    }

    fn answer(&mut self, request: Request) -> anyhow::Result<Value> {
        let busy = || anyhow::anyhow!("a loop is running; send stop_loop first");
        Ok(match request {
            Request::Info => {
                let vm = self.vm.lock().unwrap();
                json!({
                    "ok": true,
                    "pid": std::process::id(),
                    "mem_bytes": vm.config.mem_bytes,
                    "pages": vm.pages(),
                    "dirty": vm.config.dirty,
                    "ring_entries": vm.config.ring_entries,
                    "harvest": vm.config.harvest,
                    "slots": vm.slots,
                    "loop_running": self.running.is_some(),
                })
            }
            Request::Run { ops } => {
                if self.running.is_some() {
                    return Err(busy());
                }
                let report = self.vm.lock().unwrap().run(&ops)?;
                json!({"ok": true, "pages_written": report.pages_written, "harvested": report.harvested,
                       "ring_full_exits": report.ring_full_exits, "seconds": report.seconds})
            }
            Request::StartLoop { ops } => {
                if self.running.is_some() {
                    return Err(busy());
                }
                let pages = self.vm.lock().unwrap().pages();
                for op in &ops {
                    op.validate(pages).map_err(|e| anyhow::anyhow!(e))?;
                }
                if ops.is_empty() {
                    anyhow::bail!("start_loop needs at least one op");
                }
                let stop = Arc::new(AtomicBool::new(false));
                let (vm, flag) = (self.vm.clone(), stop.clone());
                let thread = std::thread::spawn(move || {
                    let (mut iterations, mut written) = (0u64, 0u64);
                    while !flag.load(Ordering::Relaxed) {
                        written += vm.lock().unwrap().run(&ops)?.pages_written;
                        iterations += 1;
                    }
                    Ok((iterations, written))
                });
                self.running = Some(Loop {
                    stop,
                    thread,
                    started: Instant::now(),
                });
                json!({"ok": true})
            }
            Request::StopLoop => {
                let (iterations, written, seconds) = self.stop_loop()?;
                json!({"ok": true, "iterations": iterations, "pages_written": written, "seconds": seconds})
            }
            Request::Harvest => {
                json!({"ok": true, "harvested": self.vm.lock().unwrap().harvest()?})
            }
            Request::Reregister => {
                self.vm.lock().unwrap().register_slots()?;
                json!({"ok": true})
            }
            Request::Checksums { first, count } => {
                if self.running.is_some() {
                    return Err(busy());
                }
                let vm = self.vm.lock().unwrap();
                let first = first.unwrap_or(0);
                let count = count.unwrap_or(vm.pages().saturating_sub(first));
                json!({"ok": true, "hashes": vm.checksums(first, count)?})
            }
            Request::Exit => json!({"ok": true}),
        })
    }

    fn stop_loop(&mut self) -> anyhow::Result<(u64, u64, f64)> {
        let running = self
            .running
            .take()
            .ok_or_else(|| anyhow::anyhow!("no loop is running"))?;
        running.stop.store(true, Ordering::Relaxed);
        let seconds = running.started.elapsed().as_secs_f64();
        let (iterations, written) = running
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("the loop thread panicked"))??;
        Ok((iterations, written, seconds))
    }
}
