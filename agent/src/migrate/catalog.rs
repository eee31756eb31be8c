//! Template catalogs with their page contents: what a destination holds.
//!
//! A catalog is built from the agent's hash lists (the most common page
//! contents across a chosen set of VMs, as in Li, Zheng and Hu), its pages
//! read from those VMs and checked against their hashes. It is saved to a
//! file (`pagefp templates export`), installed at a destination ahead of
//! time (`pagefp templates import`), and loaded by `pagefp migrate receive`.
//!
//! File format, version 1 (little-endian):
//!
//! ```text
//! b"PFTC", u32 version, u32 page size, u32 count, [u8; 32] digest
//! count × [u8; 32] blake3 hashes (the digest is the blake3 of these bytes)
//! u64 length, then one zstd frame holding count × page bytes, in hash order
//! ```

use std::{
    collections::HashSet,
    io::{Read, Write},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

use super::wire::PAGE;
use crate::{
    api::{client, views::CatalogView},
    content::TemplateId,
    guest_memory::read_copied,
};

pub const MAGIC: [u8; 4] = *b"PFTC";
pub const VERSION: u32 = 1;
const HEADER_LEN: usize = 48;

/// Default directory `templates import` installs into and `migrate
/// receive` loads from.
pub const DEFAULT_DIR: &str = "/var/lib/pagefp/catalogs";

/// Where a destination's templates come from: the `--templates`,
/// `--catalog-dir`, `--no-installed`, `--local-templates` and
/// `--agent-socket` flags of `pagefp migrate receive` and `pagefp
/// qemu-proxy receive`.
#[derive(Clone, Debug, clap::Args)]
pub struct TemplateSources {
    /// A template catalog (`pagefp templates export`) to offer; repeatable.
    #[arg(long = "templates")]
    pub catalogs: Vec<PathBuf>,
    /// Also every catalog installed here by `pagefp templates import`.
    #[arg(long, default_value = DEFAULT_DIR)]
    pub catalog_dir: PathBuf,
    /// Do not load the installed catalogs.
    #[arg(long)]
    pub no_installed: bool,
    /// Also templates built from the VMs the local agent tracks.
    #[arg(long)]
    pub local_templates: bool,
    /// The local agent's API socket.
    #[arg(long, default_value = crate::config::DEFAULT_SOCKET)]
    pub agent_socket: PathBuf,
}

/// Catalogs loaded from [`TemplateSources`].
pub struct LoadedCatalogs {
    /// (where from, catalog), in load order.
    pub catalogs: Vec<(String, Catalog)>,
    /// Bytes of the catalog files read (moved to this host ahead of time).
    pub file_bytes: u64,
}

impl TemplateSources {
    /// Only the named files: no installed catalogs, no local VMs.
    pub fn files(catalogs: Vec<PathBuf>) -> Self {
        Self {
            catalogs,
            catalog_dir: PathBuf::from(DEFAULT_DIR),
            no_installed: true,
            local_templates: false,
            agent_socket: PathBuf::from(crate::config::DEFAULT_SOCKET),
        }
    }

    /// Loads (and checks) every catalog these sources name.
    pub fn load(&self) -> anyhow::Result<LoadedCatalogs> {
        let mut paths = self.catalogs.clone();
        if !self.no_installed {
            paths.extend(installed(&self.catalog_dir)?);
        }
        let mut loaded = LoadedCatalogs {
            catalogs: Vec::new(),
            file_bytes: 0,
        };
        for path in paths {
            let catalog = Catalog::load(&path)?;
            loaded.file_bytes += std::fs::metadata(&path).map_or(0, |m| m.len());
            loaded.catalogs.push((path.display().to_string(), catalog));
        }
        if self.local_templates {
            let catalog = build_from_agent(&self.agent_socket, &BuildOptions::default())
                .context("building templates from the local agent's VMs")?;
            loaded.catalogs.push(("local VMs".into(), catalog));
        }
        Ok(loaded)
    }
}

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
        &self.pages[index * PAGE..(index + 1) * PAGE]
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
        out.extend_from_slice(&(PAGE as u32).to_le_bytes());
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
        let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        if word(4) != VERSION {
            bail!(
                "catalog version {} is not supported (this pagefp reads version {VERSION})",
                word(4)
            );
        }
        if word(8) as usize != PAGE {
            bail!("catalog of {}-byte pages; this host uses {PAGE}", word(8));
        }
        let count = word(12) as usize;
        let digest: [u8; 32] = bytes[16..48].try_into().unwrap();
        let hashes_end = HEADER_LEN
            .checked_add(count.checked_mul(32).context("catalog count overflows")?)
            .context("catalog count overflows")?;
        if bytes.len() < hashes_end + 8 {
            bail!(
                "catalog is truncated: {count} templates announced, {} bytes present",
                bytes.len()
            );
        }
        let hashes: Vec<[u8; 32]> = bytes[HEADER_LEN..hashes_end]
            .chunks_exact(32)
            .map(|c| c.try_into().unwrap())
            .collect();
        let compressed_len =
            u64::from_le_bytes(bytes[hashes_end..hashes_end + 8].try_into().unwrap()) as usize;
        let body = &bytes[hashes_end + 8..];
        if body.len() != compressed_len {
            bail!(
                "catalog is truncated: page data has {} of {compressed_len} bytes",
                body.len()
            );
        }
        let mut pages = Vec::with_capacity(count * PAGE);
        zstd::stream::read::Decoder::new(body)
            .context("catalog page data is not zstd")?
            .take((count * PAGE) as u64 + 1)
            .read_to_end(&mut pages)
            .context("catalog page data is corrupt")?;
        if pages.len() != count * PAGE {
            bail!(
                "catalog page data holds {} bytes for {count} pages",
                pages.len()
            );
        }
        let catalog = Self { hashes, pages };
        if catalog.digest() != digest {
            bail!("catalog digest mismatch: the file is corrupt");
        }
        for (i, hash) in catalog.hashes.iter().enumerate() {
            if blake3::hash(catalog.page(i)).as_bytes() != hash {
                bail!("catalog template {i} does not match its hash: the file is corrupt");
            }
        }
        Ok(catalog)
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
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

/// Which VMs' pages a catalog is built from, and how many templates.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// Only these VMs (all the agent tracks if empty).
    pub vms: Vec<u32>,
    /// Never these VMs.
    pub exclude: Vec<u32>,
    /// A content must be held by at least this many of the VMs.
    pub min_vms: u32,
    /// At most this many bytes of templates.
    pub budget_bytes: u64,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            vms: Vec::new(),
            exclude: Vec::new(),
            min_vms: 2,
            budget_bytes: 256 << 20,
        }
    }
}

