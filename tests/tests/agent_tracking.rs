//! The agent on real KVM VMs and real eBPF: discovery, hashes that match the
//! VMM's own memory, rehashing that follows writes, and exits.
//!
//! Every test runs the real `pagefp agent` (as root) and real
//! `pagefp-testvmm` processes; see `pagefp_tests::fleet`.

use std::time::Duration;

use pagefp_tests::{
    agent_process::{AgentOptions, AgentProcess, TempDir},
    fleet::{CODE_PAGES, Vm, VmOptions, assert_served_hashes_match, vm_pages},
    require_privileged,
    synthetic_images::{FleetLayout, write_fleet},
    vmm_client::{VmmArgs, VmmProcess, testvmm_binary},
};

const WAIT: Duration = Duration::from_secs(60);

#[test]
fn vms_started_before_and_after_the_agent_are_tracked_and_hashes_match() {
    require_privileged!("vms_started_before_and_after_the_agent_are_tracked_and_hashes_match");
    let dir = TempDir::new("pagefp-discovery");
    let images = write_fleet(&dir.0, 2, 2048, FleetLayout::default()).unwrap();
    let before = Vm::start(&dir, &images[0], VmOptions::default());
    let agent = AgentProcess::start(&AgentOptions::default()).unwrap();

    // Started before: listed at once, not tracked until it registers memory.
    let view = agent.wait_vm(before.pid(), WAIT, "adopted", |v| {
        v["discovery"] == "adopted"
    });
    assert_eq!(view["pages"], 0, "{view:#}");
    assert!(
        view["note"]
            .as_str()
            .unwrap()
            .contains("started before the agent")
    );

    // Started after: tracked from creation.
    let after = Vm::start(&dir, &images[1], VmOptions::default());
    let view = agent.wait_all_clean(after.pid(), WAIT);
    assert_eq!(view["discovery"], "at_creation");
    assert_eq!(view["dirty_mode"], "ring");
    assert_eq!(view["tracking"], "tracked");
    assert_eq!(view["pages"].as_u64(), Some(2048 + CODE_PAGES as u64));
    assert_served_hashes_match(&agent, &after);

    // The early VM re-registers its memory (as QEMU does when a migration
    // starts) and harvests its ring once: then it is tracked too.
    before.reregister();
    before.touch(0, 1, 7);
    let view = agent.wait_all_clean(before.pid(), WAIT);
    assert_eq!(view["synced"], true);
    assert_served_hashes_match(&agent, &before);
}

#[test]
fn written_pages_are_rehashed_and_only_a_bounded_number_of_others() {
    require_privileged!("written_pages_are_rehashed_and_only_a_bounded_number_of_others");
    let dir = TempDir::new("pagefp-rehash");
    let images = write_fleet(&dir.0, 1, 4096, FleetLayout::default()).unwrap();
    let agent = AgentProcess::start(&AgentOptions::default()).unwrap();
    let vm = Vm::start(&dir, &images[0], VmOptions::default());
    let before = agent.wait_all_clean(vm.pid(), WAIT);
    let hashed_before = before["stats"]["pages_hashed"].as_u64().unwrap();

    const K: u32 = 300;
    vm.random(1000, K, 42);
    let after = agent.wait_vm(vm.pid(), WAIT, "rehashed", |v| {
        v["clean"] == v["pages"] && v["stats"]["pages_rehashed"].as_u64() >= Some(u64::from(K))
    });
    let hashed = after["stats"]["pages_hashed"].as_u64().unwrap() - hashed_before;
    let rehashed = after["stats"]["pages_rehashed"].as_u64().unwrap();
    assert_eq!(
        rehashed,
        u64::from(K),
        "every written page rehashed once: {after:#}"
    );
    assert!(
        hashed <= u64::from(K) + 16,
        "{hashed} pages hashed for {K} written"
    );
    assert_served_hashes_match(&agent, &vm);
}

