//! Live migration end to end: real KVM VMs (the test VMM), the real agent
//! with its eBPF tracking, `pagefp migrate send` and `receive` as processes
//! over TCP. Every migration is checked independently of pagefp's own
//! verification: the paused source's memory against the destination's.

use std::{io::Write, net::TcpStream, path::PathBuf, time::Duration};

use agent::{
    api::report::Mode,
    net::tls,
    transport::migration::{FrameWriter, Hello, Kind, PREAMBLE_MAGIC, Region},
};
use pagefp_tests::{
    agent_process::{AgentOptions, AgentProcess, TempDir, agent_binary, free_port},
    link_security::{self, LinkSecurity},
    migration::{self, Cut, CuttingRelay, Direction, Outcome, ReceiveSpec, SendSpec},
    privileged,
    synthetic_images::fleet_image_file,
    vmm_client::{Op, VmmArgs, VmmProcess, testvmm_binary},
};
use proptest::{prelude::*, test_runner::TestRunner};

const MEM_MIB: u32 = 32;
const PAGES: u32 = MEM_MIB * 256;

struct Setup {
    dir: TempDir,
    agent: AgentProcess,
}

fn setup(test: &str) -> Option<Setup> {
    if !privileged::check(test) {
        return None;
    }
    let dir = TempDir::new("pagefp-migration");
    // Room for bursts of events while sender, receiver and guests share two
    // cores with a debug-built agent.
    let options = AgentOptions {
        ring_buffer_bytes: Some(64 << 20),
        ..AgentOptions::default()
    };
    let agent = AgentProcess::start(&options).expect("starting the agent");
    Some(Setup { dir, agent })
}

fn image(dir: &TempDir, vm: usize) -> PathBuf {
    fleet_image_file(&dir.0, vm, PAGES as usize)
}

fn source_vm(setup: &Setup, vm: usize) -> VmmProcess {
    let mut args = VmmArgs::new(
        setup.dir.0.join(format!("src-{vm}-{}.sock", free_port())),
        MEM_MIB,
    );
    args.image = Some(image(&setup.dir, vm));
    let process = VmmProcess::spawn(&testvmm_binary(), &args).expect("starting the source VMM");
    setup
        .agent
        .wait_all_clean(process.pid(), Duration::from_secs(120));
    process
}

fn incoming_vm(setup: &Setup) -> VmmProcess {
    let mut args = VmmArgs::new(
        setup.dir.0.join(format!("dst-{}.sock", free_port())),
        MEM_MIB,
    );
    args.incoming = true;
    VmmProcess::spawn(&testvmm_binary(), &args).expect("starting the incoming VMM")
}

/// A catalog of the templates of fleet VM `vm` (started, exported, stopped).
fn catalog_of(setup: &Setup, vms: &[usize]) -> PathBuf {
    let running: Vec<VmmProcess> = vms.iter().map(|&vm| source_vm(setup, vm)).collect();
    let pids: Vec<u32> = running.iter().map(VmmProcess::pid).collect();
    let path = setup.dir.0.join(format!("catalog-{pids:?}.pftc"));
    setup
        .agent
        .export_templates(&path, &pids, &["--min-vms", "1"])
        .unwrap();
    for vm in running {
        vm.exit().unwrap();
    }
    path
}

fn send_spec(setup: &Setup, source: &VmmProcess, to: String, mode: Mode) -> SendSpec {
    SendSpec {
        keep_source: true,
        ..SendSpec::new(source.pid(), source.socket(), to, mode, &setup.agent.socket)
    }
}

fn receive_spec(
    setup: &Setup,
    dest: &VmmProcess,
    listen: String,
    catalogs: Vec<PathBuf>,
) -> ReceiveSpec {
    ReceiveSpec {
        listen,
        vmm_socket: dest.socket().to_path_buf(),
        catalogs,
        agent_socket: Some(setup.agent.socket.clone()),
        no_resume: true,
        timeout_s: 60,
        ..ReceiveSpec::default()
    }
}

fn state_of(vmm: &VmmProcess) -> String {
    vmm.request(&serde_json::json!({"cmd": "info"})).unwrap()["state"]
        .as_str()
        .unwrap_or("?")
        .to_string()
}

/// Migrates `source` into a fresh incoming VMM, both left paused; checks
/// the memory is identical; returns the sender's report and the destination.
fn migrate_checked(
    setup: &Setup,
    source: &VmmProcess,
    mode: Mode,
    catalogs: Vec<PathBuf>,
) -> (agent::api::report::MigrationReport, VmmProcess) {
    migrate_checked_with(setup, source, mode, catalogs, None)
}

