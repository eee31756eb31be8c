//! The parser: reads QEMU's stream from a [`Read`], hands every byte on to
//! a [`Sink`] (RAM page payloads as [`Page`]s, everything else as bytes).

use std::io::Read;

use super::{
    error::{Place, StreamError},
    format::{self, PAGE_SIZE, limits, ram, section},
    input::Input,
};

/// What a [`Sink`] may fail with.
pub type SinkError = Box<dyn std::error::Error + Send + Sync>;

/// Where the parsed stream goes. The bytes of [`Sink::bytes`] and the pages
/// of [`Sink::page`], in call order, are exactly the input stream.
pub trait Sink {
    /// Stream bytes to pass on unchanged.
    fn bytes(&mut self, bytes: &[u8]) -> Result<(), SinkError>;
    /// The 4096-byte payload of a RAM `PAGE` record; its header went to
    /// [`Sink::bytes`] just before.
    fn page(&mut self, page: Page<'_>) -> Result<(), SinkError>;
    /// The preamble (file header, configuration, commands, the setup
    /// sections) has been read and accepted. Called once, before the first
    /// page, and before [`Sink::bytes`] gets anything beyond the preamble
    /// and the next section's type byte. A sink that holds bytes back until
    /// now can still refuse the migration without having sent anything.
    fn preamble(&mut self, _preamble: &Preamble) -> Result<(), SinkError> {
        Ok(())
    }
    /// The parser is about to wait for more input (a good moment to flush).
    fn idle(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
    /// The RAM section ended; the rest (device state, EOF, the VM
    /// description) is passed on as bytes.
    fn ram_end(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// A RAM page as it appears in the stream.
#[derive(Clone, Copy, Debug)]
pub struct Page<'a> {
    pub data: &'a [u8; PAGE_SIZE],
    /// The RAM block (`RAMBlock.idstr`) and the page's offset in it.
    pub block: &'a str,
    pub offset: u64,
    /// Where `data` starts in the stream.
    pub stream_offset: u64,
}

/// What to do with a feature the parser does not understand when it is
/// found in the preamble (before anything was sent). Found later, the rest
/// of the stream is always passed through unchanged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Unsupported {
    /// Fail with [`StreamError::Unsupported`].
    #[default]
    Refuse,
    /// Pass the rest of the stream through unchanged, without deduplication.
    PassThrough,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    pub unsupported: Unsupported,
}

/// A RAM block as the `MEM_SIZE` record announces it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamBlock {
    pub name: String,
    pub length: u64,
    /// Its guest physical address (`x-ignore-shared` streams only).
    pub address: Option<u64>,
}

/// Where and why the parser stopped looking into the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassThrough {
    pub offset: u64,
    pub reason: String,
}

/// What the stream's beginning said.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Preamble {
    /// Machine type from the configuration section (absent for machine
    /// types older than 2.9, which send no configuration).
    pub machine: Option<String>,
    /// Capabilities the configuration lists (QEMU 7.2: `x-ignore-shared`).
    pub capabilities: Vec<String>,
    pub uuid: Option<[u8; 16]>,
    /// Sections started in the setup phase: (id, name).
    pub sections: Vec<(u32, String)>,
    pub ram_section: Option<u32>,
    pub blocks: Vec<RamBlock>,
    /// The source opened QEMU's return path (`OPEN_RETURN_PATH`, the
    /// `return-path` capability): the destination answers on the same
    /// connection (PONG, and SHUT when it has loaded the stream), and the
    /// source waits for SHUT before it ends its stream.
    pub return_path: bool,
    /// Set when the stream is passed through from the preamble on.
    pub pass_through: Option<PassThrough>,
}