/// The three programs the agent can put on `kvm_dirty_ring_push` (BTF-typed,
/// raw, classic: the cheapest the kernel takes is the default) report the
/// same writes: each written page rehashed once, and every served hash true.
#[test]
fn every_ring_push_program_reports_every_write() {
    require_privileged!("every_ring_push_program_reports_every_write");
    let dir = TempDir::new("pagefp-ring-push");
    let images = write_fleet(&dir.0, 1, 2048, FleetLayout::default()).unwrap();
    for (program, attached, function) in [
        (
            "btf",
            "tp_btf/kvm_dirty_ring_push",
            "pagefp_dirty_ring_push_btf",
        ),
        (
            "raw",
            "raw_tracepoint/kvm_dirty_ring_push",
            "pagefp_dirty_ring_push_raw",
        ),
        (
            "tracepoint",
            "tracepoint/kvm/kvm_dirty_ring_push",
            "pagefp_dirty_ring_push",
        ),
    ] {
        let agent = AgentProcess::start(&AgentOptions {
            extra: vec![
                "--ring-push-program".into(),
                program.into(),
                "--ebpf-run-stats".into(),
            ],
            ..AgentOptions::default()
        })
        .unwrap();
        let status = agent.status();
        assert_eq!(status["sources"]["ring_push"], attached);
        assert_eq!(status["ebpf_run_stats"], true, "{status:#}");
        let vm = Vm::start(&dir, &images[0], VmOptions::default());
        let before = agent.wait_all_clean(vm.pid(), WAIT);
        assert_eq!(before["tracking"], "tracked", "{program}: {before:#}");
        const K: u32 = 200;
        vm.random(100, K, 5);
        let after = agent.wait_vm(vm.pid(), WAIT, "rehashed", |v| {
            v["clean"] == v["pages"] && v["stats"]["pages_rehashed"].as_u64() >= Some(u64::from(K))
        });
        assert_eq!(
            after["stats"]["pages_rehashed"].as_u64(),
            Some(u64::from(K)),
            "{program}: every written page rehashed once: {after:#}"
        );
        assert_served_hashes_match(&agent, &vm);
        // The kernel counted the push program's runs: at least one per
        // page written (the emulator pushes one per dword written).
        let status = agent.status();
        let push = status["ebpf_programs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["program"] == function)
            .unwrap_or_else(|| panic!("{function} not in {status:#}"));
        assert!(
            push["runs"].as_u64().unwrap() >= u64::from(K) && push["run_ns"].as_u64().unwrap() > 0,
            "{program}: {push:#}"
        );
        vm.exit();
    }
    // The default is the cheapest that loads: the BTF-typed program here.
    let agent = AgentProcess::start(&AgentOptions::default()).unwrap();
    assert_eq!(
        agent.status()["sources"]["ring_push"],
        "tp_btf/kvm_dirty_ring_push"
    );
}

#[test]
fn a_page_written_again_before_reprotection_is_never_served_stale() {
    require_privileged!("a_page_written_again_before_reprotection_is_never_served_stale");
    let dir = TempDir::new("pagefp-rewrite");
    let images = write_fleet(&dir.0, 1, 1024, FleetLayout::default()).unwrap();
    let agent = AgentProcess::start(&AgentOptions::default()).unwrap();
    let vm = Vm::start(
        &dir,
        &images[0],
        VmOptions {
            manual_harvest: true,
            ..VmOptions::default()
        },
    );
    agent.wait_all_clean(vm.pid(), WAIT);

    // First write: reported, not re-protected (the VMM does not harvest).
    vm.touch(10, 4, 1);
    assert_served_hashes_match(&agent, &vm);
    let records = vm_pages(&agent, vm.pid());
    for (page, record) in records.iter().enumerate().take(14).skip(10) {
        assert_ne!(record.state, 1, "page {page} written but served clean");
    }
    // Second write of the same pages before re-protection: on hardware this
    // raises no event; the page must still not be served with old content.
    vm.touch(10, 4, 2);
    assert_served_hashes_match(&agent, &vm);
    // Re-protection: now the pages are read again and served clean.
    vm.harvest();
    agent.wait_all_clean(vm.pid(), WAIT);
    assert_served_hashes_match(&agent, &vm);
}

#[test]
fn an_exited_vm_disappears_with_its_counts() {
    require_privileged!("an_exited_vm_disappears_with_its_counts");
    let dir = TempDir::new("pagefp-exit");
    let images = write_fleet(&dir.0, 2, 1024, FleetLayout::default()).unwrap();
    let agent = AgentProcess::start(&AgentOptions::default()).unwrap();
    let a = Vm::start(&dir, &images[0], VmOptions::default());
    let b = Vm::start(&dir, &images[1], VmOptions::default());
    agent.wait_all_clean(a.pid(), WAIT);
    agent.wait_all_clean(b.pid(), WAIT);
    let with_both = agent.status()["distinct_contents"].as_u64().unwrap();
    assert!(
        !agent.templates()["templates"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    let gone = b.pid();
    b.exit();
    let deadline = std::time::Instant::now() + WAIT;
    while agent.vm(gone).is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "VM {gone} still listed after it exited"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = agent.status();
    assert!(status["distinct_contents"].as_u64().unwrap() < with_both);
    // The agent no longer maps the exited VM's RAM (else it is never freed):
    // one guest-RAM mapping left, the running VM's.
    let ram_mappings = || agent.guest_ram_mappings();
    let deadline = std::time::Instant::now() + WAIT;
    while ram_mappings() > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent still maps the exited VM's RAM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(ram_mappings(), 1, "the running VM stays mapped");
    let listed: Vec<u64> = agent
        .get_json("/v1/vms")
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["pid"].as_u64().unwrap())
        .collect();
    assert!(
        listed.contains(&u64::from(a.pid())) && !listed.contains(&u64::from(gone)),
        "{listed:?}"
    );
    // Nothing is shared by two VMs any more.
    assert!(
        agent.templates()["templates"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

/// VMs that exit while the agent reads their memory (their first pass,
/// 64 MiB each, just started): once they are gone, the agent maps none of
/// their RAM (a mapping made during the exit is not kept).
#[test]
fn vms_that_exit_while_being_read_leave_no_mapping_behind() {
    require_privileged!("vms_that_exit_while_being_read_leave_no_mapping_behind");
    let dir = TempDir::new("pagefp-exit-reading");
    let images = write_fleet(&dir.0, 3, 16_384, FleetLayout::default()).unwrap();
    let agent = AgentProcess::start(&AgentOptions::default()).unwrap();
    let mut pids = Vec::new();
    for _round in 0..3 {
        let vms: Vec<_> = images
            .iter()
            .map(|image| Vm::start(&dir, image, VmOptions::default()))
            .collect();
        for vm in vms {
            let deadline = std::time::Instant::now() + WAIT;
            while agent.vm(vm.pid()).is_none() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "VM {} never listed",
                    vm.pid()
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            pids.push(vm.pid());
            vm.exit();
        }
    }
    agent.wait_released(&pids, WAIT);
}

#[test]
fn untracked_vms_are_rescanned_and_served_unverified() {
    require_privileged!("untracked_vms_are_rescanned_and_served_unverified");
    let dir = TempDir::new("pagefp-untracked");
    let images = write_fleet(&dir.0, 2, 1024, FleetLayout::default()).unwrap();
    let agent = AgentProcess::start(&AgentOptions::default()).unwrap();
    let vm = Vm::start(
        &dir,
        &images[0],
        VmOptions {
            dirty: "none",
            ..VmOptions::default()
        },
    );
    let view = agent.wait_vm(vm.pid(), WAIT, "rescanned", |v| {
        v["unverified"].as_u64() == Some(1024) && v["clean"].as_u64() == Some(CODE_PAGES as u64)
    });
    assert_eq!(view["tracking"], "untracked", "{view:#}");
    assert_served_hashes_match(&agent, &vm);
    // Rescanned again and again, its unchanged pages skip blake3.
    let deadline = std::time::Instant::now() + WAIT;
    while agent.status()["hashing"]["rescan_unchanged"].as_u64() < Some(1024) {
        assert!(
            std::time::Instant::now() < deadline,
            "no rescan found its pages unchanged"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_served_hashes_match(&agent, &vm);
}

/// The dirty bitmap without BPF trampolines (this kernel refuses fexit):
/// the harvested bitmaps are the reports. Every harvest confirms what was
/// read before it; written pages are read again and confirmed by the next.
#[test]
fn bitmap_vms_are_tracked_from_their_harvested_bitmaps() {
    require_privileged!("bitmap_vms_are_tracked_from_their_harvested_bitmaps");
    let dir = TempDir::new("pagefp-bitmap");
    let images = write_fleet(&dir.0, 1, 1024, FleetLayout::default()).unwrap();
    let agent = AgentProcess::start(&AgentOptions::default()).unwrap();
    let vm = Vm::start(
        &dir,
        &images[0],
        VmOptions {
            dirty: "bitmap",
            ..VmOptions::default()
        },
    );
    let view = vm.harvest_until_clean(&agent, WAIT);
    assert_eq!(view["tracking"], "tracked", "{view:#}");
    assert_eq!(
        view["dirty_mode"]["bitmap"]["manual_protect"], false,
        "{view:#}"
    );
    assert_served_hashes_match(&agent, &vm);
    // Written, then not yet harvested: served, but never with old content.
    vm.touch(10, 8, 3);
    assert_served_hashes_match(&agent, &vm);
    vm.harvest_until_clean(&agent, WAIT);
    assert_served_hashes_match(&agent, &vm);
}

/// A guest's untouched memory stays unallocated: the agent finds the holes
/// of its memfd and hashes them as the zero page without reading them
/// (reading a hole through a shared mapping allocates it). 2 MiB of image
/// in 64 MiB of guest RAM: after the agent's full pass, the memfd holds
/// about the image, and every page past it is served as the zero page.
#[test]
fn untouched_guest_memory_is_hashed_without_being_allocated() {
    require_privileged!("untouched_guest_memory_is_hashed_without_being_allocated");
    let dir = TempDir::new("pagefp-holes");
    let images = write_fleet(&dir.0, 1, 512, FleetLayout::default()).unwrap();
    let agent = AgentProcess::start(&AgentOptions::default()).unwrap();
    let mut args = VmmArgs::new(dir.0.join("holes.sock"), 64);
    args.image = Some(images[0].clone());
    let vm = VmmProcess::spawn(&testvmm_binary(), &args).unwrap();
    let view = agent.wait_all_clean(vm.pid(), WAIT);
    assert!(view["pages"].as_u64() >= Some(64 * 256), "{view:#}");
    let ram = agent::procfs::maps(vm.pid())
        .unwrap()
        .into_iter()
        .find(|m| m.path.contains("pagefp-guest-ram") && m.size() == 64 << 20)
        .expect("the guest RAM's memfd mapping");
    let allocated = {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(ram.map_file(vm.pid())).unwrap().blocks() * 512
    };
    assert!(
        allocated < 8 << 20,
        "{allocated} bytes of the 64 MiB memfd allocated after the agent's pass"
    );
    let zero = agent::content::zero_page_hash();
    let past_image: Vec<_> = agent
        .hashes(vm.pid())
        .into_iter()
        .filter(|r| r.gpa >= 4 << 20 && r.gpa < 64 << 20)
        .collect();
    assert!(past_image.len() > 10_000);
    assert!(past_image.iter().all(|r| r.hash == zero));
}
