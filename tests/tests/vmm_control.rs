//! The test VMM's control socket and process life on the real /dev/kvm: bad
//! input is refused and serving goes on, loops, concurrent connections,
//! `exit` and signals, and what the agent relies on (a sealed memfd).

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    process::Command,
    time::Duration,
};

use pagefp_tests::{
    agent_process::TempDir,
    require_kvm,
    vmm_client::{DirtyMode, Harvest, Op, Refused, VmmArgs, VmmProcess, testvmm_binary},
};
use serde_json::{Value, json};

fn spawn(dir: &TempDir, name: &str, edit: impl FnOnce(&mut VmmArgs)) -> VmmProcess {
    let mut args = VmmArgs::new(dir.0.join(format!("{name}.sock")), 1);
    edit(&mut args);
    VmmProcess::spawn(&testvmm_binary(), &args).expect("starting pagefp-testvmm")
}

/// One raw line out, one line back, on a connection of its own.
fn raw(socket: &std::path::Path, line: &[u8]) -> Value {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.write_all(line).unwrap();
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
}

fn refusal(vmm: &VmmProcess, request: Value) -> String {
    let answer = vmm.request(&request).unwrap();
    assert_eq!(answer["ok"], false, "{request} was accepted: {answer}");
    let error = answer["error"].as_str().unwrap_or_default().to_owned();
    assert!(!error.is_empty(), "{request}: no error text in {answer}");
    error
}

#[test]
fn bad_requests_are_refused_and_the_vmm_keeps_serving() {
    require_kvm!("bad_requests_are_refused_and_the_vmm_keeps_serving");
    let dir = TempDir::new("pagefp-vmm-bad");
    let vmm = spawn(&dir, "bad", |_| {});
    let touch =
        |first: u64, count: u64| json!({"op": "touch", "first": first, "count": count, "value": 1});
    for (bad, needle) in [
        (json!({"cmd": "fly"}), "unknown variant"),
        (json!({"nocmd": 1}), "cmd"),
        (json!("not an object"), "bad request"),
        (json!({"cmd": "info", "extra": 1}), "unknown field"),
        (
            json!({"cmd": "run", "ops": [], "extra": 1}),
            "unknown field",
        ),
        (
            json!({"cmd": "run", "ops": [{"op": "zero", "first": 0, "count": 1, "seed": 1}]}),
            "unknown field",
        ),
        (json!({"cmd": "run"}), "ops"),
        (
            json!({"cmd": "run", "ops": [touch(250, 10)]}),
            "outside RAM",
        ),
        (
            json!({"cmd": "run", "ops": [touch(u32::MAX.into(), 2)]}),
            "outside RAM",
        ),
        (json!({"cmd": "run", "ops": [touch(0, 1 << 32)]}), "u32"),
        (
            json!({"cmd": "run", "ops": [{"op": "touch", "first": -1, "count": 1, "value": 1}]}),
            "invalid value",
        ),
        (
            json!({"cmd": "run", "ops": [{"op": "zero", "first": 0, "count": 0}]}),
            "at least 1",
        ),
        (
            json!({"cmd": "run", "ops": [{"op": "copy", "src": 2, "first": 0, "count": 5}]}),
            "inside its destination",
        ),
        (
            json!({"cmd": "run", "ops": [{"op": "copy", "src": 256, "first": 0, "count": 1}]}),
            "outside RAM",
        ),
        (
            json!({"cmd": "run", "ops": [{"op": "stride", "first": 0, "count": 2, "step": 0, "value": 1}]}),
            "step",
        ),
        (
            json!({"cmd": "run", "ops": [{"op": "melt", "first": 0, "count": 1}]}),
            "unknown variant",
        ),
        (
            json!({"cmd": "checksums", "first": 200, "count": 100}),
            "outside RAM",
        ),
        (json!({"cmd": "stop_loop"}), "no loop is running"),
        (json!({"cmd": "start_loop", "ops": []}), "at least one op"),
    ] {
        let error = refusal(&vmm, bad.clone());
        assert!(
            error.contains(needle),
            "{bad}: {error:?} does not mention {needle:?}"
        );
    }
    // A refused run ran nothing, not even its valid ops.
    refusal(
        &vmm,
        json!({"cmd": "run", "ops": [touch(0, 1), touch(300, 1)]}),
    );
    assert_eq!(
        vmm.checksums_range(0, 1).unwrap()[0],
        blake3::hash(&[0; 4096]).to_hex().to_string()
    );
    // Not JSON, not UTF-8, an empty line: refused or skipped, the connection stays usable.
    let socket = vmm.socket().to_owned();
    assert_eq!(raw(&socket, b"{\"cmd\":\n")["ok"], false);
    assert_eq!(raw(&socket, b"\xff\xfe\x00garbage\n")["ok"], false);
    assert_eq!(raw(&socket, b"\n   \n{\"cmd\":\"info\"}\n")["ok"], true);
    let info = vmm.info().unwrap();
    assert_eq!(info.pages, 256);
    // The typed client turns refusals into `Refused`.
    let err = vmm
        .run(&[Op::Touch {
            first: 256,
            count: 1,
            value: 1,
        }])
        .unwrap_err();
    assert!(err.downcast_ref::<Refused>().is_some(), "{err:#}");
}

