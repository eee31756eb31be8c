//! The test VMM's side of live migration on the real /dev/kvm: pause and
//! resume in the middle of an op, the state blob, incoming VMMs, and a
//! migration done by hand (memory copied through /proc/PID/map_files).
//! Expected memory is computed here from the ops, independently of the VMM.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use agent::page::PAGE_SIZE;
use pagefp_tests::{
    agent_process::TempDir,
    require_kvm,
    vmm::guest_code::{CODE_GPA, CODE_SLOT_SIZE, expected_random_page, random_pool},
    vmm_client::{Op, VmmArgs, VmmProcess, copy_guest_memory, testvmm_binary},
};
use serde_json::{Value, json};

fn hex(page: &[u8]) -> String {
    blake3::hash(page).to_hex().to_string()
}

fn zero_hash() -> String {
    hex(&[0; PAGE_SIZE])
}

fn spawn(dir: &TempDir, name: &str, mem_mib: u32, edit: impl FnOnce(&mut VmmArgs)) -> VmmProcess {
    let mut args = VmmArgs::new(dir.0.join(format!("{name}.sock")), mem_mib);
    edit(&mut args);
    VmmProcess::spawn(&testvmm_binary(), &args).expect("starting pagefp-testvmm")
}

/// An incoming VMM with the layout of `source`.
fn incoming_like(dir: &TempDir, name: &str, source: &VmmProcess, slots: u32) -> VmmProcess {
    let mem_mib = (source.info().unwrap().mem_bytes >> 20) as u32;
    spawn(dir, name, mem_mib, |a| {
        a.incoming = true;
        a.slots = slots;
    })
}

fn refusal(vmm: &VmmProcess, request: Value) -> String {
    let answer = vmm.request(&request).unwrap();
    assert_eq!(answer["ok"], false, "{request} was accepted: {answer}");
    let error = answer["error"].as_str().unwrap_or_default().to_owned();
    assert!(!error.is_empty(), "{request}: no error text in {answer}");
    error
}

fn assert_refused(vmm: &VmmProcess, request: Value, needle: &str) {
    let error = refusal(vmm, request.clone());
    assert!(
        error.contains(needle),
        "{request}: {error:?} does not mention {needle:?}"
    );
}

fn iterations(vmm: &VmmProcess) -> u64 {
    vmm.info().unwrap().loop_iterations
}

/// Polls `done` every 20 ms for up to `timeout`.
fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How many pages from `first` on hold their `random` content for `seed`,
/// in a row (the guest writes them in order).
fn random_prefix(hashes: &[String], first: u32, count: u32, seed: u32) -> u32 {
    let pool = random_pool();
    (first..first + count)
        .take_while(|&page| hashes[page as usize] == hex(&expected_random_page(&pool, page, seed)))
        .count() as u32
}

fn touched(value: u32) -> String {
    let mut page = vec![0u8; PAGE_SIZE];
    page[8..12].copy_from_slice(&value.to_le_bytes());
    hex(&page)
}