/// [`migrate_checked`] with `threads` encoding threads at the sender.
fn migrate_checked_with(
    setup: &Setup,
    source: &VmmProcess,
    mode: Mode,
    catalogs: Vec<PathBuf>,
    threads: Option<usize>,
) -> (agent::api::report::MigrationReport, VmmProcess) {
    let dest = incoming_vm(setup);
    let listen = format!("127.0.0.1:{}", free_port());
    let receiver =
        migration::start_receiver(&receive_spec(setup, &dest, listen.clone(), catalogs), None)
            .unwrap();
    let spec = SendSpec {
        threads,
        ..send_spec(setup, source, listen, mode)
    };
    let sent = migration::send(&spec, None).unwrap();
    let received = receiver.finish(Duration::from_secs(60));
    assert!(sent.success, "sender failed:\n{}", sent.stderr);
    assert!(received.success, "receiver failed:\n{}", received.stderr);
    let report = sent.report().clone();
    assert!(
        report.verified && received.report().verified,
        "not verified: {report:?}"
    );
    assert_eq!(
        state_of(source),
        "paused",
        "--keep-source leaves the source paused"
    );
    assert_eq!(
        state_of(&dest),
        "paused",
        "--no-resume leaves the destination paused"
    );
    let diff = differing(&source.checksums().unwrap(), &dest.checksums().unwrap());
    assert!(
        diff.is_empty(),
        "{} pages differ, first {:?}",
        diff.len(),
        &diff[..diff.len().min(8)]
    );
    (report, dest)
}

/// A workload that keeps changing `count` pages (two values in turn) and a
/// few pages of random content, an iteration every 2 ms at most. (Under this
/// host's instruction emulator every written dword is a dirty-ring push:
/// whole-page random writes cost 1026 eBPF events a page, so they are few.)
fn hot_loop(first: u32, count: u32, seed: u32) -> Vec<Op> {
    vec![
        Op::Touch {
            first,
            count,
            value: seed,
        },
        Op::Stride {
            first,
            count: count / 2,
            step: 2,
            value: seed ^ 0xFFFF,
        },
        Op::Random {
            first: first + count,
            count: 2,
            seed,
        },
    ]
}

fn start_hot_loop(vmm: &VmmProcess, first: u32, count: u32, seed: u32) {
    vmm.start_loop_every(&hot_loop(first, count, seed), 2)
        .unwrap();
}

/// Resumes `vmm` (if paused) and checks its loop goes on.
fn assert_keeps_writing(vmm: &VmmProcess, what: &str) {
    let iterations = |v: &VmmProcess| {
        v.request(&serde_json::json!({"cmd": "info"})).unwrap()["loop_iterations"]
            .as_u64()
            .unwrap()
    };
    if state_of(vmm) == "paused" {
        vmm.resume().unwrap();
    }
    let before = iterations(vmm);
    std::thread::sleep(Duration::from_millis(500));
    let after = iterations(vmm);
    assert!(
        after > before,
        "{what} keeps running its workload ({before} -> {after} iterations)"
    );
}

/// Page indexes where two checksum lists differ (the lists are not printed: too long).
fn differing(a: &[String], b: &[String]) -> Vec<usize> {
    assert_eq!(a.len(), b.len(), "memory sizes differ");
    (0..a.len()).filter(|&i| a[i] != b[i]).collect()
}

#[test]
fn every_mode_migrates_a_running_guest_byte_identical() {
    let Some(setup) = setup("every_mode_migrates_a_running_guest_byte_identical") else {
        return;
    };
    let catalog = catalog_of(&setup, &[2, 4]);
    let mut bytes = Vec::new();
    for mode in [Mode::Baseline, Mode::Templates, Mode::TemplatesZstd] {
        let source = source_vm(&setup, 0);
        start_hot_loop(&source, PAGES / 2, 128, 11);
        let (report, dest) = migrate_checked(&setup, &source, mode, vec![catalog.clone()]);
        println!(
            "{mode}: {} bytes, {} rounds, pages zero {} template {} full {} zstd {}, downtime {:?} ms",
            report.wire_bytes,
            report.round,
            report.pages.zero,
            report.pages.template,
            report.pages.full,
            report.pages.zstd,
            report.downtime_ms
        );
        assert!(report.round >= 2, "a pre-copy round and the final round");
        match mode {
            Mode::Baseline => assert_eq!(report.pages.template + report.pages.zstd, 0),
            Mode::Templates => {
                assert!(
                    report.pages.template > 0,
                    "the shared OS pages travel as templates"
                );
                assert_eq!(report.pages.zstd, 0);
            }
            Mode::TemplatesZstd => {
                // --zstd auto (the default) compresses at least its samples
                // and says what it chose.
                assert!(report.pages.zstd > 0 && report.pages.template > 0);
                let chosen = report.compression.as_deref().unwrap_or_default();
                assert!(chosen.starts_with("Auto: "), "{chosen}");
            }
        }
        // The destination runs the guest on: its loop continues.
        assert_keeps_writing(&dest, "the migrated guest");
        assert!(dest.stop_loop().unwrap().iterations > 0);
        bytes.push(report.wire_bytes);
        source.exit().unwrap();
        dest.exit().unwrap();
    }
    // Which mode sends fewer bytes is the benchmark's business (figures from
    // one run side by side); here only that every mode uses its encodings.
    println!("wire bytes by mode: {bytes:?}");
}

