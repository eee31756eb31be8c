//! QEMU guests the agent finds without eBPF: processes running QEMU without
//! KVM (TCG) whose guest RAM is a shared memory backend
//! (`-object memory-backend-file,share=on,...` or `memory-backend-memfd`).
//!
//! KVM reports nothing about such guests, so their pages are rescanned at a
//! bounded rate and served `unverified`; whoever uses one of their hashes
//! (the QEMU proxy, the catalog builder) confirms the content itself.
//! Guests that use KVM are left to the eBPF tracking, which knows their
//! writes.
//!
//! A guest's RAM is found from its command line (the backend objects, in
//! QEMU's `key=value,...` form or libvirt's JSON form) and its memory map
//! (`/proc/PID/maps`: the shared mappings of those files). Each mapping
//! becomes one slot; its "guest physical address" is its offset in the
//! backend, which is what QEMU's own RAM block offsets are too.

use std::path::Path;

use crate::{
    page::PAGE_SIZE,
    procfs::{self, Mapping},
    registry::{RamRegion, SharedRamGuest},
};

/// A memory backend object on QEMU's command line that another process can
/// read: where its memory lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SharedBackend {
    /// `memory-backend-file,share=on,mem-path=PATH`: the file itself, or a
    /// file QEMU creates (and unlinks) inside when PATH is a directory.
    File { mem_path: String },
    /// `memory-backend-memfd` (shared unless `share=off`).
    Memfd,
}

/// Every QEMU process on the host that does not use KVM and keeps its RAM in
/// shared memory.
pub fn find() -> Vec<SharedRamGuest> {
    let mut guests: Vec<SharedRamGuest> = procfs::pids().filter_map(inspect).collect();
    guests.sort_unstable_by_key(|guest| guest.pid);
    guests
}

/// `pid`'s shared RAM, if it is a QEMU without KVM that has some.
pub fn inspect(pid: u32) -> Option<SharedRamGuest> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|arg| !arg.is_empty())
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect();
    let program = Path::new(args.first()?).file_name()?.to_str()?;
    if !program.starts_with("qemu-system") && !program.starts_with("qemu-kvm") {
        return None;
    }
    let mut backends = shared_backends(&args);
    if backends.is_empty() || procfs::holds_kvm_vm(pid) {
        return None;
    }
    // The memory map names files by absolute path; QEMU takes a mem-path
    // relative to its working directory.
    for backend in &mut backends {
        if let SharedBackend::File { mem_path } = backend
            && Path::new(mem_path).is_relative()
            && let Ok(cwd) = std::fs::read_link(format!("/proc/{pid}/cwd"))
        {
            *mem_path = cwd.join(&*mem_path).display().to_string();
        }
    }
    let regions = ram_regions(&procfs::maps(pid).ok()?, &backends);
    (!regions.is_empty()).then_some(SharedRamGuest { pid, regions })
}

/// The shared memory backends among QEMU's arguments.
pub fn shared_backends(args: &[String]) -> Vec<SharedBackend> {
    args.windows(2)
        .filter(|pair| pair[0] == "-object" || pair[0] == "--object")
        .filter_map(|pair| backend(&pair[1]))
        .collect()
}

/// One `-object` value, in QEMU's `type,key=value` form (`,,` is a comma in
/// a value) or as JSON (`{"qom-type": ...}`, as libvirt writes it).
fn backend(value: &str) -> Option<SharedBackend> {
    let (qom_type, share, mem_path) = if value.trim_start().starts_with('{') {
        let json: serde_json::Value = serde_json::from_str(value).ok()?;
        let share = match json.get("share") {
            Some(serde_json::Value::Bool(b)) => Some(*b),
            Some(serde_json::Value::String(s)) => flag(s),
            _ => None,
        };
        (
            json.get("qom-type")?.as_str()?.to_owned(),
            share,
            json.get("mem-path")
                .and_then(|p| p.as_str())
                .map(str::to_owned),
        )
    } else {
        let mut fields = split_options(value).into_iter();
        let first = fields.next()?;
        let mut qom_type = first.strip_prefix("qom-type=").unwrap_or(&first).to_owned();
        let mut share = None;
        let mut mem_path = None;
        for field in fields {
            match field.split_once('=') {
                Some(("qom-type", v)) => qom_type = v.to_owned(),
                Some(("share", v)) => share = flag(v),
                Some(("mem-path", v)) => mem_path = Some(v.to_owned()),
                _ => {}
            }
        }
        (qom_type, share, mem_path)
    };
    match qom_type.as_str() {
        // QEMU's default for a file backend is private (copy-on-write):
        // another process would not see the guest's writes.
        "memory-backend-file" if share == Some(true) => Some(SharedBackend::File {
            mem_path: mem_path?,
        }),
        "memory-backend-memfd" if share != Some(false) => Some(SharedBackend::Memfd),
        _ => None,
    }
}

