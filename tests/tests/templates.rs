//! Occurrence counts and the template catalog equal the ground truth
//! computed from the images.

use std::time::Duration;

use pagefp_tests::{
    agent_process::{AgentOptions, AgentProcess, TempDir},
    fleet::{Vm, VmOptions, code_slot_image},
    require_privileged,
    synthetic_images::{FleetLayout, count_contents, expected_templates, fleet_image, write_fleet},
};

#[test]
fn four_vms_counts_and_catalog_equal_the_ground_truth() {
    require_privileged!("four_vms_counts_and_catalog_equal_the_ground_truth");
    const PAGES: usize = 2048;
    let dir = TempDir::new("pagefp-templates");
    let images = write_fleet(&dir.0, 4, PAGES, FleetLayout::default()).unwrap();
    let agent = AgentProcess::start(&AgentOptions::default()).unwrap();
    let vms: Vec<Vm> = images
        .iter()
        .map(|image| Vm::start(&dir, image, VmOptions::default()))
        .collect();
    for vm in &vms {
        agent.wait_all_clean(vm.pid(), Duration::from_secs(60));
    }

    // Each VM's memory: its RAM image, then the VMM's read-only code slot.
    let memories: Vec<Vec<u8>> = (0..4)
        .map(|vm| {
            let mut memory = fleet_image(vm, PAGES, FleetLayout::default());
            memory.extend(code_slot_image());
            memory
        })
        .collect();
    let refs: Vec<&[u8]> = memories.iter().map(Vec::as_slice).collect();
    let counts = count_contents(&refs);
    let status = agent.status();
    assert_eq!(
        status["distinct_contents"].as_u64(),
        Some(counts.len() as u64),
        "{status:#}"
    );

    let expected = expected_templates(&counts, 2, usize::MAX);
    let catalog = agent.templates();
    let served: Vec<(String, u64, u64)> = catalog["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["hash"].as_str().unwrap().to_string(),
                t["pages"].as_u64().unwrap(),
                t["vms"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(String, u64, u64)> = expected
        .iter()
        .map(|(hash, pages, vms)| (agent::page::hex(hash), u64::from(*pages), u64::from(*vms)))
        .collect();
    assert_eq!(served.len(), expected.len());
    assert_eq!(served, expected);
    // Indexes are ranks.
    for (rank, template) in catalog["templates"].as_array().unwrap().iter().enumerate() {
        assert_eq!(template["index"].as_u64(), Some(rank as u64));
    }
    // Per-VM coverage: the pages of each VM whose content is a template.
    for (i, vm) in vms.iter().enumerate() {
        let view = agent.vm(vm.pid()).unwrap();
        let expected_pages = memories[i]
            .chunks_exact(4096)
            .filter(|page| {
                let hash = agent::page::hex(blake3::hash(page).as_bytes());
                served.iter().any(|(h, _, _)| *h == hash)
            })
            .count();
        assert_eq!(
            view["template_pages"].as_u64(),
            Some(expected_pages as u64),
            "VM {i}"
        );
    }
}
