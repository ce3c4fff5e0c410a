//! Deletion overhead (`rm -rf` of a tree of empty files: no agent, inside a target, counted
//! against a large budget, auditd's CIS delete rule), interleaved round by round; exec overhead
//! in the same rounds; per-program BPF run time in a separate pass (kernel.bpf_stats_enabled
//! costs two clock reads per program run, so it stays off while the rows are timed); the agent's
//! footprint.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{
    Sizes,
    sys::{self, Agent, Auditd, BpfStats, Mount, ProgStat},
};

pub struct DeletionResult {
    pub fs: &'static str,
    pub files: usize,
    pub none: Vec<Duration>,
    pub target: Vec<Duration>,
    pub counted: Vec<Duration>,
    pub auditd: Vec<Duration>,
    /// Per program: (run time, runs) during one `rm -rf` inside the target, then one counted.
    pub stats_target: Vec<ProgStat>,
    pub stats_counted: Vec<ProgStat>,
    pub stats_rm_target: Duration,
    pub stats_rm_counted: Duration,
    /// Largest VmHWM of the agent over the rounds, KiB.
    pub hwm_kib: u64,
    /// Incident events the agent logged while the rows ran (none expected: no budget crossed).
    pub incidents: usize,
    pub tier: String,
}

pub struct ExecResult {
    pub count: usize,
    pub none: Vec<Duration>,
    pub guarded: Vec<Duration>,
}

pub struct Footprint {
    pub rss_idle_kib: u64,
    pub cpu_idle_percent: f64,
    pub idle_secs: u64,
    pub memlock_kib: u64,
}

/// The bench's policy: `target` is the only deletion target, everything else counts against a
/// budget no `rm -rf` here reaches. Syslog off: the host's log gets nothing from the bench.
pub fn policy(target: &Path, budget: u64) -> String {
    format!(
        "mode = \"enforce\"\n[deletion]\nbudget = {budget}\nwindow = \"1m\"\naction = \"hold\"\n\
         targets = [{:?}]\nprotected_roots = [\"/\"]\nprotect_mount_points = false\n\
         [alerts.syslog]\nenabled = false\n",
        target.display().to_string()
    )
}

/// A policy that stops only the bench's own runaways: every job gets a budget it never reaches,
/// except a job that runs the bench's copy of `rm` (`rm`): `budget` within `target`. Other
/// people's jobs on this machine are never held by the bench's agent.
pub fn scoped_policy(target: &Path, rm: &Path, budget: u64, alerts: &str) -> String {
    format!(
        "mode = \"enforce\"\n[deletion]\nbudget = 100000000\nwindow = \"1m\"\naction = \"hold\"\n\
         targets = [{t:?}]\nprotected_roots = [\"/\"]\nprotect_mount_points = false\n\
         [[deletion.rule]]\nname = \"bench-runaway\"\nmatch = {{ executable = {rm:?} }}\n\
         targets = [{t:?}]\nbudget = {budget}\n{alerts}",
        t = target.display().to_string(),
        rm = rm.display().to_string(),
    )
}