/// QEMU's boolean spellings.
fn flag(value: &str) -> Option<bool> {
    match value {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// Splits QEMU's option syntax at single commas; `,,` stands for a comma.
fn split_options(value: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                fields.last_mut().unwrap().push(',');
            } else {
                fields.push(String::new());
            }
        } else {
            fields.last_mut().unwrap().push(c);
        }
    }
    fields
}

/// The shared mappings in `maps` (of `/proc/PID/maps`) that hold the memory
/// of `backends`.
pub fn ram_regions(maps: &[Mapping], backends: &[SharedBackend]) -> Vec<RamRegion> {
    maps.iter()
        .filter(|m| m.shared && !m.path.is_empty())
        .filter(|m| backends.iter().any(|backend| holds(backend, &m.path)))
        .filter(|m| m.size() > 0 && m.size().is_multiple_of(PAGE_SIZE as u64))
        .map(|m| RamRegion {
            uaddr: m.start,
            size: m.size(),
            offset: m.offset,
            path: m.path.clone(),
        })
        .collect()
}

fn holds(backend: &SharedBackend, path: &str) -> bool {
    match backend {
        SharedBackend::File { mem_path } => {
            let dir = mem_path.trim_end_matches('/');
            path == mem_path
                || path
                    .strip_prefix(dir)
                    .is_some_and(|rest| rest.starts_with('/'))
        }
        // QEMU names the memfd after the backend's type.
        SharedBackend::Memfd => path.starts_with("/memfd:memory-backend-memfd"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn backends_in_both_syntaxes() {
        let found = shared_backends(&args(&[
            "qemu-system-x86_64",
            "-object",
            "memory-backend-file,id=ram,size=256M,mem-path=/dev/shm/a,,b,share=on",
            "-object",
            "memory-backend-file,id=private,size=256M,mem-path=/dev/shm/c",
            "-object",
            r#"{"qom-type":"memory-backend-file","id":"pc.ram","mem-path":"/var/lib/libvirt/qemu/ram/1-vm/pc.ram","share":true,"size":268435456}"#,
            "-object",
            "memory-backend-memfd,id=m",
            "-object",
            "memory-backend-memfd,id=n,share=off",
            "-object",
            "qom-type=memory-backend-file,id=q,mem-path=/dev/hugepages,share=yes",
            "-object",
            "rng-random,id=rng0,filename=/dev/urandom",
        ]));
        assert_eq!(
            found,
            vec![
                SharedBackend::File {
                    mem_path: "/dev/shm/a,b".into()
                },
                SharedBackend::File {
                    mem_path: "/var/lib/libvirt/qemu/ram/1-vm/pc.ram".into()
                },
                SharedBackend::Memfd,
                SharedBackend::File {
                    mem_path: "/dev/hugepages".into()
                },
            ]
        );
    }

    #[test]
    fn only_shared_mappings_of_the_backends_are_ram() {
        let maps = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 123 /usr/bin/qemu-system-x86_64
7f0000000000-7f0010000000 rw-s 00000000 00:1a 99 /dev/shm/guest ram
7f0010000000-7f0010200000 rw-p 00000000 00:1a 99 /dev/shm/guest ram
7f1000000000-7f1000200000 rw-s 00000000 00:1b 77 /dev/hugepages/qemu_back_mem.pc.ram.Ab12 (deleted)
7f2000000000-7f2000400000 rw-s 00200000 00:01 5 /memfd:memory-backend-memfd (deleted)
7f3000000000-7f3000001000 rw-s 00000000 00:01 6 /memfd:other (deleted)
7f4000000000-7f4000001000 rw-s 00000000 00:1a 98 /dev/shm/guest ram2
";
        let regions = ram_regions(
            &procfs::parse_maps(maps),
            &[
                SharedBackend::File {
                    mem_path: "/dev/shm/guest ram".into(),
                },
                SharedBackend::File {
                    mem_path: "/dev/hugepages/".into(),
                },
                SharedBackend::Memfd,
            ],
        );
        let found: Vec<(u64, u64, u64, &str)> = regions
            .iter()
            .map(|r| (r.uaddr, r.size, r.offset, r.path.as_str()))
            .collect();
        assert_eq!(
            found,
            vec![
                (0x7f00_0000_0000, 0x1000_0000, 0, "/dev/shm/guest ram"),
                (
                    0x7f10_0000_0000,
                    0x20_0000,
                    0,
                    "/dev/hugepages/qemu_back_mem.pc.ram.Ab12"
                ),
                (
                    0x7f20_0000_0000,
                    0x40_0000,
                    0x20_0000,
                    "/memfd:memory-backend-memfd"
                ),
            ]
        );
    }

    #[test]
    fn this_process_is_not_a_qemu_guest() {
        assert_eq!(inspect(std::process::id()), None);
    }
}