#[test]
fn info_describes_the_vm_and_its_sealed_memfd() {
    require_kvm!("info_describes_the_vm_and_its_sealed_memfd");
    let dir = TempDir::new("pagefp-vmm-info");
    let vmm = spawn(&dir, "info", |a| {
        a.mem_mib = 4;
        a.slots = 2;
        a.ring_entries = 4096;
    });
    let mode = std::fs::metadata(vmm.socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode");
    let info = vmm.info().unwrap();
    assert_eq!(info.vm.pid, vmm.pid());
    assert_eq!((info.mem_bytes, info.pages), (4 << 20, 1024));
    assert_eq!(
        (info.dirty, info.harvest, info.ring_entries),
        (DirtyMode::Ring, Harvest::Auto, 4096)
    );
    assert!(!info.loop_running);
    assert_eq!(info.slots.len(), 2);

    // RAM is one shared memfd mapping, sealed against shrinking and growing,
    // which another process (the agent) can map through map_files.
    let uaddr = info.slots[0].uaddr;
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", vmm.pid())).unwrap();
    let line = maps
        .lines()
        .find(|l| u64::from_str_radix(l.split('-').next().unwrap(), 16).unwrap() == uaddr)
        .unwrap_or_else(|| panic!("no mapping at {uaddr:#x}:\n{maps}"));
    assert!(
        line.contains("rw-s") && line.contains("memfd:pagefp-guest-ram"),
        "{line}"
    );
    let range = line.split_whitespace().next().unwrap();
    let file = std::fs::File::open(format!("/proc/{}/map_files/{range}", vmm.pid())).unwrap();
    let seals = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GET_SEALS).unwrap();
    let wanted = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    assert_eq!(seals & wanted, wanted, "seals {seals:#x}");
    assert_eq!(file.metadata().unwrap().len(), 4 << 20);
}

#[test]
fn a_loop_runs_until_stopped_and_blocks_run_and_checksums() {
    require_kvm!("a_loop_runs_until_stopped_and_blocks_run_and_checksums");
    let dir = TempDir::new("pagefp-vmm-loop");
    let vmm = spawn(&dir, "loop", |a| a.harvest = "manual".into());
    vmm.start_loop(&[Op::Touch {
        first: 0,
        count: 100,
        value: 5,
    }])
    .unwrap();
    assert!(vmm.info().unwrap().loop_running);
    for busy in [
        json!({"cmd": "run", "ops": [{"op": "zero", "first": 0, "count": 1}]}),
        json!({"cmd": "checksums"}),
        json!({"cmd": "start_loop", "ops": [{"op": "zero", "first": 0, "count": 1}]}),
    ] {
        assert!(refusal(&vmm, busy).contains("stop_loop first"));
    }
    std::thread::sleep(Duration::from_millis(300));
    // Harvests (and re-registrations) are served between iterations.
    assert!(vmm.harvest().unwrap().harvested > 0);
    vmm.reregister().unwrap();
    let report = vmm.stop_loop().unwrap();
    assert!(report.iterations > 0 && report.seconds > 0.0, "{report:?}");
    assert_eq!(report.pages_written, report.iterations * 100);
    assert!(!vmm.info().unwrap().loop_running);
    let mut page = vec![0u8; 4096];
    page[8] = 5;
    assert_eq!(
        vmm.checksums_range(99, 1).unwrap()[0],
        blake3::hash(&page).to_hex().to_string()
    );
    vmm.run(&[Op::Zero { first: 0, count: 1 }]).unwrap();
    assert!(refusal(&vmm, json!({"cmd": "stop_loop"})).contains("no loop"));
}

