//! Numbers of QEMU 7.2's migration stream format, with where QEMU defines
//! them. Everything is big-endian on the wire.

/// `QEMU_VM_FILE_MAGIC` (`migration/savevm.h`): "QEVM".
pub const FILE_MAGIC: u32 = 0x5145_564d;
/// `QEMU_VM_FILE_VERSION` (`migration/savevm.h`); version 2 is obsolete.
pub const FILE_VERSION: u32 = 3;

/// Section types, `QEMU_VM_*` in `migration/savevm.h`.
pub mod section {
    pub const EOF: u8 = 0x00;
    pub const START: u8 = 0x01;
    pub const PART: u8 = 0x02;
    pub const END: u8 = 0x03;
    pub const FULL: u8 = 0x04;
    pub const SUBSECTION: u8 = 0x05;
    pub const VMDESCRIPTION: u8 = 0x06;
    pub const CONFIGURATION: u8 = 0x07;
    pub const COMMAND: u8 = 0x08;
    pub const FOOTER: u8 = 0x7e;

    /// A name for messages.
    pub fn name(kind: u8) -> &'static str {
        match kind {
            EOF => "EOF",
            START => "SECTION_START",
            PART => "SECTION_PART",
            END => "SECTION_END",
            FULL => "SECTION_FULL",
            SUBSECTION => "SUBSECTION",
            VMDESCRIPTION => "VMDESCRIPTION",
            CONFIGURATION => "CONFIGURATION",
            COMMAND => "COMMAND",
            FOOTER => "SECTION_FOOTER",
            _ => "unknown",
        }
    }
}

/// Flags in the low bits of a RAM record's be64 header: `RAM_SAVE_FLAG_*`
/// in `migration/ram.c`, and `RAM_SAVE_FLAG_HOOK` (RDMA only) in
/// `migration/qemu-file.h`.
pub mod ram {
    pub const FULL: u64 = 0x01;
    pub const ZERO: u64 = 0x02;
    pub const MEM_SIZE: u64 = 0x04;
    pub const PAGE: u64 = 0x08;
    pub const EOS: u64 = 0x10;
    pub const CONTINUE: u64 = 0x20;
    pub const XBZRLE: u64 = 0x40;
    pub const HOOK: u64 = 0x80;
    pub const COMPRESS_PAGE: u64 = 0x100;
    /// `RAM_SAVE_FLAG_MULTIFD_FLUSH` (QEMU 8.0+, multifd only): no data; the
    /// destination waits for a SYNC packet on every multifd channel.
    pub const MULTIFD_FLUSH: u64 = 0x200;
    /// The flag bits: `addr & ~TARGET_PAGE_MASK` in `ram_load_precopy`.
    pub const FLAGS_MASK: u64 = 0xfff;
    /// `ENCODING_FLAG_XBZRLE` (`migration/xbzrle.h`), the byte before an
    /// XBZRLE page's be16 length.
    pub const ENCODING_XBZRLE: u8 = 0x01;
    /// zlib's `compressBound(4096)` (n + n>>12 + n>>14 + n>>25 + 13): the
    /// longest compressed page `ram_load_precopy` accepts.
    pub const MAX_COMPRESSED: u32 = 4096 + 1 + 13;
}

/// `enum qemu_vm_cmd` in `migration/savevm.c`.
pub mod command {
    /// `MIG_CMD_OPEN_RETURN_PATH`: the destination opens its end of the
    /// return path on the same connection.
    pub const OPEN_RETURN_PATH: u16 = 1;
    /// `MIG_CMD_PING`: be32 value, answered by a PONG on the return path.
    pub const PING: u16 = 2;
    /// `MIG_CMD_SWITCHOVER_START` (QEMU 10.0 and later, machine types 10.0
    /// and later): no data; sent once, just before the RAM section's `END`,
    /// when the source stops the guest for the switchover.
    pub const SWITCHOVER_START: u16 = 11;

    pub fn name(cmd: u16) -> &'static str {
        match cmd {
            1 => "OPEN_RETURN_PATH",
            2 => "PING",
            3 => "POSTCOPY_ADVISE",
            4 => "POSTCOPY_LISTEN",
            5 => "POSTCOPY_RUN",
            6 => "POSTCOPY_RAM_DISCARD",
            7 => "PACKAGED",
            8 => "ENABLE_COLO",
            9 => "POSTCOPY_RESUME",
            10 => "RECV_BITMAP",
            11 => "SWITCHOVER_START",
            _ => "unknown",
        }
    }
}

/// `MULTIFD_MAGIC` (`migration/multifd.c`): the first be32 of every multifd
/// channel.
pub const MULTIFD_MAGIC: u32 = 0x1122_3344;

/// The guest page size of x86 (`TARGET_PAGE_BITS` 12, and no
/// `configuration/target-page-bits` subsection says otherwise).
pub const PAGE_SIZE: usize = 4096;
pub const PAGE_BITS: u32 = 12;

/// The RAM section's name and the version QEMU 7.2 registers it with
/// (`register_savevm_live("ram", 0, 4, ...)` in `ram_mig_init`).
pub const RAM_SECTION: &str = "ram";
pub const RAM_VERSION: u32 = 4;

/// Limits: far above anything QEMU writes, low enough that no input can
/// make the parser allocate much or loop long.
pub mod limits {
    /// Machine type name in the configuration section (QEMU's are < 64).
    pub const MACHINE_NAME: u32 = 256;
    /// Capabilities listed in `configuration/capabilities` (QEMU 7.2 has 20).
    pub const CAPABILITIES: u32 = 64;
    /// RAM blocks in a `MEM_SIZE` record.
    pub const RAM_BLOCKS: usize = 4096;
    /// Sections started before the first RAM chunk.
    pub const SETUP_SECTIONS: usize = 64;
}
