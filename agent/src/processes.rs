//! The host's processes as `/proc` shows them: the two questions the agent
//! asks when it looks for VMs it was not told about.

/// Every process id in `/proc` now.
pub fn pids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
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
