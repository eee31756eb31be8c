//! The guest: a few 32-bit protected-mode routines, hand-assembled. The VMM
//! puts the operation's parameters in registers and starts the vCPU at the
//! routine; the routine writes the pages and executes `hlt`.
//!
//! Registers on entry: `ebx` = first page, `ecx` = page count (> 0),
//! `edx` = source page / seed / value, `esi` = stride step (in pages).
//! Page-sized work uses `rep movsd` / `rep stosd`: under KVM's instruction
//! emulator one string instruction costs about as much as one plain one.

/// Guest physical address of the code slot.
pub const CODE_GPA: u64 = 0xE000_0000;
/// Size of the code slot: code in the first page, then the random pool.
pub const CODE_SLOT_SIZE: usize = 4 << 20;
/// Offset of the pseudo-random pool in the code slot.
pub const POOL_OFFSET: usize = 1 << 20;
/// Bytes of the pool that page offsets are drawn from (plus one page spare).
pub const POOL_SPAN: u32 = 2 << 20;

/// Offsets of the routines inside the code slot.
pub const ZERO: u64 = 0x000;
pub const COPY: u64 = 0x040;
pub const RANDOM: u64 = 0x080;
pub const TOUCH: u64 = 0x100;
pub const STRIDE: u64 = 0x140;

const POOL_GPA: u32 = (CODE_GPA as u32) + POOL_OFFSET as u32;

fn le(v: u32) -> [u8; 4] {
    v.to_le_bytes()
}

/// Machine code of every routine, at its offset.
pub fn routines() -> Vec<(u64, Vec<u8>)> {
    let zero = vec![
        0x89, 0xDF, // mov edi, ebx
        0xC1, 0xE7, 0x0C, // shl edi, 12
        0x89, 0xC8, // mov eax, ecx
        0xC1, 0xE0, 0x0A, // shl eax, 10      (dwords = pages * 1024)
        0x89, 0xC1, // mov ecx, eax
        0x31, 0xC0, // xor eax, eax
        0xFC, // cld
        0xF3, 0xAB, // rep stosd
        0xF4, // hlt
    ];
    let copy = vec![
        0x89, 0xCD, // mov ebp, ecx      (pages left)
        0x89, 0xDF, // mov edi, ebx
        0xC1, 0xE7, 0x0C, // shl edi, 12
        0xFC, // cld
        // loop:
        0x89, 0xD6, // mov esi, edx
        0xC1, 0xE6, 0x0C, // shl esi, 12
        0xB9, 0x00, 0x04, 0x00, 0x00, // mov ecx, 1024
        0xF3, 0xA5, // rep movsd       (edi += 4096)
        0x4D, // dec ebp
        0x75, 0xF1, // jnz loop (-15)
        0xF4, // hlt
    ];
    let mut random = vec![
        0x89, 0xCD, // mov ebp, ecx
        0x89, 0xDF, // mov edi, ebx
        0xC1, 0xE7, 0x0C, // shl edi, 12
        0xFC, // cld
        // loop: esi = POOL + ((page * 0x9E3779B1 + seed * 0x85EBCA77) & (SPAN - 4))
        0x69, 0xF3, // imul esi, ebx, imm32
    ];
    random.extend(le(0x9E37_79B1));
    random.extend([0x69, 0xC2]); // imul eax, edx, imm32
    random.extend(le(0x85EB_CA77));
    random.extend([0x01, 0xC6]); // add esi, eax
    random.extend([0x81, 0xE6]); // and esi, imm32
    random.extend(le(POOL_SPAN - 4));
    random.extend([0x81, 0xC6]); // add esi, imm32
    random.extend(le(POOL_GPA));
    random.extend([0xB9, 0x00, 0x04, 0x00, 0x00]); // mov ecx, 1024
    random.extend([0xF3, 0xA5]); // rep movsd
    random.extend([0x89, 0x9F]); // mov [edi-4096], ebx   (page number)
    random.extend(le(-4096i32 as u32));
    random.extend([0x89, 0x97]); // mov [edi-4092], edx   (seed)
    random.extend(le(-4092i32 as u32));
    random.extend([0x43]); // inc ebx
    random.extend([0x4D]); // dec ebp
    random.extend([0x75, 0xCF]); // jnz loop (-49)
    random.extend([0xF4]); // hlt
    let touch = vec![
        0x89, 0xDF, // mov edi, ebx
        0xC1, 0xE7, 0x0C, // shl edi, 12
        // loop:
        0x89, 0x57, 0x08, // mov [edi+8], edx
        0x81, 0xC7, 0x00, 0x10, 0x00, 0x00, // add edi, 4096
        0x49, // dec ecx
        0x75, 0xF4, // jnz loop (-12)
        0xF4, // hlt
    ];
    let stride = vec![
        0x89, 0xDF, // mov edi, ebx
        0xC1, 0xE7, 0x0C, // shl edi, 12
        0xC1, 0xE6, 0x0C, // shl esi, 12
        // loop:
        0x89, 0x57, 0x08, // mov [edi+8], edx
        0x01, 0xF7, // add edi, esi
        0x49, // dec ecx
        0x75, 0xF8, // jnz loop (-8)
        0xF4, // hlt
    ];
    vec![
        (ZERO, zero),
        (COPY, copy),
        (RANDOM, random),
        (TOUCH, touch),
        (STRIDE, stride),
    ]
}

/// The pool of pseudo-random bytes "random" pages are copied from.
pub fn random_pool() -> Vec<u8> {
    let mut pool = vec![0u8; POOL_SPAN as usize + 4096];
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for chunk in pool.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    pool
}

/// Pages of the code slot.
pub const CODE_PAGES: usize = CODE_SLOT_SIZE / 4096;

/// The whole code slot: routines, then the pool.
pub fn code_slot_image() -> Vec<u8> {
    let mut image = vec![0u8; CODE_SLOT_SIZE];
    for (offset, bytes) in routines() {
        image[offset as usize..offset as usize + bytes.len()].copy_from_slice(&bytes);
    }
    let pool = random_pool();
    image[POOL_OFFSET..POOL_OFFSET + pool.len()].copy_from_slice(&pool);
    image
}

/// What the random routine writes into `page` for `seed` (for tests).
pub fn expected_random_page(pool: &[u8], page: u32, seed: u32) -> Vec<u8> {
    let offset = (page
        .wrapping_mul(0x9E37_79B1)
        .wrapping_add(seed.wrapping_mul(0x85EB_CA77)))
        & (POOL_SPAN - 4);
    let mut bytes = pool[offset as usize..offset as usize + 4096].to_vec();
    bytes[..4].copy_from_slice(&page.to_le_bytes());
    bytes[4..8].copy_from_slice(&seed.to_le_bytes());
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routines_fit_their_slots_and_loops_jump_to_their_start() {
        let routines = routines();
        for pair in routines.windows(2) {
            assert!(
                pair[0].0 + pair[0].1.len() as u64 <= pair[1].0,
                "routine at {:#x} overlaps",
                pair[0].0
            );
        }
        let random = &routines[2].1;
        // The loop starts after the 8-byte prologue; jnz is the 2 bytes before hlt.
        assert_eq!(random.len() - 3 - 8 + 2, 49);
    }
}
