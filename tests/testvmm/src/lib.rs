//! pagefp's test VMM: one KVM VM with one vCPU, built on kvm-ioctls.
//!
//! What QEMU does on a KVM host, reduced to what pagefp's tests, demo and
//! benchmarks need: guest RAM in a sealed memfd, loaded from an image before
//! KVM sees it; dirty logging by ring (default), bitmap or not at all; a
//! guest that writes pages as told; a control socket (see [`control`]) that
//! speaks the product's control protocol (`agent::migrate::vmm::protocol`,
//! what `pagefp migrate` uses) plus this VMM's workload commands
//! ([`protocol`]); and live migration: the vCPU can be kicked out of
//! KVM_RUN in the middle of an op ([`kick`]), its state saved and loaded
//! into an incoming VMM ([`snapshot`]) whose memory a receiver writes
//! through `/proc/PID/map_files` ([`map_files`]).

pub mod control;
pub mod dirty_pages;
pub mod dirty_ring;
pub mod guest_code;
pub mod kick;
pub mod map_files;
pub mod memory;
pub mod protocol;
pub mod signals;
pub mod snapshot;
pub mod workload;

use std::{
    os::fd::{AsRawFd, BorrowedFd},
    path::PathBuf,
    sync::Arc,
    time::Instant,
};

