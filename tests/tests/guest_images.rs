//! The real Linux guest images (`cargo xtask images`): built under QEMU TCG,
//! the same OS in each, loadable into the test VMM, bootable and migratable
//! under QEMU itself with the toolkit in `pagefp_tests::qemu`.

use std::{collections::HashMap, time::Duration};

use pagefp_tests::{
    agent_process::{TempDir, free_port},
    guest_images::{self, GuestImage, stats},
    privileged,
    qemu::{QEMU, QemuGuest},
    vmm_client::{VmmArgs, VmmProcess, testvmm_binary},
};

/// The images, built if needed; `None` (skipped) without QEMU outside CI.
fn images(test: &str) -> Option<Vec<GuestImage>> {
    if which::which(QEMU).is_err() {
        assert!(
            !privileged::required(),
            "{QEMU} is missing: run `cargo xtask setup`"
        );
        println!("skipped: {test}: QEMU is not installed (cargo xtask setup)");
        return None;
    }
    Some(guest_images::ensure_images().expect("building the guest images"))
}

/// The idle guest (the quickest to boot and migrate).
fn idle(images: &[GuestImage]) -> &GuestImage {
    images
        .iter()
        .find(|image| image.workload == "idle")
        .expect("an idle image")
}

#[test]
fn images_are_linux_guests_sharing_their_os() {
    let Some(images) = images("images_are_linux_guests_sharing_their_os") else {
        return;
    };
    assert!(images.len() >= 6, "at least 6 guests, got {}", images.len());
    let workloads: std::collections::HashSet<&str> =
        images.iter().map(|image| image.workload.as_str()).collect();
    assert_eq!(
        workloads.len(),
        images.len(),
        "a different workload in each guest"
    );
    let zero = stats::zero_page_hash();
    let hashes: Vec<Vec<[u8; 32]>> = images
        .iter()
        .map(|image| {
            assert!(
                image.mem_mib >= 256,
                "{}: {} MiB",
                image.name,
                image.mem_mib
            );
            let len = std::fs::metadata(&image.ram_path).unwrap().len();
            assert_eq!(
                len,
                u64::from(image.mem_mib) << 20,
                "{}: the dump is the whole RAM",
                image.name
            );
            assert_eq!(
                image.kernel, images[0].kernel,
                "the same kernel in every guest"
            );
            assert_eq!(
                image.initrd, images[0].initrd,
                "the same initramfs in every guest"
            );
            stats::page_hashes(&image.ram_path).unwrap()
        })
        .collect();
    // How many images hold each non-zero content.
    let mut holders: HashMap<[u8; 32], usize> = HashMap::new();
    for pages in &hashes {
        let mut distinct: Vec<[u8; 32]> =
            pages.iter().copied().filter(|hash| *hash != zero).collect();
        distinct.sort_unstable();
        distinct.dedup();
        for hash in distinct {
            *holders.entry(hash).or_default() += 1;
        }
    }
    let in_every_image = holders
        .values()
        .filter(|count| **count == images.len())
        .count();
    println!("{in_every_image} page contents are in every image (kernel, libraries, programs)");
    assert!(
        in_every_image > 5_000,
        "the same OS gives pages common to all guests: {in_every_image}"
    );
    let (figures, _) = stats::stats_of(&hashes);
    let (mut nonzero_total, mut pages_total) = (0, 0);
    for ((image, pages), figure) in images.iter().zip(&hashes).zip(&figures) {
        let nonzero = pages.iter().filter(|hash| **hash != zero).count() as u64;
        let shared = pages
            .iter()
            .filter(|hash| **hash != zero && holders[*hash] >= 2)
            .count() as u64;
        let own = nonzero - shared;
        println!(
            "{}: {nonzero} non-zero pages, {shared} shared with other guests, {own} its own",
            image.name
        );
        assert_eq!(
            (figure.nonzero, figure.shared, figure.own),
            (nonzero, shared, own)
        );
        assert_eq!(
            image.pages, *figure,
            "{}: the manifest's figures",
            image.name
        );
        assert!(
            nonzero * 10 >= pages.len() as u64 * 4,
            "{}: only {nonzero} of {} pages are not zero",
            image.name,
            pages.len()
        );
        assert!(
            shared > 10_000,
            "{}: the same kernel and initramfs give shared pages ({shared})",
            image.name
        );
        assert!(
            own > 1_000,
            "{}: its workload gives pages of its own ({own})",
            image.name
        );
        nonzero_total += nonzero;
        pages_total += pages.len() as u64;
    }
    assert!(
        nonzero_total * 2 > pages_total,
        "the images are not mostly zero: {nonzero_total} of {pages_total}"
    );
}