/// Pausing a long op stops the vCPU within it, promptly; nothing is written
/// while paused; resuming finishes the op exactly.
#[test]
fn pause_stops_the_vcpu_in_the_middle_of_an_op_and_resume_goes_on() {
    require_kvm!("pause_stops_the_vcpu_in_the_middle_of_an_op_and_resume_goes_on");
    let dir = TempDir::new("pagefp-vmm-pause");
    // Without dirty logging a chunk of a random op is 2048 pages (about a
    // second under the emulator): a pause that waited for a chunk boundary
    // would be seen, in time and in memory.
    let vmm = spawn(&dir, "pause", 32, |a| a.dirty = "none".into());
    let (first, count, seed) = (0, 4096, 21);
    vmm.start_loop(&[Op::Random { first, count, seed }])
        .unwrap();
    assert_refused(&vmm, json!({"cmd": "save_state"}), "paused VM");
    // About 400 pages in (0.4 ms a page here; 3x either way still lands
    // inside the first chunk).
    std::thread::sleep(Duration::from_millis(150));

    let started = Instant::now();
    vmm.pause().unwrap();
    let first_pause = started.elapsed();
    let info = vmm.info().unwrap();
    assert_eq!(info.vm.state, "paused");
    assert!(info.loop_running, "a paused loop is suspended, not stopped");
    assert_eq!(info.loop_iterations, 0);
    // Stopped inside the first chunk: a prefix of the op's pages is written,
    // then at most one page in progress, then nothing.
    let hashes = vmm.checksums().unwrap();
    let done = random_prefix(&hashes, first, count, seed);
    assert!(
        done > 0 && done < 2048,
        "{done} pages written at the pause: not inside the first chunk"
    );
    let untouched = hashes[done as usize + 1..]
        .iter()
        .filter(|h| **h == zero_hash())
        .count();
    assert_eq!(
        untouched,
        hashes.len() - done as usize - 1,
        "only pages before the pause point were written"
    );

    // Nothing runs while paused.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        vmm.checksums().unwrap(),
        hashes,
        "memory changed while paused"
    );
    assert_eq!(iterations(&vmm), 0);
    assert_refused(
        &vmm,
        json!({"cmd": "run", "ops": [{"op": "zero", "first": 0, "count": 1}]}),
        "paused",
    );
    assert_refused(
        &vmm,
        json!({"cmd": "start_loop", "ops": [{"op": "zero", "first": 0, "count": 1}]}),
        "paused",
    );
    vmm.harvest().unwrap();
    vmm.pause().unwrap();
    assert_eq!(vmm.state().unwrap(), "paused", "pause is idempotent");

    // More pauses at other points of the op; each answers promptly.
    let mut latencies = vec![first_pause];
    for wait_ms in [150, 420, 90, 260] {
        vmm.resume().unwrap();
        std::thread::sleep(Duration::from_millis(wait_ms));
        let started = Instant::now();
        vmm.pause().unwrap();
        latencies.push(started.elapsed());
    }
    latencies.sort();
    println!("pause latencies: {latencies:?}");
    assert!(
        latencies[latencies.len() / 2] < Duration::from_millis(150),
        "{latencies:?}"
    );
    assert!(
        latencies[latencies.len() - 1] < Duration::from_millis(700),
        "{latencies:?}"
    );

    vmm.resume().unwrap();
    vmm.resume().unwrap();
    assert_eq!(vmm.state().unwrap(), "running", "resume is idempotent");
    wait_for("an iteration after resume", Duration::from_secs(30), || {
        iterations(&vmm) >= 1
    });
    let report = vmm.stop_loop().unwrap();
    assert!(
        report.iterations >= 1 && report.pages_written >= u64::from(count),
        "{report:?}"
    );
    // The op, interrupted five times, wrote exactly its pages.
    let hashes = vmm.checksums().unwrap();
    assert_eq!(random_prefix(&hashes, first, count, seed), count);
    assert!(hashes[count as usize..].iter().all(|h| *h == zero_hash()));
}

/// The whole migration by hand: pause, save, copy memory through
/// map_files, load, resume the destination; the loop goes on there.
#[test]
fn a_running_loop_migrates_through_map_files_and_goes_on() {
    require_kvm!("a_running_loop_migrates_through_map_files_and_goes_on");
    let dir = TempDir::new("pagefp-vmm-migrate");
    let source = spawn(&dir, "source", 16, |a| a.slots = 2);
    let info = source.info().unwrap();
    assert_eq!(info.vm.state, "running");
    let regions: Vec<_> = info
        .vm
        .memory
        .iter()
        .map(|r| (r.slot, r.gpa, r.size, r.read_only))
        .collect();
    assert_eq!(
        regions,
        [
            (0, 0, 8 << 20, false),
            (1, 8 << 20, 8 << 20, false),
            (100, CODE_GPA, CODE_SLOT_SIZE as u64, true)
        ]
    );
    // A long random op (about 1.6 s with the dirty ring), then a page that
    // changes value twice an iteration.
    let (count, seed, hot) = (2500, 7, 3000);
    source
        .start_loop(&[
            Op::Random {
                first: 0,
                count,
                seed,
            },
            Op::Touch {
                first: hot,
                count: 1,
                value: 1,
            },
            Op::Touch {
                first: hot,
                count: 1,
                value: 2,
            },
        ])
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    source.pause().unwrap();
    let state = source.save_state().unwrap();
    let at_pause = source.checksums().unwrap();
    let done = random_prefix(&at_pause, 0, count, seed);
    assert!(
        done < count,
        "paused inside the first iteration's random op ({done} pages done)"
    );

    let dest = incoming_like(&dir, "dest", &source, 2);
    let incoming = dest.info().unwrap();
    assert_eq!(incoming.vm.state, "incoming");
    assert!(!incoming.loop_running);
    assert!(
        dest.checksums().unwrap().iter().all(|h| *h == zero_hash()),
        "incoming memory starts zeroed"
    );
    let copied = copy_guest_memory(&source, &dest).unwrap();
    assert_eq!(copied, (16 << 20) + CODE_SLOT_SIZE as u64);
    dest.load_state(&state).unwrap();
    let loaded = dest.info().unwrap();
    assert_eq!(loaded.vm.state, "paused", "load_state leaves the VM paused");
    assert!(loaded.loop_running, "the loop came along");
    assert_eq!(
        dest.checksums().unwrap(),
        at_pause,
        "destination memory equals the source's"
    );

    dest.resume().unwrap();
    wait_for(
        "the migrated loop's iterations",
        Duration::from_secs(30),
        || iterations(&dest) >= 2,
    );
    let report = dest.stop_loop().unwrap();
    assert!(report.iterations >= 2, "{report:?}");
    let hashes = dest.checksums().unwrap();
    assert_ne!(hashes, at_pause, "the destination's guest wrote on");
    assert_eq!(
        random_prefix(&hashes, 0, count, seed),
        count,
        "the interrupted op finished exactly"
    );
    assert!(hashes[hot as usize] == touched(1) || hashes[hot as usize] == touched(2));
    let others = (0..hashes.len()).filter(|&p| p >= count as usize && p != hot as usize);
    assert!(
        others.into_iter().all(|p| hashes[p] == zero_hash()),
        "nothing else was written"
    );

    // The source stayed paused and unchanged; exit ends it.
    assert_eq!(source.state().unwrap(), "paused");
    assert_eq!(source.checksums().unwrap(), at_pause);
    let socket = source.socket().to_owned();
    assert!(source.exit().unwrap().success());
    assert!(!socket.exists());
    // The destination is a VM like any other now.
    dest.run(&[Op::Zero { first: 0, count: 1 }]).unwrap();
    dest.harvest().unwrap();
}

