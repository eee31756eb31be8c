//! The state a paused test VM carries to its destination: the vCPU (general
//! registers, segment/control registers, FPU/SSE state, XCRs) and the VMM's
//! work (a loop or a `run` request: its ops, where it stands, and whether
//! the vCPU is in the middle of a chunk). Guest memory travels separately:
//! a migration writes it into the incoming VM's memfds through
//! `/proc/PID/map_files`, the read-only code slot included.
//!
//! # Format (version 1)
//!
//! `save_state` answers the blob as lowercase hex. The blob is
//!
//! | bytes | content |
//! |---|---|
//! | 8 | magic `PAGEFPVM` |
//! | 4 | version, u32 little-endian (1) |
//! | 4 | length N of the document, u32 little-endian |
//! | N | the document: UTF-8 JSON, see [`Document`] |
//! | 32 | blake3 of everything before |
//!
//! The document names the memory layout the state belongs to (every region's
//! slot, guest address, size and read-only flag, and the blake3 of the code
//! slot's content), the vCPU registers by name, and the work. A destination
//! refuses a blob whose magic, version, checksum or layout differs from its
//! own, with a message naming what differs. No MSRs, interrupt or event
//! state: the guest runs in flat 32-bit protected mode without paging,
//! interrupts or an interrupt controller.

use anyhow::{Context as _, anyhow, bail};
use kvm_bindings::{kvm_dtable, kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, kvm_xcrs};
use kvm_ioctls::Cap;
use serde::{Deserialize, Serialize};

use super::{CODE_SLOT, Cursor, DirtyMode, MemoryRegion, TestVm, Work, guest_code};

pub const MAGIC: &[u8; 8] = b"PAGEFPVM";
pub const VERSION: u32 = 1;
const HEADER: usize = 16;
const CHECKSUM: usize = 32;
/// Largest document accepted (a loop of many ops is still far below).
const MAX_DOCUMENT: usize = 64 << 20;

/// What the blob's JSON document holds.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    /// "pagefp-testvmm".
    pub vmm: String,
    pub layout: Layout,
    pub vcpu: VcpuState,
    /// None: the vCPU was idle.
    pub work: Option<Work>,
}

/// The memory layout a state belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layout {
    pub regions: Vec<LayoutRegion>,
    /// blake3 (hex) of the code slot's content.
    pub code_blake3: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayoutRegion {
    pub slot: u32,
    pub gpa: u64,
    pub size: u64,
    pub read_only: bool,
}

impl From<&MemoryRegion> for LayoutRegion {
    fn from(r: &MemoryRegion) -> Self {
        Self {
            slot: r.slot,
            gpa: r.gpa,
            size: r.size,
            read_only: r.read_only,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuState {
    pub regs: Regs,
    pub sregs: Sregs,
    pub fpu: Fpu,
    /// None where KVM has no KVM_CAP_XCRS.
    pub xcrs: Option<Vec<Xcr>>,
}

/// Defines a struct of named u64 fields mirroring a KVM struct that has
/// exactly these fields.
macro_rules! mirror_u64 {
    ($(#[$meta:meta])* $name:ident, $kvm:ty, [$($field:ident),* $(,)?]) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $(pub $field: u64),*
        }

        impl From<&$kvm> for $name {
            fn from(k: &$kvm) -> Self {
                Self { $($field: k.$field),* }
            }
        }

        impl From<&$name> for $kvm {
            fn from(m: &$name) -> Self {
                Self { $($field: m.$field),* }
            }
        }
    };
}

mirror_u64!(
    /// `kvm_regs`.
    Regs,
    kvm_regs,
    [rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip, rflags]
);

/// `kvm_segment`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    #[serde(rename = "type")]
    pub type_: u8,
    pub present: u8,
    pub dpl: u8,
    pub db: u8,
    pub s: u8,
    pub l: u8,
    pub g: u8,
    pub avl: u8,
    pub unusable: u8,
}

impl From<&kvm_segment> for Segment {
    fn from(k: &kvm_segment) -> Self {
        Self {
            base: k.base,
            limit: k.limit,
            selector: k.selector,
            type_: k.type_,
            present: k.present,
            dpl: k.dpl,
            db: k.db,
            s: k.s,
            l: k.l,
            g: k.g,
            avl: k.avl,
            unusable: k.unusable,
        }
    }
}

impl From<&Segment> for kvm_segment {
    fn from(m: &Segment) -> Self {
        Self {
            base: m.base,
            limit: m.limit,
            selector: m.selector,
            type_: m.type_,
            present: m.present,
            dpl: m.dpl,
            db: m.db,
            s: m.s,
            l: m.l,
            g: m.g,
            avl: m.avl,
            unusable: m.unusable,
            padding: 0,
        }
    }
}

/// `kvm_dtable` (GDT, IDT).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dtable {
    pub base: u64,
    pub limit: u16,
}

/// `kvm_sregs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sregs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: Dtable,
    pub idt: Dtable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
    pub interrupt_bitmap: [u64; 4],
}