/// The agent watches both ends of migrations: a source that exits after
/// success, a kept source and its destination stopped afterwards. Once they
/// are gone, the agent maps none of their RAM.
#[test]
fn migrated_vms_leave_no_mapping_behind_in_the_agent() {
    let Some(setup) = setup("migrated_vms_leave_no_mapping_behind_in_the_agent") else {
        return;
    };
    let mut pids = Vec::new();
    for keep_source in [false, true] {
        let mut source = source_vm(&setup, 3);
        start_hot_loop(&source, 100, 64, 5);
        let dest = incoming_vm(&setup);
        pids.extend([source.pid(), dest.pid()]);
        let listen = format!("127.0.0.1:{}", free_port());
        let mut spec = receive_spec(&setup, &dest, listen.clone(), vec![]);
        spec.no_resume = keep_source;
        let receiver = migration::start_receiver(&spec, None).unwrap();
        let mut send = send_spec(&setup, &source, listen, Mode::Templates);
        send.keep_source = keep_source;
        let sent = migration::send(&send, None).unwrap();
        assert!(sent.success, "{}", sent.stderr);
        assert!(receiver.finish(Duration::from_secs(30)).success);
        // The destination is a VM like any other: tracked, then hashed.
        setup
            .agent
            .wait_vm(dest.pid(), Duration::from_secs(60), "listed", |v| {
                v["pages"].as_u64() > Some(0)
            });
        if keep_source {
            source.exit().unwrap();
        } else {
            source
                .wait_exit(Duration::from_secs(10))
                .expect("the source VMM exits after success");
        }
        dest.exit().unwrap();
    }
    setup.agent.wait_released(&pids, Duration::from_secs(60));
}

#[test]
fn the_source_exits_only_after_success() {
    let Some(setup) = setup("the_source_exits_only_after_success") else {
        return;
    };
    let mut source = source_vm(&setup, 1);
    start_hot_loop(&source, 100, 64, 3);
    let dest = incoming_vm(&setup);
    let listen = format!("127.0.0.1:{}", free_port());
    let mut spec = receive_spec(&setup, &dest, listen.clone(), vec![]);
    spec.no_resume = false;
    let receiver = migration::start_receiver(&spec, None).unwrap();
    let mut send = send_spec(&setup, &source, listen, Mode::Templates);
    send.keep_source = false;
    let sent = migration::send(&send, None).unwrap();
    assert!(sent.success, "{}", sent.stderr);
    assert!(receiver.finish(Duration::from_secs(30)).success);
    let status = source
        .wait_exit(Duration::from_secs(10))
        .expect("the source VMM exits after success");
    assert!(status.success());
    assert_eq!(state_of(&dest), "running");
}

/// Property: whatever the guest writes while it migrates, the destination
/// ends byte-identical (checked by the test, not only by pagefp).
#[test]
fn concurrent_random_writes_end_byte_identical() {
    let Some(setup) = setup("concurrent_random_writes_end_byte_identical") else {
        return;
    };
    // Whole-page ops (random, copy, zero) stay small: see hot_loop.
    let op =
        (0u32..5, 0..PAGES - 600, 1u32..400, any::<u32>()).prop_map(|(kind, first, count, x)| {
            match kind {
                0 => Op::Random {
                    first,
                    count: count % 8 + 1,
                    seed: x,
                },
                1 => Op::Copy {
                    src: first + 20,
                    first,
                    count: count % 16 + 1,
                },
                2 => Op::Zero {
                    first,
                    count: count % 16 + 1,
                },
                3 => Op::Touch {
                    first,
                    count,
                    value: x,
                },
                _ => Op::Stride {
                    first,
                    count: count.min(150),
                    step: 3,
                    value: x,
                },
            }
        });
    let workload = proptest::collection::vec(op, 1..4);
    let modes = prop_oneof![
        Just(Mode::Baseline),
        Just(Mode::Templates),
        Just(Mode::TemplatesZstd)
    ];
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 4,
        ..ProptestConfig::default()
    });
    // One to four encoding threads: batches are encoded out of order and
    // must still be written (and held) as the pages were read.
    let threads = 1usize..=4;
    let catalog = catalog_of(&setup, &[3]);
    runner
        .run(&(workload, modes, threads), |(ops, mode, threads)| {
            let source = source_vm(&setup, 0);
            source.start_loop_every(&ops, 2).unwrap();
            let (_, dest) =
                migrate_checked_with(&setup, &source, mode, vec![catalog.clone()], Some(threads));
            source.exit().unwrap();
            dest.exit().unwrap();
            Ok(())
        })
        .unwrap();
}