/// Builds a catalog from what the agent at `socket` knows: the agent's own
/// template selection (`GET /v1/templates`) among the chosen VMs, with where
/// one copy of each template lives; each page is read there and kept only
/// if it still matches its hash (a guest may have written it since).
/// Unverified hashes (VMs whose writes nobody reports, such as QEMU guests
/// without KVM) count too, for that reason.
pub fn build_from_agent(socket: &Path, options: &BuildOptions) -> anyhow::Result<Catalog> {
    let pids = |pids: &[u32]| {
        pids.iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut query = format!(
        "/v1/templates?format=json&locations=1&min_vms={}&budget_bytes={}",
        options.min_vms, options.budget_bytes
    );
    if !options.vms.is_empty() {
        query.push_str(&format!("&vms={}", pids(&options.vms)));
    }
    if !options.exclude.is_empty() {
        query.push_str(&format!("&exclude={}", pids(&options.exclude)));
    }
    let selection: CatalogView = serde_json::from_slice(
        &client::get_blocking(socket, &query).context("asking the agent for its templates")?,
    )
    .context(
        "the agent's template list is not what this pagefp expects: are both the same version?",
    )?;
    let mut catalog = Catalog::default();
    let mut buf = vec![0u8; PAGE];
    for template in selection.templates {
        let Some(at) = template.at else {
            continue;
        };
        if !read_copied(at.pid, at.uaddr, &[0], &mut buf)[0] {
            continue;
        }
        if *blake3::hash(&buf).as_bytes() == template.hash {
            catalog.hashes.push(template.hash);
            catalog.pages.extend_from_slice(&buf);
        }
    }
    Ok(catalog)
}

/// The templates a receiver can offer, from every source, without repeats.
#[derive(Default)]
pub struct TemplateStore {
    /// In offer order; a template's id is its page's blake3 hash.
    pub ids: Vec<TemplateId>,
    pages: Vec<u8>,
    seen: HashSet<TemplateId>,
}

impl TemplateStore {
    pub fn add(&mut self, catalog: &Catalog) -> usize {
        let before = self.ids.len();
        for (i, hash) in catalog.hashes.iter().enumerate() {
            if self.seen.insert(*hash) {
                self.ids.push(*hash);
                self.pages.extend_from_slice(catalog.page(i));
            }
        }
        self.ids.len() - before
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn page(&self, index: u32) -> Option<&[u8]> {
        let start = index as usize * PAGE;
        self.pages.get(start..start + PAGE)
    }

    pub fn hash(&self, index: u32) -> Option<&TemplateId> {
        self.ids.get(index as usize)
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
mod tests {
    use super::*;

    fn catalog(n: usize) -> Catalog {
        let mut c = Catalog::default();
        for i in 0..n {
            let page: Vec<u8> = (0..PAGE).map(|j| (i * 7 + j / 3) as u8).collect();
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

    #[test]
    fn the_store_keeps_each_template_once() {
        let mut store = TemplateStore::default();
        assert_eq!(store.add(&catalog(3)), 3);
        assert_eq!(store.add(&catalog(4)), 1);
        assert_eq!(store.page(3).unwrap(), catalog(4).page(3));
    }
}
