//! What the agent pins in bpffs outlives it (that is the point: a crash or restart leaves no gap).
//! This module makes sure it outlives it only where people can see it, and that it can always be
//! switched off, with or without an agent:
//!
//! - [`usable_pin_dir`]: pins go only to a bpffs visible to the host. bpffs mounted by the agent
//!   inside the unit's private mount namespace would die with the namespace: the programs would
//!   detach with the agent and, worse, jobs held at that moment would stay stopped with no pinned
//!   state naming them. Without a visible bpffs the agent pins nothing and says so.
//! - [`switch_off`] (`guardrail off`, the packages' removal scripts): detaches every pinned
//!   program, continues the jobs the pinned `JOBS` map shows as held, answers the shutdown
//!   callers `SD_STOPPED` shows as waiting, and removes the pin directory.
use std::path::{Path, PathBuf};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use guardrail_common::{
    ALLOWANCE_UNLIMITED, HeldJob, JOB_ACTIVE, JOB_HELD, JobKey, JobState, SD_OUT_STOPPED,
    ShutdownEvent,
};
use nix::sys::signal::Signal;

use crate::host::procinfo;

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

// The magic is a c_long (fsword_t): 32 bits on some targets.
#[allow(clippy::unnecessary_cast)]
fn on_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

/// `pin_dir` if its parent is a bpffs mount this agent may pin to; None (and why) otherwise.
pub fn usable_pin_dir(pin_dir: &Path) -> (Option<PathBuf>, Option<String>) {
    let parent = pin_dir.parent().unwrap_or(Path::new("/"));
    if on_bpffs(parent) {
        return (Some(pin_dir.to_path_buf()), None);
    }
    (
        None,
        Some(format!(
            "{} is not on a bpffs visible to the host (mount it there: `mount -t bpf bpf /sys/fs/bpf`, then restart guardrail): nothing is pinned, so the programs detach whenever the agent stops or crashes",
            parent.display()
        )),
    )
}

/// What [`switch_off`] did, one line each.
#[derive(Debug, Default)]
pub struct OffReport {
    pub lines: Vec<String>,
    /// Programs detached.
    pub programs: usize,
    /// Held jobs continued (process group ids).
    pub continued: Vec<u32>,
    pub problems: Vec<String>,
}

pub(crate) fn pinned_hash<K: aya::Pod, V: aya::Pod>(
    path: &Path,
) -> anyhow::Result<BpfHashMap<MapData, K, V>> {
    let data = MapData::from_pin(path)?;
    Ok(BpfHashMap::try_from(Map::HashMap(data))?)
}

fn comm_of(pid: u32) -> Option<Vec<u8>> {
    let c = std::fs::read(format!("/proc/{pid}/comm")).ok()?;
    Some(c.strip_suffix(b"\n").unwrap_or(&c).to_vec())
}

fn state_of(pid: u32) -> Option<char> {
    procinfo::stat(pid).map(|s| s.state)
}

fn cstr(b: &[u8]) -> &[u8] {
    &b[..b.iter().position(|c| *c == 0).unwrap_or(b.len())]
}