#[test]
fn images_are_cached_by_their_inputs() {
    let Some(images) = images("images_are_cached_by_their_inputs") else {
        return;
    };
    let modified = |image: &GuestImage| {
        std::fs::metadata(&image.ram_path)
            .unwrap()
            .modified()
            .unwrap()
    };
    let before: Vec<_> = images.iter().map(modified).collect();
    let again = guest_images::ensure_images().unwrap();
    assert_eq!(
        again.iter().map(|image| &image.digest).collect::<Vec<_>>(),
        images.iter().map(|image| &image.digest).collect::<Vec<_>>()
    );
    assert_eq!(
        again.iter().map(modified).collect::<Vec<_>>(),
        before,
        "unchanged inputs: nothing rebuilt"
    );
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(guest_images::images_dir().join("manifest.json")).unwrap(),
    )
    .unwrap();
    let listed = manifest["images"].as_array().unwrap();
    assert_eq!(listed.len(), images.len());
    for entry in listed {
        let inputs = &entry["inputs"];
        for key in [
            "kernel_package",
            "kernel_package_blake3",
            "initramfs_blake3",
            "scripts_blake3",
            "qemu_version",
        ] {
            assert!(
                inputs[key].as_str().is_some_and(|value| !value.is_empty()),
                "{key} in {entry}"
            );
        }
        assert!(
            inputs["kernel_package"]
                .as_str()
                .unwrap()
                .starts_with("linux-image-")
        );
        assert!(
            inputs["run_seconds"].as_u64().is_some()
                && inputs["mem_mib"].as_u64() == entry["mem_mib"].as_u64()
        );
        assert!(
            entry["build"]["heartbeat"].as_u64().unwrap() > 0,
            "the guest kept running: {entry}"
        );
    }
}

#[test]
fn an_image_loads_into_the_test_vmm() {
    let Some(images) = images("an_image_loads_into_the_test_vmm") else {
        return;
    };
    if !privileged::check_kvm("an_image_loads_into_the_test_vmm") {
        return;
    }
    let image = images
        .iter()
        .find(|image| image.workload == "python")
        .unwrap_or(&images[0]);
    let dir = TempDir::new("pagefp-image-vmm");
    let mut args = VmmArgs::new(dir.0.join("vmm.sock"), image.mem_mib);
    args.image = Some(image.ram_path.clone());
    let vmm = VmmProcess::spawn(&testvmm_binary(), &args).unwrap();
    let served = vmm.checksums().unwrap();
    let expected: Vec<String> = stats::page_hashes(&image.ram_path)
        .unwrap()
        .iter()
        .map(|hash| blake3::Hash::from(*hash).to_hex().to_string())
        .collect();
    assert_eq!(served.len(), expected.len(), "one checksum per page");
    assert!(served == expected, "the VMM's RAM is the image");
    vmm.exit().unwrap();
}

