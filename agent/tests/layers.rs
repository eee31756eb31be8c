//! The agent's modules import one way only (docs/architecture.md): every
//! top-level module has a rank, and may name (`crate::x`) only modules of a
//! lower rank. A new module must be given its rank here, on purpose.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Top-level modules of `agent/src`, bottom up.
const RANKS: &[(&str, u32)] = &[
    // Foundation.
    ("page", 0),
    ("clock", 0),
    ("procfs", 0),
    ("random", 0),
    ("config", 0),
    ("guest_memory", 1),
    // The core: tracking feeds the registry (a pure state machine), whose
    // jobs the hasher runs; content counts, templates selects.
    ("content", 2),
    ("templates", 3),
    ("registry", 3),
    ("hasher", 4),
    ("tracking", 5),
    // The contract between the daemon and the tools, and between hosts.
    ("api", 6),
    ("net", 6),
    ("transport", 7),
    // The outer ring.
    ("catalog", 8),
    ("qemu_stream", 8),
    ("compression", 8),
    ("daemon", 9),
    ("migrate", 9),
    ("qemu_proxy", 9),
    ("cli", 10),
];

fn rank(module: &str) -> Option<u32> {
    RANKS.iter().find(|(m, _)| *m == module).map(|(_, r)| *r)
}

fn sources(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

/// The modules `text` names as `crate::x` or inside `crate::{x, y::z}`.
fn named_modules(text: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut names = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The names at the group's top level.
            let mut depth = 1;
            let mut top = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    break;
                }
                top.push(if depth == 1 { c } else { ' ' });
            }
            for item in top.split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    names.insert(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `crate::some_macro!` names a macro, not a module.
            if !rest[name.len()..].starts_with('!') {
                names.insert(name);
            }
        }
    }
    names
}

#[test]
fn modules_import_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut wrong: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut unranked = BTreeSet::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let top = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_str()
            .unwrap();
        let module = top.trim_end_matches(".rs");
        if module == "lib" || module == "main" {
            continue;
        }
        let Some(own) = rank(module) else {
            unranked.insert(module.to_owned());
            continue;
        };
        for name in named_modules(&std::fs::read_to_string(file).unwrap()) {
            if name == module || name.chars().next().is_some_and(|c| c.is_ascii_uppercase()) {
                continue;
            }
            match rank(&name) {
                Some(theirs) if theirs < own => {}
                Some(_) => wrong
                    .entry(relative.display().to_string())
                    .or_default()
                    .push(name),
                None => {
                    unranked.insert(name);
                }
            }
        }
    }
    assert!(
        unranked.is_empty(),
        "modules without a rank (add them to RANKS and docs/architecture.md): {unranked:?}"
    );
    assert!(
        wrong.is_empty(),
        "imports against the layers (see docs/architecture.md): {wrong:#?}"
    );
}

#[test]
fn the_import_scanner_sees_groups_and_paths() {
    let names = named_modules(
        "use crate::{\n    api::{client, views::X},\n    page::PAGE_SIZE,\n};\n\
         let x = crate::registry::Registry::new(); // crate::daemon in a comment\n\
         crate::message_kinds! { enum K { A = 1, } }\n",
    );
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_eq!(names, ["api", "page", "registry"]);
}