/// Stray connections, then the genuine source: the receiver drops each
/// stray with a warning that contains the matching `expected` text, leaves
/// the incoming VMM untouched, and takes the migration.
fn strays_then_the_source(setup: &Setup, security: LinkSecurity, expected: &[&str]) {
    let source = source_vm(setup, 0);
    start_hot_loop(&source, 200, 64, 5);
    let dest = incoming_vm(setup);
    let listen = format!("127.0.0.1:{}", free_port());
    let mut resume = receive_spec(setup, &dest, listen.clone(), vec![]);
    resume.no_resume = false;
    resume.security = security.clone();
    let receiver = migration::start_receiver(&resume, None).unwrap();
    let mut future = PREAMBLE_MAGIC.to_vec();
    future.extend_from_slice(&9u32.to_le_bytes());
    for bytes in [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        future,
        vec![0; 3],
    ] {
        let mut stray = TcpStream::connect(&listen).unwrap();
        let _ = stray.write_all(&bytes);
        let _ = stray.shutdown(std::net::Shutdown::Write);
        // Its answer (an abort, then the close) shows it was dealt with.
        let mut answer = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stray, &mut answer);
    }
    if security.is_tls() {
        // Real senders with certificates the receiver must refuse: from
        // another CA, and expired. Each fails before the source is paused.
        let ca = link_security::test_pki();
        for (name, days, ca_dir, refusal) in [
            // The sender checks the receiver first: not its CA.
            ("other-ca", 30, None, "not signed by the CA"),
            // The receiver's CA, but expired: the receiver refuses it.
            (
                "expired",
                -2,
                Some(ca),
                "the peer refused this end's certificate",
            ),
        ] {
            let dir = setup.dir.0.join(name);
            link_security::make_pki(&dir, days, ca_dir);
            let mut spec = send_spec(setup, &source, listen.clone(), Mode::Templates);
            spec.security = LinkSecurity::Tls(dir);
            let sent = migration::send(&spec, None).unwrap();
            assert!(!sent.success, "{name}: {}", sent.stderr);
            assert!(sent.stderr.contains(refusal), "{name}: {}", sent.stderr);
            assert!(
                sent.stderr.contains("the source VM keeps running"),
                "{name}: {}",
                sent.stderr
            );
            assert_eq!(state_of(&source), "running", "{name}");
        }
    }
    assert_eq!(state_of(&dest), "incoming", "the incoming VMM is untouched");
    let mut spec = send_spec(setup, &source, listen, Mode::Templates);
    spec.keep_source = false;
    spec.security = security.clone();
    let sent = migration::send(&spec, None).unwrap();
    let received = receiver.finish(Duration::from_secs(60));
    assert!(sent.success, "{}", sent.stderr);
    assert!(received.success, "{}", received.stderr);
    assert_eq!(received.report().tls, security.is_tls());
    assert_eq!(sent.report().tls, security.is_tls());
    for expected in expected {
        assert!(
            received.stderr.contains(expected),
            "{expected:?} in:\n{}",
            received.stderr
        );
    }
    assert_eq!(state_of(&dest), "running");
    dest.exit().unwrap();
}

#[test]
fn stray_connections_are_ignored_and_the_migration_still_arrives() {
    let Some(setup) = setup("stray_connections_are_ignored_and_the_migration_still_arrives") else {
        return;
    };
    // TLS (the default): nothing but a certificate from the CA gets in.
    strays_then_the_source(
        &setup,
        LinkSecurity::default(),
        &[
            "refused a connection from",
            "speaks plain TCP, but this end requires TLS",
            "TLS handshake failed",
            "has expired",
        ],
    );
    // Plaintext: the protocol's own preamble check turns strays away.
    strays_then_the_source(
        &setup,
        LinkSecurity::Plaintext,
        &[
            "ignoring a connection from",
            "not a pagefp migration stream",
            "version 9 is not supported",
            "the peer closed it",
            "INSECURE plain TCP",
        ],
    );
}

/// Sends `bytes` to a receiver and checks that it refuses them with
/// `expected` and discards its incoming VMM; what it answered, as text.
fn expect_refused(setup: &Setup, bytes: Vec<u8>, expected: &str) -> String {
    let dest = incoming_vm(setup);
    let mut dest = dest;
    let listen = format!("127.0.0.1:{}", free_port());
    // Bytes straight onto the protocol: what a peer that authenticated
    // (or a plaintext one) could send.
    let mut spec = receive_spec(setup, &dest, listen.clone(), vec![]);
    spec.security = LinkSecurity::Plaintext;
    // Bounded memory: the receiver runs with at most 1 GiB of address
    // space (the zstd bomb below would need more), and must still refuse
    // with its own message rather than die.
    let mut limited = std::process::Command::new("prlimit");
    limited.args(["--as=1073741824", "--"]);
    let receiver = migration::start_receiver(&spec, Some(limited)).unwrap();
    let mut stream = TcpStream::connect(&listen).unwrap();
    let _ = stream.write_all(&bytes);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let _ = std::io::Read::read_to_end(&mut stream, &mut answer);
    let outcome = receiver.finish(Duration::from_secs(30));
    assert!(!outcome.success, "a malformed stream was accepted");
    assert!(
        outcome.stderr.contains(expected),
        "expected {expected:?} in:\n{}",
        outcome.stderr
    );
    assert!(outcome.stderr.contains("discarded"), "{}", outcome.stderr);
    assert!(
        dest.wait_exit(Duration::from_secs(10)).is_some(),
        "the incoming VMM is discarded"
    );
    String::from_utf8_lossy(&answer).into_owned()
}

