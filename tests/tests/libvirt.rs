//! `virsh migrate --live` through the QEMU proxies, for real: two libvirt
//! daemons acting as two hosts (see `pagefp_tests::libvirt`), a domain on
//! QEMU 7.2 (what Debian 12's libvirt 9.0 runs) and on QEMU 10.0 booting a
//! disk that fills pages and halts, migrated with libvirt's own capability
//! set (the return path at both ends, pause-before-switchover, ...), plain
//! and with `--parallel` (multifd, 4 channels), the destination left
//! paused (`--suspend`) so its memory can be compared with the source's.

use std::time::Duration;

use pagefp_tests::{
    agent_process::free_port,
    libvirt::{self, Hosts, domain_xml, emulator},
    link_security::LinkSecurity,
    privileged,
    qemu::QemuBuild,
    qemu_proxy_run::{Ends, Proxies, Templates},
    qemu_streams::{BiosGuest, catalog_from_stream, differing_pages, page_filler_disk},
};

const DOMAIN: &str = "pagefp-guest";
const MEM_MIB: u32 = 64;

#[test]
fn virsh_migrate_live_goes_through_the_proxies_and_the_guest_arrives_identical() {
    let test = "virsh_migrate_live_goes_through_the_proxies_and_the_guest_arrives_identical";
    if !libvirt::available() || which::which("qemu-system-x86_64").is_err() {
        assert!(
            !privileged::required(),
            "{test}: libvirt or QEMU is missing (`cargo xtask setup` installs them)"
        );
        eprintln!("skipped: {test}: libvirt or QEMU is not installed");
        return;
    }
    let hosts = Hosts::start("lv", 40, 1000).expect("starting two libvirt hosts");
    let dir = &hosts.dir.0;
    let disk = dir.join("filler.img");
    page_filler_disk(&disk).unwrap();
    // Templates: the pages of another guest booted from the same disk
    // (its stream, captured over QMP), as a catalog at the destination.
    let catalog = {
        let boot = [
            "-drive".into(),
            format!("file={},format=raw,if=ide,snapshot=on", disk.display()),
        ];
        let mut other = BiosGuest::start(dir, "other", MEM_MIB, &boot).unwrap();
        std::thread::sleep(Duration::from_secs(1));
        let (stream, _) = other.capture(&dir.join("other.qemu")).unwrap();
        let path = dir.join("other.pftc");
        catalog_from_stream(&stream).unwrap().save(&path).unwrap();
        path
    };
    let ends = Ends {
        link: Some(&hosts.link),
    };
    let runs = QemuBuild::ALL
        .into_iter()
        .filter(|build| build.available())
        .flat_map(|build| [None, Some(4u32)].map(|parallel| (build, parallel)));
    for (build, parallel) in runs {
        let how = match parallel {
            None => format!("QEMU {}: virsh migrate --live", build.version()),
            Some(n) => format!(
                "QEMU {}: virsh migrate --live --parallel --parallel-connections {n}",
                build.version()
            ),
        };
        let xml = dir.join("domain.xml");
        let qemu = emulator(build, dir).unwrap();
        std::fs::write(&xml, domain_xml(DOMAIN, MEM_MIB, &disk, &qemu)).unwrap();
        hosts
            .source
            .virsh(&["create", &xml.to_string_lossy()])
            .unwrap();
        // Until the disk's code filled its last page (each word holds its
        // page's segment: 0x9f00 for the last one) and halted.
        let full = u64::from(MEM_MIB) << 20;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let source_memory = loop {
            let memory = hosts
                .source
                .memory(DOMAIN, &dir.join("source.mem"), full)
                .unwrap();
            if memory[0x9fffe..0xa0000] == [0x00, 0x9f] {
                break memory;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{how}: the guest did not fill its pages"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(source_memory[0x10000..0x10002], [0x00, 0x10]);
        // libvirt listens for the destination QEMU on the migration URI's
        // port, and the source QEMU connects to it: the send proxy takes
        // that port at the source end, QEMU at the destination end.
        let port = free_port();
        let proxies = Proxies::start_on(
            &ends,
            port,
            port,
            &[Templates::Catalog(catalog.clone())],
            &[],
            &LinkSecurity::default(),
        )
        .unwrap();
        let uri = format!("tcp://127.0.0.1:{port}");
        let mut args = vec!["migrate", "--live", "--unsafe", "--suspend", DOMAIN];
        let dest_uri = hosts.dest.migration_uri();
        args.push(&dest_uri);
        args.extend([uri.as_str(), "--listen-address", "127.0.0.1"]);
        let connections = parallel.map(|n| n.to_string());
        if let Some(n) = &connections {
            args.extend(["--parallel", "--parallel-connections", n]);
        }
        let migrated = hosts.source.virsh(&args);
        let outcome = proxies.wait().unwrap();
        migrated.unwrap_or_else(|e| {
            panic!(
                "{how}: {e:#}\nsend proxy: {:?}\nreceive proxy: {:?}",
                outcome.send.as_ref().err(),
                outcome.receive.as_ref().err()
            )
        });
        let sent = outcome.send.unwrap();
        outcome.receive.unwrap();
        println!("{how}: {sent:?}");
        // Exactly one copy: gone from the source, paused at the destination.
        assert!(
            !hosts
                .source
                .virsh(&["list", "--all", "--name"])
                .unwrap()
                .contains(DOMAIN),
            "{how}: the domain is still on the source host"
        );
        assert_eq!(hosts.dest.state(DOMAIN).unwrap(), "paused", "{how}");
        assert_eq!(sent.channels, 1 + parallel.unwrap_or(0), "{how}: {sent:?}");
        assert!(
            sent.ram_complete && sent.pass_through.is_none(),
            "{how}: {sent:?}"
        );
        // libvirt switched the return path on: PONG and SHUT came back.
        assert!(sent.return_path_bytes >= 16, "{how}: {sent:?}");
        assert!(sent.template_pages > 100, "{how}: {sent:?}");
        let dest_memory = hosts
            .dest
            .memory(DOMAIN, &dir.join("dest.mem"), full)
            .unwrap();
        let differing = differing_pages(&source_memory, &dest_memory);
        assert!(differing.is_empty(), "{how}: pages {differing:?} differ");
        hosts.dest.virsh(&["resume", DOMAIN]).unwrap();
        assert_eq!(hosts.dest.state(DOMAIN).unwrap(), "running", "{how}");
        hosts.dest.virsh(&["destroy", DOMAIN]).unwrap();
    }
}
