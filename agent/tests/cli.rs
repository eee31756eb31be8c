//! The `pagefp` command line: bad input and missing privileges give one clear
//! line that says what to do, never a panic.

use std::process::Command;

fn pagefp(args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_pagefp"))
        .args(args)
        .output()
        .expect("running pagefp");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "pagefp panicked: {stderr}");
    (output.status.success(), stderr)
}

#[test]
fn status_without_an_agent_says_what_to_do() {
    let (ok, stderr) = pagefp(&["status", "--socket", "/nonexistent/pagefp.sock"]);
    assert!(!ok);
    assert!(
        stderr.contains("cannot connect to the agent") && stderr.contains("pagefp agent"),
        "{stderr}"
    );
}

#[test]
fn invalid_configuration_is_refused_with_the_reason() {
    let (ok, stderr) = pagefp(&[
        "agent",
        "--ring-buffer-bytes",
        "5000",
        "--socket",
        "/tmp/never.sock",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("ring_buffer_bytes must be a power of two"),
        "{stderr}"
    );
    let dir = std::env::temp_dir().join(format!("pagefp-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("bad.toml");
    std::fs::write(&config, "min_vm = 3\n").unwrap();
    let (ok, stderr) = pagefp(&["agent", "--config", config.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains("is invalid") && stderr.contains("min_vm"),
        "{stderr}"
    );
    let (ok, stderr) = pagefp(&[
        "agent",
        "--config",
        dir.join("missing.toml").to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(stderr.contains("cannot read config file"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_agent_without_root_names_what_is_missing() {
    if !nix::unistd::geteuid().is_root() {
        let (ok, stderr) = pagefp(&["agent", "--socket", "/tmp/pagefp-user.sock"]);
        assert!(!ok);
        assert!(stderr.contains("must run as root"), "{stderr}");
        return;
    }
    // As root: drop to nobody for this one run.
    let Ok(output) = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_pagefp"),
            "agent",
            "--socket",
            "/tmp/pagefp-nobody.sock",
        ])
        .output()
    else {
        eprintln!("skipped: setpriv is not installed");
        return;
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("must run as root") && stderr.lines().count() <= 2,
        "{stderr}"
    );
}
