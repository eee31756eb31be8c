//! What the API shows of the registry (JSON views), as the daemon writes
//! them (`crate::daemon::views`) and clients read them.

use serde::{Deserialize, Serialize};

use crate::registry::{DirtyMode, Discovery, Tracking, vm::VmStats};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SlotView {
    pub slot: u32,
    pub gpa: u64,
    pub size: u64,
    pub uaddr: u64,
    pub flags: u32,
    pub tracking: Tracking,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmView {
    pub pid: u32,
    pub comm: String,
    pub discovery: Discovery,
    pub dirty_mode: DirtyMode,
    /// The weakest tracking of its slots ("untracked" if it has no slot yet).
    pub tracking: Tracking,
    pub synced: bool,
    pub note: Option<String>,
    pub pages: u64,
    pub unknown: u64,
    pub clean: u64,
    pub dirty: u64,
    pub unverified: u64,
    pub zero_pages: u64,
    pub hashed_pct: f64,
    pub template_pages: u64,
    pub template_coverage_pct: f64,
    pub stats: VmStats,
    pub slots: Vec<SlotView>,
}

/// One template of [`CatalogView`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateView {
    /// Rank (0: saves the most pages).
    pub index: u32,
    #[serde(with = "crate::page::hex32")]
    pub hash: [u8; 32],
    /// Pages holding this content, over the VMs the selection counted.
    pub pages: u32,
    pub vms: u32,
    /// Where one copy lives (`?locations=1`): read it there, check its hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<PageLocation>,
}

/// A guest page in a VMM process's address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageLocation {
    pub pid: u32,
    pub uaddr: u64,
}

/// `GET /v1/templates`: the selected templates, in rank order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogView {
    pub min_vms: u32,
    pub budget_bytes: u64,
    /// The VMs counted (`?vms=` less `?exclude=`; every VM if `?vms=` is absent).
    pub vms: Vec<u32>,
    /// Templates selected (`templates` may be cut short by `?limit=`).
    pub selected: usize,
    /// Pages covered by the templates, over the VMs counted.
    pub pages_covered: u64,
    /// Distinct contents that were eligible (held by enough VMs).
    pub eligible: u64,
    pub templates: Vec<TemplateView>,
}
