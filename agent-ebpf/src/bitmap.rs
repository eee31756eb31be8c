//! Copies a dirty-log ioctl's bitmap from the VMM's memory into the ring
//! buffer, at `sys_exit_ioctl` (see `agent_common::bitmap`).
//!
//! The VMM's thread is still in the kernel, so the bitmap is exactly what
//! `KVM_GET_DIRTY_LOG` wrote (or what `KVM_CLEAR_DIRTY_LOG` was given: QEMU
//! frees or rewrites its mask only after the ioctl returns).

use agent_common::{
    BitmapChunk, BitmapCopy, BitmapHead, BitmapOf,
    bitmap::{BITMAP_CHUNK_PAGES, BITMAP_CHUNK_WORDS, MAX_BITMAP_CHUNKS},
};
use aya_ebpf::{
    cty::c_void,
    helpers::generated::{bpf_loop, bpf_probe_read_user},
};

use crate::emit::{EVENTS, NO_WAKEUP, SLOT_PAGES, now_ns, record_loss, slot_key};

/// Sends the bitmap of `copy` in chunks; returns how many pages (from its
/// first) were sent. Fewer than the ioctl covered when the ring buffer is
/// full (the loss is recorded), the bitmap cannot be read, the slot's size
/// is not known, or it has more than `MAX_BITMAP_CHUNKS` chunks: user space
/// then treats the rest as unknown. One `bpf_loop` callback per chunk, so
/// the verifier checks one chunk's copy, not every iteration.
#[inline(always)]
pub fn send(pid: u32, copy: &BitmapCopy) -> u32 {
    let pages: u64 = match copy.pages {
        Some(pages) => u64::from(pages),
        // SAFETY: values in SLOT_PAGES are plain integers.
        None => match unsafe { SLOT_PAGES.get(&slot_key(pid, copy.slot)) } {
            Some(pages) => *pages,
            None => return 0,
        },
    };
    let chunks = pages
        .div_ceil(u64::from(BITMAP_CHUNK_PAGES))
        .min(u64::from(MAX_BITMAP_CHUNKS)) as u32;
    let mut state = Copying {
        pid,
        copy: *copy,
        pages,
        sent: 0,
    };
    // SAFETY: bpf_loop calls `copy_chunk` with a pointer to `state`, which
    // lives until it returns.
    unsafe {
        bpf_loop(
            chunks,
            copy_chunk as *mut c_void,
            (&raw mut state).cast(),
            0,
        );
    }
    state.sent
}

/// What the chunks of one bitmap share.
struct Copying {
    pid: u32,
    copy: BitmapCopy,
    /// Pages of the whole bitmap.
    pages: u64,
    /// Pages sent so far.
    sent: u32,
}

/// Sends chunk `index`; 0 to go on, 1 to stop.
#[inline(never)]
extern "C" fn copy_chunk(index: u64, state: *mut c_void) -> i64 {
    // SAFETY: `send` passes a pointer to its `Copying`.
    let state = unsafe { &mut *state.cast::<Copying>() };
    let chunk_pages = u64::from(BITMAP_CHUNK_PAGES);
    let offset = index * chunk_pages;
    if offset >= state.pages || offset != u64::from(state.sent) {
        return 1;
    }
    let count = (state.pages - offset).min(chunk_pages) as u32;
    let bytes = count.div_ceil(64) * 8;
    if bytes == 0 || bytes as usize > BITMAP_CHUNK_WORDS * 8 {
        return 1;
    }
    let Some(mut entry) = EVENTS.reserve::<BitmapChunk>(0) else {
        record_loss(state.pid, now_ns());
        return 1;
    };
    let chunk = entry.as_mut_ptr();
    let copy = &state.copy;
    let first_page = copy.first_page + offset;
    let head = match copy.of {
        BitmapOf::Get => BitmapHead::get(state.pid, copy.enter_ns, copy.slot, first_page, count),
        BitmapOf::Clear => {
            BitmapHead::clear(state.pid, copy.enter_ns, copy.slot, first_page, count)
        }
    };
    // SAFETY: `chunk` points to a reserved ring-buffer record of
    // size_of::<BitmapChunk>() bytes; `bytes` is at most the size of its
    // `words`, and bpf_probe_read_user checks the user address itself.
    let read = unsafe {
        (&raw mut (*chunk).head).write(head);
        bpf_probe_read_user(
            (&raw mut (*chunk).words).cast(),
            bytes,
            (copy.user_ptr + offset / 8) as *const c_void,
        )
    };
    if read != 0 {
        entry.discard(0);
        return 1;
    }
    entry.submit(NO_WAKEUP);
    state.sent += count;
    0
}
