//! Loading and attaching pagefp's eBPF programs, with a clear error for every
//! missing privilege or kernel feature, and a fallback where one exists.

pub mod btf;
pub mod cost;
pub mod tracefs;

use agent_common::{BitmapChunk, Event, LossRecord, RingLayout, TraceOffsets};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, FExit, RawTracePoint, TracePoint},
};
use serde::Serialize;

use crate::config::{Config, RingPushProgram};

/// The eBPF object built by `agent/build.rs`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("tracefs is not mounted: run `mount -t tracefs tracefs /sys/kernel/tracing`")]
    NoTracefs,
    #[error(
        "tracepoint {tracepoint} is missing ({source}): load KVM (`modprobe kvm_intel` or `kvm_amd`) and make sure the kernel has CONFIG_FTRACE_SYSCALLS"
    )]
    MissingTracepoint {
        tracepoint: String,
        source: std::io::Error,
    },
    #[error(
        "tracepoint {tracepoint} has no field `{field}`: this kernel's KVM is too old or too new for pagefp"
    )]
    MissingField { tracepoint: String, field: String },
    #[error(
        "loading the eBPF programs failed: {0}. pagefp needs root (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN) and a kernel with BPF ring buffers (5.8+)"
    )]
    Load(#[source] aya::EbpfError),
    #[error("eBPF program {program} could not be {action}: {source}")]
    Program {
        program: &'static str,
        action: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {0}: {1}")]
    Map(&'static str, #[source] aya::maps::MapError),
    #[error(
        "no eBPF program could watch kvm_dirty_ring_push ({0}): load KVM (`modprobe kvm_intel` or `kvm_amd`), or set ring_push_program = \"auto\""
    )]
    RingPush(String),
}

/// Where the agent learns of guest page writes.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Sources {
    /// Programs attached, by name.
    pub attached: Vec<String>,
    /// The one on dirty-ring pushes (the per-page hot path), e.g.
    /// `tp_btf/kvm_dirty_ring_push`.
    pub ring_push: String,
    /// The BPF trampoline program on `mark_page_dirty_in_slot` (an fexit) is
    /// attached: it covers bitmap mode. Named after fentry, the kernel
    /// feature it needs (fentry and fexit are allowed or refused together).
    pub fentry: bool,
    /// Why it is not used, when it is not.
    pub fentry_error: Option<String>,
    /// The write-fault tracepoint is attached.
    pub write_faults: bool,
    /// KVM logs dirty pages with Intel PML (`kvm_intel`'s `pml` parameter):
    /// a write reaches the dirty bitmap at the vCPU's next exit.
    pub pml: bool,
    /// The loaded programs' kernel ids, for their cost ([`cost`]).
    pub programs: Vec<cost::AttachedProgram>,
    /// The agent holds the kernel's eBPF run-time statistics on
    /// (`ebpf_run_stats`); why not, if it asked and could not.
    pub run_stats_held: bool,
    pub run_stats_error: Option<String>,
}

/// Whether `kvm_intel` uses Page Modification Logging.
fn kvm_pml_enabled() -> bool {
    std::fs::read_to_string("/sys/module/kvm_intel/parameters/pml")
        .is_ok_and(|value| matches!(value.trim(), "Y" | "1"))
}

/// One record of the ring buffer.
pub enum Record {
    Event(Event),
    /// Part of a dirty-log ioctl's bitmap, sent before its event.
    Bitmap(Box<BitmapChunk>),
}

/// The loaded programs and the maps user space reads.
pub struct Probes {
    /// Keeps the programs attached; dropped last.
    _ebpf: Ebpf,
    /// Keeps the kernel's run-time statistics on (`ebpf_run_stats`).
    _run_stats: Option<std::os::fd::OwnedFd>,
    pub events: RingBuf<MapData>,
    pub losses: HashMap<MapData, u32, LossRecord>,
    pub unattributed: Array<MapData, LossRecord>,
    /// Losses recorded so far, all kinds: [`Probes::loss_count`].
    pub loss_count: PerCpuArray<MapData, u64>,
    pub vm_pids: HashMap<MapData, u32, u32>,
    /// Pages of each memory slot, key pid << 32 | slot: see [`Probes::forget_vm`].
    pub slot_pages: HashMap<MapData, u64, u64>,
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    pub sources: Sources,
}

