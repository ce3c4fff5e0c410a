//! `cargo xtask bench`: what guardrail costs and what it lets through, measured side by side in
//! one run on this machine and written to BENCHMARKS.md (issue 16). Machines are noisy, so the
//! figures to read are ratios of medians of interleaved rounds, never absolute times.
//!
//! 1. deletion overhead: `rm -rf` of a tree of empty files on tmpfs and on ext4 (an image on a
//!    loop device), no agent / inside a target / counted against a large budget / auditd with the
//!    CIS delete rule; per-program BPF run time from kernel.bpf_stats_enabled;
//! 2. footprint: agent RSS idle and peak, CPU idle, the maps' locked memory, events sent;
//! 3. blast radius: files deleted past a budget by 1 and 16 parallel deleters, idle and under CPU
//!    load, guardrail against a userspace-reactive baseline;
//! 4. exec overhead: fork+exec of a static binary, unguarded vs guarded;
//! 5. alert latency: from the crossing to the line at a local rsyslog and to the alert at a local
//!    Alertmanager, p50/p99;
//! 6. the kernel tiers side by side in the test VM (exec, capability checks, rm -rf): what the
//!    fmod_ret tier's trampolines cost every process on the host;
//! 7. the storm: a million deletions across 64 concurrent jobs under unlimited budgets, then
//!    every job crossing a low budget at once (none missed, none found only by the tick).
//!
//! `--quick` takes each measurement once at a small size and writes nothing: the test command
//! runs it so the bench cannot rot. It fails only when a measurement could not be taken.
//!
//! Everything lives in a scratch directory under /var/tmp; mounts, the loop device, the sysctl
//! and auditd are undone by guards (sys.rs) also when a step fails.
mod blast;
mod deletion;
mod latency;
mod report;
mod storm;
mod sys;
mod tiers;

use std::{path::Path, process::Command, time::Instant};

use anyhow::{Context, Result, bail};

#[derive(clap::Args, Clone, Debug, Default)]
pub struct BenchCli {
    /// Each measurement once, at a small size; print only (BENCHMARKS.md is not written).
    #[arg(long)]
    pub quick: bool,
    /// Interleaved rounds of the deletion and exec rows (default 7).
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Files per directory in the deletion tree of 100 directories (default 1000).
    #[arg(long)]
    pub files_per_dir: Option<usize>,
    /// Runs per blast-radius case (default 50).
    #[arg(long)]
    pub blast_runs: Option<usize>,
    /// fork+exec per exec row (default 5000).
    #[arg(long)]
    pub execs: Option<usize>,
    /// Seconds of the idle-CPU measurement (default 60).
    #[arg(long)]
    pub idle_secs: Option<u64>,
}

/// Sizes of one bench run.
#[derive(Clone, Debug)]
pub struct Sizes {
    pub dirs: usize,
    pub per_dir: usize,
    pub rounds: usize,
    pub execs: usize,
    pub blast_runs: usize,
    pub blast_files: usize,
    pub blast_budget: u64,
    pub idle_secs: u64,
    pub latency_runs: usize,
    pub vm: tiers::VmSizes,
    pub storm: storm::StormSizes,
}

impl Sizes {
    fn from(cli: &BenchCli) -> Sizes {
        let q = cli.quick;
        Sizes {
            dirs: if q { 10 } else { 100 },
            per_dir: cli.files_per_dir.unwrap_or(if q { 200 } else { 1000 }),
            rounds: cli.rounds.unwrap_or(if q { 1 } else { 7 }),
            execs: cli.execs.unwrap_or(if q { 500 } else { 5000 }),
            blast_runs: cli.blast_runs.unwrap_or(if q { 1 } else { 50 }),
            blast_files: 20_000,
            blast_budget: 1_000,
            idle_secs: cli.idle_secs.unwrap_or(if q { 5 } else { 60 }),
            latency_runs: if q { 3 } else { 50 },
            vm: tiers::VmSizes {
                rounds: if q { 1 } else { 5 },
                execs: if q { 20 } else { 300 },
                chowns: if q { 1000 } else { 100_000 },
                files: if q { 200 } else { 5000 },
            },
            storm: storm::StormSizes {
                jobs: 64,
                files: if q { 6_400 } else { 1_000_000 },
                cross_files: if q { 100 } else { 300 },
                cross_budget: if q { 20 } else { 100 },
            },
        }
    }
}