#[test]
fn connections_are_served_concurrently() {
    require_kvm!("connections_are_served_concurrently");
    let dir = TempDir::new("pagefp-vmm-conns");
    // The client keeps its own connection open all along.
    let vmm = spawn(&dir, "c", |_| {});
    let socket = vmm.socket().to_owned();
    // A connection that sends half a line and goes quiet blocks nobody.
    let mut quiet = UnixStream::connect(&socket).unwrap();
    quiet.write_all(b"{\"cmd\":").unwrap();
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut stream = UnixStream::connect(&socket).unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                for _ in 0..5 {
                    let request = json!({"cmd": "run", "ops": [{"op": "touch", "first": i, "count": 1, "value": i}]});
                    writeln!(stream, "{request}").unwrap();
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    let answer: Value = serde_json::from_str(&line).unwrap();
                    assert_eq!(answer["ok"], true, "{answer}");
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    assert_eq!(vmm.info().unwrap().pages, 256);
    drop(quiet);
    assert_eq!(raw(&socket, b"{\"cmd\":\"harvest\"}\n")["ok"], true);
}

#[test]
fn exit_and_signals_end_the_process_cleanly() {
    require_kvm!("exit_and_signals_end_the_process_cleanly");
    let dir = TempDir::new("pagefp-vmm-exit");
    let vmm = spawn(&dir, "exit", |_| {});
    let socket = vmm.socket().to_owned();
    let status = vmm.exit().unwrap();
    assert!(status.success(), "{status}");
    assert!(!socket.exists(), "the socket file is removed");

    for signal in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
    ] {
        let vmm = spawn(&dir, signal.as_str(), |_| {});
        // Even while a loop runs.
        vmm.start_loop(&[Op::Touch {
            first: 0,
            count: 10,
            value: 1,
        }])
        .unwrap();
        let socket = vmm.socket().to_owned();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(vmm.pid() as i32), signal).unwrap();
        let mut vmm = vmm;
        let status = vmm
            .wait_exit(Duration::from_secs(10))
            .expect("exits on the signal");
        assert!(status.success(), "{signal}: {status}");
        assert!(!socket.exists(), "{signal}: the socket file is removed");
    }
}

#[test]
fn bad_command_lines_fail_with_a_message() {
    require_kvm!("bad_command_lines_fail_with_a_message");
    let dir = TempDir::new("pagefp-vmm-args");
    let big = dir.0.join("big.img");
    std::fs::write(&big, vec![1u8; (1 << 20) + 1]).unwrap();
    let socket = dir.0.join("never.sock");
    let socket = socket.to_str().unwrap();
    for (args, needle) in [
        (
            vec!["--mem-mib", "1", "--ring-entries", "64"],
            "at least 256",
        ),
        (
            vec!["--mem-mib", "1", "--ring-entries", "1000"],
            "power of two",
        ),
        (vec!["--mem-mib", "4096"], "at most 3584 MiB"),
        (
            vec!["--mem-mib", "1", "--slots", "3"],
            "multiple of 3 pages",
        ),
        (
            vec!["--mem-mib", "1", "--image", big.to_str().unwrap()],
            "raise --mem-mib",
        ),
        (
            vec!["--mem-mib", "1", "--image", "/nonexistent.img"],
            "opening image",
        ),
        (
            vec!["--mem-mib", "1", "--dirty", "sometimes"],
            "invalid value",
        ),
    ] {
        let output = Command::new(testvmm_binary())
            .args(["--socket", socket])
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} was accepted");
        assert!(
            stderr.contains(needle),
            "{args:?}: {stderr:?} does not mention {needle:?}"
        );
    }
    assert!(!std::path::Path::new(socket).exists());
}
