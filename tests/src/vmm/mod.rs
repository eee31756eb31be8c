//! pagefp's test VMM: one KVM VM with one vCPU, built on kvm-ioctls.
//!
//! What QEMU does on a KVM host, reduced to what pagefp's tests, demo and
//! benchmarks need: guest RAM in a sealed memfd, loaded from an image before
//! KVM sees it; dirty logging by ring (default), bitmap or not at all; a
//! guest that writes pages as told; and a control socket (see [`control`]).

pub mod control;
pub mod dirty_ring;
pub mod guest_code;
pub mod memory;
pub mod workload;

use std::{os::fd::AsRawFd, path::PathBuf, time::Instant};

use anyhow::{Context as _, bail};
use kvm_bindings::{
    KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, kvm_enable_cap, kvm_segment,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use serde::Serialize;

use self::{
    dirty_ring::DirtyRing,
    guest_code::{CODE_GPA, CODE_SLOT_SIZE},
    memory::{CodeMemory, GuestRam},
    workload::Op,
};

pub const PAGE: usize = 4096;
const CODE_SLOT: u32 = 100;
const KVM_CAP_DIRTY_LOG_RING: u32 = 192;
const KVM_CAP_DIRTY_LOG_RING_ACQ_REL: u32 = 223;
const KVM_EXIT_DIRTY_RING_FULL: u32 = 31;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum DirtyMode {
    Ring,
    Bitmap,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
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

#[derive(Clone, Copy, Debug, Serialize)]
pub struct SlotInfo {
    pub slot: u32,
    pub gpa: u64,
    pub size: u64,
    pub uaddr: u64,
    pub flags: u32,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct RunReport {
    pub pages_written: u64,
    pub harvested: u64,
    pub ring_full_exits: u64,
    pub seconds: f64,
}

pub struct TestVm {
    _kvm: Kvm,
    vm: VmFd,
    vcpu: VcpuFd,
    ram: GuestRam,
    _code: CodeMemory,
    ring: Option<DirtyRing>,
    /// Ring entries collected or pending since the last reset.
    unreset_entries: u64,
    pub config: VmConfig,
    /// RAM slots.
    pub slots: Vec<SlotInfo>,
    code_slot: SlotInfo,
}

impl TestVm {
    pub fn new(config: VmConfig) -> anyhow::Result<Self> {
        if config.mem_bytes == 0 || config.mem_bytes % (PAGE * config.slots.max(1) as usize) != 0 {
            bail!(
                "guest RAM must be a non-zero multiple of {} pages per slot",
                config.slots.max(1)
            );
        }
        if config.dirty == DirtyMode::Ring && !config.ring_entries.is_power_of_two() {
            bail!(
                "--ring-entries must be a power of two, not {}",
                config.ring_entries
            );
        }
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
            let mut enable = kvm_enable_cap {
                cap,
                ..Default::default()
            };
            enable.args[0] = u64::from(config.ring_entries) * 16;
            vm.enable_cap(&enable).context("enabling the dirty ring")?;
        }
        // Image first: host-side writes after registration would be invisible
        // to dirty tracking.
        let ram = GuestRam::new(config.mem_bytes, config.image.as_deref())?;
        let mut code = CodeMemory::new(CODE_SLOT_SIZE)?;
        code.write(0, &guest_code::code_slot_image());
        let flags = if config.dirty == DirtyMode::None {
            0
        } else {
            KVM_MEM_LOG_DIRTY_PAGES
        };
        let slot_count = config.slots.max(1);
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
        for slot in &slots {
            register_slot(&vm, slot)?;
        }
        // Read-only: the guest only executes and reads it.
        let code_slot = SlotInfo {
            slot: CODE_SLOT,
            gpa: CODE_GPA,
            size: CODE_SLOT_SIZE as u64,
            uaddr: code.host_addr(),
            flags: KVM_MEM_READONLY,
        };
        register_slot(&vm, &code_slot)?;
        let vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU")?;
        let ring = match config.dirty {
            DirtyMode::Ring => {
                // SAFETY: the vCPU fd is open for the whole call.
                let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(vcpu.as_raw_fd()) };
                Some(DirtyRing::map(fd, config.ring_entries)?)
            }
            _ => None,
        };
        let mut this = Self {
            _kvm: kvm,
            vm,
            vcpu,
            ram,
            _code: code,
            ring,
            unreset_entries: 0,
            config,
            slots,
            code_slot,
        };
        this.setup_protected_mode()?;
        Ok(this)
    }

    /// Registers every slot again with its current parameters (as QEMU does
    /// when a migration switches dirty logging on).
    pub fn register_slots(&mut self) -> anyhow::Result<()> {
        for slot in self.slots.iter().chain([&self.code_slot]) {
            register_slot(&self.vm, slot)?;
        }
        Ok(())
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
        (self.config.mem_bytes / PAGE) as u32
    }

    /// Runs `ops` on the vCPU; in auto mode harvests afterwards.
    pub fn run(&mut self, ops: &[Op]) -> anyhow::Result<RunReport> {
        let pages = self.pages();
        for op in ops {
            op.validate(pages).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        let started = Instant::now();
        let mut report = RunReport::default();
        for op in ops {
            // Keep each KVM_RUN within half the dirty ring: the emulator does
            // not stop a vCPU whose ring fills in the middle of a run.
            let per_run = match self.config.dirty {
                DirtyMode::Ring => (self.config.ring_entries / 2) / op.writes_per_page(),
                _ => u32::MAX,
            };
            for chunk in op.chunks(per_run) {
                self.run_one(&chunk, &mut report)?;
                if self.config.dirty == DirtyMode::Ring {
                    let collected = self.collect_ring();
                    report.harvested += collected;
                    if self.unreset_entries > u64::from(self.config.ring_entries / 2) {
                        // The ring would overflow: re-protect now, whatever the mode.
                        self.reset_ring()?;
                    }
                }
            }
            report.pages_written += op.pages();
        }
        if self.config.harvest == Harvest::Auto {
            report.harvested += self.harvest()?;
        }
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    fn run_one(&mut self, op: &Op, report: &mut RunReport) -> anyhow::Result<()> {
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
        self.vcpu.set_regs(&regs).context("KVM_SET_REGS")?;
        loop {
            match self.vcpu.run().context("KVM_RUN")? {
                VcpuExit::Hlt => return Ok(()),
                VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) => {
                    report.ring_full_exits += 1;
                    report.harvested += self.collect_ring();
                    self.reset_ring()?;
                }
                other => bail!("unexpected vCPU exit: {other:?}"),
            }
        }
    }

    /// Collects the ring's dirty entries (marking them for reset).
    fn collect_ring(&mut self) -> u64 {
        let Some(ring) = &mut self.ring else { return 0 };
        let mut entries = Vec::new();
        let n = ring.collect(&mut entries) as u64;
        self.unreset_entries += n;
        n
    }

    fn reset_ring(&mut self) -> anyhow::Result<()> {
        dirty_ring::reset_rings(&self.vm)?;
        self.unreset_entries = 0;
        Ok(())
    }

    /// Harvests the dirty log and re-protects the pages; returns entries seen.
    pub fn harvest(&mut self) -> anyhow::Result<u64> {
        match self.config.dirty {
            DirtyMode::Ring => {
                let collected = self.collect_ring();
                self.reset_ring()?;
                Ok(collected)
            }
            DirtyMode::Bitmap => {
                let mut dirty = 0u64;
                for slot in &self.slots {
                    let bitmap = self
                        .vm
                        .get_dirty_log(slot.slot, slot.size as usize)
                        .context("KVM_GET_DIRTY_LOG")?;
                    dirty += bitmap
                        .iter()
                        .map(|w| u64::from(w.count_ones()))
                        .sum::<u64>();
                }
                Ok(dirty)
            }
            DirtyMode::None => Ok(0),
        }
    }

    /// blake3 of pages `first..first+count` from the VMM's own mapping.
    pub fn checksums(&self, first: u32, count: u32) -> anyhow::Result<Vec<String>> {
        let end = first
            .checked_add(count)
            .filter(|end| *end <= self.pages())
            .context("checksum range outside RAM")?;
        Ok(
            self.ram.as_slice()[first as usize * PAGE..end as usize * PAGE]
                .chunks_exact(PAGE)
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