/// What the parser saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub stream_bytes: u64,
    pub preamble: Preamble,
    /// RAM records by kind.
    pub pages: u64,
    pub zero_pages: u64,
    pub xbzrle_pages: u64,
    pub compressed_pages: u64,
    /// RAM sections (`START`, `PART`, `END`) read to their `EOS`.
    pub ram_chunks: u64,
    /// The RAM section's `END` was read: everything after it (device
    /// state, `EOF`, the VM description) was passed through.
    pub ram_complete: bool,
    /// `MULTIFD_FLUSH` records (QEMU 8.0+ with multifd).
    pub multifd_flushes: u64,
    /// QEMU 10.0+'s `SWITCHOVER_START` command was read (between the last
    /// `PART` and the `END` of RAM).
    pub switchover_start: bool,
    /// Set if the parser stopped understanding the stream before the RAM
    /// section ended; everything from `offset` on was passed through.
    pub pass_through: Option<PassThrough>,
}

/// Parses the whole stream from `reader` into `sink`.
pub fn parse<R: Read, S: Sink + ?Sized>(
    reader: R,
    sink: &mut S,
    options: &Options,
) -> Result<Summary, StreamError> {
    let mut parser = Parser {
        input: Input::new(reader, INPUT_CAPACITY),
        sink,
        options: *options,
        out: Vec::with_capacity(OUT_FLUSH + 64),
        place: Place::TopLevel,
        mark: 0,
        last_block: None,
        command: None,
        ignore_shared: false,
        preamble_done: false,
        summary: Summary::default(),
    };
    parser.run()?;
    parser.flush_out()?;
    parser.summary.stream_bytes = parser.input.offset();
    Ok(parser.summary)
}

const INPUT_CAPACITY: usize = 256 << 10;
/// Bytes collected for [`Sink::bytes`] before they are handed over.
const OUT_FLUSH: usize = 64 << 10;

/// How a part of the stream ended.
enum Flow {
    Continue,
    /// Stop parsing; pass the rest through, for this reason.
    PassRest(String),
}

const ADVICE_COMMAND: &str = "The proxies understand the commands QEMU 7.2 to 10.0 send for plain pre-copy with or without the return path; migrate without the feature that sends this one.";
const ADVICE_POSTCOPY: &str = "Postcopy needs page requests from the destination and its own channel, which the proxies do not carry: switch postcopy-ram off (the return path alone is carried).";
const ADVICE_MULTIFD: &str = "This connection is one of QEMU's multifd channels, not its main stream: read it with qemu_stream::multifd::parse_channel.";
const ADVICE_COLO: &str = "COLO is not supported through the proxies: switch x-colo off.";
const ADVICE_SECTION: &str = "Only RAM is understood among the iterative sections; the data of others (block migration, dirty bitmaps, VFIO) is not framed, so nothing after it could be deduplicated. Migrate disks with NBD/drive-mirror instead, switch the capability off, or pass --pass-through-unsupported to carry the stream without deduplication.";
const ADVICE_CONFIGURATION: &str = "This proxy reads QEMU 7.2's configuration section; pass --pass-through-unsupported to carry the stream without deduplication.";
const ADVICE_RAM: &str = "This RAM record is not understood (QEMU 7.2 to 10.0 write MEM_SIZE, ZERO, PAGE, XBZRLE, COMPRESS_PAGE, MULTIFD_FLUSH and EOS); pass --pass-through-unsupported to carry the stream without deduplication.";

struct Parser<'s, R, S: ?Sized> {
    input: Input<R>,
    sink: &'s mut S,
    options: Options,
    /// Bytes consumed and not yet handed to the sink.
    out: Vec<u8>,
    place: Place,
    /// Stream offset where the current item (section, record) started.
    mark: u64,
    /// The block of the previous page record (for `CONTINUE`).
    last_block: Option<String>,
    /// The most telling command of the preamble (offset, number).
    command: Option<(u64, u16)>,
    ignore_shared: bool,
    preamble_done: bool,
    summary: Summary,
}

