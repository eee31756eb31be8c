//! Where a kernel struct's members are, from the kernel's BTF
//! (`/sys/kernel/btf/vmlinux`, and a module's split BTF such as
//! `/sys/kernel/btf/kvm` when KVM is a module).
//!
//! The eBPF programs cannot be relocated here (aya 0.14 applies CO-RE
//! relocations only to C programs' records), so user space finds the offsets
//! and hands them to the programs as read-only globals before they load.
//! Only what that needs is read: type names and struct members. Every length
//! is checked; a malformed file is an error, never a panic.

use std::path::Path;

/// `BTF_MAGIC` in the header, little endian.
const MAGIC: u16 = 0xeb9f;
/// `BTF_KIND_STRUCT`.
const KIND_STRUCT: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} is not BTF the agent can read ({1})")]
    Malformed(String, &'static str),
}

/// One BTF blob: its types section and string section.
struct Blob<'a> {
    types: &'a [u8],
    strings: &'a [u8],
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    let word = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(word.try_into().ok()?))
}

impl<'a> Blob<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self, &'static str> {
        let magic = bytes
            .get(0..2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or("shorter than its header")?;
        if magic != MAGIC {
            return Err("bad magic (only little-endian BTF is read)");
        }
        let word = |at| u32_at(bytes, at).map(|v| v as usize).ok_or("short header");
        let header_len = word(4)?;
        let section = |off: usize, len: usize| {
            let start = header_len.checked_add(off)?;
            bytes.get(start..start.checked_add(len)?)
        };
        Ok(Self {
            types: section(word(8)?, word(12)?).ok_or("types section out of bounds")?,
            strings: section(word(16)?, word(20)?).ok_or("strings section out of bounds")?,
        })
    }

    /// Bytes that follow a type record of `kind` with `vlen` entries.
    fn trailing(kind: u32, vlen: usize) -> Result<usize, &'static str> {
        Ok(match kind {
            // INT, VAR, DECL_TAG: one word.
            1 | 14 | 17 => 4,
            // ARRAY
            3 => 12,
            // STRUCT, UNION, DATASEC, ENUM64: 12 bytes an entry.
            4 | 5 | 15 | 19 => 12 * vlen,
            // ENUM, FUNC_PROTO: 8 bytes an entry.
            6 | 13 => 8 * vlen,
            // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG.
            2 | 7..=12 | 16 | 18 => 0,
            _ => return Err("unknown type kind"),
        })
    }
}

/// The kernel's BTF, with a module's on top of it when asked for.
pub struct KernelBtf {
    base: Vec<u8>,
    module: Option<Vec<u8>>,
    origin: String,
}

impl KernelBtf {
    /// vmlinux's BTF, and module `module`'s if the kernel has it as a module.
    pub fn load(module: &str) -> Result<Self, BtfError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| BtfError::Read {
                path: path.display().to_string(),
                source,
            })
        };
        let root = Path::new("/sys/kernel/btf");
        let base = read(&root.join("vmlinux"))?;
        let module_path = root.join(module);
        let module = module_path
            .exists()
            .then(|| read(&module_path))
            .transpose()?;
        Ok(Self {
            base,
            module,
            origin: root.display().to_string(),
        })
    }

    /// From bytes (tests).
    #[cfg(test)]
    fn from_bytes(base: Vec<u8>, module: Option<Vec<u8>>) -> Self {
        Self {
            base,
            module,
            origin: "test BTF".into(),
        }
    }

    /// Byte offsets of `members` in `struct name`, in the order asked; `None`
    /// if the struct, or one of the members (as a whole-byte, non-bitfield
    /// member), is not there.
    pub fn member_offsets(
        &self,
        name: &str,
        members: &[&str],
    ) -> Result<Option<Vec<u32>>, BtfError> {
        let malformed = |why| BtfError::Malformed(self.origin.clone(), why);
        let base = Blob::parse(&self.base).map_err(malformed)?;
        let module = self
            .module
            .as_deref()
            .map(Blob::parse)
            .transpose()
            .map_err(malformed)?;
        // A module's split BTF numbers its strings after the base's.
        let string = |offset: u32| -> &[u8] {
            let offset = offset as usize;
            let (strings, at) = match &module {
                Some(split) if offset >= base.strings.len() => {
                    (split.strings, offset - base.strings.len())
                }
                _ => (base.strings, offset),
            };
            let tail = strings.get(at..).unwrap_or_default();
            &tail[..tail.iter().position(|&b| b == 0).unwrap_or(tail.len())]
        };
        for blob in std::iter::once(&base).chain(module.as_ref()) {
            if let Some(found) = find_members(blob, &string, name, members).map_err(malformed)? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }
}

