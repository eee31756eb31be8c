//! The test VMM itself, on the real /dev/kvm: every guest op writes exactly
//! what it should, dirty logging sees the writes, bad requests are refused.

use pagefp_tests::{
    agent_process::TempDir,
    fleet::{Vm, VmOptions},
    images::{FleetLayout, fleet_image, write_fleet},
    require_privileged,
    vmm::guest_code::{expected_random_page, random_pool},
    vmm_client::{VmmArgs, VmmProcess, testvmm_binary},
};
use serde_json::json;

fn hash(page: &[u8]) -> [u8; 32] {
    *blake3::hash(page).as_bytes()
}

#[test]
fn every_op_writes_exactly_its_pages() {
    require_privileged!("every_op_writes_exactly_its_pages");
    let dir = TempDir::new("pagefp-vmm-ops");
    let images = write_fleet(&dir.0, 1, 256, FleetLayout::default()).unwrap();
    let mut expected: Vec<Vec<u8>> = fleet_image(0, 256, FleetLayout::default())
        .chunks(4096)
        .map(<[u8]>::to_vec)
        .collect();
    let vm = Vm::start(&dir, &images[0], VmOptions::default());
    let pool = random_pool();

    let report = vm.run(json!([
        {"op": "random", "first": 10, "count": 5, "seed": 77},
        {"op": "copy", "src": 3, "first": 20, "count": 4},
        {"op": "zero", "first": 0, "count": 2},
        {"op": "touch", "first": 30, "count": 3, "value": 0xABCD},
        {"op": "stride", "first": 40, "count": 3, "step": 10, "value": 5}
    ]));
    assert_eq!(report["pages_written"], 5 + 4 + 2 + 3 + 3);
    for page in 10..15 {
        expected[page] = expected_random_page(&pool, page as u32, 77);
    }
    for page in 20..24 {
        expected[page] = expected[3].clone();
    }
    for page in 0..2 {
        expected[page] = vec![0; 4096];
    }
    for page in [30, 31, 32, 40, 50, 60] {
        let value: u32 = if page < 40 { 0xABCD } else { 5 };
        expected[page][8..12].copy_from_slice(&value.to_le_bytes());
    }
    let served = vm.checksums();
    for (page, content) in expected.iter().enumerate() {
        assert_eq!(served[page], hash(content), "page {page}");
    }
    // Random pages are distinct from each other.
    let distinct: std::collections::HashSet<_> = served[10..15].iter().collect();
    assert_eq!(distinct.len(), 5);
}

#[test]
fn dirty_logging_sees_every_written_page() {
    require_privileged!("dirty_logging_sees_every_written_page");
    let dir = TempDir::new("pagefp-vmm-dirty");
    let images = write_fleet(&dir.0, 1, 4096, FleetLayout::default()).unwrap();
    // A small ring: the VMM must harvest in the middle of the op.
    let ring = Vm::start(
        &dir,
        &images[0],
        VmOptions {
            ring_entries: 256,
            ..VmOptions::default()
        },
    );
    let report = ring.touch(0, 3000, 9);
    assert_eq!(
        report["harvested"], 3000,
        "one ring entry per touched page: {report}"
    );
    let bitmap = Vm::start(
        &dir,
        &images[0],
        VmOptions {
            dirty: "bitmap",
            manual_harvest: true,
            ..VmOptions::default()
        },
    );
    bitmap.touch(100, 50, 1);
    assert_eq!(bitmap.harvest()["harvested"], 50);
    assert_eq!(
        bitmap.harvest()["harvested"],
        0,
        "a harvest re-protects what it reported"
    );
    let none = Vm::start(
        &dir,
        &images[0],
        VmOptions {
            dirty: "none",
            ..VmOptions::default()
        },
    );
    assert_eq!(none.touch(0, 10, 1)["harvested"], 0);
}

#[test]
fn bad_requests_are_refused_and_the_vmm_keeps_serving() {
    require_privileged!("bad_requests_are_refused_and_the_vmm_keeps_serving");
    let dir = TempDir::new("pagefp-vmm-bad");
    let args = VmmArgs {
        socket: dir.0.join("vmm.sock"),
        mem_mib: 1,
        image: None,
        dirty: "ring".into(),
        ring_entries: 4096,
        harvest: "auto".into(),
        slots: 1,
    };
    let vmm = VmmProcess::spawn(&testvmm_binary(), &args).unwrap();
    for bad in [
        json!({"cmd": "fly"}),
        json!({"cmd": "run", "ops": [{"op": "touch", "first": 250, "count": 10, "value": 1}]}),
        json!({"cmd": "run", "ops": [{"op": "zero", "first": 0, "count": 0}]}),
        json!({"cmd": "run", "ops": [{"op": "copy", "src": 2, "first": 0, "count": 5}]}),
        json!({"cmd": "checksums", "first": 200, "count": 100}),
        json!({"cmd": "stop_loop"}),
        json!("not an object"),
    ] {
        let answer = vmm.request(&bad).unwrap();
        assert_eq!(answer["ok"], false, "{bad} was accepted");
        assert!(
            answer["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{bad}: {answer}"
        );
    }
    let info = vmm.request(&json!({"cmd": "info"})).unwrap();
    assert_eq!(info["pages"], 256);
    // An image larger than RAM is refused at start with a clear message.
    let big = dir.0.join("big.img");
    std::fs::write(&big, vec![1u8; 2 << 20]).unwrap();
    let refused = VmmProcess::spawn(
        &testvmm_binary(),
        &VmmArgs {
            image: Some(big),
            socket: dir.0.join("b.sock"),
            ..args
        },
    );
    assert!(refused.is_err());
}
