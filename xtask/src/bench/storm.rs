//! The storm: many deletions across many concurrent jobs, budgets unlimited, against no agent;
//! then, with the same agent, the budget set low and every job crossing it at once: each must be
//! held, from its own crossing event (a crossing the agent found only by its tick, because the
//! ring buffer had no room or the agent fell behind, is counted as a lost event).
//!
//! Only the bench's own copy of `rm` is under the bench's rule (deletion::scoped_policy): the
//! low budget cannot hold anyone else's job on this machine.
use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::sys::{self, Agent};

#[derive(Clone, Copy, Debug)]
pub struct StormSizes {
    pub jobs: usize,
    pub files: usize,
    /// Files per job in the crossing phase, and the budget they cross.
    pub cross_files: usize,
    pub cross_budget: u64,
}

pub struct StormResult {
    pub sizes: StormSizes,
    pub none: Duration,
    pub guarded: Duration,
    /// Agent VmRSS before the storm, VmHWM after it (KiB).
    pub rss_before_kib: u64,
    pub hwm_kib: u64,
    /// Incidents the agent logged during the storm (unlimited budgets: 0 expected).
    pub storm_incidents: usize,
    /// Crossing phase: jobs held from their own event, found by the tick (lost event), missed.
    pub held: usize,
    pub lost: usize,
    pub missed: usize,
}

/// `jobs` directories of `files / jobs` empty files each.
fn fill(root: &Path, s: &StormSizes, per_job: usize) -> Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    for j in 0..s.jobs {
        let d = root.join(format!("job{j:02}"));
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        for f in 0..per_job {
            std::fs::File::create(d.join(format!("f{f:06}")))?;
        }
        dirs.push(d);
    }
    Ok(dirs)
}

/// One `rm -rf` per directory, each in a process group of its own (a job each), all at once.
fn spawn_all(rm: &Path, dirs: &[PathBuf]) -> Result<Vec<Child>> {
    dirs.iter()
        .map(|d| {
            Command::new(rm)
                .arg("-rf")
                .arg(d)
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting rm")
        })
        .collect()
}

fn storm_once(rm: &Path, root: &Path, s: &StormSizes) -> Result<Duration> {
    let dirs = fill(root, s, s.files / s.jobs)?;
    sys::sh(Command::new("sync").arg("-f").arg(root))?;
    let t = Instant::now();
    let mut kids = spawn_all(rm, &dirs)?;
    for k in &mut kids {
        let st = k.wait()?;
        if !st.success() {
            bail!("a storm rm failed ({st})");
        }
    }
    let took = t.elapsed();
    if let Some(d) = dirs.iter().find(|d| d.exists()) {
        bail!("{} is still there after the storm", d.display());
    }
    Ok(took)
}

pub fn run(bin: &Path, scratch: &Path, rm: &Path, s: StormSizes) -> Result<StormResult> {
    let m = sys::Mount::tmpfs(&scratch.join("storm"))?;
    let root = m.dir.join("tree");
    let target = m.dir.join("target");
    std::fs::create_dir_all(&target)?;
    // A: no agent.
    let none = storm_once(rm, &root, &s)?;
    // B: the agent, every deletion of the storm counted against a budget it never reaches.
    let adir = scratch.join("storm-agent");
    let unlimited = super::deletion::scoped_policy(&target, rm, 100_000_000, "");
    let agent = Agent::start(bin, &unlimited, &adir)?;
    let rss_before_kib = sys::status_kib(agent.pid(), "VmRSS");
    let guarded = storm_once(rm, &root, &s)?;
    let hwm_kib = sys::status_kib(agent.pid(), "VmHWM");
    let storm_incidents = agent.incidents().len();
    // C: the budget set low (the policy file rewritten, SIGHUP), every job crossing it at once.
    let low = super::deletion::scoped_policy(&target, rm, s.cross_budget, "");
    std::fs::write(adir.join("policy.toml"), low)?;
    let before = agent.log_text().matches("policy reloaded").count();
    // SAFETY: kill(2) to the agent this bench started.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) };
    if !sys::wait_until(Duration::from_secs(20), || {
        agent.log_text().matches("policy reloaded").count() > before
    }) {
        bail!("the agent did not reload its policy: {}", agent.log_text());
    }
    let dirs = fill(&root, &s, s.cross_files)?;
    let mut kids = spawn_all(rm, &dirs)?;
    let groups: Vec<i32> = kids.iter().map(|k| k.id() as i32).collect();
    let held_pgids = || {
        let mut v: Vec<u64> = agent
            .incidents()
            .iter()
            .filter(|i| i["outcome"] == "held")
            .filter_map(|i| i["pgid"].as_u64())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    // The adoption tick looks every second for holds older than a second.
    sys::wait_until(Duration::from_secs(30), || held_pgids().len() >= s.jobs);
    let incidents = agent.incidents();
    let held_ids = held_pgids();
    let held_here = groups
        .iter()
        .filter(|g| held_ids.contains(&(**g as u64)))
        .count();
    let lost = incidents
        .iter()
        .filter(|i| i["outcome"] == "held")
        .filter(|i| {
            i["reason"]
                .as_str()
                .is_some_and(|r| r.contains("event was lost"))
        })
        .count();
    for g in &groups {
        // SAFETY: kill(2) of the process groups of the rm processes this bench started.
        unsafe {
            libc::kill(-g, libc::SIGKILL);
            libc::kill(-g, libc::SIGCONT);
        }
    }
    for k in &mut kids {
        let _ = k.wait();
    }
    drop(agent);
    let _ = std::fs::remove_dir_all(&root);
    Ok(StormResult {
        sizes: s,
        none,
        guarded,
        rss_before_kib,
        hwm_kib,
        storm_incidents,
        held: held_here - lost.min(held_here),
        lost,
        missed: s.jobs - held_here,
    })
}
