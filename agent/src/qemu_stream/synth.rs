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
