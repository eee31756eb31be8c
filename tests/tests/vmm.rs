//! The test VMM on the real /dev/kvm: every guest op writes exactly what it
//! should. Expected contents are computed here, independently of the VMM.

use std::path::Path;

use agent::page::PAGE_SIZE;
use pagefp_tests::{
    agent_process::TempDir,
    require_kvm,
    vmm_client::{Op, VmmArgs, VmmProcess, testvmm_binary},
};

fn hex(page: &[u8]) -> String {
    blake3::hash(page).to_hex().to_string()
}

fn spawn(dir: &TempDir, name: &str, edit: impl FnOnce(&mut VmmArgs)) -> VmmProcess {
    let mut args = VmmArgs::new(dir.0.join(format!("{name}.sock")), 1);
    edit(&mut args);
    VmmProcess::spawn(&testvmm_binary(), &args).expect("starting pagefp-testvmm")
}

/// An image of `pages` distinct pages plus `tail` bytes of one more.
fn write_image(path: &Path, pages: usize, tail: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let bytes: Vec<u8> = (0..pages * PAGE_SIZE + tail)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect();
    std::fs::write(path, &bytes).unwrap();
    bytes
}

/// The guest's pool of pseudo-random bytes, rebuilt from its definition: a
/// 64-bit xorshift (13, 7, 17) from 0x2545F4914F6CDD1D, little-endian, 2 MiB + 4 KiB.
fn pool() -> Vec<u8> {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut pool = Vec::with_capacity((2 << 20) + PAGE_SIZE);
    while pool.len() < (2 << 20) + PAGE_SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        pool.extend_from_slice(&x.to_le_bytes());
    }
    pool
}

/// A `random` page: 4 KiB of the pool at a 4-aligned offset mixed from page
/// and seed, then the page number at byte 0 and the seed at byte 4.
fn random_page(pool: &[u8], page: u32, seed: u32) -> Vec<u8> {
    let mixed = page
        .wrapping_mul(0x9E37_79B1)
        .wrapping_add(seed.wrapping_mul(0x85EB_CA77));
    let offset = (mixed & ((2 << 20) - 4)) as usize;
    let mut bytes = pool[offset..offset + PAGE_SIZE].to_vec();
    bytes[..4].copy_from_slice(&page.to_le_bytes());
    bytes[4..8].copy_from_slice(&seed.to_le_bytes());
    bytes
}

fn assert_memory(vmm: &VmmProcess, expected: &[Vec<u8>]) {
    let served = vmm.checksums().unwrap();
    assert_eq!(served.len(), expected.len(), "one hash per RAM page");
    for (page, content) in expected.iter().enumerate() {
        assert_eq!(served[page], hex(content), "page {page}");
    }
}

#[test]
fn every_op_writes_exactly_its_pages() {
    require_kvm!("every_op_writes_exactly_its_pages");
    let dir = TempDir::new("pagefp-vmm-ops");
    let image = dir.0.join("image.raw");
    // 200 pages and a half, in 1 MiB (256 pages): the rest of RAM is zero.
    let bytes = write_image(&image, 200, 2000);
    let mut expected: Vec<Vec<u8>> = vec![vec![0; PAGE_SIZE]; 256];
    for (page, chunk) in bytes.chunks(PAGE_SIZE).enumerate() {
        expected[page][..chunk.len()].copy_from_slice(chunk);
    }
    let vmm = spawn(&dir, "ops", |a| a.image = Some(image.clone()));
    assert_memory(&vmm, &expected);

    let pool = pool();
    let ops = [
        Op::Random {
            first: 10,
            count: 5,
            seed: 77,
        },
        Op::Copy {
            src: 3,
            first: 20,
            count: 4,
        },
        Op::Zero { first: 0, count: 2 },
        Op::Touch {
            first: 30,
            count: 3,
            value: 0xABCD,
        },
        Op::Stride {
            first: 40,
            count: 3,
            step: 10,
            value: 5,
        },
        // Later ops see earlier ones: page 11 is random by now.
        Op::Copy {
            src: 11,
            first: 250,
            count: 6,
        },
    ];
    let report = vmm.run(&ops).unwrap();
    assert_eq!(report.pages_written, 5 + 4 + 2 + 3 + 3 + 6);
    for (page, content) in expected.iter_mut().enumerate().take(15).skip(10) {
        *content = random_page(&pool, page as u32, 77);
    }
    for page in 20..24 {
        expected[page] = expected[3].clone();
    }
    expected[0] = vec![0; PAGE_SIZE];
    expected[1] = vec![0; PAGE_SIZE];
    for page in [30, 31, 32] {
        expected[page][8..12].copy_from_slice(&0xABCDu32.to_le_bytes());
    }
    for page in [40, 50, 60] {
        expected[page][8..12].copy_from_slice(&5u32.to_le_bytes());
    }
    for page in 250..256 {
        expected[page] = expected[11].clone();
    }
    assert_memory(&vmm, &expected);
    assert_eq!(
        vmm.checksums().unwrap()[0],
        hex(&[0; PAGE_SIZE]),
        "zero page hash"
    );
}