fn hello_stream(regions: Vec<Region>, tail: impl FnOnce(&mut FrameWriter<Vec<u8>>)) -> Vec<u8> {
    let mut writer = FrameWriter::new(Vec::new());
    writer.preamble().unwrap();
    writer
        .json(
            Kind::Hello,
            &Hello {
                id: "test".into(),
                mode: Mode::Baseline,
                page_size: 4096,
                regions,
                source: "test".into(),
                digest_chunk_pages: 1024,
                digest_seed: 1,
                query_hashes: 0,
            },
        )
        .unwrap();
    tail(&mut writer);
    writer.get_mut().clone()
}

fn regions_of(mem_mib: u32) -> Vec<Region> {
    vec![
        Region {
            slot: 0,
            gpa: 0,
            size: u64::from(mem_mib) << 20,
            read_only: false,
        },
        // The test VMM's read-only code slot is guest memory too.
        Region {
            slot: 100,
            gpa: 0xE000_0000,
            size: 4 << 20,
            read_only: true,
        },
    ]
}

#[test]
fn malformed_or_incompatible_streams_are_refused() {
    let Some(setup) = setup("malformed_or_incompatible_streams_are_refused") else {
        return;
    };
    let answer = expect_refused(
        &setup,
        hello_stream(regions_of(MEM_MIB * 2), |_| {}),
        "memory layouts differ",
    );
    // The peer is told why, but not the incoming VMM's memory map.
    assert!(answer.contains("memory layouts differ"), "{answer}");
    assert!(!answer.contains("0x"), "{answer}");
    // Sizes whose page total overflows: refused as a layout, no panic.
    let mut huge = regions_of(MEM_MIB);
    for region in &mut huge {
        region.size = u64::MAX - 4095;
    }
    expect_refused(&setup, hello_stream(huge, |_| {}), "memory layouts differ");
    // A page record with a corrupted byte: the checksum catches it.
    let mut corrupt = hello_stream(regions_of(MEM_MIB), |w| {
        let mut page = vec![0u8; 4101];
        page[0] = 3;
        w.frame(Kind::Pages, 0, &page).unwrap();
    });
    let at = corrupt.len() - 100;
    corrupt[at] ^= 1;
    expect_refused(&setup, corrupt, "checksum mismatch");
    // A well-formed page beyond guest memory.
    let beyond = hello_stream(regions_of(MEM_MIB), |w| {
        let mut record = vec![3u8];
        record.extend_from_slice(&(PAGES + 5000).to_le_bytes());
        record.extend_from_slice(&[0u8; 4096]);
        w.frame(Kind::Pages, 0, &record).unwrap();
    });
    expect_refused(&setup, beyond, "beyond");
    // A template reference in a baseline stream.
    let template = hello_stream(regions_of(MEM_MIB), |w| {
        let mut record = vec![2u8];
        record.extend_from_slice(&1u32.to_le_bytes());
        record.extend_from_slice(&0u32.to_le_bytes());
        w.frame(Kind::Pages, 0, &record).unwrap();
    });
    expect_refused(&setup, template, "was not offered");
    // Truncated in the middle of a message.
    let mut truncated = hello_stream(regions_of(MEM_MIB), |w| {
        w.frame(Kind::Pages, 0, &[1, 0, 0, 0, 0, 1, 0, 0, 0])
            .unwrap();
    });
    truncated.truncate(truncated.len() - 3);
    expect_refused(&setup, truncated, "connection failed");
    // A zstd bomb: 1 GiB of zeros in a Pages frame of about 40 KiB.
    let bomb = hello_stream(regions_of(MEM_MIB), |w| {
        let zeros = vec![0u8; 64 << 20];
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 19).unwrap();
        for _ in 0..16 {
            std::io::Write::write_all(&mut encoder, &zeros).unwrap();
        }
        w.frame(
            Kind::Pages,
            agent::transport::migration::FLAG_ZSTD,
            &encoder.finish().unwrap(),
        )
        .unwrap();
    });
    expect_refused(&setup, bomb, "more than the maximum message size");
}

