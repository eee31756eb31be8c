//! Deciding whether a privileged test can run here.
//!
//! Outside CI a missing capability skips the test with a clear line; in CI
//! (`CI=true` or `PAGEFP_REQUIRE_PRIVILEGED=1`) it fails the test, so nothing
//! is ever skipped silently where it must run.

use std::path::Path;

/// True when privileged tests must not be skipped.
pub fn required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var("PAGEFP_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1")
}

/// What is missing for KVM + eBPF tests, if anything.
pub fn missing() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not running as root".into());
    }
    if !Path::new("/dev/kvm").exists() {
        return Some("/dev/kvm not available".into());
    }
    let tracefs = [
        "/sys/kernel/tracing/events/kvm",
        "/sys/kernel/debug/tracing/events/kvm",
    ];
    if !tracefs.iter().any(|p| Path::new(p).is_dir()) {
        return Some("KVM tracepoints not visible (mount tracefs: `cargo xtask setup`)".into());
    }
    None
}

/// What is missing for tests that only need KVM (the test VMM), if anything.
pub fn kvm_missing() -> Option<String> {
    if !Path::new("/dev/kvm").exists() {
        return Some("/dev/kvm not available".into());
    }
    if let Err(err) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Some(format!(
            "/dev/kvm not available ({err}: run as root or join the kvm group)"
        ));
    }
    None
}

/// Returns true if the test should run; prints why and returns false if it is
/// skipped; panics if it is skipped where it must run.
#[must_use]
pub fn check(test: &str) -> bool {
    decide(test, missing())
}

/// As [`check`], for tests that only need /dev/kvm.
#[must_use]
pub fn check_kvm(test: &str) -> bool {
    decide(test, kvm_missing())
}

fn decide(test: &str, missing: Option<String>) -> bool {
    match missing {
        None => true,
        Some(reason) if required() => {
            panic!("{test}: privileged test cannot run ({reason}) but CI requires it")
        }
        Some(reason) => {
            eprintln!("skipped: {test}: {reason}");
            false
        }
    }
}

/// Skips (returns from) the calling test when privileges are missing.
#[macro_export]
macro_rules! require_privileged {
    ($name:expr) => {
        if !$crate::privileged::check($name) {
            return;
        }
    };
}

/// Skips (returns from) the calling test when /dev/kvm cannot be used.
#[macro_export]
macro_rules! require_kvm {
    ($name:expr) => {
        if !$crate::privileged::check_kvm($name) {
            return;
        }
    };
}
