//! Test VMs driven through the VMM's control socket, and the checks that
//! compare what the agent serves with the VMM's own memory.

use std::{path::Path, time::Duration};

use agent::api::wire::PageRecord;
use serde_json::{Value, json};

pub use crate::vmm::guest_code::{CODE_GPA, CODE_PAGES, code_slot_image};
use crate::{
    agent_process::{AgentProcess, TempDir},
    vmm_client::{VmmArgs, VmmProcess, testvmm_binary},
};

/// How a test VM runs.
#[derive(Clone, Debug)]
pub struct VmOptions {
    /// "ring" (default), "bitmap" or "none".
    pub dirty: &'static str,
    /// Harvest only when asked (or when the ring is full).
    pub manual_harvest: bool,
    pub ring_entries: u32,
}

impl Default for VmOptions {
    fn default() -> Self {
        Self {
            dirty: "ring",
            manual_harvest: false,
            ring_entries: 65536,
        }
    }
}

/// A running test VM whose RAM is exactly its image.
pub struct Vm {
    process: VmmProcess,
}

impl Vm {
    pub fn start(dir: &TempDir, image: &Path, options: VmOptions) -> Self {
        let bytes = std::fs::metadata(image).expect("image exists").len();
        assert_eq!(bytes % (1 << 20), 0, "test images are whole MiB");
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let socket = dir.0.join(format!(
            "vmm-{n}-{}.sock",
            image.file_stem().unwrap().to_string_lossy()
        ));
        let args = VmmArgs {
            socket,
            mem_mib: (bytes >> 20) as u32,
            image: Some(image.to_path_buf()),
            dirty: options.dirty.to_string(),
            ring_entries: options.ring_entries,
            harvest: if options.manual_harvest {
                "manual"
            } else {
                "auto"
            }
            .to_string(),
            slots: 1,
            incoming: false,
            env: Vec::new(),
        };
        let process = VmmProcess::spawn(&testvmm_binary(), &args).expect("starting pagefp-testvmm");
        Self { process }
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The VMM's control socket.
    pub fn socket(&self) -> &Path {
        self.process.socket()
    }

    fn call(&self, request: Value) -> Value {
        let answer = self
            .process
            .request(&request)
            .unwrap_or_else(|e| panic!("VMM request {request}: {e}"));
        assert_eq!(answer["ok"], true, "VMM request {request} failed: {answer}");
        answer
    }

    pub fn run(&self, ops: Value) -> Value {
        self.call(json!({"cmd": "run", "ops": ops}))
    }

    /// Pages `first..first+count` get fresh pseudo-random content.
    pub fn random(&self, first: u32, count: u32, seed: u32) -> Value {
        self.run(json!([{"op": "random", "first": first, "count": count, "seed": seed}]))
    }

    /// Writes `value` into pages `first..first+count`.
    pub fn touch(&self, first: u32, count: u32, value: u32) -> Value {
        self.run(json!([{"op": "touch", "first": first, "count": count, "value": value}]))
    }

    /// Runs `ops` over and over in the VMM until [`Vm::stop_loop`].
    pub fn start_loop(&self, ops: Value) -> Value {
        self.call(json!({"cmd": "start_loop", "ops": ops}))
    }

    /// A loop whose iterations start at least `interval_ms` apart.
    pub fn start_loop_every(&self, ops: Value, interval_ms: u64) -> Value {
        self.call(json!({"cmd": "start_loop", "ops": ops, "interval_ms": interval_ms}))
    }

    pub fn stop_loop(&self) -> Value {
        self.call(json!({"cmd": "stop_loop"}))
    }

    pub fn harvest(&self) -> Value {
        self.call(json!({"cmd": "harvest"}))
    }

    /// Harvests the VM's dirty log until `agent` serves every page clean
    /// (and the VM synced); its view then.
    pub fn harvest_until_clean(&self, agent: &AgentProcess, timeout: Duration) -> Value {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            self.harvest();
            std::thread::sleep(Duration::from_millis(100));
            let view = agent.vm(self.pid()).expect("VM listed");
            if view["synced"] == true && view["clean"] == view["pages"] {
                return view;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "VM {} never all clean: {view:#}",
                self.pid()
            );
        }
    }

    /// Registers the memory slots again with the same parameters.
    pub fn reregister(&self) -> Value {
        self.call(json!({"cmd": "reregister"}))
    }

    /// blake3 of every page, from the VMM's own mapping.
    pub fn checksums(&self) -> Vec<[u8; 32]> {
        let answer = self.call(json!({"cmd": "checksums"}));
        answer["hashes"]
            .as_array()
            .expect("hashes")
            .iter()
            .map(|h| {
                let text = h.as_str().unwrap();
                let mut hash = [0u8; 32];
                for (i, byte) in hash.iter_mut().enumerate() {
                    *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap();
                }
                hash
            })
            .collect()
    }

    /// Asks the VMM to exit and waits for it.
    pub fn exit(mut self) {
        let _ = self.process.request(&json!({"cmd": "exit"}));
        assert!(
            self.process.wait_exit(Duration::from_secs(10)).is_some(),
            "the VMM did not exit"
        );
    }
}

/// blake3 of every page of the VMM's code slot.
pub fn code_slot_hashes() -> Vec<[u8; 32]> {
    code_slot_image()
        .chunks_exact(4096)
        .map(|page| *blake3::hash(page).as_bytes())
        .collect()
}

/// The agent's hash list of `pid`.
pub fn vm_pages(agent: &AgentProcess, pid: u32) -> Vec<PageRecord> {
    agent.hashes(pid)
}

/// Every page the agent serves as clean or unverified has exactly the hash of
/// the VMM's current memory. (The VM is idle between control commands.)
pub fn assert_served_hashes_match(agent: &AgentProcess, vm: &Vm) {
    let records = agent.hashes(vm.pid());
    let mut truth = vm.checksums();
    // The VMM's read-only code slot follows its RAM.
    truth.extend(code_slot_hashes());
    assert_eq!(records.len(), truth.len(), "hash list covers every page");
    let zero = *blake3::hash(&[0u8; 4096]).as_bytes();
    let ram_pages = truth.len() - CODE_PAGES;
    let mut served = 0;
    for (index, (record, expected)) in records.iter().zip(&truth).enumerate() {
        let gpa = if index < ram_pages {
            index as u64 * 4096
        } else {
            CODE_GPA + (index - ram_pages) as u64 * 4096
        };
        assert_eq!(record.gpa, gpa);
        if record.state == agent::api::wire::state::CLEAN
            || record.state == agent::api::wire::state::UNVERIFIED
        {
            served += 1;
            assert_eq!(
                &record.hash, expected,
                "page {index} served (state {}) with a hash that is not its content",
                record.state
            );
            assert_eq!(
                record.zero == 1,
                *expected == zero,
                "page {index} zero flag"
            );
        } else {
            assert_eq!(
                record.hash, [0; 32],
                "page {index}: no hash for unknown or dirty pages"
            );
        }
    }
    eprintln!(
        "{served}/{} served hashes match the VMM's memory",
        records.len()
    );
}