/// Loses the connection at one point; the destination is discarded, the
/// source keeps running (or, once "go" was sent, stays paused). The relay
/// cuts at message boundaries, so it must see them: these runs are
/// plaintext (over TLS a cut is the same cut, only invisible to a relay).
fn lose_connection(setup: &Setup, direction: Direction, cut: Cut, phase: &str) {
    let source = source_vm(setup, 0);
    start_hot_loop(&source, 200, 64, 5);
    let mut dest = incoming_vm(setup);
    let listen = format!("127.0.0.1:{}", free_port());
    let mut receive = receive_spec(setup, &dest, listen.clone(), vec![]);
    receive.security = LinkSecurity::Plaintext;
    let receiver = migration::start_receiver(&receive, None).unwrap();
    let relay = CuttingRelay::start(listen, direction, cut).unwrap();
    let mut send = send_spec(setup, &source, relay.listen.clone(), Mode::Templates);
    send.security = LinkSecurity::Plaintext;
    let sent = migration::send(&send, None).unwrap();
    if matches!(direction, Direction::SourceToDest)
        && matches!(cut, Cut::AfterBytes(n) if n < agent::transport::PREAMBLE_LEN as u64)
    {
        // Cut inside the preamble: to the receiver, a stray connection. It
        // drops it and waits on for a source, the incoming VMM untouched.
        relay.join();
        assert!(!sent.success, "{phase}: {}", sent.stderr);
        assert!(
            sent.stderr.contains("the source VM keeps running"),
            "{phase}"
        );
        assert_eq!(state_of(&source), "running", "{phase}");
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            state_of(&dest),
            "incoming",
            "{phase}: the destination waits"
        );
        let received = receiver.finish(Duration::from_millis(100));
        assert!(
            received.stderr.contains("ignoring a connection from"),
            "{phase}"
        );
        dest.exit().unwrap();
        source.exit().unwrap();
        return;
    }
    let received = receiver.finish(Duration::from_secs(30));
    relay.join();
    assert!(
        !sent.success,
        "{phase}: the sender reported success over a cut connection"
    );
    assert!(!received.success, "{phase}: the receiver reported success");
    if matches!(cut, Cut::BeforeKind(Kind::Go)) {
        // The source sent "go" and cannot know it was lost: it must not run
        // (the destination might), so it stays paused for the operator.
        assert!(
            sent.stderr.contains("stays paused"),
            "{phase}:\n{}",
            sent.stderr
        );
        assert_eq!(state_of(&source), "paused", "{phase}");
        source.resume().unwrap();
    } else {
        assert!(
            sent.stderr.contains("the source VM keeps running"),
            "{phase}:\n{}",
            sent.stderr
        );
        assert_eq!(state_of(&source), "running", "{phase}: the source runs on");
    }
    assert_keeps_writing(&source, phase);
    assert!(
        dest.wait_exit(Duration::from_secs(10)).is_some(),
        "{phase}: the destination is discarded"
    );
    source.exit().unwrap();
}

#[test]
fn a_lost_connection_at_any_phase_leaves_the_source_running() {
    let Some(setup) = setup("a_lost_connection_at_any_phase_leaves_the_source_running") else {
        return;
    };
    use Direction::*;
    lose_connection(&setup, SourceToDest, Cut::AfterBytes(5), "preamble");
    lose_connection(&setup, SourceToDest, Cut::AfterBytes(40), "hello");
    lose_connection(&setup, DestToSource, Cut::AfterBytes(6), "offer");
    lose_connection(
        &setup,
        SourceToDest,
        Cut::AfterBytes(3 << 20),
        "first round",
    );
    lose_connection(
        &setup,
        DestToSource,
        Cut::BeforeKind(Kind::RoundAck),
        "round acknowledgement",
    );
    lose_connection(
        &setup,
        SourceToDest,
        Cut::BeforeKind(Kind::State),
        "final round",
    );
    lose_connection(
        &setup,
        SourceToDest,
        Cut::BeforeKind(Kind::Verify),
        "digest",
    );
    // The destination verified and loaded the state; its "ready" is lost.
    lose_connection(&setup, DestToSource, Cut::BeforeKind(Kind::Ready), "ready");
    // "go" is lost: the destination never resumes; the source stays paused
    // (it cannot tell this from a lost "resumed") until the operator acts.
    lose_connection(&setup, SourceToDest, Cut::BeforeKind(Kind::Go), "go");
}

/// Migrates through a relay that cuts after "go" (`direction`, `cut`): the
/// source cannot know the outcome. Checks that exactly one VM runs, the
/// destination's, ends both VMMs and returns the receiver's outcome.
fn lose_the_end_after_go(setup: &Setup, direction: Direction, cut: Cut) -> Outcome {
    let source = source_vm(setup, 0);
    start_hot_loop(&source, 200, 64, 5);
    let dest = incoming_vm(setup);
    let listen = format!("127.0.0.1:{}", free_port());
    let mut spec = receive_spec(setup, &dest, listen.clone(), vec![]);
    spec.no_resume = false;
    // Plaintext: the relay cuts at message boundaries (see lose_connection).
    spec.security = LinkSecurity::Plaintext;
    let receiver = migration::start_receiver(&spec, None).unwrap();
    let relay = CuttingRelay::start(listen, direction, cut).unwrap();
    let mut send = send_spec(setup, &source, relay.listen.clone(), Mode::Templates);
    send.keep_source = false;
    send.security = LinkSecurity::Plaintext;
    let sent = migration::send(&send, None).unwrap();
    let received = receiver.finish(Duration::from_secs(30));
    relay.join();
    assert!(!sent.success);
    assert!(sent.stderr.contains("stays paused"), "{}", sent.stderr);
    assert_eq!(state_of(&source), "paused", "never running on both hosts");
    assert_eq!(state_of(&dest), "running", "never running nowhere");
    assert_keeps_writing(&dest, "the destination");
    source.exit().unwrap();
    dest.exit().unwrap();
    received
}

#[test]
fn losing_the_final_acknowledgement_leaves_the_source_paused_never_running_twice() {
    let Some(setup) =
        setup("losing_the_final_acknowledgement_leaves_the_source_paused_never_running_twice")
    else {
        return;
    };
    // "go" reaches the destination, which resumes; its "resumed" is lost,
    // so the source cannot know.
    let received = lose_the_end_after_go(
        &setup,
        Direction::DestToSource,
        Cut::BeforeKind(Kind::Resumed),
    );
    assert!(
        received.success,
        "the destination resumed:\n{}",
        received.stderr
    );
}

