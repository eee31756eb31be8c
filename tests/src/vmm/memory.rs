//! Guest RAM: one sealed memfd mapped shared, as QEMU's memory-backend-memfd.
//! The seals (no shrink, no grow) let the agent map the same file safely.

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

pub struct GuestRam {
    _file: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping lives as long as the struct; access goes through
// methods that take &self/&mut self (the VMM serialises them with a mutex).
unsafe impl Send for GuestRam {}

impl GuestRam {
    /// `len` bytes of zeroed RAM, with `image` copied at its start.
    pub fn new(len: usize, image: Option<&Path>) -> anyhow::Result<Self> {
        let name = CString::new("pagefp-guest-ram").unwrap();
        let fd = memfd_create(
            name.as_c_str(),
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .context("memfd_create")?;
        ftruncate(&fd, len as i64).context("sizing guest RAM")?;
        fcntl(
            fd.as_fd(),
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
            ),
        )
        .context("sealing guest RAM")?;
        let size = NonZeroUsize::new(len).context("guest RAM size must not be 0")?;
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
        .context("mapping guest RAM")?;
        let mut ram = Self {
            _file: fd,
            ptr: ptr.cast(),
            len,
        };
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

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above; &mut self gives exclusive access from the host side.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
    }
}

/// Anonymous private memory for the code slot (never dirty-logged).
pub struct CodeMemory {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: as GuestRam.
unsafe impl Send for CodeMemory {}

impl CodeMemory {
    pub fn new(len: usize) -> anyhow::Result<Self> {
        let size = NonZeroUsize::new(len).context("code slot size")?;
        // SAFETY: a fresh anonymous mapping.
        let ptr = unsafe {
            nix::sys::mman::mmap_anonymous(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        }
        .context("mapping the code slot")?;
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    pub fn host_addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    pub fn write(&mut self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= self.len);
        // SAFETY: in bounds (checked above) of our own mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.ptr.as_ptr().add(offset),
                bytes.len(),
            )
        }
    }
}

impl Drop for CodeMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
    }
}
