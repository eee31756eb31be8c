//! The catalog file: reading (bounded, every page checked) and writing. On
//! its own, without the rest of the agent, so the fuzz target compiles it
//! alone (`agent/fuzz/fuzz_targets/catalog.rs`).

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

use crate::{
    page::PAGE_SIZE,
    transport::{hashes, le_u32, le_u64},
};

pub const MAGIC: [u8; 4] = *b"PFTC";
pub const VERSION: u32 = 1;
const HEADER_LEN: usize = 48;

/// Most templates one catalog file may hold (4 GiB of pages; also the most
/// one native migration can offer).
pub const MAX_TEMPLATES: usize = 1 << 20;

/// Default directory `templates import` installs into and `migrate
/// receive` loads from.
pub const DEFAULT_DIR: &str = "/var/lib/pagefp/catalogs";

/// Templates and their pages.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Catalog {
    pub hashes: Vec<[u8; 32]>,
    /// `hashes.len()` pages.
    pub pages: Vec<u8>,
}

impl Catalog {
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    pub fn page(&self, index: usize) -> &[u8] {
        &self.pages[index * PAGE_SIZE..(index + 1) * PAGE_SIZE]
    }

    /// Identifies the catalog: blake3 of its hash list.
    pub fn digest(&self) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new();
        for hash in &self.hashes {
            hasher.update(hash);
        }
        *hasher.finalize().as_bytes()
    }

    pub fn to_bytes(&self) -> anyhow::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.len() * 32 + self.pages.len() / 2);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        out.extend_from_slice(&(self.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.digest());
        for hash in &self.hashes {
            out.extend_from_slice(hash);
        }
        let compressed = zstd::bulk::compress(&self.pages, 3).context("compressing templates")?;
        out.extend_from_slice(&(compressed.len() as u64).to_le_bytes());
        out.extend_from_slice(&compressed);
        Ok(out)
    }

    /// Parses and checks a catalog: every page must match its hash.
    pub fn from_bytes(bytes: &[u8]) -> anyhow::Result<Self> {
        if bytes.len() < HEADER_LEN || bytes[..4] != MAGIC {
            bail!("not a pagefp template catalog (made by `pagefp templates export`)");
        }
        let word = |at: usize| le_u32(bytes, at).unwrap_or_default();
        if word(4) != VERSION {
            bail!(
                "catalog version {} is not supported (this pagefp reads version {VERSION})",
                word(4)
            );
        }
        if word(8) as usize != PAGE_SIZE {
            bail!(
                "catalog of {}-byte pages; this host uses {PAGE_SIZE}",
                word(8)
            );
        }
        let count = word(12) as usize;
        if count > MAX_TEMPLATES {
            bail!(
                "catalog of {count} templates; at most {MAX_TEMPLATES} are read (export smaller catalogs with `pagefp templates export --budget-mib`)"
            );
        }
        let hashes_end = HEADER_LEN + count * 32;
        let truncated = || {
            anyhow::anyhow!(
                "catalog is truncated: {count} templates announced, {} bytes present",
                bytes.len()
            )
        };
        let digest = hashes(&bytes[16..HEADER_LEN]).context("catalog header")?[0];
        let hashes = bytes
            .get(HEADER_LEN..hashes_end)
            .and_then(hashes)
            .ok_or_else(truncated)?;
        // Everything about the hash list is checked before any page data is
        // decompressed.
        let catalog = Self {
            hashes,
            pages: Vec::new(),
        };
        if catalog.digest() != digest {
            bail!("catalog digest mismatch: the file is corrupt");
        }
        let zero = crate::content::zero_page_hash();
        let mut seen = std::collections::HashSet::with_capacity(count);
        for (i, hash) in catalog.hashes.iter().enumerate() {
            if *hash == zero {
                bail!(
                    "catalog template {i} is the zero page, which is never a template: the file was not made by pagefp"
                );
            }
            if !seen.insert(hash) {
                bail!(
                    "catalog template {i} repeats an earlier one: the file was not made by pagefp"
                );
            }
        }
        let compressed_len = le_u64(bytes, hashes_end).ok_or_else(truncated)? as usize;
        let body = &bytes[hashes_end + 8..];
        if body.len() != compressed_len {
            bail!(
                "catalog is truncated: page data has {} of {compressed_len} bytes",
                body.len()
            );
        }
        // Page by page, each checked against its hash as it comes: memory
        // grows only with pages that proved themselves.
        let mut decoder =
            zstd::stream::read::Decoder::new(body).context("catalog page data is not zstd")?;
        let mut catalog = catalog;
        let mut page = vec![0u8; PAGE_SIZE];
        for i in 0..count {
            decoder.read_exact(&mut page).with_context(|| {
                format!("catalog page data ends or is corrupt at template {i} of {count}")
            })?;
            if blake3::hash(&page).as_bytes() != &catalog.hashes[i] {
                bail!("catalog template {i} does not match its hash: the file is corrupt");
            }
            catalog.pages.extend_from_slice(&page);
        }
        if decoder
            .read(&mut page[..1])
            .context("catalog page data is corrupt")?
            != 0
        {
            bail!("catalog page data holds more than its {count} pages: the file is corrupt");
        }
        Ok(catalog)
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        // The largest file a catalog of MAX_TEMPLATES incompressible pages makes.
        let max_len = (HEADER_LEN + MAX_TEMPLATES * (32 + PAGE_SIZE + 1) + (1 << 20)) as u64;
        let len = std::fs::metadata(path)
            .with_context(|| format!("reading catalog {}", path.display()))?
            .len();
        if len > max_len {
            bail!(
                "catalog {} is {len} bytes, more than any catalog of at most {MAX_TEMPLATES} templates",
                path.display()
            );
        }
        let bytes =
            std::fs::read(path).with_context(|| format!("reading catalog {}", path.display()))?;
        Self::from_bytes(&bytes).with_context(|| format!("catalog {}", path.display()))
    }

    /// Writes atomically (temporary file, then rename).
    pub fn save(&self, path: &Path) -> anyhow::Result<u64> {
        let bytes = self.to_bytes()?;
        let tmp = path.with_extension("tmp");
        let mut file =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
        Ok(bytes.len() as u64)
    }
}

