//! The state a paused test VM carries to its destination: the vCPU's
//! registers and the VMM's workload (the loop and where it stands). Guest
//! memory travels separately (the migration writes it into the incoming
//! VM's memfd); the code slot is the same read-only image in every VMM of
//! one build, checked by hash.
//!
//! Format: one JSON object, version 1, with `regs` and `sregs` as the hex
//! bytes of KVM's `kvm_regs` / `kvm_sregs` (the guest code uses no FPU).

use anyhow::{Context as _, bail};
use kvm_bindings::{kvm_regs, kvm_sregs};
use serde::{Deserialize, Serialize};

use super::{LoopState, TestVm, guest_code};

const MAGIC: &str = "pagefp-testvmm-state";
const VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct Snapshot {
    magic: String,
    version: u32,
    mem_bytes: u64,
    slots: u32,
    code_hash: String,
    regs: String,
    sregs: String,
    workload: Option<LoopState>,
}

fn to_hex<T: Copy>(value: &T) -> String {
    // SAFETY: T is a plain-old-data KVM struct; reading its bytes (padding
    // included, zero-initialised by KVM's defaults) is sound.
    let bytes = unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) };
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex<T: Copy + Default>(text: &str, what: &str) -> anyhow::Result<T> {
    if text.len() != 2 * size_of::<T>() {
        bail!("{what} has {} hex digits, expected {}", text.len(), 2 * size_of::<T>());
    }
    let bytes = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .with_context(|| format!("{what} is not hex"))?;
    let mut value = T::default();
    // SAFETY: T is a plain-old-data KVM struct of exactly bytes.len() bytes;
    // every bit pattern is a valid value.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&mut value as *mut T).cast::<u8>(), bytes.len()) };
    Ok(value)
}

fn code_hash() -> String {
    blake3::hash(&guest_code::code_slot_image()).to_hex().to_string()
}

impl TestVm {
    /// The paused VM's state.
    pub fn save_snapshot(&self) -> anyhow::Result<String> {
        let regs = self.vcpu.get_regs().context("KVM_GET_REGS")?;
        let sregs = self.vcpu.get_sregs().context("KVM_GET_SREGS")?;
        let snapshot = Snapshot {
            magic: MAGIC.into(),
            version: VERSION,
            mem_bytes: self.config.mem_bytes as u64,
            slots: self.config.slots,
            code_hash: code_hash(),
            regs: to_hex(&regs),
            sregs: to_hex(&sregs),
            workload: self.workload.clone(),
        };
        Ok(serde_json::to_string(&snapshot)?)
    }

    /// Loads a state saved by [`TestVm::save_snapshot`] into an incoming VM
    /// and registers its memory with KVM; the VM stays paused.
    pub fn load_snapshot(&mut self, text: &str) -> anyhow::Result<()> {
        if self.registered {
            bail!("load_state is for an incoming VM (started with --incoming); this one already runs");
        }
        let snapshot: Snapshot = serde_json::from_str(text)
            .context("the state is not a pagefp-testvmm state (malformed JSON or missing fields)")?;
        if snapshot.magic != MAGIC {
            bail!("the state is not a pagefp-testvmm state (magic {:?})", snapshot.magic);
        }
        if snapshot.version != VERSION {
            bail!("state version {} is not supported (this VMM reads version {VERSION})", snapshot.version);
        }
        if snapshot.mem_bytes != self.config.mem_bytes as u64 || snapshot.slots != self.config.slots {
            bail!(
                "the state is for {} MiB of RAM in {} slot(s); this VMM has {} MiB in {}: start it with the source's --mem-mib and --slots",
                snapshot.mem_bytes >> 20,
                snapshot.slots,
                self.config.mem_bytes >> 20,
                self.config.slots
            );
        }
        if snapshot.code_hash != code_hash() {
            bail!("the source VMM runs other guest code (another pagefp build): migrate between equal builds");
        }
        let regs: kvm_regs = from_hex(&snapshot.regs, "regs")?;
        let sregs: kvm_sregs = from_hex(&snapshot.sregs, "sregs")?;
        if let Some(workload) = &snapshot.workload {
            self.check_ops(&workload.cursor.ops)?;
        }
        self.registered = true;
        if let Err(err) = self.register_slots() {
            self.registered = false;
            return Err(err);
        }
        self.vcpu.set_sregs(&sregs).context("KVM_SET_SREGS")?;
        self.vcpu.set_regs(&regs).context("KVM_SET_REGS")?;
        self.workload = snapshot.workload;
        Ok(())
    }
}
