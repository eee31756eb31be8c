//! Lost events and bad requests, against the real agent.

use std::time::Duration;

use pagefp_tests::{
    agent_process::{AgentOptions, AgentProcess, TempDir},
    fleet::{Vm, VmOptions, assert_served_hashes_match},
    require_privileged,
    synthetic_images::{FleetLayout, write_fleet},
};

const WAIT: Duration = Duration::from_secs(60);

#[test]
fn lost_events_make_pages_unknown_never_stale() {
    require_privileged!("lost_events_make_pages_unknown_never_stale");
    let dir = TempDir::new("pagefp-loss");
    let images = write_fleet(&dir.0, 1, 8192, FleetLayout::default()).unwrap();
    // A ring buffer of one page holds about 60 events.
    let agent = AgentProcess::start(&AgentOptions {
        ring_buffer_bytes: Some(4096),
        ..AgentOptions::default()
    })
    .unwrap();
    let vm = Vm::start(
        &dir,
        &images[0],
        VmOptions {
            ring_entries: 16384,
            ..VmOptions::default()
        },
    );
    // With so small a buffer even the VM's creation may be lost (other VMs on
    // the host write too): then it is adopted and synced at a harvest.
    vm.harvest_until_clean(&agent, WAIT);

    // Thousands of writes at once: the ring buffer overflows.
    vm.random(0, 8192, 5);
    let status = agent.status();
    assert!(
        status["registry"]["losses_attributed"].as_u64() > Some(0),
        "no loss recorded: {status:#}"
    );
    // Whatever the agent serves now is current content, or not served.
    assert_served_hashes_match(&agent, &vm);

    // Harvests after the loss (a VMM harvests periodically, QEMU's reaper
    // every second) resync the VM; then everything is clean again.
    let view = vm.harvest_until_clean(&agent, WAIT);
    assert!(view["stats"]["resyncs"].as_u64() >= Some(1), "{view:#}");
    assert_served_hashes_match(&agent, &vm);
}

#[test]
fn malformed_requests_and_unknown_vms_get_4xx_with_a_message() {
    require_privileged!("malformed_requests_and_unknown_vms_get_4xx_with_a_message");
    let agent = AgentProcess::start(&AgentOptions::default()).unwrap();
    for (path, status) in [
        ("/v1/vms/999999999", 404),
        ("/v1/vms/999999999/hashes", 404),
        ("/v1/vms/not-a-pid", 400),
        ("/v1/templates?format=xml", 400),
        ("/v1/templates?limit=lots", 400),
        ("/v1/nothing", 404),
    ] {
        match agent.get(path) {
            Err(agent::api::client::ClientError::Status {
                status: got,
                message,
            }) => {
                assert_eq!(got.as_u16(), status, "{path}");
                assert!(message.len() > 10, "{path}: unhelpful message {message:?}");
            }
            other => panic!("{path}: expected HTTP {status}, got {other:?}"),
        }
    }
    // A raw request with garbage does not bring the agent down.
    {
        use std::io::{Read, Write};
        let mut stream = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
        stream.write_all(b"\x00\x01garbage\r\n\r\n").unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
    }
    assert_eq!(agent.status()["version"], env!("CARGO_PKG_VERSION"));
    // The socket is root-only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&agent.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    // Metrics answer too, with no VM running.
    assert!(agent.metrics().contains("pagefp_build_info"));
}