use agent::page::PAGE_SIZE;
use anyhow::{Context as _, bail};
use kvm_bindings::{
    KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, kvm_enable_cap, kvm_segment,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use serde::Serialize;

use self::{
    dirty_pages::DirtyPages,
    dirty_ring::DirtyRing,
    guest_code::{CODE_GPA, CODE_SLOT_SIZE},
    kick::Kicker,
    memory::{CODE_MEMFD, Memfd},
    workload::Op,
};

/// KVM slot id of the read-only code slot.
pub const CODE_SLOT: u32 = 100;
const KVM_CAP_DIRTY_LOG_RING: u32 = 192;
const KVM_CAP_DIRTY_LOG_RING_ACQ_REL: u32 = 223;
const KVM_EXIT_DIRTY_RING_FULL: u32 = 31;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum DirtyMode {
    Ring,
    Bitmap,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Harvest {
    Auto,
    Manual,
}

#[derive(Clone, Debug)]
pub struct VmConfig {
    pub mem_bytes: usize,
    pub image: Option<PathBuf>,
    pub dirty: DirtyMode,
    pub ring_entries: u32,
    pub harvest: Harvest,
    pub slots: u32,
}

impl VmConfig {
    /// Checks what KVM would otherwise refuse with a bare errno.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(1..MAX_RAM_SLOTS).contains(&self.slots) {
            bail!(
                "--slots must be 1..={}, not {}",
                MAX_RAM_SLOTS - 1,
                self.slots
            );
        }
        let unit = PAGE_SIZE * self.slots as usize;
        if self.mem_bytes == 0 || !self.mem_bytes.is_multiple_of(unit) {
            bail!(
                "guest RAM ({} bytes) must be a non-zero multiple of {} pages ({} bytes) so that each of the {} slots gets whole pages",
                self.mem_bytes,
                self.slots,
                unit,
                self.slots
            );
        }
        if self.mem_bytes > MAX_MEM_BYTES {
            bail!(
                "--mem-mib {} is too large: RAM must end below the code slot at {CODE_GPA:#x} (at most {} MiB)",
                self.mem_bytes >> 20,
                MAX_MEM_BYTES >> 20
            );
        }
        if self.dirty == DirtyMode::Ring {
            // KVM wants a power-of-two ring of at least one page of entries.
            let min = (PAGE_SIZE / 16) as u32;
            if !self.ring_entries.is_power_of_two() || self.ring_entries < min {
                bail!(
                    "--ring-entries must be a power of two of at least {min} (one page of 16-byte entries), not {}",
                    self.ring_entries
                );
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SlotInfo {
    pub slot: u32,
    pub gpa: u64,
    pub size: u64,
    pub uaddr: u64,
    pub flags: u32,
}

/// One region of guest memory as `info` reports it: where the guest sees it
/// and where this VMM maps it (`uaddr`, inside a sealed memfd mapping).
pub use agent::migrate::vmm::protocol::MemoryRegion;

/// Largest RAM: everything below the code slot.
pub const MAX_MEM_BYTES: usize = CODE_GPA as usize;
/// RAM slot ids are 0..K-1 and must stay clear of the code slot's id.
pub const MAX_RAM_SLOTS: u32 = CODE_SLOT;

#[derive(Clone, Copy, Debug, Default, Serialize, serde::Deserialize)]
pub struct RunReport {
    pub pages_written: u64,
    /// Distinct pages the closing harvest reported (auto mode; 0 in manual mode).
    pub harvested: u64,
    /// Dirty-ring entries behind `harvested` (one per emulated write).
    pub entries: u64,
    pub ring_full_exits: u64,
    pub seconds: f64,
}

/// What one harvest reported.
#[derive(Clone, Debug, Default)]
pub struct Harvested {
    /// Guest page numbers written since the previous harvest, ascending.
    pub pages: Vec<u64>,
    /// Dirty-ring entries seen for them (ring mode; 0 otherwise).
    pub entries: u64,
}

/// Where a list of ops stands. The VM runs it one chunk at a time (a chunk
/// fits the dirty ring); a chunk may itself be interrupted (pause, a control
/// request) and continues from the vCPU's registers.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Cursor {
    pub ops: Vec<Op>,
    /// The op being run.
    pub op: usize,
    /// Its chunks, and the next one to run.
    pub chunks: Vec<Op>,
    pub chunk: usize,
    /// The vCPU is inside chunk `chunk` (it was interrupted): the next run
    /// continues from the vCPU's registers instead of starting the chunk.
    #[serde(default)]
    pub started: bool,
    #[serde(default)]
    pub report: RunReport,
}

impl Cursor {
    pub fn new(ops: Vec<Op>) -> Self {
        Self {
            ops,
            op: 0,
            chunks: Vec::new(),
            chunk: 0,
            started: false,
            report: RunReport::default(),
        }
    }

    /// Chunks still to run, the interrupted one included.
    pub fn remaining_chunks(&self) -> &[Op] {
        self.chunks.get(self.chunk..).unwrap_or_default()
    }
}

/// A workload the VM runs over and over (`start_loop`).
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct LoopState {
    pub cursor: Cursor,
    pub iterations: u64,
    pub pages_written: u64,
    /// Shortest time between iteration starts (0: back to back), to model
    /// a guest that dirties memory at a bounded rate.
    #[serde(default)]
    pub interval_ms: u64,
}

impl LoopState {
    pub fn new(ops: Vec<Op>, interval_ms: u64) -> Self {
        Self {
            cursor: Cursor::new(ops),
            iterations: 0,
            pages_written: 0,
            interval_ms,
        }
    }

    /// Pages written by whole ops, the current iteration's included.
    pub fn total_pages_written(&self) -> u64 {
        self.pages_written + self.cursor.report.pages_written
    }
}

/// What the vCPU is doing for the VMM's clients; migrates with the VM.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Work {
    /// The ops of one `run` request.
    Run(Cursor),
    /// A `start_loop` workload.
    Loop(LoopState),
}

impl Work {
    /// The ops it runs.
    pub fn ops(&self) -> &[Op] {
        match self {
            Work::Run(cursor) => &cursor.ops,
            Work::Loop(state) => &state.cursor.ops,
        }
    }

    pub fn cursor(&self) -> &Cursor {
        match self {
            Work::Run(cursor) => cursor,
            Work::Loop(state) => &state.cursor,
        }
    }
}

/// How a KVM_RUN ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// The routine reached its `hlt`.
    Halted,
    /// Kicked out (see [`kick`]); the registers say where it stopped.
    Kicked,
}

/// Most pages one chunk writes (bounds how long a control request such as
/// `harvest` may wait when the vCPU is not kicked).
const MAX_CHUNK_PAGES: u32 = 2048;

pub struct TestVm {
    kvm: Kvm,
    vm: VmFd,
    vcpu: VcpuFd,
    kicker: Arc<Kicker>,
    ram: Memfd,
    code: Memfd,
    ring: Option<DirtyRing>,
    /// Ring entries collected or pending since the last reset.
    unreset_entries: u64,
    /// Pages collected from the ring since the last harvest.
    pending: DirtyPages,
    /// Ring entries behind `pending`.
    pending_entries: u64,
    pub config: VmConfig,
    /// RAM slots.
    pub slots: Vec<SlotInfo>,
    code_slot: SlotInfo,
    /// Memory registered with KVM (false: an incoming VM not loaded yet).
    pub registered: bool,
}

impl TestVm {
    pub fn new(config: VmConfig) -> anyhow::Result<Self> {
        Self::create(config, true)
    }

    /// A VM waiting for a migration: zeroed RAM and code slot that KVM does
    /// not see yet (a receiver writes them through /proc/PID/map_files),
    /// registered by [`TestVm::load_snapshot`].
    pub fn new_incoming(config: VmConfig) -> anyhow::Result<Self> {
        if config.image.is_some() {
            bail!("an incoming VM gets its memory from the migration, not from --image");
        }
        Self::create(config, false)
    }

    fn create(config: VmConfig, register: bool) -> anyhow::Result<Self> {
        config.validate()?;
        let kvm = Kvm::new().context("opening /dev/kvm (is KVM available and are you root?)")?;
        let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
        if config.dirty == DirtyMode::Ring {
            let cap = if vm.check_extension_raw(KVM_CAP_DIRTY_LOG_RING_ACQ_REL.into()) > 0 {
                KVM_CAP_DIRTY_LOG_RING_ACQ_REL
            } else if vm.check_extension_raw(KVM_CAP_DIRTY_LOG_RING.into()) > 0 {
                KVM_CAP_DIRTY_LOG_RING
            } else {
                bail!("this KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING): use --dirty bitmap");
            };
            let max_bytes = vm.check_extension_raw(KVM_CAP_DIRTY_LOG_RING.into());
            let bytes = u64::from(config.ring_entries) * 16;
            if max_bytes > 0 && bytes > max_bytes as u64 {
                bail!(
                    "--ring-entries {} is more than this KVM allows: use at most {}",
                    config.ring_entries,
                    max_bytes / 16
                );
            }
            let mut enable = kvm_enable_cap {
                cap,
                ..Default::default()
            };
            enable.args[0] = u64::from(config.ring_entries) * 16;
            vm.enable_cap(&enable).context("enabling the dirty ring")?;
        }
        // Image first: host-side writes after registration would be invisible
        // to dirty tracking.
        let ram = Memfd::ram(config.mem_bytes, config.image.as_deref())?;
        let mut code = Memfd::new(CODE_MEMFD, CODE_SLOT_SIZE)?;
        if register {
            // An incoming VM gets its code with the rest of its memory.
            code.write(0, &guest_code::code_slot_image());
        }
        let flags = if config.dirty == DirtyMode::None {
            0
        } else {
            KVM_MEM_LOG_DIRTY_PAGES
        };
        let slot_count = config.slots;
        let slot_size = (config.mem_bytes / slot_count as usize) as u64;
        let slots: Vec<SlotInfo> = (0..slot_count)
            .map(|i| SlotInfo {
                slot: i,
                gpa: u64::from(i) * slot_size,
                size: slot_size,
                uaddr: ram.host_addr() + u64::from(i) * slot_size,
                flags,
            })
            .collect();
        // Read-only: the guest only executes and reads it.
        let code_slot = SlotInfo {
            slot: CODE_SLOT,
            gpa: CODE_GPA,
            size: CODE_SLOT_SIZE as u64,
            uaddr: code.host_addr(),
            flags: KVM_MEM_READONLY,
        };
        if register {
            for slot in &slots {
                register_slot(&vm, slot)?;
            }
            register_slot(&vm, &code_slot)?;
        }
        let vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU")?;
        // SAFETY: the vCPU fd is open for the whole of `create`.
        let vcpu_fd = unsafe { BorrowedFd::borrow_raw(vcpu.as_raw_fd()) };
        let kicker = Arc::new(Kicker::new(vcpu_fd)?);
        let ring = match config.dirty {
            DirtyMode::Ring => Some(DirtyRing::map(vcpu_fd, config.ring_entries)?),
            _ => None,
        };
        let mut this = Self {
            kvm,
            vm,
            vcpu,
            kicker,
            ram,
            code,
            ring,
            unreset_entries: 0,
            pending: DirtyPages::new((config.mem_bytes / PAGE_SIZE) as u32),
            pending_entries: 0,
            config,
            slots,
            code_slot,
            registered: register,
        };
        this.setup_protected_mode()?;
        Ok(this)
    }

    /// Registers every slot again with its current parameters (as QEMU does
    /// when a migration switches dirty logging on).
    pub fn register_slots(&mut self) -> anyhow::Result<()> {
        if !self.registered {
            bail!("the incoming VM has no memory registered yet: send load_state first");
        }
        for slot in self.slots.iter().chain([&self.code_slot]) {
            register_slot(&self.vm, slot)?;
        }
        Ok(())
    }

    /// Every region of guest memory: the RAM slots, then the code slot.
    pub fn memory(&self) -> Vec<MemoryRegion> {
        self.slots
            .iter()
            .chain([&self.code_slot])
            .map(|s| MemoryRegion {
                slot: s.slot,
                gpa: s.gpa,
                size: s.size,
                uaddr: s.uaddr,
                read_only: s.flags & KVM_MEM_READONLY != 0,
            })
            .collect()
    }

    /// What kicks this VM's vCPU out of KVM_RUN (shared with the control
    /// threads, which must not wait for the VM's lock to do it).
    pub fn kicker(&self) -> Arc<Kicker> {
        self.kicker.clone()
    }

    fn setup_protected_mode(&mut self) -> anyhow::Result<()> {
        let mut sregs = self.vcpu.get_sregs().context("KVM_GET_SREGS")?;
        let code = kvm_segment {
            base: 0,
            limit: 0xFFFF_FFFF,
            selector: 0x8,
            type_: 0xB,
            present: 1,
            dpl: 0,
            db: 1,
            s: 1,
            l: 0,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let data = kvm_segment {
            selector: 0x10,
            type_: 0x3,
            ..code
        };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.cr0 |= 1;
        self.vcpu.set_sregs(&sregs).context("KVM_SET_SREGS")
    }

    pub fn pages(&self) -> u32 {
        (self.config.mem_bytes / PAGE_SIZE) as u32
    }

    /// Dirty-ring entries a single KVM_RUN may add to the ring's un-reset
    /// entries. KVM asks for an exit once the ring is "soft full" (64 entries
    /// short of full), but under the instruction emulator that exit comes late
    /// or not at all (one `rep movsd` pushes 1024 entries in one go), and a
    /// push into a full ring overwrites an entry (the ring is then out of
    /// sync for good). So the VMM never lets a run come near that: it resets
    /// the ring before a run that could pass this budget.
    fn ring_budget(&self) -> u32 {
        self.config.ring_entries.saturating_sub(128)
    }

    /// Checks `ops` before anything runs.
    pub fn check_ops(&self, ops: &[Op]) -> anyhow::Result<()> {
        let pages = self.pages();
        for op in ops {
            op.validate(pages).map_err(|e| anyhow::anyhow!("{e}"))?;
            if self.config.dirty == DirtyMode::Ring && op.writes_per_page() > self.ring_budget() {
                bail!(
                    "{} writes {} dwords per page and the instruction emulator pushes one dirty-ring entry per write: \
                     it needs --ring-entries of at least {} (this VMM has {})",
                    op.name(),
                    op.writes_per_page(),
                    (op.writes_per_page() + 128).next_power_of_two(),
                    self.config.ring_entries
                );
            }
        }
        Ok(())
    }

    /// Runs `ops` on the vCPU; in auto mode harvests afterwards.
    pub fn run(&mut self, ops: &[Op]) -> anyhow::Result<RunReport> {
        self.check_ops(ops)?;
        let mut cursor = Cursor::new(ops.to_vec());
        while !self.step(&mut cursor)? {}
        Ok(cursor.report)
    }

    /// Runs `cursor` on until the current chunk ends or the vCPU is kicked;
    /// true once every op ran (then, in auto mode, the dirty log was
    /// harvested).
    pub fn step(&mut self, cursor: &mut Cursor) -> anyhow::Result<bool> {
        if !self.registered {
            bail!("the incoming VM has no memory yet: send load_state first");
        }
        let started = Instant::now();
        if let Some(op) = cursor.ops.get(cursor.op).cloned() {
            if cursor.chunks.is_empty() {
                let per_run = match self.config.dirty {
                    DirtyMode::Ring => self.ring_budget() / op.writes_per_page(),
                    _ => u32::MAX,
                };
                cursor.chunks = op.chunks(per_run.min(MAX_CHUNK_PAGES));
                cursor.chunk = 0;
                cursor.started = false;
            }
            let chunk = cursor.chunks[cursor.chunk].clone();
            if !cursor.started {
                if self.config.dirty == DirtyMode::Ring {
                    let pushes = u64::from(chunk.writes_per_page()) * chunk.pages();
                    if self.unreset_entries + pushes > u64::from(self.ring_budget()) {
                        // The ring could fill: re-protect now, whatever the mode
                        // (the entries stay pending for the next harvest).
                        self.reset_ring()?;
                    }
                }
                self.enter(&chunk)?;
                cursor.started = true;
            }
            let stop = self.run_vcpu(&mut cursor.report);
            self.collect_ring();
            if stop? == Stop::Halted {
                cursor.started = false;
                cursor.chunk += 1;
                if cursor.chunk == cursor.chunks.len() {
                    cursor.report.pages_written += op.pages();
                    cursor.op += 1;
                    cursor.chunks.clear();
                }
            }
        }
        let done = cursor.op >= cursor.ops.len();
        if done && self.config.harvest == Harvest::Auto {
            let harvested = self.harvest()?;
            cursor.report.harvested = harvested.pages.len() as u64;
            cursor.report.entries = harvested.entries;
        }
        cursor.report.seconds += started.elapsed().as_secs_f64();
        Ok(done)
    }

    /// Runs a loop on (as [`TestVm::step`]), starting it over when it ends;
    /// true when an iteration ended.
    pub fn step_loop(&mut self, state: &mut LoopState) -> anyhow::Result<bool> {
        let ended = self.step(&mut state.cursor)?;
        if ended {
            state.iterations += 1;
            state.pages_written += state.cursor.report.pages_written;
            state.cursor = Cursor::new(std::mem::take(&mut state.cursor.ops));
        }
        Ok(ended)
    }

    /// Points the vCPU at the routine of `op` with its parameters.
    fn enter(&mut self, op: &Op) -> anyhow::Result<()> {
        let (entry, ebx, ecx, edx, esi) = match *op {
            Op::Random { first, count, seed } => (guest_code::RANDOM, first, count, seed, 0),
            Op::Copy { src, first, count } => (guest_code::COPY, first, count, src, 0),
            Op::Zero { first, count } => (guest_code::ZERO, first, count, 0, 0),
            Op::Touch {
                first,
                count,
                value,
            } => (guest_code::TOUCH, first, count, value, 0),
            Op::Stride {
                first,
                count,
                step,
                value,
            } => (guest_code::STRIDE, first, count, value, step),
        };
        let mut regs = self.vcpu.get_regs().context("KVM_GET_REGS")?;
        regs.rip = CODE_GPA + entry;
        regs.rflags = 2;
        regs.rbx = u64::from(ebx);
        regs.rcx = u64::from(ecx);
        regs.rdx = u64::from(edx);
        regs.rsi = u64::from(esi);
        self.vcpu.set_regs(&regs).context("KVM_SET_REGS")
    }

    /// KVM_RUN until the routine halts or the vCPU is kicked.
    fn run_vcpu(&mut self, report: &mut RunReport) -> anyhow::Result<Stop> {
        loop {
            match self.vcpu.run() {
                Ok(VcpuExit::Hlt) => return Ok(Stop::Halted),
                Ok(VcpuExit::Intr) => {
                    self.kicker.clear();
                    return Ok(Stop::Kicked);
                }
                Err(err) if err.errno() == libc::EINTR => {
                    self.kicker.clear();
                    return Ok(Stop::Kicked);
                }
                Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => {
                    report.ring_full_exits += 1;
                    let collected = self.collect_ring();
                    log::debug!("dirty ring full: {collected} entries collected");
                    if collected == 0 && self.unreset_entries == 0 {
                        bail!(
                            "KVM reports the dirty ring full but it holds no dirty entry: the ring overflowed \
                             and is out of sync; restart the VMM with a larger --ring-entries"
                        );
                    }
                    self.reset_ring()?;
                }
                Ok(other) => bail!("unexpected vCPU exit: {other:?}"),
                Err(err) => return Err(err).context("KVM_RUN"),
            }
        }
    }

    /// Moves the ring's dirty entries into `pending` (marking them for reset).
    fn collect_ring(&mut self) -> u64 {
        let Some(ring) = &mut self.ring else { return 0 };
        let mut entries = Vec::new();
        let n = ring.collect(&mut entries) as u64;
        for (slot, offset) in entries {
            // slot = address space << 16 | slot id; only RAM slots are logged.
            if let Some(slot) = self.slots.get((slot & 0xFFFF) as usize) {
                self.pending.insert(slot.gpa / PAGE_SIZE as u64 + offset);
            }
        }
        self.unreset_entries += n;
        self.pending_entries += n;
        n
    }

    fn reset_ring(&mut self) -> anyhow::Result<()> {
        dirty_ring::reset_rings(&self.vm)?;
        self.unreset_entries = 0;
        Ok(())
    }

    /// Harvests the dirty log and re-protects the pages: every page written
    /// since the previous harvest, once.
    pub fn harvest(&mut self) -> anyhow::Result<Harvested> {
        match self.config.dirty {
            DirtyMode::Ring => {
                self.collect_ring();
                self.reset_ring()?;
            }
            DirtyMode::Bitmap => {
                for slot in &self.slots {
                    let bitmap = self
                        .vm
                        .get_dirty_log(slot.slot, slot.size as usize)
                        .context("KVM_GET_DIRTY_LOG")?;
                    self.pending
                        .insert_bitmap(slot.gpa / PAGE_SIZE as u64, &bitmap);
                }
            }
            DirtyMode::None => {}
        }
        Ok(Harvested {
            pages: self.pending.drain(),
            entries: std::mem::take(&mut self.pending_entries),
        })
    }

    /// blake3 of pages `first..first+count` from the VMM's own mapping.
    pub fn checksums(&self, first: u32, count: u32) -> anyhow::Result<Vec<String>> {
        let end = first
            .checked_add(count)
            .filter(|end| *end <= self.pages())
            .context("checksum range outside RAM")?;
        Ok(
            self.ram.as_slice()[first as usize * PAGE_SIZE..end as usize * PAGE_SIZE]
                .chunks_exact(PAGE_SIZE)
                .map(|page| blake3::hash(page).to_hex().to_string())
                .collect(),
        )
    }
}

/// Registers one RAM slot. The caller keeps the RAM mapped while the VM lives.
fn register_slot(vm: &VmFd, slot: &SlotInfo) -> anyhow::Result<()> {
    let region = kvm_userspace_memory_region {
        slot: slot.slot,
        flags: slot.flags,
        guest_phys_addr: slot.gpa,
        memory_size: slot.size,
        userspace_addr: slot.uaddr,
    };
    // SAFETY: `uaddr..uaddr+size` lies in the guest RAM mapping, which the
    // TestVm owning `vm` keeps mapped until the VM is dropped.
    unsafe { vm.set_user_memory_region(region) }
        .with_context(|| format!("registering RAM slot {}", slot.slot))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(mem_mib: usize) -> VmConfig {
        VmConfig {
            mem_bytes: mem_mib << 20,
            image: None,
            dirty: DirtyMode::Ring,
            ring_entries: 4096,
            harvest: Harvest::Auto,
            slots: 1,
        }
    }

    #[test]
    fn configs_kvm_would_refuse_are_refused_with_a_reason() {
        assert!(config(1).validate().is_ok());
        for (bad, needle) in [
            (
                VmConfig {
                    ring_entries: 64,
                    ..config(1)
                },
                "at least 256",
            ),
            (
                VmConfig {
                    ring_entries: 3000,
                    ..config(1)
                },
                "power of two",
            ),
            (
                VmConfig {
                    slots: 0,
                    ..config(1)
                },
                "--slots",
            ),
            (
                VmConfig {
                    slots: 100,
                    ..config(1)
                },
                "--slots",
            ),
            (
                VmConfig {
                    slots: 3,
                    ..config(1)
                },
                "multiple of 3 pages",
            ),
            (
                VmConfig {
                    mem_bytes: 0,
                    ..config(1)
                },
                "non-zero",
            ),
            (config(4096), "at most 3584 MiB"),
        ] {
            let err = bad.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{bad:?}: {err}");
        }
        // A ring smaller than a page is fine when the ring is not used.
        assert!(
            VmConfig {
                ring_entries: 64,
                dirty: DirtyMode::Bitmap,
                ..config(1)
            }
            .validate()
            .is_ok()
        );
    }

    #[test]
    fn a_vm_in_process_runs_ops_and_harvests_each_page_once() {
        if !pagefp_tests::privileged::check_kvm(
            "a_vm_in_process_runs_ops_and_harvests_each_page_once",
        ) {
            return;
        }
        let mut vm = TestVm::new(VmConfig {
            slots: 2,
            ..config(1)
        })
        .unwrap();
        let ops = [
            Op::Touch {
                first: 100,
                count: 56,
                value: 7,
            },
            // Written twice in one run, reported once.
            Op::Zero {
                first: 120,
                count: 16,
            },
            Op::Stride {
                first: 0,
                count: 4,
                step: 64,
                value: 1,
            },
        ];
        let report = vm.run(&ops).unwrap();
        assert_eq!(report.pages_written, 56 + 16 + 4);
        assert_eq!(
            report.harvested,
            56 + 3,
            "pages 0, 64, 192 and 100..156 (128 twice)"
        );
        assert_eq!(report.entries, 56 + 16 * 1024 + 4);
        let hashes = vm.checksums(100, 56).unwrap();
        let mut touched = vec![0u8; PAGE_SIZE];
        touched[8..12].copy_from_slice(&7u32.to_le_bytes());
        assert_eq!(hashes[0], blake3::hash(&touched).to_hex().to_string());
        assert_eq!(
            hashes[20],
            blake3::hash(&[0; PAGE_SIZE]).to_hex().to_string()
        );
        assert!(
            vm.harvest().unwrap().pages.is_empty(),
            "nothing written since"
        );
    }
}
