//! Section 6 of the bench: what each kernel tier costs, measured in the test VM (Debian's 6.1
//! kernel under qemu TCG, booted with `bpf` in its LSM list, so that every tier can be forced in
//! one boot): an exec loop,
//! a loop of capability checks (the fmod_ret tier's `security_capable` trampoline runs on every
//! one, on every process of the host) and an `rm -rf` outside every target. The VM script,
//! tests/vm/bench/tier-costs.sh, interleaves the tiers round by round and prints one `TIERCOST`
//! line per tier and round; here they become medians and ratios to the no-agent row. Emulation
//! slows everything, so only the ratios mean anything.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};

use crate::vm;

/// Sizes for the VM script (`/bench-sizes`).
#[derive(Clone, Copy, Debug)]
pub struct VmSizes {
    pub rounds: usize,
    pub execs: usize,
    pub chowns: usize,
    pub files: usize,
}

/// Per-round figures of one tier (ns per exec, per capability check, per deleted file).
#[derive(Clone, Debug, Default)]
pub struct TierRow {
    pub tier: String,
    pub exec_ns: Vec<f64>,
    pub chown_ns: Vec<f64>,
    pub rm_ns: Vec<f64>,
}

#[derive(Clone, Debug, Default)]
pub struct TierCosts {
    pub sizes: Option<VmSizes>,
    pub kernel: String,
    pub rows: Vec<TierRow>,
}

/// Boots the VM once with the bench script and the agent `bin` (and the testkit beside it).
pub fn run(bin: &Path, scratch: &Path, sizes: VmSizes) -> Result<TierCosts> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the workspace root")?
        .to_path_buf();
    let sizes_file = scratch.join("bench-sizes");
    std::fs::write(
        &sizes_file,
        format!(
            "{} {} {} {}\n",
            sizes.rounds, sizes.execs, sizes.chowns, sizes.files
        ),
    )?;
    let mut opts = vm::VmOptions::new(root.join("tests/vm/bench"))?;
    opts.binaries = vec![bin.to_path_buf()];
    let testkit = bin.with_file_name("guardrail-testkit");
    ensure!(
        testkit.exists(),
        "{} is missing (cargo build --release --bins)",
        testkit.display()
    );
    opts.binaries.push(testkit);
    opts.extra_files = vec![(sizes_file, PathBuf::from("/bench-sizes"))];
    opts.memory_mb = 2048;
    opts.cpus = 1;
    opts.timeout = std::time::Duration::from_secs(2400);
    opts.case_timeout = std::time::Duration::from_secs(1500);
    let report = vm::run_vm_tests(&opts)?;
    report.check().context("the tier-cost VM run")?;
    let log = std::fs::read_to_string(&report.log_path)
        .with_context(|| format!("reading {}", report.log_path.display()))?;
    let mut costs = parse(&log)?;
    costs.sizes = Some(sizes);
    let per_tier = costs.rows.iter().map(|r| r.exec_ns.len());
    ensure!(
        per_tier.clone().all(|n| n == sizes.rounds),
        "every tier measured {} times: {:?}",
        sizes.rounds,
        costs
            .rows
            .iter()
            .map(|r| (&r.tier, r.exec_ns.len()))
            .collect::<Vec<_>>()
    );
    Ok(costs)
}

