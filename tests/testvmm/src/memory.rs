//! Guest memory: sealed memfds mapped shared, as QEMU's memory-backend-memfd.
//! The seals (no shrink, no grow) let another process (the agent, a migration
//! receiver) map the same file through `/proc/PID/map_files` safely.
//!
//! RAM is one memfd (`memfd:pagefp-guest-ram`) split into the RAM slots; the
//! read-only code slot is a second one (`memfd:pagefp-guest-code`), so that a
//! migration can copy every region the same way.

use std::{
    ffi::CString,
    fs::File,
    io::Read,
    num::NonZeroUsize,
    os::fd::{AsFd, OwnedFd},
    path::Path,
    ptr::NonNull,
};

use anyhow::{Context as _, bail};
use nix::{
    fcntl::{FcntlArg, SealFlag, fcntl},
    sys::{
        memfd::{MFdFlags, memfd_create},
        mman::{MapFlags, ProtFlags, mmap, munmap},
    },
    unistd::ftruncate,
};

/// Name of the RAM memfd (seen in `/proc/PID/maps` as `memfd:NAME`).
pub const RAM_MEMFD: &str = "pagefp-guest-ram";
/// Name of the code slot's memfd.
pub const CODE_MEMFD: &str = "pagefp-guest-code";

/// One sealed memfd of a fixed size, mapped shared read-write.
pub struct Memfd {
    _file: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping lives as long as the struct; access goes through
// methods that take &self/&mut self (the VMM serialises them with a mutex).
unsafe impl Send for Memfd {}

impl Memfd {
    /// `len` zeroed bytes in a memfd called `name`, sealed against shrinking
    /// and growing.
    pub fn new(name: &str, len: usize) -> anyhow::Result<Self> {
        let c_name = CString::new(name).context("memfd name")?;
        let fd = memfd_create(
            c_name.as_c_str(),
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .with_context(|| format!("memfd_create {name}"))?;
        ftruncate(&fd, len as i64).with_context(|| format!("sizing {name}"))?;
        fcntl(
            fd.as_fd(),
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
            ),
        )
        .with_context(|| format!("sealing {name}"))?;
        let size = NonZeroUsize::new(len).with_context(|| format!("{name} must not be empty"))?;
        // SAFETY: a fresh shared mapping of a file of exactly `len` bytes.
        let ptr = unsafe {
            mmap(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd.as_fd(),
                0,
            )
        }
        .with_context(|| format!("mapping {name}"))?;
        Ok(Self {
            _file: fd,
            ptr: ptr.cast(),
            len,
        })
    }

    /// Guest RAM: `len` zeroed bytes with `image` copied at the start.
    pub fn ram(len: usize, image: Option<&Path>) -> anyhow::Result<Self> {
        let mut ram = Self::new(RAM_MEMFD, len)?;
        if let Some(path) = image {
            ram.load(path)?;
        }
        Ok(ram)
    }

    fn load(&mut self, path: &Path) -> anyhow::Result<()> {
        let mut file =
            File::open(path).with_context(|| format!("opening image {}", path.display()))?;
        let size = file.metadata()?.len() as usize;
        if size > self.len {
            bail!(
                "image {} has {size} bytes, more than the {} bytes of guest RAM: raise --mem-mib",
                path.display(),
                self.len
            );
        }
        file.read_exact(&mut self.as_mut_slice()[..size])
            .with_context(|| format!("reading image {}", path.display()))?;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn host_addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above; &mut self gives exclusive access from the host side.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Copies `bytes` to `offset`.
    pub fn write(&mut self, offset: usize, bytes: &[u8]) {
        self.as_mut_slice()[offset..offset + bytes.len()].copy_from_slice(bytes);
    }
}

impl Drop for Memfd {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
    }
}
