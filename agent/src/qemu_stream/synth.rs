//! Synthetic QEMU 7.2 migration streams for tests, property tests and the
//! fuzz target's seeds, written the way QEMU's `migration/savevm.c` and
//! `migration/ram.c` write them, with every page they hold recorded.

use super::format::{self, PAGE_SIZE, ram, section};

/// One RAM record of a chunk.
#[derive(Clone, Debug)]
pub enum Record {
    /// A `PAGE` of block `block` (index into [`StreamSpec::blocks`]),
    /// content from `seed` (see [`page_content`]).
    Page { block: usize, page: u64, seed: u64 },
    /// A `ZERO` page.
    Zero { block: usize, page: u64 },
    /// An `XBZRLE` page with this (opaque) encoded data.
    Xbzrle {
        block: usize,
        page: u64,
        data: Vec<u8>,
    },
    /// A `COMPRESS_PAGE` page with this (opaque) zlib data.
    Compressed {
        block: usize,
        page: u64,
        data: Vec<u8>,
    },
}

/// The shape of a stream.
#[derive(Clone, Debug)]
pub struct StreamSpec {
    /// Send the configuration section (machine types 2.9 and later).
    pub configuration: bool,
    /// `x-ignore-shared` (adds each block's address to `MEM_SIZE`).
    pub ignore_shared: bool,
    pub uuid: Option<[u8; 16]>,
    /// Section footers (machine types 2.4 and later).
    pub footers: bool,
    /// RAM blocks: name and length in pages.
    pub blocks: Vec<(String, u64)>,
    /// The RAM chunks after setup: `PART` sections, the last one `END`.
    pub chunks: Vec<Vec<Record>>,
    /// Opaque device state: one `FULL` section per entry.
    pub devices: Vec<Vec<u8>>,
    /// QEMU 10.0+: a `SWITCHOVER_START` command before the RAM `END`.
    pub switchover_start: bool,
}

impl Default for StreamSpec {
    fn default() -> Self {
        Self {
            configuration: true,
            ignore_shared: false,
            uuid: None,
            footers: true,
            blocks: vec![("pc.ram".into(), 256), ("pc.bios".into(), 64)],
            chunks: vec![Vec::new()],
            devices: vec![b"\x01\x02\x03".to_vec()],
            switchover_start: false,
        }
    }
}

/// A page as the stream carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpectedPage {
    pub block: String,
    pub offset: u64,
    pub stream_offset: u64,
    pub data: Box<[u8; PAGE_SIZE]>,
}

/// A built stream and what it holds.
#[derive(Clone, Debug)]
pub struct Built {
    pub bytes: Vec<u8>,
    pub pages: Vec<ExpectedPage>,
    pub zero_pages: u64,
    pub xbzrle_pages: u64,
    pub compressed_pages: u64,
    /// Where the device state (after the RAM `END`) starts.
    pub tail_offset: usize,
}

/// The RAM section's id in built streams.
pub const RAM_SECTION_ID: u32 = 2;

