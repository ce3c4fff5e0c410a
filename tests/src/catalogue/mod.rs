//! The bypass catalogue (tests/catalogue/bypass.toml): ways of destroying files or shutting a
//! host down, each with the outcome every tier gives. The same rows run on the host
//! (tests/tests/host_bypass_catalogue.rs: tracepoint, userspace), in the VM
//! (`guardrail-testkit catalogue`, case 45: lsm, fmodret) and generate README.md's coverage table
//! ([`readme`]), so the README claims nothing no test asserts.
pub mod readme;
pub mod run;

use std::{fmt, ops::RangeInclusive, path::Path};

use serde::Deserialize;

use crate::Tier;

/// The catalogue's text, built in: the testkit carries it into the VM without a file.
pub const TEXT: &str = include_str!("../../catalogue/bypass.toml");

/// Files each deletion row destroys at most, the job budget and the login session budget of the
/// fixture (the numbers the outcomes in the file are written for).
pub const N: usize = 60;
pub const BUDGET: usize = 20;
pub const SESSION_BUDGET: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bypass.toml: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("row {row}: {what}")]
    Row { row: String, what: String },
}

fn row_err(row: &str, what: impl Into<String>) -> Error {
    Error::Row {
        row: row.to_string(),
        what: what.into(),
    }
}

/// Where a deletion row's files are.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Victim {
    /// A directory outside every target.
    #[default]
    Plain,
    /// A directory inside the data directory (owners: root only).
    Data,
    /// The protected root itself (an empty directory: one thing to lose).
    Protected,
    /// 70 levels of directories, then the files.
    Deep,
}

/// What a tier does with a row, as the file writes it ("held 21", "killed 22..=29", "free").
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A hold is open with this many files gone; deny ends the job with nothing more gone.
    Held(RangeInclusive<usize>),
    /// As `Held`, for a data directory or protected root: stopped right after these files.
    Stopped(RangeInclusive<usize>),
    /// The job ends by itself with this many gone and an incident `refused`.
    Refused(RangeInclusive<usize>),
    /// The job ends, killed, with this many gone and an incident `killed`.
    Killed(RangeInclusive<usize>),
    /// Everything goes and nothing is held: a documented gap.
    Free,
    /// Everything goes and no incident at all: the tier cannot see it.
    NotSeen,
    /// No test shows it (a shutdown row without a test for the tier, a program the VM lacks):
    /// the README says so and no runner tries it.
    Untested,
}

impl Outcome {
    pub fn parse(s: &str) -> Result<Outcome, String> {
        let s = s.trim();
        match s {
            // A shutdown row's refusal: nothing to count.
            "refused" => return Ok(Outcome::Refused(0..=0)),
            "free" => return Ok(Outcome::Free),
            "not seen" => return Ok(Outcome::NotSeen),
            "untested" => return Ok(Outcome::Untested),
            _ => {}
        }
        let (word, count) = s
            .split_once(' ')
            .ok_or_else(|| format!("outcome {s:?}: want e.g. \"held 20\", \"free\""))?;
        let range = parse_range(count.trim()).ok_or_else(|| {
            format!("outcome {s:?}: {count:?} is not a count or a range LOW..=HIGH")
        })?;
        Ok(match word {
            "held" => Outcome::Held(range),
            "stopped" => Outcome::Stopped(range),
            "refused" => Outcome::Refused(range),
            "killed" => Outcome::Killed(range),
            _ => return Err(format!("outcome {s:?}: unknown word {word:?}")),
        })
    }

    /// The files gone that this outcome allows, for a row of `n` files.
    pub fn gone(&self, n: usize) -> RangeInclusive<usize> {
        match self {
            Outcome::Held(r) | Outcome::Stopped(r) | Outcome::Refused(r) | Outcome::Killed(r) => {
                r.clone()
            }
            Outcome::Free | Outcome::NotSeen => n..=n,
            Outcome::Untested => 0..=n,
        }
    }
}