#[test]
fn random_pages_are_distinct_and_reproducible() {
    require_kvm!("random_pages_are_distinct_and_reproducible");
    let dir = TempDir::new("pagefp-vmm-random");
    let a = spawn(&dir, "a", |a| a.mem_mib = 4);
    let b = spawn(&dir, "b", |a| a.mem_mib = 4);
    a.run(&[Op::Random {
        first: 0,
        count: 1000,
        seed: 1,
    }])
    .unwrap();
    b.run(&[
        Op::Random {
            first: 0,
            count: 500,
            seed: 1,
        },
        Op::Random {
            first: 500,
            count: 500,
            seed: 2,
        },
    ])
    .unwrap();
    let (ha, hb) = (
        a.checksums_range(0, 1000).unwrap(),
        b.checksums_range(0, 1000).unwrap(),
    );
    let distinct: std::collections::HashSet<_> = ha.iter().collect();
    assert_eq!(distinct.len(), 1000, "every (page, seed) is unique");
    assert_eq!(ha[..500], hb[..500], "same page and seed, same content");
    assert!(
        ha[500..].iter().zip(&hb[500..]).all(|(x, y)| x != y),
        "another seed, other content"
    );
    let pool = pool();
    assert_eq!(hb[999], hex(&random_page(&pool, 999, 2)));
    // Untouched RAM stays zero.
    assert!(
        a.checksums_range(1000, 24)
            .unwrap()
            .iter()
            .all(|h| *h == hex(&[0; PAGE_SIZE]))
    );
}

#[test]
fn checksum_ranges_are_slices_of_the_whole() {
    require_kvm!("checksum_ranges_are_slices_of_the_whole");
    let dir = TempDir::new("pagefp-vmm-ranges");
    let vmm = spawn(&dir, "r", |_| {});
    vmm.run(&[Op::Random {
        first: 0,
        count: 256,
        seed: 9,
    }])
    .unwrap();
    let all = vmm.checksums().unwrap();
    assert_eq!(all.len(), 256);
    assert_eq!(vmm.checksums_range(17, 30).unwrap(), all[17..47]);
    assert_eq!(vmm.checksums_range(255, 1).unwrap(), all[255..]);
    assert!(vmm.checksums_range(0, 0).unwrap().is_empty());
}

#[test]
fn ops_cross_slot_boundaries() {
    require_kvm!("ops_cross_slot_boundaries");
    let dir = TempDir::new("pagefp-vmm-slots");
    let vmm = spawn(&dir, "s", |a| a.slots = 4);
    let info = vmm.info().unwrap();
    assert_eq!(info.slots.len(), 4);
    for (i, slot) in info.slots.iter().enumerate() {
        assert_eq!(slot.slot, i as u32);
        assert_eq!(slot.gpa, i as u64 * (256 << 10));
        assert_eq!(slot.size, 256 << 10);
        assert_eq!(
            slot.uaddr,
            info.slots[0].uaddr + slot.gpa,
            "one mapping, cut in slots"
        );
        assert_eq!(slot.flags, 1, "KVM_MEM_LOG_DIRTY_PAGES");
    }
    // Pages 60..70 straddle slots 0 and 1; the copy source is in slot 3.
    vmm.run(&[
        Op::Random {
            first: 200,
            count: 1,
            seed: 4,
        },
        Op::Copy {
            src: 200,
            first: 60,
            count: 10,
        },
        Op::Touch {
            first: 127,
            count: 3,
            value: 1,
        },
    ])
    .unwrap();
    let hashes = vmm.checksums().unwrap();
    assert!(hashes[60..70].iter().all(|h| *h == hashes[200]));
    let mut touched = vec![0u8; PAGE_SIZE];
    touched[8] = 1;
    assert_eq!(
        hashes[127..130],
        [hex(&touched), hex(&touched), hex(&touched)]
    );
    assert_eq!(hashes[130], hex(&[0; PAGE_SIZE]));
}