fn find_members<'s>(
    blob: &Blob<'_>,
    string: &dyn Fn(u32) -> &'s [u8],
    name: &str,
    members: &[&str],
) -> Result<Option<Vec<u32>>, &'static str> {
    let mut at = 0;
    while at < blob.types.len() {
        let field = |n: usize| u32_at(blob.types, at + 4 * n).ok_or("truncated type");
        let (name_off, info) = (field(0)?, field(1)?);
        let kind = (info >> 24) & 0x1f;
        let vlen = (info & 0xffff) as usize;
        let kind_flag = info >> 31 == 1;
        let entries = at + 12;
        at = entries
            .checked_add(Blob::trailing(kind, vlen)?)
            .ok_or("type out of bounds")?;
        if at > blob.types.len() {
            return Err("truncated type");
        }
        if kind != KIND_STRUCT || string(name_off) != name.as_bytes() {
            continue;
        }
        let mut found = Vec::with_capacity(members.len());
        for wanted in members {
            let offset = (0..vlen).find_map(|i| {
                let entry = entries + 12 * i;
                let member_name = u32_at(blob.types, entry)?;
                let bits = u32_at(blob.types, entry + 8)?;
                // With kind_flag, the top byte is a bitfield's size.
                let (bitfield, bit_offset) = if kind_flag {
                    (bits >> 24 != 0, bits & 0xff_ffff)
                } else {
                    (false, bits)
                };
                (string(member_name) == wanted.as_bytes() && !bitfield && bit_offset % 8 == 0)
                    .then_some(bit_offset / 8)
            });
            match offset {
                Some(offset) => found.push(offset),
                None => return Ok(None),
            }
        }
        return Ok(Some(found));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob holding `struct pair { u32 a; u32 b; }` (member b at byte 4)
    /// after an INT type, with strings `pair`, `a`, `b`.
    fn blob(strings_prefix: usize) -> Vec<u8> {
        let mut strings = vec![0u8];
        let name = |s: &str, strings: &mut Vec<u8>| {
            let at = (strings_prefix + strings.len()) as u32;
            strings.extend_from_slice(s.as_bytes());
            strings.push(0);
            at
        };
        let (pair, a, b) = (
            name("pair", &mut strings),
            name("a", &mut strings),
            name("b", &mut strings),
        );
        let mut types = Vec::new();
        for word in [0, 1 << 24, 4, 32] {
            types.extend_from_slice(&u32::to_le_bytes(word));
        }
        for word in [pair, (KIND_STRUCT << 24) | 2, 8, a, 1, 0, b, 1, 32] {
            types.extend_from_slice(&u32::to_le_bytes(word));
        }
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for word in [
            24,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&u32::to_le_bytes(word));
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn finds_members_in_base_and_split_btf() {
        let base = blob(0);
        let btf = KernelBtf::from_bytes(base.clone(), None);
        assert_eq!(
            btf.member_offsets("pair", &["b", "a"]).unwrap(),
            Some(vec![4, 0])
        );
        assert_eq!(btf.member_offsets("pair", &["c"]).unwrap(), None);
        assert_eq!(btf.member_offsets("other", &["a"]).unwrap(), None);
        // The same struct in a module's split BTF, its strings numbered after
        // the base's; the base holds no `pair` of its own here.
        let mut empty_base = blob(0);
        // type_len (header bytes 12..16) = 0: no types.
        empty_base[12..16].copy_from_slice(&u32::to_le_bytes(0));
        let base_strings_len = u32_at(&empty_base, 20).unwrap() as usize;
        let split = KernelBtf::from_bytes(empty_base, Some(blob(base_strings_len)));
        assert_eq!(split.member_offsets("pair", &["b"]).unwrap(), Some(vec![4]));
    }

    #[test]
    fn malformed_btf_is_an_error_not_a_panic() {
        let good = blob(0);
        for cut in 0..good.len() {
            let btf = KernelBtf::from_bytes(good[..cut].to_vec(), None);
            let _ = btf.member_offsets("pair", &["b"]);
        }
        let mut wrong_kind = good.clone();
        wrong_kind[24 + 4 + 3] = 0x1f;
        assert!(
            KernelBtf::from_bytes(wrong_kind, None)
                .member_offsets("pair", &["a"])
                .is_err()
        );
    }

    #[test]
    fn reads_this_kernels_dirty_ring_layout() {
        let btf = KernelBtf::load("kvm").expect("this kernel exposes BTF");
        let offsets = btf
            .member_offsets("kvm_dirty_ring", &["dirty_index", "index"])
            .unwrap()
            .expect("struct kvm_dirty_ring is in the kernel's BTF");
        // linux/kvm_dirty_ring.h: dirty_index comes first; index after the
        // four u32 counters and the gfn pointer.
        assert_eq!(offsets, vec![0, 24]);
    }
}