impl From<&kvm_sregs> for Sregs {
    fn from(k: &kvm_sregs) -> Self {
        let dtable = |d: &kvm_dtable| Dtable {
            base: d.base,
            limit: d.limit,
        };
        Self {
            cs: (&k.cs).into(),
            ds: (&k.ds).into(),
            es: (&k.es).into(),
            fs: (&k.fs).into(),
            gs: (&k.gs).into(),
            ss: (&k.ss).into(),
            tr: (&k.tr).into(),
            ldt: (&k.ldt).into(),
            gdt: dtable(&k.gdt),
            idt: dtable(&k.idt),
            cr0: k.cr0,
            cr2: k.cr2,
            cr3: k.cr3,
            cr4: k.cr4,
            cr8: k.cr8,
            efer: k.efer,
            apic_base: k.apic_base,
            interrupt_bitmap: k.interrupt_bitmap,
        }
    }
}

impl From<&Sregs> for kvm_sregs {
    fn from(m: &Sregs) -> Self {
        let dtable = |d: &Dtable| kvm_dtable {
            base: d.base,
            limit: d.limit,
            padding: [0; 3],
        };
        Self {
            cs: (&m.cs).into(),
            ds: (&m.ds).into(),
            es: (&m.es).into(),
            fs: (&m.fs).into(),
            gs: (&m.gs).into(),
            ss: (&m.ss).into(),
            tr: (&m.tr).into(),
            ldt: (&m.ldt).into(),
            gdt: dtable(&m.gdt),
            idt: dtable(&m.idt),
            cr0: m.cr0,
            cr2: m.cr2,
            cr3: m.cr3,
            cr4: m.cr4,
            cr8: m.cr8,
            efer: m.efer,
            apic_base: m.apic_base,
            interrupt_bitmap: m.interrupt_bitmap,
        }
    }
}

/// `kvm_fpu`; the 16-byte registers as 32 hex digits each.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fpu {
    /// st0..st7 (8).
    pub fpr: Vec<String>,
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    /// xmm0..xmm15 (16).
    pub xmm: Vec<String>,
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for Fpu {
    fn from(k: &kvm_fpu) -> Self {
        Self {
            fpr: k.fpr.iter().map(|r| to_hex(r)).collect(),
            fcw: k.fcw,
            fsw: k.fsw,
            ftwx: k.ftwx,
            last_opcode: k.last_opcode,
            last_ip: k.last_ip,
            last_dp: k.last_dp,
            xmm: k.xmm.iter().map(|r| to_hex(r)).collect(),
            mxcsr: k.mxcsr,
        }
    }
}

impl TryFrom<&Fpu> for kvm_fpu {
    type Error = anyhow::Error;

