//! `cargo xtask bench`: the foundation's benchmark report. Every figure is a
//! ratio of two measurements taken side by side in one run (these machines
//! are noisy), alternated and summarised by the median.

pub mod dirty_rate;
pub mod fuzz;
pub mod hashing;
pub mod memory;
pub mod migration;
pub mod qemu_kvm;
pub mod rehash;
pub mod rescan;
pub mod scale;
pub mod throughput;

use std::path::{Path, PathBuf};

use serde::Serialize;

/// One figure of the report.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    pub name: &'static str,
    pub value: f64,
    /// The target, and whether the value must be at least (`>=`) or at most (`<=`) it.
    pub target: f64,
    pub direction: &'static str,
    pub met: bool,
    pub unit: &'static str,
    /// The measurements behind the value.
    pub details: serde_json::Value,
}

impl Figure {
    pub fn at_least(
        name: &'static str,
        value: f64,
        target: f64,
        unit: &'static str,
        details: serde_json::Value,
    ) -> Self {
        Self {
            name,
            value,
            target,
            direction: ">=",
            met: value >= target,
            unit,
            details,
        }
    }

    pub fn at_most(
        name: &'static str,
        value: f64,
        target: f64,
        unit: &'static str,
        details: serde_json::Value,
    ) -> Self {
        Self {
            name,
            value,
            target,
            direction: "<=",
            met: value <= target,
            unit,
            details,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: String,
    pub figures: Vec<Figure>,
}

/// The median of `values` (which must not be empty).
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Min, median and max of `values`, as the report gives a figure's spread.
pub fn spread(values: &[f64]) -> serde_json::Value {
    let mut sorted = values.to_vec();
    let middle = if sorted.is_empty() {
        f64::NAN
    } else {
        median(&mut sorted)
    };
    serde_json::json!({
        "min": sorted.first().copied().unwrap_or(f64::NAN),
        "median": middle,
        "max": sorted.last().copied().unwrap_or(f64::NAN),
        "rounds": values,
    })
}

/// Prints the report and writes it as JSON.
pub fn write_report(report: &Report, path: &Path) -> anyhow::Result<PathBuf> {
    println!();
    println!(
        "{:<32} {:>12} {:>10} {:>6}",
        "figure", "value", "target", "met"
    );
    for figure in &report.figures {
        println!(
            "{:<32} {:>12.3} {:>7}{:<3.2} {:>6}",
            figure.name,
            figure.value,
            figure.direction,
            figure.target,
            if figure.met { "yes" } else { "NO" }
        );
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_vec_pretty(report)?)?;
    println!("\nreport written to {}", path.display());
    Ok(path.to_path_buf())
}

/// `nproc` and the kernel, for the report.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} CPUs, Linux {}", kernel.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_targets() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(Figure::at_least("x", 0.95, 0.9, "", serde_json::Value::Null).met);
        assert!(!Figure::at_most("y", 1.2, 1.05, "", serde_json::Value::Null).met);
    }
}
