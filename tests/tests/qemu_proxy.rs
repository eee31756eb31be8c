//! Unmodified QEMU migrating through `pagefp qemu-proxy send|receive`: real
//! QEMU TCG guests of one OS, templates exported from two other guests of
//! that OS (test VMM VMs the agent tracks), QEMU reports completed, the
//! guest runs on at the destination, fewer bytes cross the "WAN".

use std::time::Duration;

use pagefp_tests::{
    agent_process::{AgentOptions, AgentProcess, TempDir, agent_binary, free_port},
    guest_images, privileged,
    qemu_proxy_run::{Ends, compare},
    vmm_client::{VmmArgs, VmmProcess, testvmm_binary},
};

#[test]
fn qemu_migrates_through_the_proxies_with_fewer_bytes() {
    if !privileged::check("qemu_migrates_through_the_proxies_with_fewer_bytes") {
        return;
    }
    if which::which("qemu-system-x86_64").is_err() {
        assert!(!privileged::required(), "QEMU is missing: run `cargo xtask setup`");
        return;
    }
    let images = guest_images::ensure_images().expect("building the guest images");
    let image = |w: &str| images.iter().find(|i| i.workload == w).unwrap();
    let dir = TempDir::new("pagefp-proxy-test");
    let agent = AgentProcess::start(&AgentOptions::default()).unwrap();
    // Two guests of the same OS at the destination give the templates.
    let others: Vec<VmmProcess> = ["idle", "find"]
        .iter()
        .map(|w| {
            let mut args = VmmArgs::new(dir.0.join(format!("{w}-{}.sock", free_port())), image(w).mem_mib);
            args.image = Some(image(w).ram_path.clone());
            let vmm = VmmProcess::spawn(&testvmm_binary(), &args).unwrap();
            agent.wait_all_clean(vmm.pid(), Duration::from_secs(300));
            vmm
        })
        .collect();
    let catalog = dir.0.join("os.pftc");
    let pids: Vec<String> = others.iter().map(|v| v.pid().to_string()).collect();
    let output = std::process::Command::new(agent_binary())
        .args(["templates", "--socket"])
        .arg(&agent.socket)
        .args(["export", "--out"])
        .arg(&catalog)
        .args(["--vms", &pids.join(",")])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    for vm in others {
        vm.exit().unwrap();
    }
    let run = compare(image("httpd"), &catalog, &Ends { link: None }, 5).expect("migrating through the proxies");
    println!("{run:?}");
    assert_eq!(run.qemu_status, "completed");
    assert!(run.guest_resumed, "the guest's heartbeat goes on at the destination");
    assert!(run.template_pages > 5_000, "the OS pages travel as templates");
    assert!(
        run.proxied_wire_bytes * 2 < run.direct_wire_bytes,
        "proxied {} bytes vs direct {}",
        run.proxied_wire_bytes,
        run.direct_wire_bytes
    );
}

#[test]
fn a_stream_that_is_not_qemus_is_refused() {
    if !privileged::check("a_stream_that_is_not_qemus_is_refused") {
        return;
    }
    let dir = TempDir::new("pagefp-proxy-bad");
    let wan = format!("127.0.0.1:{}", free_port());
    let local = format!("127.0.0.1:{}", free_port());
    let qemu = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let receive = std::process::Command::new(agent_binary())
        .args(["qemu-proxy", "receive", "--no-installed", "--timeout-s", "30", "--listen", &wan])
        .args(["--qemu", &qemu.local_addr().unwrap().to_string()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let send = std::process::Command::new(agent_binary())
        .args(["qemu-proxy", "send", "--listen", &local, "--to", &wan])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    {
        use std::io::Write;
        let mut fake = std::net::TcpStream::connect(&local).unwrap();
        fake.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    }
    let sent = send.wait_with_output().unwrap();
    assert!(!sent.status.success());
    let err = String::from_utf8_lossy(&sent.stderr);
    assert!(err.contains("not a QEMU migration stream"), "{err}");
    let received = receive.wait_with_output().unwrap();
    assert!(!received.status.success(), "the receive proxy fails too");
    drop(dir);
}
