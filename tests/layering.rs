//! The layers of docs/architecture.md hold in the code: a module uses only modules below it.
//! The order is read from the document's layer table, so the table and the code cannot drift
//! apart without this test failing. Within a row, "then" orders modules too (`admin`, then
//! `server`, then the commands); modules that share a row without "then" share a layer and may
//! not use each other.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The crate's top-level modules, from `src/lib.rs`.
fn modules() -> Vec<String> {
    let lib = std::fs::read_to_string(root().join("src/lib.rs")).unwrap();
    lib.lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';').to_string())
        .collect()
}

/// Each module's place, from the layer table: (layer, place within its row).
fn layers(modules: &[String]) -> BTreeMap<String, (f64, usize)> {
    let doc = std::fs::read_to_string(root().join("docs/architecture.md")).unwrap();
    let mut places = BTreeMap::new();
    for row in doc.lines().filter(|l| l.starts_with("| ")) {
        let cells: Vec<&str> = row.split(" | ").collect();
        let Some(layer) = cells.first().and_then(|c| layer_number(c)) else {
            continue;
        };
        let Some(cell) = cells.get(1) else {
            continue;
        };
        for (step, part) in cell.split(", then ").enumerate() {
            for name in named_modules(part, modules) {
                places.entry(name).or_insert((layer, step));
            }
        }
    }
    places
}

/// "| 6½" -> 6.5; `None` for a row that is not a layer.
fn layer_number(cell: &str) -> Option<f64> {
    let cell = cell.trim_start_matches('|').trim();
    let half = cell.ends_with('½');
    let whole: f64 = cell.trim_end_matches('½').parse().ok()?;
    Some(whole + if half { 0.5 } else { 0.0 })
}

/// The modules a table cell names: `name`, or `src/name.rs` and `src/name/`.
fn named_modules(cell: &str, modules: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    for quoted in cell.split('`').skip(1).step_by(2) {
        let name = quoted
            .trim_start_matches("src/")
            .trim_end_matches(".rs")
            .trim_end_matches('/');
        if modules.iter().any(|m| m == name) && !found.iter().any(|f| f == name) {
            found.push(name.to_string());
        }
    }
    found
}

/// Every `.rs` file of a module.
fn files_of(module: &str) -> Vec<PathBuf> {
    let single = root().join(format!("src/{module}.rs"));
    if single.exists() {
        return vec![single];
    }
    let mut files = Vec::new();
    let mut dirs = vec![root().join(format!("src/{module}"))];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files
}

/// The modules a source file names as `crate::module`, or in `use crate::{a, b::c}`.
/// (A path through `super::super::` is not followed; the code has none.)
fn uses(source: &str, modules: &[String]) -> Vec<String> {
    let mut used: Vec<String> = Vec::new();
    let mut add = |name: String| {
        if modules.contains(&name) && !used.contains(&name) {
            used.push(name);
        }
    };
    let word = |text: &str| -> String {
        text.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    for (at, _) in source.match_indices("crate::") {
        let rest = &source[at + "crate::".len()..];
        match rest.strip_prefix('{') {
            Some(group) => {
                let group = &group[..group.find('}').unwrap_or(group.len())];
                for item in group.split(',') {
                    add(word(item.trim()));
                }
            }
            None => add(word(rest)),
        }
    }
    used
}

#[test]
fn every_module_has_a_layer() {
    let modules = modules();
    let places = layers(&modules);
    let missing: Vec<_> = modules
        .iter()
        .filter(|m| !places.contains_key(*m))
        .collect();
    assert!(
        missing.is_empty(),
        "not in docs/architecture.md's layer table: {missing:?}"
    );
}

#[test]
fn no_module_uses_one_above_it_or_beside_it() {
    let modules = modules();
    let places = layers(&modules);
    let mut wrong = Vec::new();
    for module in &modules {
        let Some(own) = places.get(module) else {
            continue;
        };
        for file in files_of(module) {
            let source = std::fs::read_to_string(&file).unwrap();
            for used in uses(&source, &modules) {
                let below = places.get(&used).is_some_and(|place| place < own);
                if used != *module && !below {
                    let file = file.strip_prefix(root()).unwrap().display();
                    wrong.push(format!("{file} ({module}, {own:?}) uses {used}"));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
}

#[test]
fn the_check_sees_a_use_and_reads_the_table() {
    let modules = modules();
    let used = uses(
        "use crate::balance::Cluster;\nlet x = crate::wire::Code::Ok;",
        &modules,
    );
    let grouped = uses("use crate::{config::Config, proxy, nothing};", &modules);
    assert_eq!(grouped, ["config", "proxy"]);
    assert_eq!(used, ["balance", "wire"]);
    let places = layers(&modules);
    assert!(places["wire"] < places["config"]);
    assert!(places["admin"] < places["server"] && places["server"] < places["demo"]);
    assert_eq!(places["health"].0, 6.5);
}
