//! README.md's coverage table, generated from the catalogue: between `<!-- catalogue:begin -->`
//! and `<!-- catalogue:end -->`. A unit test fails when the README's table differs from the one
//! the catalogue gives; `cargo xtask catalogue` (or this test with GUARDRAIL_CATALOGUE_WRITE=1)
//! writes it.
use std::{fmt::Write, path::Path};

use super::{BUDGET, Check, N, Outcome, Row, SESSION_BUDGET, rows};
use crate::Tier;

pub const BEGIN: &str = "<!-- catalogue:begin -->";
pub const END: &str = "<!-- catalogue:end -->";

fn range_text(r: &std::ops::RangeInclusive<usize>) -> String {
    if r.start() == r.end() {
        r.start().to_string()
    } else {
        format!("{}–{}", r.start(), r.end())
    }
}

/// A cell of a deletion row: what happened to its files.
fn script_cell(o: &Outcome, files: usize) -> String {
    let of = |r: &std::ops::RangeInclusive<usize>| format!("{} of {files} gone", range_text(r));
    match o {
        Outcome::Held(r) => format!("held, {}", of(r)),
        Outcome::Stopped(r) => format!("stopped, {}", of(r)),
        Outcome::Refused(r) => format!("refused, {}", of(r)),
        Outcome::Killed(r) => format!("killed, {}", of(r)),
        Outcome::Free => "**free**: all gone, no hold".to_string(),
        Outcome::NotSeen => "**not seen**: all gone, no incident".to_string(),
        Outcome::Untested => "not tested".to_string(),
    }
}

/// A cell of a shutdown row.
fn proof_cell(o: &Outcome) -> String {
    match o {
        Outcome::Refused(_) => "refused".to_string(),
        Outcome::Free => "allowed".to_string(),
        Outcome::Untested => "not tested".to_string(),
        other => other.to_string(),
    }
}

fn escape(s: &str) -> String {
    s.replace('|', "\\|")
}

/// The table (and its two lines of introduction) for `rows`.
pub fn render(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Generated from `tests/catalogue/bypass.toml` by `cargo xtask catalogue`; every cell is \
         asserted by a test: deletion rows run in `tests/tests/host_bypass_catalogue.rs` \
         (tracepoint, userspace) and VM case `45-lsm-catalogue.sh` (lsm; fmodret with \
         `--ubuntu-lsm`), with a job budget of {BUDGET}, a session budget of {SESSION_BUDGET} \
         and {N} files outside targets, as user nobody unless the row says root. \"Gone\" counts \
         files no longer holding their bytes (renamed over or truncated counts)."
    );
    out.push('\n');
    out.push_str("| scenario | lsm | fmodret | tracepoint | userspace | note |\n");
    out.push_str("|---|---|---|---|---|---|\n");
    for row in rows {
        let cells: Vec<String> = Tier::ALL
            .iter()
            .map(|t| match &row.check {
                Check::Script { .. } => script_cell(row.expect(*t), row.files()),
                Check::Proof(_) => proof_cell(row.expect(*t)),
            })
            .collect();
        let mut note = row.note.clone();
        if let Check::Proof(proofs) = &row.check {
            let names: Vec<String> = proofs
                .iter()
                .map(|p| {
                    let short = p.rsplit('/').next().unwrap_or(p);
                    format!("`{short}`")
                })
                .collect();
            if !note.is_empty() {
                note.push_str("; ");
            }
            let _ = write!(note, "shown by {}", names.join(", "));
        }
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            escape(&row.title),
            cells.join(" | "),
            escape(&note)
        );
    }
    out
}

/// `readme` with the text between the markers replaced by `table`, or an error naming a missing
/// marker.
pub fn splice(readme: &str, table: &str) -> Result<String, String> {
    let b = readme
        .find(BEGIN)
        .ok_or_else(|| format!("README.md has no {BEGIN}"))?;
    let e = readme
        .find(END)
        .filter(|e| *e > b)
        .ok_or_else(|| format!("README.md has no {END} after {BEGIN}"))?;
    Ok(format!("{}{BEGIN}\n{table}{}", &readme[..b], &readme[e..]))
}

/// README.md as the catalogue wants it.
pub fn wanted(readme_path: &Path) -> Result<(String, String), String> {
    let readme = std::fs::read_to_string(readme_path)
        .map_err(|e| format!("{}: {e}", readme_path.display()))?;
    let want = splice(&readme, &render(&rows()))?;
    Ok((readme, want))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's coverage table is the catalogue's: the README claims nothing no row asserts.
    /// GUARDRAIL_CATALOGUE_WRITE=1 (what `cargo xtask catalogue` sets) rewrites it instead.
    #[test]
    fn readme_coverage_table_is_generated_from_the_catalogue() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
        let (have, want) = wanted(&path).unwrap_or_else(|e| panic!("{e}"));
        if std::env::var_os("GUARDRAIL_CATALOGUE_WRITE").is_some() {
            if have != want {
                std::fs::write(&path, &want).expect("writing README.md");
            }
            return;
        }
        assert!(
            have == want,
            "README.md's coverage table differs from tests/catalogue/bypass.toml: run `cargo \
             xtask catalogue`.\nwanted:\n{}",
            render(&rows())
        );
    }

    #[test]
    fn splice_needs_both_markers() {
        assert!(splice("no markers", "t").is_err());
        assert!(splice(&format!("{END} {BEGIN}"), "t").is_err());
        assert_eq!(
            splice(&format!("a\n{BEGIN}\nold\n{END}\nb"), "new\n").expect("spliced"),
            format!("a\n{BEGIN}\nnew\n{END}\nb")
        );
    }
}