/// (program, tracepoint group, tracepoint name, required)
/// (The dirty-ring push has three programs: [`attach_ring_push`].)
const TRACEPOINTS: [(&str, &str, &str, bool); 5] = [
    ("pagefp_ioctl_enter", "syscalls", "sys_enter_ioctl", true),
    ("pagefp_ioctl_exit", "syscalls", "sys_exit_ioctl", true),
    (
        "pagefp_dirty_ring_reset",
        "kvm",
        "kvm_dirty_ring_reset",
        true,
    ),
    ("pagefp_process_exit", "sched", "sched_process_exit", true),
    ("pagefp_write_fault", "kvm", "kvm_page_fault", false),
];

impl Probes {
    /// Loads and attaches everything, as `config` says: the event ring
    /// buffer's size, the dirty-ring push program, run-time statistics.
    pub fn attach(config: &Config) -> Result<Self, EbpfError> {
        let (ring_bytes, ring_push) = (config.ring_buffer_bytes, config.ring_push_program);
        let root = tracefs::tracefs_root()?;
        let offsets: TraceOffsets = tracefs::read_offsets(&root)?;
        let layout = dirty_ring_layout();
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries("EVENTS", ring_bytes)
            .override_global("TRACE_OFFSETS", &offsets, true);
        if let Ok(layout) = &layout {
            loader.override_global("RING_LAYOUT", layout, true);
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(EbpfError::Load)?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(err) => {
                log::warn!("eBPF logs unavailable: {err}");
                None
            }
        };
        let ring_push = attach_ring_push(&mut ebpf, ring_push, &layout)?;
        let mut sources = Sources {
            attached: vec![ring_push.clone()],
            ring_push,
            ..Sources::default()
        };
        for (program, group, name, required) in TRACEPOINTS {
            let tracepoint: &mut TracePoint = ebpf
                .program_mut(program)
                .expect("program is in the object")
                .try_into()
                .expect("program is a tracepoint");
            let attached = tracepoint
                .load()
                .map_err(|source| EbpfError::Program {
                    program,
                    action: "loaded",
                    source,
                })
                .and_then(|()| {
                    tracepoint
                        .attach(group, name)
                        .map_err(|source| EbpfError::Program {
                            program,
                            action: "attached",
                            source,
                        })
                });
            match attached {
                Ok(_) => sources.attached.push(format!("tracepoint/{group}/{name}")),
                Err(err) if !required => log::info!("optional source not used: {err}"),
                Err(err) => return Err(err),
            }
        }
        sources.pml = kvm_pml_enabled();
        sources.write_faults = sources
            .attached
            .iter()
            .any(|a| a.ends_with("kvm_page_fault"));
        match attach_fentry(&mut ebpf) {
            Ok(()) => {
                sources.fentry = true;
                sources
                    .attached
                    .push("fexit/mark_page_dirty_in_slot".into());
            }
            Err(err) => {
                log::info!(
                    "fexit/mark_page_dirty_in_slot unavailable ({err}): dirty-ring VMs are tracked through kvm:kvm_dirty_ring_push; bitmap-mode VMs are rescanned"
                );
                sources.fentry_error = Some(err);
            }
        }
        sources.programs = cost::attached_programs(&ebpf);
        let run_stats = if config.ebpf_run_stats {
            cost::enable_run_stats()
                .inspect_err(|err| log::warn!("{err}"))
                .map_err(|err| sources.run_stats_error = Some(err))
                .ok()
        } else {
            None
        };
        sources.run_stats_held = run_stats.is_some();
        let events = RingBuf::try_from(ebpf.take_map("EVENTS").expect("EVENTS map"))
            .map_err(|e| EbpfError::Map("EVENTS", e))?;
        let losses = HashMap::try_from(ebpf.take_map("LOSSES").expect("LOSSES map"))
            .map_err(|e| EbpfError::Map("LOSSES", e))?;
        let unattributed = Array::try_from(
            ebpf.take_map("UNATTRIBUTED_LOSSES")
                .expect("UNATTRIBUTED_LOSSES map"),
        )
        .map_err(|e| EbpfError::Map("UNATTRIBUTED_LOSSES", e))?;
        let loss_count =
            PerCpuArray::try_from(ebpf.take_map("LOSS_COUNT").expect("LOSS_COUNT map"))
                .map_err(|e| EbpfError::Map("LOSS_COUNT", e))?;
        let slot_pages = HashMap::try_from(ebpf.take_map("SLOT_PAGES").expect("SLOT_PAGES map"))
            .map_err(|e| EbpfError::Map("SLOT_PAGES", e))?;
        let vm_pids = HashMap::try_from(ebpf.take_map("VM_PIDS").expect("VM_PIDS map"))
            .map_err(|e| EbpfError::Map("VM_PIDS", e))?;
        Ok(Self {
            _ebpf: ebpf,
            _run_stats: run_stats,
            events,
            losses,
            unattributed,
            loss_count,
            vm_pids,
            slot_pages,
            logger,
            sources,
        })
    }

