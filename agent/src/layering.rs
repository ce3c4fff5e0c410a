//! The agent's modules form layers: each top-level module may use only those before it in
//! [`LAYERS`], so the data path reads one way and no two modules import each other (the
//! architecture review found `events` and `alert` doing so). This test reads the sources and
//! fails on any `crate::` path that points up or sideways, naming the file.
use std::{collections::BTreeMap, fs, path::Path};

/// Bottom to top. Modules on one line may not use each other.
const LAYERS: &[&[&str]] = &[
    &["text", "timefmt"],
    &["host"],
    &["policy"],
    &["tiers"],
    &["incident"],
    &["sinks"],
    &["control"],
    &["guards"],
    &["daemon"],
    &["commands"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// The top-level modules a source file names through `crate::`, outside its test module.
fn uses(text: &str) -> Vec<String> {
    let text = text
        .find("#[cfg(test)]\nmod tests")
        .or_else(|| text.find("#[cfg(test)]\npub(crate) mod tests"))
        .map_or(text, |i| &text[..i]);
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a::b, c, d::{e, f}};`: the first segment of each top-level item.
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.extend(first_segment(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            out.extend(first_segment(&item));
        } else {
            out.extend(first_segment(rest));
        }
    }
    out
}

/// The path's first segment; None for an empty item (a trailing comma).
fn first_segment(s: &str) -> Option<String> {
    let seg: String = s
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    (!seg.is_empty()).then_some(seg)
}

fn visit(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    for e in fs::read_dir(dir).expect("read src").flatten() {
        let p = e.path();
        if p.is_dir() {
            visit(&p, files);
        } else if p.extension().is_some_and(|x| x == "rs") {
            files.push(p);
        }
    }
}

#[test]
fn every_module_uses_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    visit(&src, &mut files);
    let mut wrong: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut checked = 0;
    for f in &files {
        let rel = f.strip_prefix(&src).expect("under src");
        let top = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .unwrap_or("")
            .trim_end_matches(".rs")
            .to_string();
        let Some(own) = layer_of(&top) else {
            continue;
        };
        checked += 1;
        let text = fs::read_to_string(f).expect("read source");
        for used in uses(&text) {
            if used == top {
                continue;
            }
            if let Some(l) = layer_of(&used)
                && l >= own
            {
                wrong
                    .entry(rel.display().to_string())
                    .or_default()
                    .push(used);
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} source files found under {}",
        src.display()
    );
    assert!(
        wrong.is_empty(),
        "modules using a layer at or above their own (see LAYERS): {wrong:#?}"
    );
}

#[test]
fn the_reader_sees_grouped_and_plain_paths() {
    let text = "use crate::{\n    host::procinfo,\n    incident::{Incident, Kind},\n    text,\n};\nlet x = crate::tiers::probe::Tier::Lsm;\n#[cfg(test)]\nmod tests { use crate::daemon; }";
    assert_eq!(uses(text), ["host", "incident", "text", "tiers"]);
}
