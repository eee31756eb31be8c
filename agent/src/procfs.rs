//! The host's processes as `/proc` shows them: the one place that reads
//! `/proc/PID/...` text (process list, names, KVM VM fds, memory maps).

use std::io;

/// Every process id in `/proc` now.
pub fn pids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
}

/// Whether process `pid` exists.
pub fn exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether process `pid`'s environment (as it started) holds `entry`
/// (`NAME=VALUE`, exactly); false if the process is gone.
pub fn environ_has(pid: u32, entry: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|environ| environ.split(|b| *b == 0).any(|e| e == entry.as_bytes()))
}

/// `/proc/PID/comm`, or "?" if the process is gone.
pub fn process_name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Whether `pid` holds a KVM VM file descriptor (its VM is KVM's, and the
/// eBPF tracking sees it).
pub fn holds_kvm_vm(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
        fds.filter_map(Result::ok).any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| target.as_os_str() == "anon_inode:kvm-vm")
        })
    })
}

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// `MAP_SHARED` (the fourth permission character is `s`).
    pub shared: bool,
    /// Offset of `start` in the mapped file.
    pub offset: u64,
    /// 0 for anonymous memory.
    pub inode: u64,
    /// The mapped file, without a trailing ` (deleted)`; empty if none.
    pub path: String,
}

impl Mapping {
    pub fn size(&self) -> u64 {
        self.end - self.start
    }

    /// Whether `[uaddr, uaddr+size)` lies inside this mapping.
    pub fn covers(&self, uaddr: u64, size: u64) -> bool {
        self.start <= uaddr && uaddr.checked_add(size).is_some_and(|end| end <= self.end)
    }

    /// A shared mapping of a file (which `/proc/PID/map_files` can reopen).
    pub fn is_shared_file(&self) -> bool {
        self.shared && self.inode != 0
    }

    /// `/proc/PID/map_files/START-END`: the mapped file itself.
    pub fn map_file(&self, pid: u32) -> String {
        format!("/proc/{pid}/map_files/{:x}-{:x}", self.start, self.end)
    }
}

/// The memory map of process `pid`.
pub fn maps(pid: u32) -> io::Result<Vec<Mapping>> {
    Ok(parse_maps(&std::fs::read_to_string(format!(
        "/proc/{pid}/maps"
    ))?))
}

/// The lines of a `/proc/PID/maps` text that parse (others are skipped).
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Mapping> {
    let mut fields = line.split_ascii_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let perms = fields.next()?;
    let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
    let _device = fields.next()?;
    let inode = fields.next()?.parse().ok()?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    if end < start {
        return None;
    }
    // The path is the rest of the line and may hold spaces.
    let path = line
        .splitn(6, |c: char| c.is_ascii_whitespace())
        .nth(5)
        .unwrap_or("")
        .trim_start();
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    Some(Mapping {
        start,
        end,
        shared: perms.as_bytes().get(3) == Some(&b's'),
        offset,
        inode,
        path: path.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_maps_lines_with_and_without_paths() {
        let text = "\
7f0000000000-7f0010000000 rw-s 00001000 00:01 1234                       /dev/shm/guest ram (deleted)
7f0010000000-7f0010001000 rw-p 00000000 00:00 0 
55d000000000-55d000001000 r-xp 00000000 08:01 99   /usr/bin/qemu-system-x86_64
garbage line
";
        let maps = parse_maps(text);
        assert_eq!(maps.len(), 3);
        assert_eq!(
            maps[0],
            Mapping {
                start: 0x7f00_0000_0000,
                end: 0x7f00_1000_0000,
                shared: true,
                offset: 0x1000,
                inode: 1234,
                path: "/dev/shm/guest ram".into(),
            }
        );
        assert!(maps[0].is_shared_file());
        assert!(maps[0].covers(0x7f00_0000_1000, 0x1000));
        assert!(!maps[0].covers(0x7f00_0fff_f000, 0x2000));
        assert!(!maps[0].covers(u64::MAX - 10, 100));
        assert!(!maps[1].shared && maps[1].path.is_empty() && !maps[1].is_shared_file());
        assert_eq!(maps[2].path, "/usr/bin/qemu-system-x86_64");
    }

    #[test]
    fn reads_its_own_maps() {
        let maps = maps(std::process::id()).unwrap();
        assert!(maps.iter().any(|m| m.path.contains("agent")));
        assert!(exists(std::process::id()));
        assert_ne!(process_name(std::process::id()), "?");
    }
}