/// One raw request on a connection of its own, answered in the background.
fn request_in_background(socket: &Path, request: Value) -> std::thread::JoinHandle<Value> {
    let mut stream = UnixStream::connect(socket).unwrap();
    std::thread::spawn(move || {
        writeln!(stream, "{request}").unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    })
}

/// A `run` request paused in the middle migrates too: its client on the
/// source gets an error when the source exits, the destination finishes it.
#[test]
fn a_paused_run_request_finishes_on_the_destination() {
    require_kvm!("a_paused_run_request_finishes_on_the_destination");
    let dir = TempDir::new("pagefp-vmm-run-migrate");
    let source = spawn(&dir, "source", 16, |_| {});
    // About 2 s with the dirty ring: still running at the pause.
    let (count, seed) = (3000, 99);
    let run = request_in_background(
        source.socket(),
        json!({"cmd": "run", "ops": [{"op": "random", "first": 0, "count": count, "seed": seed}]}),
    );
    std::thread::sleep(Duration::from_millis(300));
    source.pause().unwrap();
    assert!(source.info().unwrap().run_pending);
    let state = source.save_state().unwrap();
    let dest = incoming_like(&dir, "dest", &source, 1);
    copy_guest_memory(&source, &dest).unwrap();
    dest.load_state(&state).unwrap();
    assert!(dest.info().unwrap().run_pending);
    assert!(source.exit().unwrap().success());
    let answer = run.join().unwrap();
    assert_eq!(answer["ok"], false, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("finishes on the destination"),
        "{answer}"
    );

    dest.resume().unwrap();
    if dest.info().unwrap().run_pending {
        assert_refused(
            &dest,
            json!({"cmd": "run", "ops": [{"op": "zero", "first": 0, "count": 1}]}),
            "run_pending",
        );
    }
    wait_for("the migrated run", Duration::from_secs(30), || {
        !dest.info().unwrap().run_pending
    });
    let hashes = dest.checksums().unwrap();
    assert_eq!(random_prefix(&hashes, 0, count, seed), count);
    assert!(hashes[count as usize..].iter().all(|h| *h == zero_hash()));
}