impl<R: Read, S: Sink + ?Sized> Parser<'_, R, S> {
    fn run(&mut self) -> Result<(), StreamError> {
        self.header()?;
        let mut kind = self.u8("a section type or the configuration section")?;
        if kind == section::CONFIGURATION {
            if let Flow::PassRest(reason) = self.configuration()? {
                return self.pass_rest(reason);
            }
            kind = self.u8("the first section")?;
        }
        // Setup phase (`qemu_savevm_state_setup`): a START section per
        // iterative handler, possibly after commands.
        while kind == section::START || kind == section::COMMAND {
            self.mark = self.input.offset() - 1;
            if kind == section::COMMAND {
                self.command()?;
                self.place = Place::TopLevel;
                kind = self.u8("the next section")?;
                continue;
            }
            if self.command.is_some() {
                return Err(self.refuse_command());
            }
            if let Flow::PassRest(reason) = self.start_section()? {
                return self.pass_rest(reason);
            }
            self.place = Place::TopLevel;
            kind = self.u8("the next section")?;
        }
        if self.command.is_some() {
            return Err(self.refuse_command());
        }
        if self.summary.preamble.ram_section.is_none() {
            self.mark = self.input.offset() - 1;
            let flow = self.unsupported(
                format!(
                    "no RAM section before the first {} section",
                    section::name(kind)
                ),
                ADVICE_SECTION,
            )?;
            if let Flow::PassRest(reason) = flow {
                return self.pass_rest(reason);
            }
        }
        self.finish_preamble()?;
        // Iteration (`qemu_savevm_state_iterate`: PART sections) and
        // completion (`qemu_savevm_state_complete_precopy`: END sections,
        // then one FULL section per device, EOF, the VM description).
        loop {
            self.mark = self.input.offset() - 1;
            match kind {
                section::PART | section::END => {
                    let id = self.be32("a section id")?;
                    if Some(id) != self.summary.preamble.ram_section {
                        return self.pass_rest(format!(
                            "{} of section {id}, which is not the RAM section",
                            section::name(kind)
                        ));
                    }
                    self.place = Place::Section {
                        id,
                        name: format::RAM_SECTION.into(),
                    };
                    if let Flow::PassRest(reason) = self.ram_records(false)? {
                        return self.pass_rest(reason);
                    }
                    if let Flow::PassRest(reason) = self.footer(id)? {
                        return self.pass_rest(reason);
                    }
                    if kind == section::END {
                        self.summary.ram_complete = true;
                        self.place = Place::TopLevel;
                        self.flush_out()?;
                        self.sink.ram_end().map_err(StreamError::Sink)?;
                        return self.tail();
                    }
                }
                section::COMMAND => {
                    self.place = Place::Command;
                    let cmd = self.be16("a command number")?;
                    let len = self.be16("a command's length")?;
                    // QEMU 10.0+ marks the switchover (guest stopped) with a
                    // command that carries nothing; RAM goes on after it.
                    if cmd != format::command::SWITCHOVER_START || len != 0 {
                        return self.pass_rest(format!(
                            "command {cmd} ({}, {len} bytes) before the RAM section ended",
                            format::command::name(cmd)
                        ));
                    }
                    self.summary.switchover_start = true;
                }
                _ => {
                    return self.pass_rest(format!(
                        "a {} section (type {kind:#04x}) before the RAM section ended",
                        section::name(kind)
                    ));
                }
            }
            self.place = Place::TopLevel;
            kind = self.u8("the next section (the RAM section has not ended)")?;
        }
    }

    /// `qemu_savevm_state_header`: magic and version.
    fn header(&mut self) -> Result<(), StreamError> {
        let magic = self.take::<4>("the file magic \"QEVM\"")?;
        if u32::from_be_bytes(magic) == format::MULTIFD_MAGIC {
            return Err(StreamError::Unsupported {
                offset: 0,
                place: Place::TopLevel,
                feature: "a multifd channel (it starts with MULTIFD_MAGIC)".into(),
                advice: ADVICE_MULTIFD,
            });
        }
        if u32::from_be_bytes(magic) != format::FILE_MAGIC {
            return Err(StreamError::NotQemu { found: magic });
        }
        let version = u32::from_be_bytes(self.take::<4>("the file version")?);
        if version != format::FILE_VERSION {
            return Err(StreamError::Version(version));
        }
        Ok(())
    }

    /// `vmstate_configuration` (`migration/savevm.c`): the machine type,
    /// then optional subsections.
    fn configuration(&mut self) -> Result<Flow, StreamError> {
        self.place = Place::Configuration;
        self.mark = self.input.offset() - 1;
        let len = self.be32("the machine type's length")?;
        if len > limits::MACHINE_NAME {
            return Err(self.malformed(
                "a machine type name of at most 256 bytes",
                format!("{len} bytes"),
            ));
        }
        let machine = self.name(len as usize, "the machine type")?;
        self.summary.preamble.machine = Some(machine);
        loop {
            if self.peek_u8("a configuration subsection or the first section")?
                != section::SUBSECTION
            {
                return Ok(Flow::Continue);
            }
            self.mark = self.input.offset();
            self.u8("the subsection marker")?;
            let len = self.u8("a subsection name's length")?;
            let name = self.name(usize::from(len), "a subsection name")?;
            let version = self.be32("a subsection version")?;
            if version != 1 {
                return self.unsupported(
                    format!("version {version} of configuration subsection {name:?}"),
                    ADVICE_CONFIGURATION,
                );
            }
            match name.as_str() {
                // vmstate_target_page_bits: VMSTATE_UINT32.
                "configuration/target-page-bits" => {
                    let bits = self.be32("the target page bits")?;
                    if bits != format::PAGE_BITS {
                        return self.unsupported(
                            format!(
                                "target pages of 2^{bits} bytes (this proxy knows 4 KiB pages)"
                            ),
                            ADVICE_CONFIGURATION,
                        );
                    }
                }
                // vmstate_capabilites: be32 count, then u8 length + name each.
                "configuration/capabilities" => {
                    let count = self.be32("the number of capabilities")?;
                    if count > limits::CAPABILITIES {
                        return Err(self.malformed("at most 64 capabilities", format!("{count}")));
                    }
                    for _ in 0..count {
                        let len = self.u8("a capability name's length")?;
                        let capability = self.name(usize::from(len), "a capability name")?;
                        match capability.as_str() {
                            "x-ignore-shared" => self.ignore_shared = true,
                            other => {
                                return self.unsupported(
                                    format!("capability {other:?} (it changes the stream format)"),
                                    ADVICE_CONFIGURATION,
                                );
                            }
                        }
                        self.summary.preamble.capabilities.push(capability);
                    }
                }
                // vmstate_uuid: VMSTATE_UINT8_ARRAY of 16.
                "configuration/uuid" => {
                    self.summary.preamble.uuid = Some(self.take::<16>("the VM's UUID")?);
                }
                other => {
                    return self.unsupported(
                        format!("configuration subsection {other:?}"),
                        ADVICE_CONFIGURATION,
                    );
                }
            }
        }
    }

    /// `qemu_savevm_command_send`: be16 command, be16 length, data. Every
    /// command in QEMU 7.2 belongs to a feature the proxies cannot carry.
    fn command(&mut self) -> Result<(), StreamError> {
        self.place = Place::Command;
        let cmd = self.be16("a command number")?;
        let len = self.be16("a command's length")?;
        if cmd == format::command::SWITCHOVER_START && len == 0 {
            // QEMU 10.0+, when the migration completes without iterating.
            self.summary.switchover_start = true;
            return Ok(());
        }
        // The return path (and its PING, be32 data) is carried: the
        // proxies relay the destination's answers.
        if (cmd == format::command::OPEN_RETURN_PATH && len == 0)
            || (cmd == format::command::PING && len == 4)
        {
            self.summary.preamble.return_path |= cmd == format::command::OPEN_RETURN_PATH;
            self.forward(usize::from(len), "a command's data")?;
            return Ok(());
        }
        // Keep reading commands (their data is framed) to name the most
        // telling feature: postcopy sends OPEN_RETURN_PATH, PING, then
        // POSTCOPY_ADVISE.
        let rank = |cmd: u16| match cmd {
            3..=7 | 9 | 10 => 3,
            8 => 2,
            _ => 0,
        };
        if self.command.is_none_or(|(_, seen)| rank(cmd) > rank(seen)) {
            self.command = Some((self.mark, cmd));
        }
        // PACKAGED's payload follows beyond its length: stop here.
        if cmd != 7 {
            self.forward(usize::from(len), "a command's data")?;
        }
        if cmd == 7 || rank(cmd) == 0 {
            return Err(self.refuse_command());
        }
        Ok(())
    }

    /// The error for the commands seen: every command in QEMU 7.2 belongs to
    /// a feature the proxies cannot carry.
    fn refuse_command(&self) -> StreamError {
        let (offset, cmd) = self.command.expect("a command was read");
        let (feature, advice) = match cmd {
            3..=7 | 9 | 10 => ("postcopy", ADVICE_POSTCOPY),
            8 => ("COLO", ADVICE_COLO),
            _ => ("an unknown command", ADVICE_COMMAND),
        };
        StreamError::Unsupported {
            offset,
            place: Place::TopLevel,
            feature: format!("{feature} (command {cmd}, {})", format::command::name(cmd)),
            advice,
        }
    }

    /// A START section of the setup phase (`save_section_header`): be32
    /// id, u8 length + name, be32 instance, be32 version, the handler's
    /// setup data, the footer.
    fn start_section(&mut self) -> Result<Flow, StreamError> {
        let id = self.be32("a section id")?;
        let len = self.u8("a section name's length")?;
        let name = self.name(usize::from(len), "a section name")?;
        let instance = self.be32("a section instance id")?;
        let version = self.be32("a section version")?;
        self.place = Place::Section {
            id,
            name: name.clone(),
        };
        self.summary.preamble.sections.push((id, name.clone()));
        if self.summary.preamble.sections.len() > limits::SETUP_SECTIONS {
            return Err(self.malformed("at most 64 sections in the setup phase", "more".into()));
        }
        if name != format::RAM_SECTION {
            return self.unsupported(
                format!("iterative section {name:?} (id {id}) besides RAM"),
                ADVICE_SECTION,
            );
        }
        if self.summary.preamble.ram_section.is_some() {
            return self.unsupported("a second RAM section".into(), ADVICE_SECTION);
        }
        if instance != 0 || version != format::RAM_VERSION {
            return self.unsupported(
                format!(
                    "RAM section instance {instance} version {version} (QEMU 7.2: instance 0, version 4)"
                ),
                ADVICE_RAM,
            );
        }
        self.summary.preamble.ram_section = Some(id);
        if let Flow::PassRest(reason) = self.ram_records(true)? {
            return Ok(Flow::PassRest(reason));
        }
        self.footer(id)
    }

    /// The section footer (`save_section_footer`): 0x7e and the section id,
    /// absent for machine types before 2.4.
    fn footer(&mut self, id: u32) -> Result<Flow, StreamError> {
        if self.peek_u8("the section footer or the next section")? != section::FOOTER {
            return Ok(Flow::Continue);
        }
        self.mark = self.input.offset();
        self.u8("the section footer")?;
        let found = self.be32("the section id in the footer")?;
        if found != id {
            return self.unsupported(
                format!("a footer of section {found} closing section {id}"),
                ADVICE_RAM,
            );
        }
        Ok(Flow::Continue)
    }

    /// RAM records up to and including `EOS` (`ram_load_precopy`).
    fn ram_records(&mut self, setup: bool) -> Result<Flow, StreamError> {
        loop {
            self.mark = self.input.offset();
            let header = self.be64("a RAM record header (be64 offset | flags)")?;
            let flags = header & ram::FLAGS_MASK;
            let addr = header & !ram::FLAGS_MASK;
            let kind = flags & !ram::CONTINUE;
            if setup && !matches!(kind, ram::MEM_SIZE | ram::EOS | ram::MULTIFD_FLUSH) {
                // ram_save_setup writes the block list and EOS only; pages
                // before the preamble is accepted would break the promise
                // that nothing goes out before it.
                return self.unsupported(
                    format!(
                        "a RAM record with flags {flags:#x} ({}) in the setup section",
                        flag_names(flags)
                    ),
                    ADVICE_RAM,
                );
            }
            let flow = match kind {
                ram::EOS => {
                    self.summary.ram_chunks += 1;
                    return Ok(Flow::Continue);
                }
                ram::MEM_SIZE => self.mem_size(addr)?,
                ram::MULTIFD_FLUSH if addr == 0 => {
                    self.summary.multifd_flushes += 1;
                    Flow::Continue
                }
                ram::ZERO => match self.block(flags)? {
                    Flow::Continue => {
                        self.u8("the fill byte of a ZERO page")?;
                        self.summary.zero_pages += 1;
                        Flow::Continue
                    }
                    pass => pass,
                },
                ram::PAGE => match self.block(flags)? {
                    Flow::Continue => {
                        self.page(addr)?;
                        Flow::Continue
                    }
                    pass => pass,
                },
                ram::XBZRLE => match self.block(flags)? {
                    Flow::Continue => self.xbzrle()?,
                    pass => pass,
                },
                ram::COMPRESS_PAGE => match self.block(flags)? {
                    Flow::Continue => self.compressed()?,
                    pass => pass,
                },
                _ => self.unsupported(
                    format!("RAM record flags {flags:#x} ({})", flag_names(flags)),
                    ADVICE_RAM,
                )?,
            };
            if let Flow::PassRest(reason) = flow {
                return Ok(Flow::PassRest(reason));
            }
        }
    }

    /// `MEM_SIZE`: the total, then per block u8 length + name, be64 length
    /// (and with `x-ignore-shared` be64 address) until the lengths add up.
    fn mem_size(&mut self, total: u64) -> Result<Flow, StreamError> {
        let mut left = total;
        while left > 0 {
            let len = self.u8("a RAM block name's length")?;
            let name = self.name(usize::from(len), "a RAM block name")?;
            let length = self.be64("a RAM block's length")?;
            let address = if self.ignore_shared {
                Some(self.be64("a RAM block's address (x-ignore-shared)")?)
            } else {
                None
            };
            let Some(rest) = left.checked_sub(length) else {
                return self.unsupported(
                    format!(
                        "RAM block {name:?} of {length} bytes where {left} of {total} are left"
                    ),
                    ADVICE_RAM,
                );
            };
            left = rest;
            if length == 0 || self.summary.preamble.blocks.len() >= limits::RAM_BLOCKS {
                return self.unsupported(
                    format!(
                        "a RAM block list with an empty block or more than {} blocks",
                        limits::RAM_BLOCKS
                    ),
                    ADVICE_RAM,
                );
            }
            let blocks = &mut self.summary.preamble.blocks;
            blocks.push(RamBlock {
                name,
                length,
                address,
            });
        }
        Ok(Flow::Continue)
    }

    /// The block of a page record: its name unless `CONTINUE`
    /// (`ram_block_from_stream`).
    fn block(&mut self, flags: u64) -> Result<Flow, StreamError> {
        if flags & ram::CONTINUE != 0 {
            if self.last_block.is_none() {
                return self.unsupported(
                    "a CONTINUE page record with no block before it".into(),
                    ADVICE_RAM,
                );
            }
            return Ok(Flow::Continue);
        }
        let len = self.u8("a RAM block name's length")?;
        let name = self.name(usize::from(len), "a RAM block name")?;
        self.last_block = Some(name);
        Ok(Flow::Continue)
    }

    /// A `PAGE` record's 4096 bytes, handed to the sink as a page.
    fn page(&mut self, offset: u64) -> Result<(), StreamError> {
        self.flush_out()?;
        self.ensure(PAGE_SIZE)?;
        if self.input.available() < PAGE_SIZE {
            return Err(self.truncated("the 4096 bytes of a RAM page"));
        }
        let block = self.last_block.as_deref().unwrap_or_default();
        hand_page(&mut self.input, self.sink, block, offset)?;
        self.summary.pages += 1;
        Ok(())
    }

    /// An XBZRLE record (`save_xbzrle_page`): u8 encoding, be16 length, data.
    fn xbzrle(&mut self) -> Result<Flow, StreamError> {
        let encoding = self.u8("an XBZRLE encoding byte")?;
        let len = self.be16("an XBZRLE length")?;
        if encoding != ram::ENCODING_XBZRLE || usize::from(len) > PAGE_SIZE {
            return self.unsupported(
                format!("an XBZRLE page with encoding {encoding} and {len} bytes"),
                ADVICE_RAM,
            );
        }
        self.forward(usize::from(len), "XBZRLE data")?;
        self.summary.xbzrle_pages += 1;
        Ok(Flow::Continue)
    }

    /// A `COMPRESS_PAGE` record (`qemu_put_compression_data`): be32 length,
    /// zlib data.
    fn compressed(&mut self) -> Result<Flow, StreamError> {
        let len = self.be32("a compressed page's length")?;
        if len > ram::MAX_COMPRESSED {
            return self.unsupported(format!("a compressed page of {len} bytes"), ADVICE_RAM);
        }
        self.forward(len as usize, "compressed page data")?;
        self.summary.compressed_pages += 1;
        Ok(Flow::Continue)
    }

    /// What the parser does not understand: an error while nothing has been
    /// sent (unless the options say pass through), else pass the rest on.
    fn unsupported(&mut self, feature: String, advice: &'static str) -> Result<Flow, StreamError> {
        if !self.preamble_done && self.options.unsupported == Unsupported::Refuse {
            return Err(StreamError::Unsupported {
                offset: self.mark,
                place: self.place.clone(),
                feature,
                advice,
            });
        }
        Ok(Flow::PassRest(format!("{feature}{}", self.place)))
    }

    fn finish_preamble(&mut self) -> Result<(), StreamError> {
        self.flush_out()?;
        self.preamble_done = true;
        self.sink
            .preamble(&self.summary.preamble)
            .map_err(StreamError::Sink)
    }

    /// Everything from `self.mark` on passes through unchanged.
    fn pass_rest(&mut self, reason: String) -> Result<(), StreamError> {
        log::warn!(
            "QEMU stream: passing everything from byte {} on through unchanged, without deduplication: {reason}",
            self.mark
        );
        let pass = PassThrough {
            offset: self.mark,
            reason,
        };
        self.summary.pass_through = Some(pass.clone());
        if !self.preamble_done {
            self.summary.preamble.pass_through = Some(pass);
            self.finish_preamble()?;
        }
        self.tail()
    }

    /// Copies the rest of the stream to the sink.
    fn tail(&mut self) -> Result<(), StreamError> {
        self.flush_out()?;
        loop {
            if self.ensure(1)? == 0 {
                return Ok(());
            }
            let chunk = self.input.peek();
            let n = chunk.len();
            self.sink.bytes(chunk).map_err(StreamError::Sink)?;
            self.input.consume(n);
        }
    }

    // Reading.

    /// Buffers at least `n` bytes unless the stream ends first (telling the
    /// sink before waiting); how many are buffered.
    fn ensure(&mut self, n: usize) -> Result<usize, StreamError> {
        if self.input.available() < n {
            self.flush_out()?;
        }
        fill(&mut self.input, self.sink, n)
    }

    fn flush_out(&mut self) -> Result<(), StreamError> {
        if !self.out.is_empty() {
            self.sink.bytes(&self.out).map_err(StreamError::Sink)?;
            self.out.clear();
        }
        Ok(())
    }

    /// Passes `n` bytes on (read in pieces: no allocation grows with `n`).
    fn forward(&mut self, mut n: usize, expected: &'static str) -> Result<(), StreamError> {
        while n > 0 {
            let want = n.min(OUT_FLUSH);
            if self.ensure(want)? < want {
                return Err(self.truncated(expected));
            }
            self.out.extend_from_slice(&self.input.peek()[..want]);
            self.input.consume(want);
            n -= want;
            if self.out.len() >= OUT_FLUSH {
                self.flush_out()?;
            }
        }
        Ok(())
    }

    fn take<const N: usize>(&mut self, expected: &'static str) -> Result<[u8; N], StreamError> {
        if self.ensure(N)? < N {
            return Err(self.truncated(expected));
        }
        let bytes: [u8; N] = self.input.peek()[..N].try_into().unwrap();
        self.input.consume(N);
        self.out.extend_from_slice(&bytes);
        if self.out.len() >= OUT_FLUSH {
            self.flush_out()?;
        }
        Ok(bytes)
    }

    fn u8(&mut self, expected: &'static str) -> Result<u8, StreamError> {
        Ok(self.take::<1>(expected)?[0])
    }

    fn be16(&mut self, expected: &'static str) -> Result<u16, StreamError> {
        Ok(u16::from_be_bytes(self.take(expected)?))
    }

    fn be32(&mut self, expected: &'static str) -> Result<u32, StreamError> {
        Ok(u32::from_be_bytes(self.take(expected)?))
    }

    fn be64(&mut self, expected: &'static str) -> Result<u64, StreamError> {
        Ok(u64::from_be_bytes(self.take(expected)?))
    }

    /// The next byte, not consumed.
    fn peek_u8(&mut self, expected: &'static str) -> Result<u8, StreamError> {
        if self.ensure(1)? < 1 {
            return Err(self.truncated(expected));
        }
        Ok(self.input.peek()[0])
    }

    /// `len` bytes (at most 256) of a name, passed on; lossy UTF-8.
    fn name(&mut self, len: usize, expected: &'static str) -> Result<String, StreamError> {
        debug_assert!(len <= 256);
        if self.ensure(len)? < len {
            return Err(self.truncated(expected));
        }
        let bytes = &self.input.peek()[..len];
        let name = String::from_utf8_lossy(bytes).into_owned();
        self.out.extend_from_slice(bytes);
        self.input.consume(len);
        Ok(name)
    }

    fn truncated(&self, expected: &'static str) -> StreamError {
        StreamError::Truncated {
            offset: self.input.offset() + self.input.available() as u64,
            place: self.place.clone(),
            expected,
        }
    }

    fn malformed(&self, expected: &'static str, found: String) -> StreamError {
        StreamError::Malformed {
            offset: self.mark,
            place: self.place.clone(),
            expected,
            found,
        }
    }
}