/// Switches off everything pinned in `dir`, with no agent: detach first (so nothing re-stops
/// what is continued), then continue held jobs and answer stopped shutdown callers, then remove
/// the pins.
pub fn switch_off(dir: &Path) -> OffReport {
    let mut r = OffReport::default();
    if std::fs::symlink_metadata(dir).is_err() {
        r.lines.push(format!(
            "nothing pinned in {}: nothing to do",
            dir.display()
        ));
        return r;
    }
    let maps = dir.join("maps");
    // Read before anything is removed: the held jobs and the waiting shutdown callers.
    let held: Vec<JobKey> = match pinned_hash::<JobKey, JobState>(&maps.join("JOBS")) {
        Ok(mut m) => {
            let held: Vec<(JobKey, JobState)> = m
                .iter()
                .filter_map(|e| e.ok())
                .filter(|(_, j)| j.state == JOB_HELD)
                .collect();
            // Let go in the kernel's own table first: a program still running for a moment
            // after its link is gone (an RCU grace period) would otherwise stop the continued
            // job again at its next deletion, and nothing would ever continue it.
            for (k, mut j) in held.clone() {
                j.state = JOB_ACTIVE;
                j.allowance = ALLOWANCE_UNLIMITED;
                let _ = m.insert(k, j, 0);
            }
            held.into_iter().map(|(k, _)| k).collect()
        }
        Err(e) if maps.join("JOBS").exists() => {
            r.problems.push(format!(
                "reading the held jobs in {}: {e:#}; find stopped jobs with `ps -eo pid,pgid,stat,args | awk '$3 ~ /T/'` and continue them with `kill -CONT -PGID`",
                maps.join("JOBS").display()
            ));
            Vec::new()
        }
        Err(_) => Vec::new(),
    };
    // The kernel keeps a held job's state in `HELD` too, and restores it from there: that entry
    // goes first, for the same reason, and a job only `HELD` remembers is continued as well.
    let mut held = held;
    if let Ok(mut m) = pinned_hash::<JobKey, HeldJob>(&maps.join("HELD")) {
        let entries: Vec<(JobKey, HeldJob)> = m.iter().filter_map(|e| e.ok()).collect();
        for (k, h) in entries {
            let _ = m.remove(&k);
            if h.state == JOB_HELD && !held.contains(&k) {
                held.push(k);
            }
        }
    }
    let callers: Vec<(u32, ShutdownEvent)> =
        match pinned_hash::<u32, ShutdownEvent>(&maps.join("SD_STOPPED")) {
            Ok(m) => m.iter().filter_map(|e| e.ok()).collect(),
            Err(_) => Vec::new(),
        };
    for links in ["links", "links_new"] {
        let Ok(rd) = std::fs::read_dir(dir.join(links)) else {
            continue;
        };
        for e in rd.flatten() {
            // Removing the last pin of a link detaches its program (bpffs: a plain unlink).
            match std::fs::remove_file(e.path()) {
                Ok(()) => r.programs += 1,
                Err(err) => r
                    .problems
                    .push(format!("removing {}: {err}", e.path().display())),
            }
        }
    }
    r.lines.push(format!(
        "detached {} programs pinned in {}",
        r.programs,
        dir.display()
    ));
    for key in held {
        if !procinfo::pgid_alive(key.pgid) {
            r.lines.push(format!(
                "held job {} is gone: nothing to continue",
                key.pgid
            ));
            continue;
        }
        // Wrappers stopped in sympathy (sudo) first found, then continued with the job.
        let wrappers = procinfo::stopped_ancestors(key.pgid);
        procinfo::signal_job(key.pgid, Signal::SIGCONT);
        procinfo::continue_pids(&wrappers);
        // A stop already on its way when the programs went (sent by a program in its last
        // moment): continue again until the job stays running.
        for _ in 0..20 {
            std::thread::sleep(std::time::Duration::from_millis(50));
            let stopped = procinfo::pids_in_group(key.pgid)
                .iter()
                .any(|p| state_of(*p).is_some_and(|c| c == 'T'));
            if stopped {
                procinfo::signal_job(key.pgid, Signal::SIGCONT);
            }
        }
        r.continued.push(key.pgid);
        r.lines.push(format!(
            "continued held job {} (process group {})",
            key.pgid, key.pgid
        ));
    }
    for (tgid, ev) in callers {
        // The same task, still waiting (a reused pid would have to be stopped and have the
        // same name to be mistaken for it).
        let waiting =
            state_of(tgid) == Some('T') && comm_of(tgid).as_deref() == Some(cstr(&ev.comm));
        if !waiting {
            continue;
        }
        let pid = nix::unistd::Pid::from_raw(tgid as i32);
        if ev.outcome == SD_OUT_STOPPED {
            // Tracepoint tier: the refused shutdown program was stopped before its first
            // instruction; continuing it would run it.
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            r.lines.push(format!(
                "ended refused shutdown caller {tgid} (it never ran)"
            ));
        } else {
            // LSM tier: its request already failed with EPERM.
            let _ = nix::sys::signal::kill(pid, Signal::SIGCONT);
            r.lines
                .push(format!("continued refused shutdown caller {tgid}"));
        }
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => r.lines.push(format!("removed {}", dir.display())),
        Err(e) => r.problems.push(format!("removing {}: {e}", dir.display())),
    }
    r
}