/// Blob bytes: magic, version, length, JSON, blake3.
fn reframe(version: u32, document: &[u8]) -> String {
    let mut blob = b"PAGEFPVM".to_vec();
    blob.extend_from_slice(&version.to_le_bytes());
    blob.extend_from_slice(&(document.len() as u32).to_le_bytes());
    blob.extend_from_slice(document);
    let checksum = blake3::hash(&blob);
    blob.extend_from_slice(checksum.as_bytes());
    blob.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn load_state_refuses_bad_blobs_and_other_layouts_and_keeps_serving() {
    require_kvm!("load_state_refuses_bad_blobs_and_other_layouts_and_keeps_serving");
    let dir = TempDir::new("pagefp-vmm-load");
    let source = spawn(&dir, "source", 8, |_| {});
    source
        .run(&[Op::Touch {
            first: 5,
            count: 10,
            value: 3,
        }])
        .unwrap();
    source.pause().unwrap();
    let state = source.save_state().unwrap();
    assert_refused(
        &source,
        json!({"cmd": "load_state", "state": state}),
        "is for an incoming VM",
    );

    // Another layout: the error names what differs.
    let bigger = spawn(&dir, "bigger", 16, |a| a.incoming = true);
    let error = refusal(&bigger, json!({"cmd": "load_state", "state": state}));
    assert!(
        error.contains("RAM size") && error.contains("8 MiB") && error.contains("16 MiB"),
        "{error}"
    );
    let split = spawn(&dir, "split", 8, |a| {
        a.incoming = true;
        a.slots = 2;
    });
    let error = refusal(&split, json!({"cmd": "load_state", "state": state}));
    assert!(
        error.contains("RAM slots") && !error.contains("RAM size"),
        "{error}"
    );
    assert_eq!(split.state().unwrap(), "incoming");
    assert!(bigger.exit().unwrap().success());
    assert!(split.exit().unwrap().success());

    let dest = incoming_like(&dir, "dest", &source, 1);
    let blob = unhex(&state);
    let document = &blob[16..blob.len() - 32];
    let mut flipped = blob.clone();
    flipped[20] ^= 0x20;
    let mut other_magic = blob.clone();
    other_magic[..8].copy_from_slice(b"QEMUVMST");
    let tail = blob.len() - 1;
    for (bad, needle) in [
        ("not a state".to_string(), "hex"),
        (state[..40].to_string(), "truncated"),
        (state[..state.len() - 2].to_string(), "truncated"),
        (
            other_magic.iter().map(|b| format!("{b:02x}")).collect(),
            "not a pagefp-testvmm state",
        ),
        (reframe(2, document), "version 2 is not supported"),
        (
            flipped.iter().map(|b| format!("{b:02x}")).collect(),
            "checksum",
        ),
        (reframe(1, b"{\"vmm\":\"pagefp-testvmm\"}"), "malformed"),
        (
            format!("{}{:02x}", &state[..tail * 2], blob[tail] ^ 1),
            "checksum",
        ),
        // Well formed, but the memory was not copied: the code slot is empty.
        (state.clone(), "code slot"),
    ] {
        assert_refused(&dest, json!({"cmd": "load_state", "state": bad}), needle);
        assert_eq!(
            dest.state().unwrap(),
            "incoming",
            "a refused state changes nothing"
        );
    }
    assert_refused(&dest, json!({"cmd": "load_state"}), "state");

    // After all that, a real migration still works.
    copy_guest_memory(&source, &dest).unwrap();
    dest.load_state(&state).unwrap();
    assert_eq!(dest.checksums().unwrap(), source.checksums().unwrap());
    assert_refused(
        &dest,
        json!({"cmd": "load_state", "state": state}),
        "is for an incoming VM",
    );
    dest.resume().unwrap();
    dest.run(&[Op::Touch {
        first: 5,
        count: 1,
        value: 4,
    }])
    .unwrap();
    assert_eq!(
        dest.checksums_range(5, 2).unwrap(),
        [touched(4), touched(3)]
    );
}

#[test]
fn an_incoming_vmm_waits_for_its_state_and_exit_discards_it() {
    require_kvm!("an_incoming_vmm_waits_for_its_state_and_exit_discards_it");
    let dir = TempDir::new("pagefp-vmm-incoming");
    let vmm = spawn(&dir, "incoming", 4, |a| a.incoming = true);
    let info = vmm.info().unwrap();
    assert_eq!(
        (info.vm.state.as_str(), info.pages, info.loop_running),
        ("incoming", 1024, false)
    );
    assert_eq!(
        info.vm.memory.len(),
        2,
        "RAM and the code slot: {:?}",
        info.vm.memory
    );
    assert!(info.vm.memory.iter().all(|r| r.uaddr != 0));
    assert!(info.vm.memory[1].read_only && !info.vm.memory[0].read_only);
    // Everything it maps is zeroed, the code slot included.
    let code =
        pagefp_tests::vmm_client::map_region(info.vm.pid, &info.vm.memory[1], false).unwrap();
    assert!(code.bytes().iter().all(|b| *b == 0));
    drop(code);
    assert!(vmm.checksums().unwrap().iter().all(|h| *h == zero_hash()));
    for (request, needle) in [
        (
            json!({"cmd": "run", "ops": [{"op": "zero", "first": 0, "count": 1}]}),
            "load_state",
        ),
        (
            json!({"cmd": "start_loop", "ops": [{"op": "zero", "first": 0, "count": 1}]}),
            "load_state",
        ),
        (json!({"cmd": "pause"}), "load_state"),
        (json!({"cmd": "resume"}), "load_state"),
        (json!({"cmd": "save_state"}), "incoming"),
        (json!({"cmd": "harvest"}), "load_state"),
        (json!({"cmd": "reregister"}), "load_state"),
    ] {
        assert_refused(&vmm, request, needle);
    }
    let socket = vmm.socket().to_owned();
    assert!(vmm.exit().unwrap().success());
    assert!(!socket.exists(), "the socket file is removed");

    // An incoming VM takes its memory from the migration, not from an image.
    let output = Command::new(testvmm_binary())
        .args([
            "--socket",
            dir.0.join("never.sock").to_str().unwrap(),
            "--incoming",
            "--image",
            "/dev/null",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--image"));
}