/// Buffers at least `n` bytes of `input` unless the stream ends first,
/// telling `sink` before it waits ([`Sink::idle`]); how many are buffered.
pub(super) fn fill<R: Read, S: Sink + ?Sized>(
    input: &mut Input<R>,
    sink: &mut S,
    n: usize,
) -> Result<usize, StreamError> {
    if input.available() < n {
        sink.idle().map_err(StreamError::Sink)?;
        let offset = input.offset();
        return input
            .fill(n)
            .map_err(|source| StreamError::Io { offset, source });
    }
    Ok(input.available())
}

/// Hands the next 4096 buffered bytes to `sink` as the page at `offset` of
/// `block`, without copying them, and consumes them. The caller made sure
/// they are buffered.
pub(super) fn hand_page<R: Read, S: Sink + ?Sized>(
    input: &mut Input<R>,
    sink: &mut S,
    block: &str,
    offset: u64,
) -> Result<(), StreamError> {
    let stream_offset = input.offset();
    let data: &[u8; PAGE_SIZE] = input.peek()[..PAGE_SIZE].try_into().unwrap();
    sink.page(Page {
        data,
        block,
        offset,
        stream_offset,
    })
    .map_err(StreamError::Sink)?;
    input.consume(PAGE_SIZE);
    Ok(())
}

/// The flags of a RAM record header, by name.
fn flag_names(flags: u64) -> String {
    const NAMES: [(u64, &str); 10] = [
        (ram::FULL, "FULL"),
        (ram::ZERO, "ZERO"),
        (ram::MEM_SIZE, "MEM_SIZE"),
        (ram::PAGE, "PAGE"),
        (ram::EOS, "EOS"),
        (ram::CONTINUE, "CONTINUE"),
        (ram::XBZRLE, "XBZRLE"),
        (ram::HOOK, "HOOK (RDMA)"),
        (ram::COMPRESS_PAGE, "COMPRESS_PAGE"),
        (ram::MULTIFD_FLUSH, "MULTIFD_FLUSH"),
    ];
    let mut names: Vec<String> = NAMES
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, name)| (*name).to_string())
        .collect();
    let unknown = flags & !NAMES.iter().fold(0, |all, (bit, _)| all | bit);
    if unknown != 0 {
        names.push(format!("unknown {unknown:#x}"));
    }
    names.join("|")
}