/// Page content for `seed`: seed 0 is a zero page, others are distinct
/// pseudo-random pages.
pub fn page_content(seed: u64) -> Box<[u8; PAGE_SIZE]> {
    let mut page = Box::new([0u8; PAGE_SIZE]);
    if seed != 0 {
        let mut state = seed;
        for word in page.chunks_exact_mut(8) {
            // splitmix64
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            word.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
    }
    page
}

struct Writer {
    bytes: Vec<u8>,
    last_block: Option<usize>,
}

impl Writer {
    fn be32(&mut self, v: u32) {
        self.bytes.extend_from_slice(&v.to_be_bytes());
    }
    fn be64(&mut self, v: u64) {
        self.bytes.extend_from_slice(&v.to_be_bytes());
    }
    fn name(&mut self, name: &str) {
        self.bytes.push(name.len() as u8);
        self.bytes.extend_from_slice(name.as_bytes());
    }
    /// `save_page_header`.
    fn page_header(&mut self, spec: &StreamSpec, block: usize, page: u64, flag: u64) {
        let mut header = (page << format::PAGE_BITS) | flag;
        if self.last_block == Some(block) {
            header |= ram::CONTINUE;
        }
        self.be64(header);
        if self.last_block != Some(block) {
            self.name(&spec.blocks[block].0);
            self.last_block = Some(block);
        }
    }
    fn footer(&mut self, spec: &StreamSpec, id: u32) {
        if spec.footers {
            self.bytes.push(section::FOOTER);
            self.be32(id);
        }
    }
}

/// Writes the stream `spec` describes.
pub fn build(spec: &StreamSpec) -> Built {
    let mut w = Writer {
        bytes: Vec::new(),
        last_block: None,
    };
    let mut built = Built {
        bytes: Vec::new(),
        pages: Vec::new(),
        zero_pages: 0,
        xbzrle_pages: 0,
        compressed_pages: 0,
        tail_offset: 0,
    };
    w.be32(format::FILE_MAGIC);
    w.be32(format::FILE_VERSION);
    if spec.configuration {
        w.bytes.push(section::CONFIGURATION);
        let machine = "pc-i440fx-7.2";
        w.be32(machine.len() as u32);
        w.bytes.extend_from_slice(machine.as_bytes());
        if spec.ignore_shared {
            w.bytes.push(section::SUBSECTION);
            w.name("configuration/capabilities");
            w.be32(1);
            w.be32(1);
            w.name("x-ignore-shared");
        }
        if let Some(uuid) = spec.uuid {
            w.bytes.push(section::SUBSECTION);
            w.name("configuration/uuid");
            w.be32(1);
            w.bytes.extend_from_slice(&uuid);
        }
    }
    // Setup: START of "ram", MEM_SIZE, EOS.
    w.bytes.push(section::START);
    w.be32(RAM_SECTION_ID);
    w.name(format::RAM_SECTION);
    w.be32(0);
    w.be32(format::RAM_VERSION);
    let total: u64 = spec
        .blocks
        .iter()
        .map(|(_, pages)| pages << format::PAGE_BITS)
        .sum();
    w.be64(total | ram::MEM_SIZE);
    for (i, (name, pages)) in spec.blocks.iter().enumerate() {
        w.name(name);
        w.be64(pages << format::PAGE_BITS);
        if spec.ignore_shared {
            w.be64((i as u64) << 32);
        }
    }
    w.be64(ram::EOS);
    w.footer(spec, RAM_SECTION_ID);
    for (i, chunk) in spec.chunks.iter().enumerate() {
        let last = i + 1 == spec.chunks.len();
        if last && spec.switchover_start {
            w.bytes.push(section::COMMAND);
            w.bytes
                .extend_from_slice(&format::command::SWITCHOVER_START.to_be_bytes());
            w.bytes.extend_from_slice(&0u16.to_be_bytes());
        }
        w.bytes
            .push(if last { section::END } else { section::PART });
        w.be32(RAM_SECTION_ID);
        for record in chunk {
            match record {
                Record::Page { block, page, seed } => {
                    w.page_header(spec, *block, *page, ram::PAGE);
                    let data = page_content(*seed);
                    built.pages.push(ExpectedPage {
                        block: spec.blocks[*block].0.clone(),
                        offset: page << format::PAGE_BITS,
                        stream_offset: w.bytes.len() as u64,
                        data: data.clone(),
                    });
                    w.bytes.extend_from_slice(&data[..]);
                }
                Record::Zero { block, page } => {
                    w.page_header(spec, *block, *page, ram::ZERO);
                    w.bytes.push(0);
                    built.zero_pages += 1;
                }
                Record::Xbzrle { block, page, data } => {
                    w.page_header(spec, *block, *page, ram::XBZRLE);
                    w.bytes.push(ram::ENCODING_XBZRLE);
                    w.bytes
                        .extend_from_slice(&(data.len() as u16).to_be_bytes());
                    w.bytes.extend_from_slice(data);
                    built.xbzrle_pages += 1;
                }
                Record::Compressed { block, page, data } => {
                    w.page_header(spec, *block, *page, ram::COMPRESS_PAGE);
                    w.be32(data.len() as u32);
                    w.bytes.extend_from_slice(data);
                    built.compressed_pages += 1;
                }
            }
        }
        w.be64(ram::EOS);
        w.footer(spec, RAM_SECTION_ID);
    }
    built.tail_offset = w.bytes.len();
    // Completion: one FULL section per device, EOF, the VM description.
    for (i, state) in spec.devices.iter().enumerate() {
        let id = RAM_SECTION_ID + 1 + i as u32;
        w.bytes.push(section::FULL);
        w.be32(id);
        w.name(&format!("device{i}"));
        w.be32(0);
        w.be32(1);
        w.bytes.extend_from_slice(state);
        w.footer(spec, id);
    }
    w.bytes.push(section::EOF);
    let description = br#"{"page_size": 4096, "devices": []}"#;
    w.bytes.push(section::VMDESCRIPTION);
    w.be32(description.len() as u32);
    w.bytes.extend_from_slice(description);
    built.bytes = w.bytes;
    built
}

/// One packet of a synthetic multifd channel.
#[derive(Clone, Debug, Default)]
pub struct PacketSpec {
    pub sync: bool,
    pub block: String,
    /// Uncompressed pages: offset in the block, content seed.
    pub pages: Vec<(u64, u64)>,
    /// Zero pages by offset (QEMU 9.0+).
    pub zero: Vec<u64>,
    /// A compressed packet: the method's flag bits and its opaque data
    /// (`pages` then only counts: their content is not in the stream; a
    /// packet without pages carries no data, as in QEMU).
    pub compressed: Option<(u32, Vec<u8>)>,
}

/// A multifd channel as QEMU writes it: the hello for channel `id`, then
/// each packet (header of [`super::multifd::PACKET_LEN`] bytes, then its
/// page data), with every uncompressed page recorded.
pub fn multifd_channel(id: u8, packets: &[PacketSpec]) -> (Vec<u8>, Vec<ExpectedPage>) {
    use super::multifd::{FLAG_SYNC, PACKET_FIXED, PACKET_LEN, PACKET_PAGES, VERSION};
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&format::MULTIFD_MAGIC.to_be_bytes());
    bytes.extend_from_slice(&VERSION.to_be_bytes());
    bytes.extend_from_slice(&[0u8; 16]);
    bytes.push(id);
    bytes.extend_from_slice(&[0u8; 39]);
    let mut pages = Vec::new();
    for (number, packet) in packets.iter().enumerate() {
        let mut header = vec![0u8; PACKET_LEN];
        let mut put32 = |at: usize, v: u32| header[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let sync = if packet.sync { FLAG_SYNC } else { 0 };
        let flags = sync | packet.compressed.as_ref().map_or(0, |(method, _)| *method);
        let used = packet.pages.len() + packet.zero.len();
        put32(0, format::MULTIFD_MAGIC);
        put32(4, VERSION);
        put32(8, flags);
        put32(12, if used == 0 { 0 } else { PACKET_PAGES as u32 });
        put32(16, packet.pages.len() as u32);
        let data_len = match &packet.compressed {
            Some(_) if packet.pages.is_empty() => 0,
            Some((_, data)) => data.len(),
            None => packet.pages.len() * PAGE_SIZE,
        };
        put32(20, data_len as u32);
        put32(32, packet.zero.len() as u32);
        header[24..32].copy_from_slice(&(number as u64).to_be_bytes());
        let name = packet.block.as_bytes();
        header[64..64 + name.len().min(255)].copy_from_slice(&name[..name.len().min(255)]);
        let offsets = packet
            .pages
            .iter()
            .map(|(offset, _)| *offset)
            .chain(packet.zero.iter().copied());
        for (i, offset) in offsets.enumerate() {
            let at = PACKET_FIXED + 8 * i;
            header[at..at + 8].copy_from_slice(&offset.to_be_bytes());
        }
        bytes.extend_from_slice(&header);
        match &packet.compressed {
            Some(_) if packet.pages.is_empty() => {}
            Some((_, data)) => bytes.extend_from_slice(data),
            None => {
                for (offset, seed) in &packet.pages {
                    let data = page_content(*seed);
                    pages.push(ExpectedPage {
                        block: packet.block.clone(),
                        offset: *offset,
                        stream_offset: bytes.len() as u64,
                        data: data.clone(),
                    });
                    bytes.extend_from_slice(&data[..]);
                }
            }
        }
    }
    (bytes, pages)
}

/// Checks (or with `PAGEFP_WRITE_FUZZ_SEEDS=1` writes) a fuzz target's
/// committed seeds in `dir` against the ones built by a test.
pub fn check_seeds(dir: &str, seeds: &[(&str, Vec<u8>)]) {
    let write = std::env::var("PAGEFP_WRITE_FUZZ_SEEDS").is_ok_and(|v| v == "1");
    for (name, seed) in seeds {
        let path = format!("{dir}/{name}");
        if write {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(&path, seed).unwrap();
        } else {
            let committed = std::fs::read(&path).unwrap_or_default();
            assert!(
                committed == *seed,
                "{path} is out of date: run `PAGEFP_WRITE_FUZZ_SEEDS=1 cargo test -p agent fuzz_seeds`"
            );
        }
    }
}
