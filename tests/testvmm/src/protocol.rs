//! The test VMM's control protocol: the product's migration commands
//! ([`VmRequest`], defined with `pagefp migrate` in
//! `agent::migrate::vmm::protocol`) plus this VMM's own workload commands
//! ([`TestRequest`]), and the typed answers of both. The server
//! ([`crate::control`]) and the tests' client (`pagefp_tests::vmm_client`)
//! use these types; the wire is documented in [`crate::control`].

pub use agent::migrate::vmm::protocol::{
    Ack, Extension, LineRead, MAX_LINE_BYTES, MemoryRegion, Paused, Reply, SavedState, VmInfo,
    VmRequest, VmState, read_line, refusal,
};
use serde::{Deserialize, Serialize};

use crate::{DirtyMode, Harvest, SlotInfo, workload::Op};

/// A request line of the test VMM.
pub type Request = agent::migrate::vmm::protocol::Request<TestRequest>;

// Commands without arguments are empty struct variants: serde ignores
// unknown fields next to the tag of a unit variant, even with deny_unknown_fields.
/// The test VMM's commands besides the migration ones.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum TestRequest {
    /// Runs `ops` once, in order; answered with [`crate::RunReport`] once they ran.
    Run { ops: Vec<Op> },
    /// Runs `ops` over and over, iterations at least `interval_ms` apart;
    /// [`Ack`].
    StartLoop {
        ops: Vec<Op>,
        #[serde(default, skip_serializing_if = "is_zero")]
        interval_ms: u64,
    },
    /// [`LoopReport`].
    StopLoop {},
    /// [`HarvestReport`] (with the pages if `list`).
    Harvest {
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        list: bool,
    },
    /// Registers the RAM and code slots again, unchanged; [`Ack`].
    Reregister {},
    /// [`Checksums`] of pages `first..first+count` (default: all).
    Checksums {
        #[serde(skip_serializing_if = "Option::is_none")]
        first: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        count: Option<u32>,
    },
}

impl From<TestRequest> for Request {
    fn from(request: TestRequest) -> Self {
        Request::Ext(request)
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Extension for TestRequest {
    const COMMANDS: &'static [&'static str] = &[
        "run",
        "start_loop",
        "stop_loop",
        "harvest",
        "reregister",
        "checksums",
    ];

    fn name(&self) -> &'static str {
        match self {
            TestRequest::Run { .. } => "run",
            TestRequest::StartLoop { .. } => "start_loop",
            TestRequest::StopLoop {} => "stop_loop",
            TestRequest::Harvest { .. } => "harvest",
            TestRequest::Reregister {} => "reregister",
            TestRequest::Checksums { .. } => "checksums",
        }
    }
}

/// The test VMM's answer to `info`: what migration reads ([`VmInfo`]), and
/// the VMM's configuration and work.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TestVmInfo {
    #[serde(flatten)]
    pub vm: VmInfo,
    pub mem_bytes: u64,
    pub pages: u32,
    pub dirty: DirtyMode,
    pub ring_entries: u32,
    pub harvest: Harvest,
    /// The RAM slots with their KVM flags.
    pub slots: Vec<SlotInfo>,
    pub loop_running: bool,
    /// Iterations of the current loop (a migrated loop's included).
    pub loop_iterations: u64,
    /// A `run` request's ops are not done yet (on a destination: a migrated
    /// run still finishing).
    pub run_pending: bool,
    /// Why the loop stopped, if it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loop_error: Option<String>,
}

/// Answer to `stop_loop`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct LoopReport {
    pub iterations: u64,
    pub pages_written: u64,
    pub seconds: f64,
}

/// Answer to `harvest`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HarvestReport {
    /// Distinct pages written since the previous harvest.
    pub harvested: u64,
    /// Dirty-ring entries behind them (the emulator pushes one per write).
    pub entries: u64,
    /// The pages themselves, when asked for (`"list": true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages: Option<Vec<u64>>,
}

/// Answer to `checksums`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Checksums {
    /// blake3 (lowercase hex) of each page asked for.
    pub hashes: Vec<String>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn test_requests_keep_the_wire_format() {
        let touch = Op::Touch {
            first: 1,
            count: 2,
            value: 3,
        };
        let all = [
            (
                TestRequest::Run {
                    ops: vec![touch.clone()],
                },
                json!({"cmd": "run", "ops": [{"op": "touch", "first": 1, "count": 2, "value": 3}]}),
            ),
            (
                TestRequest::StartLoop {
                    ops: vec![touch.clone()],
                    interval_ms: 0,
                },
                json!({"cmd": "start_loop", "ops": [{"op": "touch", "first": 1, "count": 2, "value": 3}]}),
            ),
            (
                TestRequest::StartLoop {
                    ops: vec![touch],
                    interval_ms: 5,
                },
                json!({"cmd": "start_loop", "interval_ms": 5,
                       "ops": [{"op": "touch", "first": 1, "count": 2, "value": 3}]}),
            ),
            (TestRequest::StopLoop {}, json!({"cmd": "stop_loop"})),
            (
                TestRequest::Harvest { list: false },
                json!({"cmd": "harvest"}),
            ),
            (
                TestRequest::Harvest { list: true },
                json!({"cmd": "harvest", "list": true}),
            ),
            (TestRequest::Reregister {}, json!({"cmd": "reregister"})),
            (
                TestRequest::Checksums {
                    first: None,
                    count: None,
                },
                json!({"cmd": "checksums"}),
            ),
            (
                TestRequest::Checksums {
                    first: Some(4),
                    count: Some(1),
                },
                json!({"cmd": "checksums", "first": 4, "count": 1}),
            ),
        ];
        for (request, wire) in all {
            assert!(TestRequest::COMMANDS.contains(&request.name()));
            assert_eq!(wire["cmd"], request.name());
            let request = Request::Ext(request);
            assert_eq!(serde_json::to_value(&request).unwrap(), wire);
            assert_eq!(Request::from_value(wire).unwrap(), request);
        }
        // No command is both a migration and a test command.
        for cmd in TestRequest::COMMANDS {
            assert!(!VmRequest::COMMANDS.contains(cmd), "{cmd}");
        }
    }

    #[test]
    fn info_carries_what_migration_reads() {
        let info = TestVmInfo {
            vm: VmInfo {
                pid: 9,
                state: VmState::Paused,
                memory: vec![MemoryRegion {
                    slot: 0,
                    gpa: 0,
                    size: 4096,
                    uaddr: 1 << 30,
                    read_only: false,
                }],
            },
            mem_bytes: 4096,
            pages: 1,
            dirty: DirtyMode::Ring,
            ring_entries: 4096,
            harvest: Harvest::Manual,
            slots: Vec::new(),
            loop_running: false,
            loop_iterations: 0,
            run_pending: false,
            loop_error: None,
        };
        let wire = Reply::Ok(info.clone()).to_value().unwrap();
        assert_eq!(wire["ok"], true);
        assert_eq!(wire["state"], "paused");
        assert_eq!(wire["harvest"], "manual");
        let Reply::Ok(vm) = Reply::<VmInfo>::from_value(wire.clone()).unwrap() else {
            panic!("refused");
        };
        assert_eq!(vm, info.vm);
        let Reply::Ok(back) = Reply::<TestVmInfo>::from_value(wire).unwrap() else {
            panic!("refused");
        };
        assert_eq!(back.vm, info.vm);
        assert_eq!(back.harvest, Harvest::Manual);
    }
}