    fn try_from(m: &Fpu) -> anyhow::Result<Self> {
        fn registers<const N: usize>(hex: &[String], what: &str) -> anyhow::Result<[[u8; 16]; N]> {
            if hex.len() != N {
                bail!("fpu.{what} has {} registers, expected {N}", hex.len());
            }
            let mut out = [[0u8; 16]; N];
            for (reg, text) in out.iter_mut().zip(hex) {
                let bytes = from_hex(text).with_context(|| format!("fpu.{what}"))?;
                *reg = bytes
                    .try_into()
                    .map_err(|_| anyhow!("fpu.{what}: a register is 16 bytes (32 hex digits)"))?;
            }
            Ok(out)
        }
        Ok(Self {
            fpr: registers::<8>(&m.fpr, "fpr")?,
            fcw: m.fcw,
            fsw: m.fsw,
            ftwx: m.ftwx,
            last_opcode: m.last_opcode,
            last_ip: m.last_ip,
            last_dp: m.last_dp,
            xmm: registers::<16>(&m.xmm, "xmm")?,
            mxcsr: m.mxcsr,
            ..Default::default()
        })
    }
}

/// One extended control register (XCR0 is the only one today).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Xcr {
    pub xcr: u32,
    pub value: u64,
}

fn xcrs_from(k: &kvm_xcrs) -> Vec<Xcr> {
    k.xcrs
        .iter()
        .take((k.nr_xcrs as usize).min(k.xcrs.len()))
        .map(|x| Xcr {
            xcr: x.xcr,
            value: x.value,
        })
        .collect()
}

fn xcrs_to(list: &[Xcr]) -> anyhow::Result<kvm_xcrs> {
    let mut k = kvm_xcrs::default();
    if list.len() > k.xcrs.len() {
        bail!(
            "{} XCRs in the state; KVM takes at most {}",
            list.len(),
            k.xcrs.len()
        );
    }
    k.nr_xcrs = list.len() as u32;
    for (slot, x) in k.xcrs.iter_mut().zip(list) {
        slot.xcr = x.xcr;
        slot.value = x.value;
    }
    Ok(k)
}

pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