    /// Reads every record waiting in the ring buffer. Records of another
    /// size than an event's or a bitmap chunk's are dropped.
    pub fn drain(&mut self, out: &mut Vec<Record>) {
        while let Some(item) = self.events.next() {
            if item.len() == size_of::<BitmapChunk>() {
                out.push(Record::Bitmap(Box::new(bytemuck::pod_read_unaligned(
                    &item[..],
                ))));
            } else if item.len() >= size_of::<Event>() {
                out.push(Record::Event(bytemuck::pod_read_unaligned(
                    &item[..size_of::<Event>()],
                )));
            }
        }
    }

    /// Drops what the programs keep of VMM `pid`, gone: its entry in
    /// `VM_PIDS` and its slots' sizes (or they would fill the maps over the
    /// host's life, and later VMs' bitmaps would not be copied).
    pub fn forget_vm(&mut self, pid: u32) {
        let _ = self.vm_pids.remove(&pid);
        let keys: Vec<u64> = self
            .slot_pages
            .keys()
            .filter_map(Result::ok)
            .filter(|key| (key >> 32) as u32 == pid)
            .collect();
        for key in keys {
            let _ = self.slot_pages.remove(&key);
        }
    }

    /// How many losses the programs have recorded: one map read, which the
    /// tracker makes every round; it reads the records only when it moved.
    pub fn loss_count(&self) -> u64 {
        self.loss_count.get(&0, 0).map_or(0, |per_cpu| {
            per_cpu.iter().fold(0u64, |sum, n| sum.wrapping_add(*n))
        })
    }

    /// Current loss records: per pid, and the unattributed one.
    pub fn losses(&self) -> (Vec<(u32, LossRecord)>, LossRecord) {
        let per_pid = self.losses.iter().filter_map(Result::ok).collect();
        let unattributed = self.unattributed.get(&0, 0).unwrap_or_default();
        (per_pid, unattributed)
    }
}

/// `struct kvm_dirty_ring`'s layout from the kernel's BTF, or why not.
fn dirty_ring_layout() -> Result<RingLayout, String> {
    let btf = btf::KernelBtf::load("kvm").map_err(|e| e.to_string())?;
    match btf.member_offsets("kvm_dirty_ring", &["dirty_index", "index"]) {
        Ok(Some(found)) => Ok(RingLayout {
            dirty_index: found[0],
            index: found[1],
        }),
        Ok(None) => Err("struct kvm_dirty_ring is not in the kernel's BTF".into()),
        Err(err) => Err(err.to_string()),
    }
}