/// The scratch directory: new, root's, 0700; removed at the end whatever happened.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new() -> Result<Scratch> {
        use std::os::unix::fs::DirBuilderExt;
        let p =
            std::path::PathBuf::from(format!("/var/tmp/guardrail-bench-{}", std::process::id()));
        if p.exists() {
            bail!("{} exists already", p.display());
        }
        std::fs::DirBuilder::new().mode(0o700).create(&p)?;
        Ok(Scratch(p))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run(bin: &Path, out: &Path, cli: &BenchCli) -> Result<()> {
    // SAFETY: geteuid takes nothing and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the bench runs as root (the agent loads BPF programs; mounts, auditd)");
    }
    let _lock = kernel_lock()?;
    let t = Instant::now();
    let s = Sizes::from(cli);
    let scratch = Scratch::new()?;
    // The runaways run a copy of rm that only the bench's rules name (deletion::scoped_policy).
    let rm = scratch.0.join("bin/rm");
    std::fs::create_dir_all(scratch.0.join("bin"))?;
    std::fs::copy("/usr/bin/rm", &rm).context("copying /usr/bin/rm")?;
    let env = report::Env::read();
    println!(
        "bench: {} ({s:?})",
        if cli.quick { "quick" } else { "full" }
    );
    let mut auditd = sys::Auditd::prepare(&scratch.0)?;
    let mut exec = deletion::ExecResult {
        count: s.execs,
        none: Vec::new(),
        guarded: Vec::new(),
    };
    let mut deletions = Vec::new();
    {
        let m = sys::Mount::tmpfs(&scratch.0.join("tmpfs"))?;
        deletions.push(deletion::run(bin, &m, &s, &mut auditd, Some(&mut exec))?);
    }
    {
        let m = sys::Mount::ext4(&scratch.0.join("ext4"), &scratch.0.join("ext4.img"))?;
        deletions.push(deletion::run(bin, &m, &s, &mut auditd, None)?);
    }
    drop(auditd);
    println!(
        "bench: deletion rows done ({:.0}s)",
        t.elapsed().as_secs_f64()
    );
    let fp = deletion::footprint(bin, &scratch.0, std::time::Duration::from_secs(s.idle_secs))?;
    println!("bench: footprint done ({:.0}s)", t.elapsed().as_secs_f64());
    let blast = blast::run(bin, &scratch.0, &rm, &s)?;
    println!(
        "bench: blast radius done ({:.0}s)",
        t.elapsed().as_secs_f64()
    );
    let lat = latency::run(bin, &scratch.0, &rm, s.latency_runs)?;
    println!(
        "bench: alert latency done ({:.0}s)",
        t.elapsed().as_secs_f64()
    );
    let storm = storm::run(bin, &scratch.0, &rm, s.storm)?;
    println!("bench: storm done ({:.0}s)", t.elapsed().as_secs_f64());
    let tier_costs = tiers::run(bin, &scratch.0, s.vm)?;
    println!("bench: VM tiers done ({:.0}s)", t.elapsed().as_secs_f64());
    let results = report::Results {
        deletions,
        exec,
        footprint: fp,
        blast,
        latency: lat,
        tiers: tier_costs,
        storm,
    };
    let text = report::render(&env, &s, &results, t.elapsed());
    print!("{text}");
    if cli.quick {
        println!(
            "bench --quick: every measurement taken in {:.0}s; BENCHMARKS.md not written",
            t.elapsed().as_secs_f64()
        );
    } else {
        std::fs::write(out, &text)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", out.display()))?;
        println!(
            "bench: wrote {} in {:.0}s",
            out.display(),
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// The machine-wide lock the kernel tests take (tests/src/lib.rs `kernel_lock`): another
/// agent would count, hold or slow the bench's deletions, and the bench's agents theirs.
fn kernel_lock() -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/guardrail-tests.lock")
        .context("opening /run/guardrail-tests.lock")?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        println!("bench: waiting for the kernel tests' lock (/run/guardrail-tests.lock)");
        // SAFETY: as above, blocking.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!(
                "flock /run/guardrail-tests.lock: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(f)
}

/// `git describe`-like: the commit the bench ran from, `+dirty` when the work tree differs.
fn commit() -> String {
    let root = crate::root();
    let rev = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(&root)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .current_dir(&root)
        .output()
        .is_ok_and(|o| !o.stdout.is_empty());
    if rev.is_empty() {
        "unknown".into()
    } else if dirty {
        format!("{rev}+dirty")
    } else {
        rev
    }
}
