//! `cargo xtask bench`: what guardrail costs, measured side by side in one run and written to
//! BENCHMARKS.md. These machines are noisy, so every figure is a ratio (or a median of repeated
//! runs interleaved with their baseline), never an absolute promise.
//!
//! Measured on this machine's kernel (the tracepoint tier):
//! - deleting N files with `rm -rf`: no agent vs agent with the files inside a target (free path:
//!   ancestor walk only) vs agent with the files outside any target under an unlimited budget
//!   (the counting path), interleaved, median of R rounds;
//! - the agent's resident memory and its kernel maps' locked memory.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

const FILES: usize = 20_000;
const ROUNDS: usize = 5;

fn fill(dir: &Path, n: usize) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for i in 0..n {
        std::fs::write(dir.join(format!("f{i:05}")), b"x")?;
    }
    Ok(())
}

/// Wall time of `rm -rf victim` in `dir`.
fn time_rm(dir: &Path) -> Result<Duration> {
    fill(&dir.join("victim"), FILES)?;
    let t = Instant::now();
    let st = Command::new("rm")
        .args(["-rf", "victim"])
        .current_dir(dir)
        .status()?;
    let d = t.elapsed();
    if !st.success() {
        bail!("rm -rf failed in {}", dir.display());
    }
    Ok(d)
}

struct AgentProc {
    child: Child,
}

impl AgentProc {
    fn start(bin: &Path, policy: &Path, dir: &Path) -> Result<AgentProc> {
        let log = dir.join("agent.log");
        let child = Command::new(bin)
            .arg("agent")
            .arg("--policy")
            .arg(policy)
            .arg("--socket")
            .arg(dir.join("bench.sock"))
            .arg("--event-log")
            .arg(dir.join("events.jsonl"))
            .arg("--pin-dir")
            .arg(format!(
                "/sys/fs/bpf/guardrail-bench-{}",
                std::process::id()
            ))
            .stdout(std::fs::File::create(&log)?)
            .stderr(Stdio::null())
            .spawn()
            .context("starting the agent")?;
        let t = Instant::now();
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("guardrail: ready")
        {
            if t.elapsed() > Duration::from_secs(60) {
                bail!(
                    "the agent did not get ready: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(AgentProc { child })
    }

    fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    fn stop(mut self) {
        // SIGTERM by PID: the agent we started.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Locked memory of the kernel maps guardrail creates (bpftool, by map name).
fn maps_memlock_kib() -> u64 {
    const OURS: &[&str] = &[
        "CONFIG",
        "DIRS",
        "RULES",
        "EXES",
        "CGROUPS",
        "UIDS",
        "TASK_RULE",
        "JOBS",
        "INCIDENTS",
        "EVENTS",
    ];
    let out = Command::new("bpftool")
        .args(["map", "show", "--json"])
        .output();
    let Ok(out) = out else { return 0 };
    let text = String::from_utf8_lossy(&out.stdout);
    // Minimal JSON walk: objects with "name" and "bytes_memlock".
    text.split('{')
        .filter(|o| {
            OURS.iter()
                .any(|n| o.contains(&format!("\"name\":\"{n}\"")))
        })
        .filter_map(|o| {
            o.split("\"bytes_memlock\":")
                .nth(1)?
                .split([',', '}'])
                .next()?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .sum::<u64>()
        / 1024
}

pub fn run(bin: &Path, out: &Path) -> Result<()> {
    let scratch = PathBuf::from(format!("/var/tmp/guardrail-bench-{}", std::process::id()));
    let inside = scratch.join("target");
    let outside = scratch.join("outside");
    std::fs::create_dir_all(&inside)?;
    std::fs::create_dir_all(&outside)?;
    let policy = scratch.join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "mode = \"enforce\"\n[deletion]\nbudget = 100000000\nwindow = \"1m\"\ntargets = [{:?}]\nprotected_roots = [\"/\"]\nprotect_mount_points = false\n",
            inside.display().to_string()
        ),
    )?;
    let (mut base, mut free, mut counted) = (Vec::new(), Vec::new(), Vec::new());
    let mut rss = 0;
    let mut memlock = 0;
    for round in 0..ROUNDS {
        // Interleaved, so drift in the machine's load hits all three alike.
        base.push(time_rm(&outside)?);
        let agent = AgentProc::start(bin, &policy, &scratch)?;
        free.push(time_rm(&inside)?);
        counted.push(time_rm(&outside)?);
        rss = rss.max(agent.rss_kib());
        memlock = memlock.max(maps_memlock_kib());
        agent.stop();
        println!("bench: round {}/{ROUNDS} done", round + 1);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let (b, f, c) = (median(&mut base), median(&mut free), median(&mut counted));
    let ratio = |x: Duration| x.as_secs_f64() / b.as_secs_f64();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let report = format!(
        "# guardrail benchmarks\n\n\
         Produced by `cargo xtask bench` (as root) on {host}, kernel {kernel}, tier tracepoint (this\n\
         machine refuses BPF LSM). {ROUNDS} interleaved rounds, medians; the ratios are what to read:\n\
         these machines are noisy and absolute times move from run to run.\n\n\
         ## Deleting {FILES} files with `rm -rf`\n\n\
         | case | median | ratio to no agent |\n|---|---|---|\n\
         | no agent | {b:?} | 1.00 |\n\
         | agent, files inside a target (ancestor walk, free) | {f:?} | {rf:.2} |\n\
         | agent, files outside targets, unlimited budget (walk + per-job count) | {c:?} | {rc:.2} |\n\n\
         The kernel does the work per deletion (a bounded walk of at most 64 ancestors with one\n\
         hash lookup each, then one atomic add); userspace hears nothing until a state changes.\n\n\
         ## Memory\n\n\
         | what | size |\n|---|---|\n\
         | agent resident memory (VmRSS, max over rounds) | {rss} KiB |\n\
         | kernel maps' locked memory (bpftool `bytes_memlock`) | {memlock} KiB |\n",
        host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .trim(),
        kernel = kernel.trim(),
        rf = ratio(f),
        rc = ratio(c),
    );
    std::fs::write(out, &report).with_context(|| format!("writing {}", out.display()))?;
    print!("{report}");
    Ok(())
}