/// The catalog files installed in `dir` (missing dir: none).
pub fn installed(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "pftc"))
        .collect();
    paths.sort();
    Ok(paths)
}

/// Checks `file` and installs it into `dir` as `<digest>.pftc`.
pub fn import(file: &Path, dir: &Path) -> anyhow::Result<(PathBuf, Catalog)> {
    let catalog = Catalog::load(file)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name: String = catalog.digest()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let target = dir.join(format!("{name}.pftc"));
    catalog.save(&target)?;
    Ok((target, catalog))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn catalog(n: usize) -> Catalog {
        let mut c = Catalog::default();
        for i in 0..n {
            let page: Vec<u8> = (0..PAGE_SIZE).map(|j| (i * 7 + j / 3) as u8).collect();
            c.hashes.push(*blake3::hash(&page).as_bytes());
            c.pages.extend_from_slice(&page);
        }
        c
    }

    #[test]
    fn catalogs_round_trip_and_corruption_is_refused() {
        let c = catalog(5);
        let bytes = c.to_bytes().unwrap();
        assert_eq!(Catalog::from_bytes(&bytes).unwrap(), c);
        for at in [0, 13, 60, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x40;
            assert!(
                Catalog::from_bytes(&bad).is_err(),
                "corruption at {at} accepted"
            );
        }
        assert!(Catalog::from_bytes(&bytes[..bytes.len() - 3]).is_err());
    }

    /// A catalog file of `catalog`'s hashes with `pages` as its page data
    /// and the digest fixed up: only the page checks can refuse it.
    fn forged(catalog: &Catalog, count: u32, pages: &[u8]) -> Vec<u8> {
        let mut bytes = catalog.to_bytes().unwrap();
        bytes[12..16].copy_from_slice(&count.to_le_bytes());
        let end = HEADER_LEN + catalog.len() * 32;
        bytes.truncate(end);
        let compressed = zstd::bulk::compress(pages, 3).unwrap();
        bytes.extend_from_slice(&(compressed.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&compressed);
        bytes
    }

    #[test]
    fn hostile_catalogs_are_refused_before_their_pages_cost_memory() {
        let good = catalog(3);
        let message = |bytes: &[u8]| format!("{:#}", Catalog::from_bytes(bytes).unwrap_err());
        // More templates announced than the file can hold, or than are read.
        let mut huge = good.to_bytes().unwrap();
        huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(message(&huge).contains("at most"), "{}", message(&huge));
        huge[12..16].copy_from_slice(&1000u32.to_le_bytes());
        assert!(message(&huge).contains("truncated"), "{}", message(&huge));
        // A page data bomb: far more bytes than the pages announced.
        let bomb = forged(&good, 3, &vec![0u8; 64 << 20]);
        assert!(bomb.len() < 64 << 10);
        assert!(
            message(&bomb).contains("does not match"),
            "{}",
            message(&bomb)
        );
        // The right pages, then more.
        let mut more = good.pages.clone();
        more.extend_from_slice(&[1u8; PAGE_SIZE]);
        assert!(message(&forged(&good, 3, &more)).contains("more than its 3 pages"));
        // The right pages, cut short.
        let short = forged(&good, 3, &good.pages[..2 * PAGE_SIZE]);
        assert!(message(&short).contains("ends or is corrupt at template 2"));
        // Repeated and zero templates.
        let mut twice = catalog(2);
        twice.hashes[1] = twice.hashes[0];
        twice.pages.copy_within(..PAGE_SIZE, PAGE_SIZE);
        assert!(message(&twice.to_bytes().unwrap()).contains("repeats"));
        let zero = Catalog {
            hashes: vec![crate::content::zero_page_hash()],
            pages: vec![0; PAGE_SIZE],
        };
        assert!(message(&zero.to_bytes().unwrap()).contains("zero page"));
    }
}