fn parse_range(s: &str) -> Option<RangeInclusive<usize>> {
    match s.split_once("..=") {
        Some((a, b)) => {
            let (a, b) = (a.parse().ok()?, b.parse().ok()?);
            (a <= b).then_some(a..=b)
        }
        None => s.parse().ok().map(|n| n..=n),
    }
}

fn count_text(r: &RangeInclusive<usize>) -> String {
    if r.start() == r.end() {
        r.start().to_string()
    } else {
        format!("{}..={}", r.start(), r.end())
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Held(r) => write!(f, "held {}", count_text(r)),
            Outcome::Stopped(r) => write!(f, "stopped {}", count_text(r)),
            Outcome::Refused(r) => write!(f, "refused {}", count_text(r)),
            Outcome::Killed(r) => write!(f, "killed {}", count_text(r)),
            Outcome::Free => f.write_str("free"),
            Outcome::NotSeen => f.write_str("not seen"),
            Outcome::Untested => f.write_str("untested"),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRow {
    id: String,
    title: String,
    source: String,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    victim: Victim,
    #[serde(default)]
    needs: Option<String>,
    #[serde(default)]
    kept_in_target: bool,
    #[serde(default)]
    setup: Option<String>,
    #[serde(default)]
    run: Option<String>,
    #[serde(default)]
    proof: Vec<String>,
    lsm: String,
    fmodret: String,
    tracepoint: String,
    userspace: String,
    note: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalogue {
    row: Vec<RawRow>,
}

/// How a row is shown to be true: a script run against each tier, or tests that exist elsewhere.
#[derive(Clone, Debug)]
pub enum Check {
    /// Run `run` (after `setup`, as root) as `root` or nobody, on the fixture.
    Script {
        setup: Option<String>,
        run: String,
        root: bool,
        victim: Victim,
        /// A program the row needs (rsync): without it the runner says so.
        needs: Option<String>,
        /// The files still intact in $T count as kept (a row that moves them there first).
        kept_in_target: bool,
    },
    /// `tests/tests/FILE.rs::function` or `tests/vm/cases/CASE.sh`.
    Proof(Vec<String>),
}

#[derive(Clone, Debug)]
pub struct Row {
    pub id: String,
    pub title: String,
    pub source: String,
    pub note: String,
    pub check: Check,
    /// Indexed like [`Tier::ALL`].
    pub expect: [Outcome; 4],
}

impl Row {
    pub fn expect(&self, tier: Tier) -> &Outcome {
        let i = Tier::ALL
            .iter()
            .position(|t| *t == tier)
            .expect("a tier of Tier::ALL");
        &self.expect[i]
    }

    /// The files a deletion row can lose.
    pub fn files(&self) -> usize {
        match &self.check {
            Check::Script {
                victim: Victim::Protected,
                ..
            } => 1,
            _ => N,
        }
    }
}

/// Parses and checks the catalogue: ids unique, every outcome well formed and within the row's
/// files, each row either a script or proofs.
pub fn parse(text: &str) -> Result<Vec<Row>, Error> {
    let raw: RawCatalogue = toml::from_str(text)?;
    let mut rows: Vec<Row> = Vec::new();
    for r in raw.row {
        if rows.iter().any(|x| x.id == r.id) {
            return Err(row_err(&r.id, "duplicate id"));
        }
        let outcome = |s: &str| Outcome::parse(s).map_err(|e| row_err(&r.id, e));
        let expect = [
            outcome(&r.lsm)?,
            outcome(&r.fmodret)?,
            outcome(&r.tracepoint)?,
            outcome(&r.userspace)?,
        ];
        let check = match (r.run, r.proof.is_empty()) {
            (Some(run), true) => {
                let root = match r.user.as_deref() {
                    None | Some("nobody") => false,
                    Some("root") => true,
                    Some(u) => return Err(row_err(&r.id, format!("user {u:?}: nobody or root"))),
                };
                Check::Script {
                    setup: r.setup,
                    run,
                    root,
                    victim: r.victim,
                    needs: r.needs,
                    kept_in_target: r.kept_in_target,
                }
            }
            (None, false) => Check::Proof(r.proof),
            _ => return Err(row_err(&r.id, "exactly one of `run` and `proof`")),
        };
        let n = if r.victim == Victim::Protected { 1 } else { N };
        for (t, o) in Tier::ALL.iter().zip(&expect) {
            if *o.gone(n).end() > n {
                return Err(row_err(
                    &r.id,
                    format!("{t}: {o} is more than its {n} files"),
                ));
            }
        }
        rows.push(Row {
            id: r.id,
            title: r.title,
            source: r.source,
            note: r.note,
            check,
            expect,
        });
    }
    Ok(rows)
}

/// The built-in catalogue.
pub fn rows() -> Vec<Row> {
    parse(TEXT).unwrap_or_else(|e| panic!("{e}"))
}

/// Whether a proof `tests/tests/F.rs::name` or `tests/vm/cases/C.sh` exists below `root` (the
/// workspace), and which tiers it covers: a host test the host's (tracepoint), a VM case lsm and
/// fmodret (`cargo xtask vm` and `--ubuntu-lsm`).
pub fn proof_tiers(root: &Path, proof: &str) -> Result<Vec<Tier>, String> {
    if let Some((file, func)) = proof.split_once("::") {
        let text = std::fs::read_to_string(root.join(file))
            .map_err(|e| format!("proof {proof}: {file}: {e}"))?;
        // The function must be a test: `#[test]` right above `fn name(`.
        let lines: Vec<&str> = text.lines().collect();
        let found = lines.iter().enumerate().any(|(i, l)| {
            l.trim_start().starts_with(&format!("fn {func}("))
                && i > 0
                && lines[i - 1].trim() == "#[test]"
        });
        if !found {
            return Err(format!("proof {proof}: no #[test] fn {func} in {file}"));
        }
        Ok(vec![Tier::Tracepoint])
    } else if proof.starts_with("tests/vm/cases/") && proof.ends_with(".sh") {
        if !root.join(proof).is_file() {
            return Err(format!("proof {proof}: no such VM case"));
        }
        Ok(vec![Tier::Lsm, Tier::Fmodret])
    } else {
        Err(format!(
            "proof {proof}: want tests/tests/F.rs::function or tests/vm/cases/C.sh"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_parse_and_print_back() {
        for s in [
            "held 20",
            "held 21..=28",
            "stopped 1",
            "refused 0",
            "killed 22..=29",
        ] {
            assert_eq!(Outcome::parse(s).expect(s).to_string(), s);
        }
        assert_eq!(Outcome::parse("not seen"), Ok(Outcome::NotSeen));
        assert!(Outcome::parse("held").is_err());
        assert!(Outcome::parse("held 9..=3").is_err());
        assert!(Outcome::parse("vanished 3").is_err());
    }

    #[test]
    fn the_catalogue_parses() {
        let rows = rows();
        assert!(rows.len() >= 20, "{} rows", rows.len());
    }

    #[test]
    fn a_bad_row_is_a_clear_error() {
        let text = "[[row]]\nid = \"x\"\ntitle = \"t\"\nsource = \"s\"\nrun = \"true\"\n\
                    lsm = \"held 20\"\nfmodret = \"held 20\"\ntracepoint = \"held 99\"\n\
                    userspace = \"untested\"\nnote = \"\"\n";
        let e = parse(text).expect_err("99 of 60").to_string();
        assert_eq!(e, "row x: tracepoint: held 99 is more than its 60 files");
        let e = parse(&text.replace("held 99", "held soon"))
            .expect_err("not a count")
            .to_string();
        assert!(e.starts_with("row x: outcome \"held soon\""), "{e}");
    }

    #[test]
    fn every_proof_exists_and_covers_what_its_row_claims() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for row in rows() {
            let Check::Proof(proofs) = &row.check else {
                continue;
            };
            let mut covered = Vec::new();
            for p in proofs {
                covered.extend(proof_tiers(&root, p).unwrap_or_else(|e| panic!("{}: {e}", row.id)));
            }
            for t in Tier::ALL {
                assert!(
                    *row.expect(t) == Outcome::Untested || covered.contains(&t),
                    "row {}: claims {} for {t}, but no proof covers {t}",
                    row.id,
                    row.expect(t)
                );
            }
        }
    }
}