/// Attaches the cheapest dirty-ring push program `choice` allows that the
/// kernel takes; returns its name.
fn attach_ring_push(
    ebpf: &mut Ebpf,
    choice: RingPushProgram,
    layout: &Result<RingLayout, String>,
) -> Result<String, EbpfError> {
    use RingPushProgram::{Auto, Btf as BtfTyped, Raw, Tracepoint};
    let order: &[RingPushProgram] = match choice {
        Auto => &[BtfTyped, Raw, Tracepoint],
        BtfTyped => &[BtfTyped],
        Raw => &[Raw],
        Tracepoint => &[Tracepoint],
    };
    let mut refused = Vec::new();
    for &program in order {
        let attached = match program {
            BtfTyped => attach_ring_push_btf(ebpf, layout),
            Raw => attach_ring_push_raw(ebpf, layout),
            Auto | Tracepoint => attach_ring_push_tracepoint(ebpf),
        };
        match attached {
            Ok(name) => {
                if !refused.is_empty() {
                    log::info!("dirty-ring pushes through {name} ({})", refused.join("; "));
                }
                return Ok(name);
            }
            Err(err) => refused.push(format!("{program:?} refused: {err}")),
        }
    }
    Err(EbpfError::RingPush(refused.join("; ")))
}

fn attach_ring_push_btf(
    ebpf: &mut Ebpf,
    layout: &Result<RingLayout, String>,
) -> Result<String, String> {
    layout.as_ref().map_err(Clone::clone)?;
    let btf = Btf::from_sys_fs().map_err(|e| format!("no kernel BTF: {e}"))?;
    let program: &mut BtfTracePoint = ebpf
        .program_mut("pagefp_dirty_ring_push_btf")
        .ok_or("program missing")?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    program
        .load("kvm_dirty_ring_push", &btf)
        .map_err(|e| format!("load: {e}"))?;
    program.attach().map_err(|e| format!("attach: {e}"))?;
    Ok("tp_btf/kvm_dirty_ring_push".into())
}

fn attach_ring_push_raw(
    ebpf: &mut Ebpf,
    layout: &Result<RingLayout, String>,
) -> Result<String, String> {
    let layout = layout.as_ref().map_err(Clone::clone)?;
    if layout.dirty_index.max(layout.index) as usize + 4 > RingLayout::HEAD_BYTES {
        return Err(format!(
            "the ring's indexes are past the {} bytes the program reads",
            RingLayout::HEAD_BYTES
        ));
    }
    let program: &mut RawTracePoint = ebpf
        .program_mut("pagefp_dirty_ring_push_raw")
        .ok_or("program missing")?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    program.load().map_err(|e| format!("load: {e}"))?;
    program
        .attach("kvm_dirty_ring_push")
        .map_err(|e| format!("attach: {e}"))?;
    Ok("raw_tracepoint/kvm_dirty_ring_push".into())
}

fn attach_ring_push_tracepoint(ebpf: &mut Ebpf) -> Result<String, String> {
    let program: &mut TracePoint = ebpf
        .program_mut("pagefp_dirty_ring_push")
        .ok_or("program missing")?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    program.load().map_err(|e| format!("load: {e}"))?;
    program
        .attach("kvm", "kvm_dirty_ring_push")
        .map_err(|e| format!("attach: {e}"))?;
    Ok("tracepoint/kvm/kvm_dirty_ring_push".into())
}

fn attach_fentry(ebpf: &mut Ebpf) -> Result<(), String> {
    let btf = Btf::from_sys_fs().map_err(|e| format!("no kernel BTF: {e}"))?;
    let program: &mut FExit = ebpf
        .program_mut("pagefp_mark_page_dirty")
        .ok_or("program missing")?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    program
        .load("mark_page_dirty_in_slot", &btf)
        .map_err(|e| format!("load refused: {e}"))?;
    program
        .attach()
        .map_err(|e| format!("attach refused: {e}"))?;
    Ok(())
}