#[test]
fn a_destination_that_got_go_keeps_the_vm_when_it_cannot_answer() {
    let Some(setup) = setup("a_destination_that_got_go_keeps_the_vm_when_it_cannot_answer") else {
        return;
    };
    // "go" reaches the destination, then its connection is reset: its
    // "resumed" cannot be written.
    let received = lose_the_end_after_go(
        &setup,
        Direction::SourceToDest,
        Cut::ResetAfterKind(Kind::Go),
    );
    // What must hold whatever the timing was checked above: the source
    // paused, the destination running. Whether the destination saw its
    // answer fail depends on whether the reset reached it before it wrote
    // "resumed": the relay forwards "go" and resets in two steps, and on a
    // loaded machine the destination can answer in between (its write then
    // succeeds into the socket buffer, and it cannot know better).
    if received.success {
        eprintln!(
            "the destination answered before the reset reached it; the invariants held:\n{}",
            received.stderr
        );
        return;
    }
    assert!(
        received.stderr.contains("owns the VM now and keeps it"),
        "{}",
        received.stderr
    );
}

#[test]
fn a_forged_destination_cannot_make_the_source_end_its_vm() {
    let Some(setup) = setup("a_forged_destination_cannot_make_the_source_end_its_vm") else {
        return;
    };
    let source = source_vm(&setup, 0);
    start_hot_loop(&source, 200, 64, 5);
    // Someone on the path poses as the destination without its certificate
    // and answers everything at once: an empty offer, "verified", "resumed".
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let to = listener.local_addr().unwrap().to_string();
    let forger = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut writer = FrameWriter::new(stream.try_clone().unwrap());
        let _ = writer.frame(
            Kind::Offer,
            0,
            &agent::transport::migration::encode_offer(&[]),
        );
        let _ = writer.json(
            Kind::Ready,
            &agent::transport::migration::Ready {
                verified: true,
                mismatched_chunks: vec![],
            },
        );
        let _ = writer.flush();
        std::thread::sleep(Duration::from_secs(2));
        drop(stream);
    });
    let mut spec = send_spec(&setup, &source, to, Mode::Templates);
    spec.keep_source = false;
    let sent = migration::send(&spec, None).unwrap();
    forger.join().unwrap();
    assert!(!sent.success, "{}", sent.stderr);
    assert!(sent.stderr.contains("TLS"), "{}", sent.stderr);
    assert!(
        sent.stderr.contains("the source VM keeps running"),
        "{}",
        sent.stderr
    );
    assert_eq!(state_of(&source), "running");
    assert_keeps_writing(&source, "the source");
    source.exit().unwrap();
}

#[test]
fn a_destination_that_stops_reading_fails_the_migration_within_the_timeout() {
    let Some(setup) =
        setup("a_destination_that_stops_reading_fails_the_migration_within_the_timeout")
    else {
        return;
    };
    let source = source_vm(&setup, 0);
    start_hot_loop(&source, 200, 64, 5);
    // A destination (with a genuine certificate) that answers the hello
    // with an empty offer, then reads nothing more: a hung receiver.
    let server =
        tls::Server::from_options(&tls::ListenSecurity::tls(link_security::test_pki())).unwrap();
    let listener = agent::net::SecureListener::bind("127.0.0.1:0", server).unwrap();
    let to = listener.local_addr().unwrap().to_string();
    let stalled = std::thread::spawn(move || {
        let channel = listener.accept(None, "the sender").unwrap();
        let (reader, writer) = channel.split(None);
        let mut writer = FrameWriter::new(writer);
        writer
            .frame(
                Kind::Offer,
                0,
                &agent::transport::migration::encode_offer(&[]),
            )
            .unwrap();
        writer.flush().unwrap();
        std::thread::sleep(Duration::from_secs(40));
        drop((reader, writer));
    });
    let mut spec = send_spec(&setup, &source, to, Mode::Baseline);
    spec.io_timeout_s = Some(3);
    let started = std::time::Instant::now();
    let sent = migration::send(&spec, None).unwrap();
    let took = started.elapsed();
    assert!(!sent.success, "{}", sent.stderr);
    assert!(
        sent.stderr.contains("the source VM keeps running"),
        "{}",
        sent.stderr
    );
    assert!(
        sent.stderr
            .contains("took nothing this side wrote for longer than the I/O timeout"),
        "{}",
        sent.stderr
    );
    assert!(
        took < Duration::from_secs(30),
        "the sender waited {took:?} for a stalled destination"
    );
    assert_eq!(state_of(&source), "running");
    assert_keeps_writing(&source, "the source");
    source.exit().unwrap();
    drop(stalled);
}