/// `dirs` directories of `per_dir` empty files under `tree`, flushed to the disk.
pub fn fill(tree: &Path, dirs: usize, per_dir: usize) -> Result<()> {
    for d in 0..dirs {
        let dir = tree.join(format!("d{d:03}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for f in 0..per_dir {
            std::fs::File::create(dir.join(format!("f{f:05}")))?;
        }
    }
    // Dirty metadata of the fill written out now, not during the timed deletion.
    sys::sh(Command::new("sync").arg("-f").arg(tree))?;
    Ok(())
}

/// Wall time of `rm -rf tree`.
fn time_rm(tree: &Path) -> Result<Duration> {
    let t = Instant::now();
    let st = Command::new("rm").arg("-rf").arg(tree).status()?;
    let d = t.elapsed();
    if !st.success() || tree.exists() {
        bail!("rm -rf {} failed ({st})", tree.display());
    }
    Ok(d)
}

fn fill_and_rm(tree: &Path, s: &Sizes) -> Result<Duration> {
    fill(tree, s.dirs, s.per_dir)?;
    time_rm(tree)
}

/// `count` fork+exec of a static binary (busybox, `true`), one after the other.
fn time_exec(count: usize) -> Result<Duration> {
    let t = Instant::now();
    for _ in 0..count {
        let st = Command::new("/bin/busybox").arg("true").status()?;
        if !st.success() {
            bail!("/bin/busybox true failed ({st})");
        }
    }
    Ok(t.elapsed())
}

fn stats_delta(before: &[ProgStat], after: &[ProgStat]) -> Vec<ProgStat> {
    after
        .iter()
        .map(|a| {
            let b = before.iter().find(|b| b.id == a.id);
            ProgStat {
                id: a.id,
                name: a.name.clone(),
                run_time_ns: a.run_time_ns.saturating_sub(b.map_or(0, |b| b.run_time_ns)),
                run_cnt: a.run_cnt.saturating_sub(b.map_or(0, |b| b.run_cnt)),
            }
        })
        .filter(|p| p.run_cnt > 0)
        .collect()
}

/// One filesystem's rows; exec rows ride along in the same rounds when `exec` is given.
pub fn run(
    bin: &Path,
    mount: &Mount,
    s: &Sizes,
    auditd: &mut Auditd,
    mut exec: Option<&mut ExecResult>,
) -> Result<DeletionResult> {
    let root = &mount.dir;
    let target = root.join("target");
    let outside = root.join("outside");
    std::fs::create_dir_all(&target)?;
    std::fs::create_dir_all(&outside)?;
    let agent_dir: PathBuf = root
        .parent()
        .unwrap_or(Path::new("/var/tmp"))
        .join(format!("agent-{}", mount.kind()));
    let pol = policy(&target, 100_000_000);
    let mut r = DeletionResult {
        fs: mount.kind(),
        files: s.dirs * s.per_dir,
        none: Vec::new(),
        target: Vec::new(),
        counted: Vec::new(),
        auditd: Vec::new(),
        stats_target: Vec::new(),
        stats_counted: Vec::new(),
        stats_rm_target: Duration::ZERO,
        stats_rm_counted: Duration::ZERO,
        hwm_kib: 0,
        incidents: 0,
        tier: String::new(),
    };
    // Warm-up, untimed: the first rm and exec after a mount or a build pay for cold caches.
    fill_and_rm(&outside.join("tree"), s)?;
    if let Some(e) = exec.as_deref_mut() {
        time_exec(e.count / 10 + 1)?;
    }
    for round in 0..s.rounds {
        // A B C D, round after round: drift in the machine's load hits every row alike.
        r.none.push(fill_and_rm(&outside.join("tree"), s)?);
        if let Some(e) = exec.as_deref_mut() {
            e.none.push(time_exec(e.count)?);
        }
        {
            let agent = Agent::start(bin, &pol, &agent_dir)?;
            r.tier = agent.tier();
            r.target.push(fill_and_rm(&target.join("tree"), s)?);
            r.counted.push(fill_and_rm(&outside.join("tree"), s)?);
            if let Some(e) = exec.as_deref_mut() {
                e.guarded.push(time_exec(e.count)?);
            }
            r.hwm_kib = r.hwm_kib.max(sys::status_kib(agent.pid(), "VmHWM"));
            r.incidents += agent.incidents().len();
        }
        let _ = std::fs::remove_dir_all(&agent_dir);
        fill(&outside.join("tree"), s.dirs, s.per_dir)?;
        auditd.begin()?;
        let d = time_rm(&outside.join("tree"));
        auditd.end();
        r.auditd.push(d?);
        println!(
            "bench: {} deletion round {}/{} done",
            mount.kind(),
            round + 1,
            s.rounds
        );
    }
    // Where the agent's time goes: per-program counters, in a pass of its own.
    {
        let _stats = BpfStats::enable()?;
        let agent = Agent::start(bin, &pol, &agent_dir)?;
        fill(&target.join("tree"), s.dirs, s.per_dir)?;
        let s0 = sys::prog_stats(agent.pid());
        r.stats_rm_target = time_rm(&target.join("tree"))?;
        let s1 = sys::prog_stats(agent.pid());
        fill(&outside.join("tree"), s.dirs, s.per_dir)?;
        let s2 = sys::prog_stats(agent.pid());
        r.stats_rm_counted = time_rm(&outside.join("tree"))?;
        let s3 = sys::prog_stats(agent.pid());
        if s0.is_empty() {
            bail!(
                "no BPF program descriptors found in /proc/{}/fdinfo",
                agent.pid()
            );
        }
        r.stats_target = stats_delta(&s0, &s1);
        r.stats_counted = stats_delta(&s2, &s3);
    }
    let _ = std::fs::remove_dir_all(&agent_dir);
    Ok(r)
}

/// Resident memory idle, CPU over an idle stretch, and the kernel maps' locked memory.
pub fn footprint(bin: &Path, scratch: &Path, idle: Duration) -> Result<Footprint> {
    let dir = scratch.join("agent-idle");
    let target = scratch.join("idle-target");
    std::fs::create_dir_all(&target)?;
    let agent = Agent::start(bin, &policy(&target, 100_000_000), &dir)?;
    // Start-up work (BTF parsing, policy compile) is over once it says ready; let it settle.
    std::thread::sleep(Duration::from_secs(1));
    let t0 = sys::cpu_ticks(agent.pid());
    let t = Instant::now();
    std::thread::sleep(idle);
    let ticks = sys::cpu_ticks(agent.pid()) - t0;
    let secs = t.elapsed().as_secs_f64();
    let fp = Footprint {
        rss_idle_kib: sys::status_kib(agent.pid(), "VmRSS"),
        // USER_HZ is 100 on Linux x86_64.
        cpu_idle_percent: ticks as f64 / secs,
        idle_secs: idle.as_secs(),
        memlock_kib: sys::maps_memlock_kib(agent.pid()),
    };
    if fp.rss_idle_kib == 0 || fp.memlock_kib == 0 {
        bail!(
            "could not read the agent's VmRSS or its maps' memlock (pid {})",
            agent.pid()
        );
    }
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&target);
    Ok(fp)
}
