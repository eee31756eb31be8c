//! Tracepoint field offsets, read from the tracefs format files so that the
//! eBPF programs never hard-code a kernel's layout.

use std::path::{Path, PathBuf};

use agent_common::TraceOffsets;

use super::EbpfError;

const TRACEFS_ROOTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// The tracefs mount, if any.
pub fn tracefs_root() -> Result<PathBuf, EbpfError> {
    TRACEFS_ROOTS
        .iter()
        .map(PathBuf::from)
        .find(|root| root.join("events").is_dir())
        .ok_or(EbpfError::NoTracefs)
}

/// Offset of `field` in tracepoint `group/name`.
fn field_offset(root: &Path, group: &str, name: &str, field: &str) -> Result<u32, EbpfError> {
    let path = root.join("events").join(group).join(name).join("format");
    let text = std::fs::read_to_string(&path).map_err(|source| EbpfError::MissingTracepoint {
        tracepoint: format!("{group}/{name}"),
        source,
    })?;
    parse_field_offset(&text, field).ok_or_else(|| EbpfError::MissingField {
        tracepoint: format!("{group}/{name}"),
        field: field.to_string(),
    })
}

/// Finds `field:<type> <field>;\toffset:N;` in a format file.
pub fn parse_field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        let last = decl.split_whitespace().last()?;
        let ident = last.split('[').next()?.trim_start_matches('*');
        if ident != field {
            return None;
        }
        let offset = rest.trim().strip_prefix("offset:")?.split(';').next()?;
        offset.trim().parse().ok()
    })
}

/// Every offset the programs need.
pub fn read_offsets(root: &Path) -> Result<TraceOffsets, EbpfError> {
    let f = |group, name, field| field_offset(root, group, name, field);
    Ok(TraceOffsets {
        ring_push_index: f("kvm", "kvm_dirty_ring_push", "index")?,
        ring_push_dirty_index: f("kvm", "kvm_dirty_ring_push", "dirty_index")?,
        ring_push_slot: f("kvm", "kvm_dirty_ring_push", "slot")?,
        ring_push_offset: f("kvm", "kvm_dirty_ring_push", "offset")?,
        ring_reset_index: f("kvm", "kvm_dirty_ring_reset", "index")?,
        ring_reset_dirty_index: f("kvm", "kvm_dirty_ring_reset", "dirty_index")?,
        ring_reset_reset_index: f("kvm", "kvm_dirty_ring_reset", "reset_index")?,
        ioctl_enter_fd: f("syscalls", "sys_enter_ioctl", "fd")?,
        ioctl_enter_cmd: f("syscalls", "sys_enter_ioctl", "cmd")?,
        ioctl_enter_arg: f("syscalls", "sys_enter_ioctl", "arg")?,
        ioctl_exit_ret: f("syscalls", "sys_exit_ioctl", "ret")?,
        // Optional on kernels without the write-fault tracepoint.
        page_fault_address: f("kvm", "kvm_page_fault", "fault_address").unwrap_or(0),
        page_fault_error_code: f("kvm", "kvm_page_fault", "error_code").unwrap_or(0),
        process_exit_group_dead: f("sched", "sched_process_exit", "group_dead")?,
        _pad: 0,
        ready: 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PUSH: &str = "name: kvm_dirty_ring_push\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\tfield:int index;\toffset:8;\tsize:4;\tsigned:1;\n\tfield:u32 slot;\toffset:20;\tsize:4;\tsigned:0;\n\tfield:u64 * sptep;\toffset:32;\tsize:8;\tsigned:0;\n\tfield:char comm[16];\toffset:40;\tsize:16;\tsigned:0;\n";

    #[test]
    fn parses_offsets() {
        assert_eq!(parse_field_offset(PUSH, "index"), Some(8));
        assert_eq!(parse_field_offset(PUSH, "slot"), Some(20));
        assert_eq!(parse_field_offset(PUSH, "sptep"), Some(32));
        assert_eq!(parse_field_offset(PUSH, "comm"), Some(40));
        assert_eq!(parse_field_offset(PUSH, "offset"), None);
    }

    #[test]
    fn reads_this_kernels_offsets_if_tracefs_is_mounted() {
        let Ok(root) = tracefs_root() else { return };
        if !root.join("events/kvm").is_dir() {
            return;
        }
        let offsets = read_offsets(&root).unwrap();
        assert_eq!(offsets.ready, 1);
        assert!(offsets.ring_push_offset > offsets.ring_push_slot);
    }
}