#[test]
fn an_interrupted_sender_resumes_the_source() {
    let Some(setup) = setup("an_interrupted_sender_resumes_the_source") else {
        return;
    };
    for (signal, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGHUP, "SIGHUP")] {
        let source = source_vm(&setup, 0);
        start_hot_loop(&source, 200, 64, 5);
        let dest = incoming_vm(&setup);
        let listen = format!("127.0.0.1:{}", free_port());
        let receiver =
            migration::start_receiver(&receive_spec(&setup, &dest, listen.clone(), vec![]), None)
                .unwrap();
        // Slow enough that the signal lands in the middle of pre-copy.
        let mut spec = send_spec(&setup, &source, listen, Mode::Baseline);
        spec.max_bandwidth = Some("20Mbit".into());
        let child = migration::send_command(&spec, None)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_secs(2));
        // SAFETY: kill(2) on the pid of a child this test spawned.
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
        let sent = migration::outcome(&child.wait_with_output().unwrap());
        let received = receiver.finish(Duration::from_secs(30));
        assert!(!sent.success, "{name}: {}", sent.stderr);
        assert!(
            sent.stderr.contains(&format!("interrupted by {name}"))
                && sent.stderr.contains("the source VM keeps running"),
            "{name}: {}",
            sent.stderr
        );
        assert!(!received.success, "{name}: {}", received.stderr);
        assert_eq!(state_of(&source), "running", "{name}");
        assert_keeps_writing(&source, name);
        source.exit().unwrap();
        let mut dest = dest;
        assert!(
            dest.wait_exit(Duration::from_secs(10)).is_some(),
            "{name}: discarded"
        );
    }
}

#[test]
fn catalogs_export_import_and_serve_templates() {
    let Some(setup) = setup("catalogs_export_import_and_serve_templates") else {
        return;
    };
    let catalog = catalog_of(&setup, &[2, 4]);
    let install = setup.dir.0.join("installed");
    let output = std::process::Command::new(agent_binary())
        .args(["templates", "import"])
        .arg(&catalog)
        .arg("--dir")
        .arg(&install)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(std::fs::read_dir(&install).unwrap().count(), 1);
    // A corrupted catalog is refused with a clear message.
    let mut bytes = std::fs::read(&catalog).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0xFF;
    let bad = setup.dir.0.join("bad.pftc");
    std::fs::write(&bad, bytes).unwrap();
    let output = std::process::Command::new(agent_binary())
        .args(["templates", "import"])
        .arg(&bad)
        .arg("--dir")
        .arg(&install)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("corrupt"));
}

/// A real Linux guest (image built under QEMU) migrates with templates
/// exported from two other guests of the same OS.
#[test]
fn a_linux_guest_migrates_with_templates_from_other_guests() {
    let Some(setup) = setup("a_linux_guest_migrates_with_templates_from_other_guests") else {
        return;
    };
    if which::which("qemu-system-x86_64").is_err() {
        assert!(
            !privileged::required(),
            "QEMU is missing: run `cargo xtask setup`"
        );
        return;
    }
    let images = pagefp_tests::guest_images::ensure_images().expect("building the guest images");
    let image = |w: &str| images.iter().find(|i| i.workload == w).unwrap();
    let start = |image: &pagefp_tests::guest_images::GuestImage| {
        let mut args = VmmArgs::new(
            setup
                .dir
                .0
                .join(format!("{}-{}.sock", image.name, free_port())),
            image.mem_mib,
        );
        args.image = Some(image.ram_path.clone());
        let vmm = VmmProcess::spawn(&testvmm_binary(), &args).unwrap();
        setup
            .agent
            .wait_all_clean(vmm.pid(), Duration::from_secs(300));
        vmm
    };
    let others = [start(image("idle")), start(image("find"))];
    let pids: Vec<u32> = others.iter().map(VmmProcess::pid).collect();
    let catalog = setup.dir.0.join("linux.pftc");
    setup.agent.export_templates(&catalog, &pids, &[]).unwrap();
    for vm in others {
        vm.exit().unwrap();
    }
    let httpd = image("httpd");
    let source = start(httpd);
    start_hot_loop(&source, 30_000, 64, 9);
    let mut args = VmmArgs::new(
        setup.dir.0.join(format!("dst-{}.sock", free_port())),
        httpd.mem_mib,
    );
    args.incoming = true;
    let dest = VmmProcess::spawn(&testvmm_binary(), &args).unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let receiver = migration::start_receiver(
        &receive_spec(&setup, &dest, listen.clone(), vec![catalog]),
        None,
    )
    .unwrap();
    let sent = migration::send(&send_spec(&setup, &source, listen, Mode::Templates), None).unwrap();
    let received = receiver.finish(Duration::from_secs(120));
    assert!(sent.success, "{}", sent.stderr);
    assert!(received.success, "{}", received.stderr);
    let report = sent.report();
    println!(
        "{}: {} bytes, pages zero {} template {} full {}",
        httpd.name, report.wire_bytes, report.pages.zero, report.pages.template, report.pages.full
    );
    assert!(report.verified);
    assert!(
        report.pages.template > 5_000,
        "the shared OS pages travel as templates"
    );
    let diff = differing(&source.checksums().unwrap(), &dest.checksums().unwrap());
    assert!(diff.is_empty(), "{} pages differ", diff.len());
    assert_keeps_writing(&dest, "the migrated Linux guest's workload");
    source.exit().unwrap();
    dest.exit().unwrap();
}