#[test]
fn the_toolkit_boots_an_image_guest() {
    let Some(images) = images("the_toolkit_boots_an_image_guest") else {
        return;
    };
    let image = idle(&images);
    let dir = TempDir::new("pagefp-image-boot");
    // RAM in a shared file, as the migration proxies read it.
    let memory = dir.0.join("guest.mem");
    let spec = image.spec().shared_memory(&memory);
    let mut guest = QemuGuest::boot(&spec, &dir.0, "guest", None).unwrap();
    guest
        .wait_ready(&image.workload, Duration::from_secs(120))
        .unwrap();
    let first = guest.wait_heartbeat(0, Duration::from_secs(30)).unwrap();
    let later = guest
        .wait_heartbeat(first + 1, Duration::from_secs(30))
        .unwrap();
    assert!(later > first + 1, "heartbeat {first} -> {later}");
    let status = guest.qmp.query_status().unwrap();
    assert!(status.running && status.status == "running", "{status:?}");
    guest.qmp.stop().unwrap();
    assert_eq!(guest.qmp.status().unwrap(), "paused");
    let stopped_at = guest.heartbeat().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        guest.heartbeat().unwrap() <= stopped_at + 1,
        "a paused guest does not count"
    );
    // A dump of the running guest: its kernel's pages are the image's.
    let dump = dir.0.join("dump.ram");
    guest
        .qmp
        .pmemsave(&dump, u64::from(image.mem_mib) << 20)
        .unwrap();
    let shared = std::fs::read(&memory).unwrap();
    assert!(
        shared == std::fs::read(&dump).unwrap(),
        "the shared memory file is the guest's RAM"
    );
    drop(shared);
    guest.qmp.cont().unwrap();
    guest
        .wait_heartbeat(stopped_at + 1, Duration::from_secs(30))
        .unwrap();
    let zero = stats::zero_page_hash();
    let ours: std::collections::HashSet<[u8; 32]> =
        stats::page_hashes(&dump).unwrap().into_iter().collect();
    let common = stats::page_hashes(&image.ram_path)
        .unwrap()
        .iter()
        .filter(|hash| **hash != zero && ours.contains(*hash))
        .count();
    assert!(
        common > 10_000,
        "the rebooted guest holds the image's OS pages: {common}"
    );
    let err = guest.qmp.execute("no-such-command", None).unwrap_err();
    assert!(err.to_string().contains("no-such-command"), "{err}");
    guest.quit().unwrap();
}

#[test]
fn the_same_guest_migrates_between_two_qemus() {
    let Some(images) = images("the_same_guest_migrates_between_two_qemus") else {
        return;
    };
    let image = idle(&images);
    let dir = TempDir::new("pagefp-image-migrate");
    let port = free_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let mut source = QemuGuest::boot(&image.spec(), &dir.0, "source", None).unwrap();
    let mut dest = QemuGuest::boot(&image.spec().incoming(&uri), &dir.0, "dest", None).unwrap();
    assert_eq!(dest.qmp.status().unwrap(), "inmigrate");
    source
        .wait_ready(&image.workload, Duration::from_secs(120))
        .unwrap();
    let before = source.wait_heartbeat(1, Duration::from_secs(30)).unwrap();
    source
        .qmp
        .migrate_set_parameters(serde_json::json!({"max-bandwidth": 1_000_000_000u64}))
        .unwrap();
    source.qmp.migrate(&uri).unwrap();
    let info = source.qmp.wait_migration(Duration::from_secs(300)).unwrap();
    assert!(info.completed(), "{:?}", info.raw);
    let ram = info.ram.unwrap();
    println!(
        "migrated in {} ms: {} bytes, {} normal and {} zero pages",
        info.total_time_ms.unwrap_or(0),
        ram.transferred,
        ram.normal,
        ram.duplicate
    );
    // RAM plus the firmware's ROMs.
    assert!(ram.total >= u64::from(image.mem_mib) << 20, "{ram:?}");
    assert!(ram.normal > 10_000 && ram.duplicate > 0, "{ram:?}");
    assert_eq!(source.qmp.status().unwrap(), "postmigrate");
    // The destination runs on: its console starts empty, and the counter
    // goes on from where the source left it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while dest.qmp.status().unwrap() != "running" {
        assert!(
            std::time::Instant::now() < deadline,
            "the destination did not start running"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let first = dest
        .wait_heartbeat(before, Duration::from_secs(30))
        .unwrap();
    let later = dest.wait_heartbeat(first, Duration::from_secs(30)).unwrap();
    assert!(
        later > first && first > before,
        "heartbeat {before} (source) -> {first} -> {later} (destination)"
    );
}