pub fn from_hex(text: &str) -> anyhow::Result<Vec<u8>> {
    let text = text.trim();
    if !text.len().is_multiple_of(2) {
        bail!("odd number of hex digits ({})", text.len());
    }
    let digit = |c: u8| -> anyhow::Result<u8> {
        Ok(match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => bail!("{:?} is not a hex digit", c as char),
        })
    };
    text.as_bytes()
        .chunks_exact(2)
        .map(|pair| Ok(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// Frames a document into the blob (see the module docs), hex-encoded.
pub fn encode(document: &Document) -> anyhow::Result<String> {
    let json = serde_json::to_vec(document)?;
    let mut blob = Vec::with_capacity(HEADER + json.len() + CHECKSUM);
    blob.extend_from_slice(MAGIC);
    blob.extend_from_slice(&VERSION.to_le_bytes());
    blob.extend_from_slice(&u32::try_from(json.len())?.to_le_bytes());
    blob.extend_from_slice(&json);
    let checksum = blake3::hash(&blob);
    blob.extend_from_slice(checksum.as_bytes());
    Ok(to_hex(&blob))
}

/// Checks a blob's framing and checksum and parses its document.
pub fn decode(text: &str) -> anyhow::Result<Document> {
    let blob = from_hex(text).context("the state is not the hex text save_state answers")?;
    if blob.len() < HEADER + CHECKSUM {
        bail!(
            "the state is truncated ({} bytes; a state has at least {})",
            blob.len(),
            HEADER + CHECKSUM
        );
    }
    if &blob[..8] != MAGIC {
        bail!(
            "the state is not a pagefp-testvmm state (its magic is not {:?})",
            String::from_utf8_lossy(MAGIC)
        );
    }
    let version = u32::from_le_bytes(blob[8..12].try_into().unwrap());
    if version != VERSION {
        bail!("state version {version} is not supported: this VMM reads version {VERSION}");
    }
    let length = u32::from_le_bytes(blob[12..16].try_into().unwrap()) as usize;
    if length > MAX_DOCUMENT || blob.len() != HEADER + length + CHECKSUM {
        bail!(
            "the state is truncated or has trailing bytes: {} bytes for a {length}-byte document",
            blob.len()
        );
    }
    let (body, checksum) = blob.split_at(HEADER + length);
    if blake3::hash(body).as_bytes() != checksum {
        bail!("the state is corrupt: its blake3 checksum does not match");
    }
    serde_json::from_slice(&body[HEADER..]).context("the state's document is malformed")
}

/// "RAM 32 MiB in 2 slot(s), code slot 100 of 4 MiB at 0xe0000000".
fn describe(regions: &[LayoutRegion]) -> String {
    let ram: Vec<_> = regions.iter().filter(|r| !r.read_only).collect();
    let mut text = format!(
        "RAM {} MiB in {} slot(s)",
        ram.iter().map(|r| r.size).sum::<u64>() >> 20,
        ram.len()
    );
    for r in regions.iter().filter(|r| r.read_only) {
        text += &format!(
            ", read-only slot {} of {} KiB at {:#x}",
            r.slot,
            r.size >> 10,
            r.gpa
        );
    }
    text
}

/// Why `theirs` (a state's layout) does not fit `mine`, if it does not.
fn layout_difference(theirs: &[LayoutRegion], mine: &[LayoutRegion]) -> Option<String> {
    if theirs == mine {
        return None;
    }
    let ram = |l: &[LayoutRegion]| -> (u64, usize) {
        let ram: Vec<_> = l.iter().filter(|r| !r.read_only).collect();
        (ram.iter().map(|r| r.size).sum(), ram.len())
    };
    let (their_ram, their_slots) = ram(theirs);
    let (my_ram, my_slots) = ram(mine);
    let mut diffs = Vec::new();
    if their_ram != my_ram {
        diffs.push(format!(
            "RAM size: the state's VM has {} MiB, this VMM {} MiB (--mem-mib)",
            their_ram >> 20,
            my_ram >> 20
        ));
    }
    if their_slots != my_slots {
        diffs.push(format!(
            "RAM slots: the state's VM has {their_slots}, this VMM {my_slots} (--slots)"
        ));
    }
    if diffs.is_empty() {
        diffs.push(format!(
            "regions: the state's VM has {}, this VMM {}",
            describe(theirs),
            describe(mine)
        ));
    }
    Some(format!(
        "the state belongs to another memory layout ({}): start the incoming VMM with the source's --mem-mib and --slots",
        diffs.join("; ")
    ))
}

impl TestVm {
    fn layout(&self) -> Layout {
        Layout {
            regions: self.memory().iter().map(LayoutRegion::from).collect(),
            code_blake3: blake3::hash(self.code.as_slice()).to_hex().to_string(),
        }
    }

    /// The paused VM's state as a blob (hex): `work` is what the vCPU was
    /// doing when it was paused.
    pub fn save_snapshot(&self, work: Option<&Work>) -> anyhow::Result<String> {
        let regs = self.vcpu.get_regs().context("KVM_GET_REGS")?;
        let sregs = self.vcpu.get_sregs().context("KVM_GET_SREGS")?;
        let fpu = self.vcpu.get_fpu().context("KVM_GET_FPU")?;
        let xcrs = if self.kvm.check_extension(Cap::Xcrs) {
            Some(xcrs_from(&self.vcpu.get_xcrs().context("KVM_GET_XCRS")?))
        } else {
            None
        };
        encode(&Document {
            vmm: "pagefp-testvmm".into(),
            layout: self.layout(),
            vcpu: VcpuState {
                regs: (&regs).into(),
                sregs: (&sregs).into(),
                fpu: (&fpu).into(),
                xcrs,
            },
            work: work.cloned(),
        })
    }

    /// Loads a blob from [`TestVm::save_snapshot`] into an incoming VM whose
    /// memory was written meanwhile, registers that memory with KVM and
    /// restores the vCPU; returns the work to carry on (the VM stays paused).
    /// Nothing changes if the blob is refused.
    pub fn load_snapshot(&mut self, text: &str) -> anyhow::Result<Option<Work>> {
        if self.registered {
            bail!(
                "load_state is for an incoming VM (started with --incoming); this one already runs"
            );
        }
        let document = decode(text)?;
        if document.vmm != "pagefp-testvmm" {
            bail!(
                "the state comes from {:?}, not pagefp-testvmm",
                document.vmm
            );
        }
        let mine = self.layout();
        if let Some(why) = layout_difference(&document.layout.regions, &mine.regions) {
            bail!(why);
        }
        let build_code = blake3::hash(&guest_code::code_slot_image())
            .to_hex()
            .to_string();
        if document.layout.code_blake3 != build_code {
            bail!(
                "the source VMM runs other guest code (another pagefp build): migrate between VMMs of the same build"
            );
        }
        if mine.code_blake3 != document.layout.code_blake3 {
            bail!(
                "the code slot (slot {CODE_SLOT} at {:#x}) does not hold the source's guest code: \
                 copy every region of info.memory, the read-only code slot included, before load_state",
                guest_code::CODE_GPA
            );
        }
        let vcpu = &document.vcpu;
        let regs = kvm_regs::from(&vcpu.regs);
        let sregs = kvm_sregs::from(&vcpu.sregs);
        let fpu = kvm_fpu::try_from(&vcpu.fpu)?;
        let xcrs = match &vcpu.xcrs {
            Some(list) if self.kvm.check_extension(Cap::Xcrs) => Some(xcrs_to(list)?),
            Some(_) => bail!("the state has XCRs but this KVM cannot set them (no KVM_CAP_XCRS)"),
            None => None,
        };
        if let Some(work) = &document.work {
            self.check_work(work)?;
        }
        // Registers first: a refused register set leaves the VM incoming.
        self.vcpu.set_sregs(&sregs).context("KVM_SET_SREGS")?;
        self.vcpu.set_regs(&regs).context("KVM_SET_REGS")?;
        self.vcpu.set_fpu(&fpu).context("KVM_SET_FPU")?;
        if let Some(xcrs) = &xcrs {
            self.vcpu.set_xcrs(xcrs).context("KVM_SET_XCRS")?;
        }
        self.registered = true;
        if let Err(err) = self.register_slots() {
            self.registered = false;
            return Err(err);
        }
        Ok(document.work)
    }

    /// Checks migrated work against this VM: ops inside RAM, a consistent
    /// cursor, chunks that fit this VMM's dirty ring.
    fn check_work(&self, work: &Work) -> anyhow::Result<()> {
        self.check_ops(work.ops())
            .context("the state's workload does not fit this VMM")?;
        let cursor: &Cursor = work.cursor();
        let consistent = cursor.op <= cursor.ops.len()
            && (cursor.chunks.is_empty()
                || (cursor.op < cursor.ops.len() && cursor.chunk < cursor.chunks.len()))
            && (!cursor.started || !cursor.chunks.is_empty());
        if !consistent {
            bail!(
                "the state's workload position is inconsistent (op {}, chunk {})",
                cursor.op,
                cursor.chunk
            );
        }
        self.check_ops(&cursor.chunks)
            .context("the state's workload does not fit this VMM")?;
        if self.config.dirty == DirtyMode::Ring {
            let budget = u64::from(self.ring_budget());
            if let Some(chunk) = cursor
                .remaining_chunks()
                .iter()
                .find(|c| u64::from(c.writes_per_page()) * c.pages() > budget)
            {
                bail!(
                    "the state's current {} op was cut for a larger dirty ring than this VMM's ({} entries): \
                     start the incoming VMM with the source's --ring-entries",
                    chunk.name(),
                    self.config.ring_entries
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(slot: u32, gpa: u64, mib: u64, read_only: bool) -> LayoutRegion {
        LayoutRegion {
            slot,
            gpa,
            size: mib << 20,
            read_only,
        }
    }

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(from_hex(&to_hex(&bytes)).unwrap(), bytes);
        assert!(from_hex("abc").is_err());
        assert!(from_hex("zz").is_err());
    }

    #[test]
    fn layout_differences_name_what_differs() {
        let code = region(100, 0xE000_0000, 4, true);
        let one = [region(0, 0, 32, false), code];
        let two = [
            region(0, 0, 16, false),
            region(1, 16 << 20, 16, false),
            code,
        ];
        let bigger = [region(0, 0, 64, false), code];
        assert!(layout_difference(&one, &one).is_none());
        let slots = layout_difference(&two, &one).unwrap();
        assert!(
            slots.contains("RAM slots: the state's VM has 2, this VMM 1"),
            "{slots}"
        );
        assert!(!slots.contains("RAM size"), "{slots}");
        let size = layout_difference(&bigger, &one).unwrap();
        assert!(size.contains("64 MiB, this VMM 32 MiB"), "{size}");
        let no_code = layout_difference(&one[..1], &one).unwrap();
        assert!(no_code.contains("read-only slot 100"), "{no_code}");
    }

    #[test]
    fn registers_survive_the_mirrors() {
        let regs = kvm_regs {
            rax: 1,
            rip: 0xE000_0080,
            rflags: 2,
            r15: u64::MAX,
            ..Default::default()
        };
        let back = kvm_regs::from(&Regs::from(&regs));
        assert_eq!(
            (back.rax, back.rip, back.rflags, back.r15),
            (1, 0xE000_0080, 2, u64::MAX)
        );
        let mut sregs = kvm_sregs::default();
        sregs.cs.selector = 8;
        sregs.cs.type_ = 0xB;
        sregs.cr0 = 0x11;
        sregs.gdt.limit = 0x17;
        sregs.interrupt_bitmap[3] = 9;
        let back = kvm_sregs::from(&Sregs::from(&sregs));
        assert_eq!(Sregs::from(&back), Sregs::from(&sregs));
        let mut fpu = kvm_fpu {
            fcw: 0x37F,
            mxcsr: 0x1F80,
            ..Default::default()
        };
        fpu.xmm[15][3] = 0xAB;
        let back = kvm_fpu::try_from(&Fpu::from(&fpu)).unwrap();
        assert_eq!(
            (back.fcw, back.xmm[15][3], back.mxcsr),
            (0x37F, 0xAB, 0x1F80)
        );
        let mut short = Fpu::from(&fpu);
        short.xmm.pop();
        assert!(
            kvm_fpu::try_from(&short)
                .unwrap_err()
                .to_string()
                .contains("15 registers")
        );
    }

    #[test]
    fn blobs_are_checked_before_use() {
        let document = Document {
            vmm: "pagefp-testvmm".into(),
            layout: Layout {
                regions: vec![region(0, 0, 1, false)],
                code_blake3: "00".into(),
            },
            vcpu: VcpuState {
                regs: Regs::default(),
                sregs: (&kvm_sregs::default()).into(),
                fpu: (&kvm_fpu::default()).into(),
                xcrs: None,
            },
            work: None,
        };
        let text = encode(&document).unwrap();
        assert_eq!(decode(&text).unwrap().layout, document.layout);
        let mut blob = from_hex(&text).unwrap();
        let err = |blob: &[u8]| decode(&to_hex(blob)).unwrap_err().to_string();
        assert!(decode("xyz").unwrap_err().to_string().contains("hex"));
        assert!(err(&blob[..20]).contains("truncated"));
        assert!(err(&blob[..blob.len() - 1]).contains("truncated"));
        let mut other = blob.clone();
        other[0] = b'X';
        assert!(err(&other).contains("not a pagefp-testvmm state"));
        let mut future = blob.clone();
        future[8] = 2;
        assert!(err(&future).contains("version 2 is not supported"));
        let n = blob.len();
        blob[n - 40] ^= 1;
        assert!(err(&blob).contains("checksum"));
    }
}