/// The `TIERCOST` lines and the kernel release from a console log.
pub fn parse(log: &str) -> Result<TierCosts> {
    let mut costs = TierCosts::default();
    for line in log.lines() {
        if let Some(k) = line.split("Linux version ").nth(1) {
            if costs.kernel.is_empty() {
                costs.kernel = k.split_whitespace().next().unwrap_or("").to_string();
            }
            continue;
        }
        let Some(rest) = line.split("TIERCOST ").nth(1) else {
            continue;
        };
        let field = |name: &str| -> Result<String> {
            rest.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .map(str::to_string)
                .with_context(|| format!("no {name}= in {line:?}"))
        };
        let num = |name: &str| -> Result<f64> {
            field(name)?
                .parse::<f64>()
                .with_context(|| format!("{name} in {line:?}"))
        };
        let tier = field("tier")?;
        let i = match costs.rows.iter().position(|r| r.tier == tier) {
            Some(i) => i,
            None => {
                costs.rows.push(TierRow {
                    tier,
                    ..TierRow::default()
                });
                costs.rows.len() - 1
            }
        };
        let row = &mut costs.rows[i];
        row.exec_ns.push(num("exec_ns")?);
        row.chown_ns.push(num("chown_ns")?);
        row.rm_ns.push(num("rm_ns")?);
    }
    if costs.rows.first().is_none_or(|r| r.tier != "none") {
        bail!("the VM printed no baseline (tier=none) TIERCOST line");
    }
    Ok(costs)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The BENCHMARKS.md section.
pub fn render(c: &TierCosts) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let Some(s) = c.sizes else {
        return o;
    };
    let _ = writeln!(
        o,
        "## 6. Kernel tiers side by side, in the test VM\n\n\
         Debian's {} kernel under qemu TCG (emulated, 1 CPU), booted with `bpf` in `lsm=` so every\n\
         tier can be forced (`guardrail agent --tier`) in one boot; {} interleaved rounds. Per\n\
         round: {} fork+execs of /bin/true, {} capability checks (`chown` as root of a file owned\n\
         by nobody: CAP_CHOWN, so `security_capable`), and `rm -rf` of {} files outside every\n\
         target. Medians; the ratio is to the no-agent row of the same run. The fmod_ret tier's\n\
         trampolines (`security_capable`, `security_file_open`, `security_bprm_check`) run for every\n\
         process on the host, guarded or not: this is their cost.\n",
        if c.kernel.is_empty() {
            "6.1"
        } else {
            &c.kernel
        },
        s.rounds,
        s.execs,
        s.chowns,
        s.files
    );
    let _ = writeln!(
        o,
        "| tier | exec (µs) | × | capability check (ns) | × | rm per file (µs) | × |\n\
         |---|---:|---:|---:|---:|---:|---:|"
    );
    let base = &c.rows[0];
    let (be, bc, br) = (
        median(&base.exec_ns),
        median(&base.chown_ns),
        median(&base.rm_ns),
    );
    for r in &c.rows {
        let (e, ch, rm) = (median(&r.exec_ns), median(&r.chown_ns), median(&r.rm_ns));
        let _ = writeln!(
            o,
            "| {} | {:.0} | {:.2} | {:.0} | {:.2} | {:.1} | {:.2} |",
            r.tier,
            e / 1000.0,
            e / be,
            ch,
            ch / bc,
            rm / 1000.0,
            rm / br
        );
    }
    o.push('\n');
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiercost_lines_become_rows_in_order_with_the_baseline_first() {
        let log = "[    0.000000] Linux version 6.1.0-41-amd64 (debian-kernel@lists.debian.org)\n\
                   [tier-costs] TIERCOST round=1 tier=none exec_ns=1000 chown_ns=100 rm_ns=2000\n\
                   [tier-costs] TIERCOST round=1 tier=fmodret exec_ns=1100 chown_ns=150 rm_ns=2600\n\
                   [tier-costs] TIERCOST round=2 tier=none exec_ns=1200 chown_ns=120 rm_ns=2200\n\
                   [tier-costs] TIERCOST round=2 tier=fmodret exec_ns=1300 chown_ns=170 rm_ns=2800\n";
        let c = parse(log).expect("parses");
        assert_eq!(c.kernel, "6.1.0-41-amd64");
        assert_eq!(c.rows.len(), 2);
        assert_eq!(c.rows[1].tier, "fmodret");
        assert_eq!(c.rows[1].chown_ns, vec![150.0, 170.0]);
        let text = render(&TierCosts {
            sizes: Some(VmSizes {
                rounds: 2,
                execs: 1,
                chowns: 1,
                files: 1,
            }),
            ..c
        });
        // Medians 1100/1200 ns exec, 110/160 ns capability check, 2100/2700 ns per file.
        assert!(
            text.contains("| fmodret | 1 | 1.09 | 160 | 1.45 | 2.7 | 1.29 |"),
            "{text}"
        );
    }

    #[test]
    fn a_log_without_a_baseline_is_an_error() {
        assert!(parse("TIERCOST round=1 tier=lsm exec_ns=1 chown_ns=1 rm_ns=1\n").is_err());
        assert!(parse("TIERCOST round=1 tier=none exec_ns=x chown_ns=1 rm_ns=1\n").is_err());
    }
}
