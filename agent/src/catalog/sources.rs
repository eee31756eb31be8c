//! Where a receiver's templates come from: catalog files named on the
//! command line, the catalogs installed on this host, and the VMs the local
//! agent tracks (built through its API).

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::{Catalog, DEFAULT_DIR, installed};
use crate::{
    api::{client, views::CatalogView},
    guest_memory::read_copied,
    page::PAGE_SIZE,
};

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
    /// Also the site-wide store: pages common across the site that this
    /// host lacks are fetched from it while the templates are agreed.
    #[command(flatten)]
    pub site: crate::config::SiteStoreConfig,
}

/// Catalogs loaded from [`TemplateSources`].
pub struct LoadedCatalogs {
    /// (where from, catalog), in load order.
    pub catalogs: Vec<(String, Catalog)>,
    /// Bytes of the catalog files read (moved to this host ahead of time).
    pub file_bytes: u64,
    /// Installed catalogs that did not load (each logged).
    pub skipped: Vec<String>,
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
            site: Default::default(),
        }
    }

    /// Loads (and checks) every catalog these sources name. A catalog named
    /// on the command line must load; an installed one that does not is
    /// skipped with a warning (its pages then travel in full), so one bad
    /// file in the directory does not stop every migration.
    pub fn load(&self) -> anyhow::Result<LoadedCatalogs> {
        // Checked now: a site store that can never work is the operator's
        // mistake; one that is down costs pages sent in full, later.
        if !self.site.nodes.is_empty() {
            super::site::SiteStore::check(&self.site)?;
        }
        let mut loaded = LoadedCatalogs {
            catalogs: Vec::new(),
            file_bytes: 0,
            skipped: Vec::new(),
        };
        let installed = if self.no_installed {
            Vec::new()
        } else {
            installed(&self.catalog_dir)?
        };
        let named = self.catalogs.iter().map(|path| (path, true));
        for (path, required) in named.chain(installed.iter().map(|path| (path, false))) {
            let catalog = match Catalog::load(path) {
                Ok(catalog) => catalog,
                Err(err) if !required => {
                    log::warn!(
                        "skipping installed catalog {}: {err:#}; remove it or import it again",
                        path.display()
                    );
                    loaded.skipped.push(path.display().to_string());
                    continue;
                }
                Err(err) => return Err(err),
            };
            loaded.file_bytes += std::fs::metadata(path).map_or(0, |m| m.len());
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
    let mut buf = vec![0u8; PAGE_SIZE];
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::file::tests::catalog;

    #[test]
    fn a_bad_installed_catalog_is_skipped_but_a_named_one_is_an_error() {
        let dir = std::env::temp_dir().join(format!("pagefp-sources-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        catalog(2).save(&dir.join("good.pftc")).unwrap();
        std::fs::write(dir.join("bad.pftc"), b"PFTC not really").unwrap();
        let sources = TemplateSources {
            catalogs: Vec::new(),
            catalog_dir: dir.clone(),
            no_installed: false,
            local_templates: false,
            agent_socket: PathBuf::from("/nonexistent"),
            site: Default::default(),
        };
        let loaded = sources.load().unwrap();
        assert_eq!(loaded.catalogs.len(), 1);
        assert_eq!(loaded.catalogs[0].1, catalog(2));
        assert_eq!(
            loaded.skipped,
            vec![dir.join("bad.pftc").display().to_string()]
        );
        let named = TemplateSources::files(vec![dir.join("bad.pftc")]);
        assert!(named.load().is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
