//! The host's processes as `/proc` shows them: the one place that reads
//! `/proc/PID/...` text (process list, names, KVM VM fds, memory maps,
//! which process owns a local TCP connection).

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

/// The process at the other end of a TCP connection between two local
/// sockets: `ours` is this process's end, `theirs` the peer's address as
/// this end sees it. Found through the kernel's socket table
/// (`/proc/net/tcp`, `/proc/net/tcp6`: the socket whose local address is
/// `theirs` and remote `ours`) and the processes' open files. `None` when
/// the peer is on another host, or gone, or `/proc` cannot be read.
pub fn tcp_peer_process(ours: std::net::SocketAddr, theirs: std::net::SocketAddr) -> Option<u32> {
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .find_map(|text| socket_inode(&text, theirs, ours))?;
    let link = format!("socket:[{inode}]");
    let me = std::process::id();
    pids().filter(|pid| *pid != me).find(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
            fds.filter_map(Result::ok)
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == &*link))
        })
    })
}

/// The inode of the socket of a `/proc/net/tcp{,6}` table whose local
/// address is `local` and remote `remote` (0: none, for sockets in
/// TIME_WAIT).
fn socket_inode(
    table: &str,
    local: std::net::SocketAddr,
    remote: std::net::SocketAddr,
) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let mut fields = line.split_ascii_whitespace();
        let _slot = fields.next()?;
        let this = parse_socket_address(fields.next()?)?;
        let peer = parse_socket_address(fields.next()?)?;
        let inode: u64 = fields.nth(6)?.parse().ok()?;
        (same_socket(this, local) && same_socket(peer, remote) && inode != 0).then_some(inode)
    })
}

/// Addresses equal, an IPv4-mapped IPv6 address equal to its IPv4 one.
fn same_socket(a: std::net::SocketAddr, b: std::net::SocketAddr) -> bool {
    let canonical = |ip: std::net::IpAddr| ip.to_canonical();
    a.port() == b.port() && canonical(a.ip()) == canonical(b.ip())
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): each 32-bit
/// word of the address as the kernel holds it (network order), printed as
/// a native integer.
fn parse_socket_address(field: &str) -> Option<std::net::SocketAddr> {
    let (address, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Option<Vec<[u8; 4]>> = (0..address.len() / 8)
        .map(|i| {
            let word = u32::from_str_radix(address.get(i * 8..i * 8 + 8)?, 16).ok()?;
            Some(word.to_ne_bytes())
        })
        .collect();
    let bytes = words?.concat();
    let ip = match (address.len(), bytes.len()) {
        (8, 4) => std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        (32, 16) => std::net::IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some(std::net::SocketAddr::new(ip, port))
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
    fn parses_socket_table_addresses() {
        assert_eq!(
            parse_socket_address("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            parse_socket_address("00000000000000000000000001000000:0016"),
            Some("[::1]:22".parse().unwrap())
        );
        assert_eq!(parse_socket_address("0100007F"), None);
        assert_eq!(parse_socket_address("XX00007F:1F90"), None);
        assert_eq!(parse_socket_address("0100:1F90"), None);
    }

    #[test]
    fn finds_the_process_at_the_other_end_of_a_local_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        // bash connects itself (its /dev/tcp) and waits for its stdin to close.
        let mut child = std::process::Command::new("bash")
            .args([
                "-c",
                &format!("exec 3<>/dev/tcp/127.0.0.1/{}; read", address.port()),
            ])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (conn, peer) = listener.accept().unwrap();
        let found = tcp_peer_process(conn.local_addr().unwrap(), peer);
        drop(child.stdin.take());
        child.wait().unwrap();
        assert_eq!(found, Some(child.id()));
        let elsewhere: std::net::SocketAddr = "192.0.2.1:1".parse().unwrap();
        assert_eq!(tcp_peer_process(address, elsewhere), None);
    }

    #[test]
    fn reads_its_own_maps() {
        let maps = maps(std::process::id()).unwrap();
        assert!(maps.iter().any(|m| m.path.contains("agent")));
        assert!(exists(std::process::id()));
        assert_ne!(process_name(std::process::id()), "?");
    }
}
