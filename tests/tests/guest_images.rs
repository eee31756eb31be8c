//! The real Linux guest images (`cargo xtask images`): built under QEMU TCG,
//! the same OS in each, loadable into the test VMM, bootable and migratable
//! under QEMU itself.

use std::{collections::HashMap, time::Duration};

use pagefp_tests::{
    agent_process::{TempDir, free_port},
    guest_images::{self, GuestImage},
    privileged,
    qemu::QemuGuest,
    vmm_client::{VmmArgs, VmmProcess, testvmm_binary},
};

fn images(test: &str) -> Option<Vec<GuestImage>> {
    if !privileged::check_kvm(test) {
        return None;
    }
    if which::which("qemu-system-x86_64").is_err() {
        assert!(!privileged::required(), "qemu-system-x86_64 is missing: run `cargo xtask setup`");
        println!("skipped: {test}: QEMU is not installed (cargo xtask setup)");
        return None;
    }
    Some(guest_images::ensure_images().expect("building the guest images"))
}

fn page_hashes(image: &GuestImage) -> Vec<[u8; 32]> {
    std::fs::read(&image.ram_path)
        .unwrap()
        .chunks(4096)
        .map(|p| *blake3::hash(p).as_bytes())
        .collect()
}

#[test]
fn images_are_linux_guests_sharing_their_os() {
    let Some(images) = images("images_are_linux_guests_sharing_their_os") else { return };
    assert!(images.len() >= 6, "at least 6 guests");
    let zero = *blake3::hash(&[0u8; 4096]).as_bytes();
    let mut holders: HashMap<[u8; 32], usize> = HashMap::new();
    let mut per_image = Vec::new();
    for image in &images {
        assert!(image.mem_mib >= 256);
        assert_eq!(std::fs::metadata(&image.ram_path).unwrap().len(), u64::from(image.mem_mib) << 20);
        let mut hashes = page_hashes(image);
        hashes.retain(|h| *h != zero);
        hashes.sort_unstable();
        hashes.dedup();
        assert!(hashes.len() > 10_000, "{}: only {} distinct non-zero pages", image.name, hashes.len());
        for hash in &hashes {
            *holders.entry(*hash).or_default() += 1;
        }
        per_image.push(hashes);
    }
    for (image, hashes) in images.iter().zip(&per_image) {
        let shared = hashes.iter().filter(|h| holders[*h] >= 2).count();
        let own = hashes.iter().filter(|h| holders[*h] == 1).count();
        println!("{}: {} distinct non-zero pages, {shared} shared with other guests, {own} its own", image.name, hashes.len());
        assert!(shared > 5_000, "{}: the same kernel and initramfs give shared pages", image.name);
        assert!(own > 100, "{}: its workload gives pages of its own", image.name);
    }
}

#[test]
fn an_image_loads_into_the_test_vmm() {
    let Some(images) = images("an_image_loads_into_the_test_vmm") else { return };
    let image = &images[0];
    let dir = TempDir::new("pagefp-image-vmm");
    let mut args = VmmArgs::new(dir.0.join("vmm.sock"), image.mem_mib);
    args.image = Some(image.ram_path.clone());
    let vmm = VmmProcess::spawn(&testvmm_binary(), &args).unwrap();
    let served = vmm.checksums().unwrap();
    let expected: Vec<String> = page_hashes(image).iter().map(|h| blake3::Hash::from(*h).to_hex().to_string()).collect();
    assert!(served == expected, "the VMM's RAM is the image");
    vmm.exit().unwrap();
}

#[test]
fn the_same_guest_boots_and_migrates_under_qemu() {
    let Some(images) = images("the_same_guest_boots_and_migrates_under_qemu") else { return };
    let image = images.iter().find(|i| i.workload == "idle").unwrap_or(&images[0]);
    let dir = TempDir::new("pagefp-image-qemu");
    let mut source = QemuGuest::boot(&image.spec(), &dir.0, "source", None).unwrap();
    source.wait_serial(&format!("pagefp-ready {}", image.workload), Duration::from_secs(180)).unwrap();
    source.wait_serial("pagefp-heartbeat 2", Duration::from_secs(60)).unwrap();
    assert_eq!(source.qmp.status().unwrap(), "running");
    let port = free_port();
    let mut spec = image.spec();
    spec.extra = vec!["-incoming".into(), format!("tcp:127.0.0.1:{port}")];
    let dest = QemuGuest::boot(&spec, &dir.0, "dest", None).unwrap();
    source.qmp.execute("migrate-set-parameters", Some(serde_json::json!({"max-bandwidth": 1_000_000_000u64}))).unwrap();
    source.qmp.migrate(&format!("tcp:127.0.0.1:{port}")).unwrap();
    let info = source.qmp.wait_migration(Duration::from_secs(300)).unwrap();
    assert_eq!(info["status"], "completed");
    // The destination's console goes on counting (the counter lives in the
    // migrated guest; its serial output starts fresh on the destination).
    let mut dest = dest;
    assert_eq!(dest.qmp.status().unwrap(), "running");
    let first = {
        dest.wait_serial("pagefp-heartbeat", Duration::from_secs(30)).unwrap();
        dest.heartbeat().unwrap()
    };
    std::thread::sleep(Duration::from_secs(3));
    let later = dest.heartbeat().unwrap();
    assert!(later > first, "heartbeat {first} -> {later} on the destination");
    assert!(first >= 2, "the counter continued from the source's ({first})");
}
