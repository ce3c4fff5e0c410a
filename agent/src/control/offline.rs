//! `guardrail status` when no agent answers: the pinned programs may still hold jobs (an agent
//! that crashed, or was stopped with `--keep-enforcing-when-stopped`), and a job stopped with no
//! agent to ask is an outage nobody sees. The pinned `JOBS` and `HELD` maps name them; this lists
//! each with the commands that free it. Everything shown about a job (its command, its user name)
//! is the job's own text: capped and escaped.
use std::{path::Path, process::ExitCode};

use anyhow::Result;
use guardrail_common::{HeldJob, JOB_HELD, JobKey, JobState};
use serde::Serialize;

use crate::{host::procinfo, text};

/// Exit status of `guardrail status` with no agent (LSB: "program is not running").
const NOT_RUNNING: u8 = 3;

/// One job the pinned state holds.
#[derive(Debug, Serialize)]
pub struct PinnedHold {
    pub incident: u64,
    pub pgid: u32,
    pub sid: u32,
    pub uid: u32,
    pub user: String,
    pub command: String,
    /// Deletions outside its targets over the job's life (0 when only `HELD` remembers it).
    pub total_count: u64,
    pub held_secs: u64,
    pub pids: Vec<u32>,
    /// Of those, stopped (state T).
    pub stopped: usize,
}

#[derive(Debug, Serialize)]
struct Offline {
    running: bool,
    why: String,
    pin_dir: String,
    /// Programs still pinned (attached and enforcing with no agent).
    pinned_programs: usize,
    held: Vec<PinnedHold>,
    problems: Vec<String>,
}

/// The held jobs in the pinned maps of `dir`, live and the very jobs that were held (a process
/// group id reused since is left out).
pub fn pinned_holds(dir: &Path) -> Result<Vec<PinnedHold>> {
    let maps = dir.join("maps");
    let mut jobs: std::collections::HashMap<JobKey, JobState> = std::collections::HashMap::new();
    if let Ok(m) = crate::tiers::pins::pinned_hash::<JobKey, JobState>(&maps.join("JOBS")) {
        jobs.extend(m.iter().filter_map(|e| e.ok()));
    }
    let held: Vec<(JobKey, HeldJob)> =
        match crate::tiers::pins::pinned_hash::<JobKey, HeldJob>(&maps.join("HELD")) {
            Ok(m) => m.iter().filter_map(|e| e.ok()).collect(),
            Err(e) if maps.join("HELD").exists() => {
                return Err(e.context(format!("reading {}", maps.join("HELD").display())));
            }
            Err(_) => Vec::new(),
        };
    for (k, h) in held {
        let merged = crate::tiers::sensor::merge_held(jobs.get(&k).copied(), Some(h));
        if let Some(j) = merged {
            jobs.insert(k, j);
        }
    }
    let now = crate::host::clock::boottime_ns();
    let mut out: Vec<PinnedHold> = jobs
        .into_iter()
        .filter(|(k, j)| {
            j.state == JOB_HELD
                && procinfo::pgid_alive(k.pgid)
                && crate::host::identity::job_predates(k, j.held_ns)
        })
        .map(|(k, j)| {
            let pids = procinfo::pids_in_group(k.pgid);
            let first = pids.first().copied().unwrap_or(k.pgid);
            let end = j.comm.iter().position(|c| *c == 0).unwrap_or(j.comm.len());
            let comm = String::from_utf8_lossy(&j.comm[..end]).into_owned();
            PinnedHold {
                incident: j.incident,
                pgid: k.pgid,
                sid: k.sid,
                uid: j.uid,
                user: procinfo::user_name(j.uid),
                command: procinfo::cmdline(first).unwrap_or(comm),
                total_count: j.total,
                held_secs: now.saturating_sub(j.held_ns) / 1_000_000_000,
                stopped: pids
                    .iter()
                    .filter(|p| procinfo::stat(**p).is_some_and(|s| s.state == 'T'))
                    .count(),
                pids,
            }
        })
        .collect();
    out.sort_by_key(|h| h.incident);
    Ok(out)
}

fn pinned_programs(dir: &Path) -> usize {
    ["links", "links_new"]
        .iter()
        .filter_map(|l| std::fs::read_dir(dir.join(l)).ok())
        .map(|rd| rd.count())
        .sum()
}

/// `guardrail status` with no agent answering on `socket` (`err`: why the call failed).
pub fn status(socket: &Path, pin_dir: &Path, json: bool, err: &anyhow::Error) -> Result<ExitCode> {
    let why = format!("no agent answers on {} ({err:#})", socket.display());
    let mut problems = Vec::new();
    let root = nix::unistd::geteuid().is_root();
    let held = if !root {
        problems.push(
            "not root: the pinned state cannot be read (run `sudo guardrail status`)".to_string(),
        );
        Vec::new()
    } else {
        pinned_holds(pin_dir).unwrap_or_else(|e| {
            problems.push(format!("{e:#}"));
            Vec::new()
        })
    };
    let report = Offline {
        running: false,
        why,
        pin_dir: pin_dir.display().to_string(),
        pinned_programs: if root { pinned_programs(pin_dir) } else { 0 },
        held,
        problems,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    Ok(ExitCode::from(NOT_RUNNING))
}

fn print_text(r: &Offline) {
    println!("agent:   not running: {}", text::escape_line(&r.why));
    if r.pinned_programs > 0 {
        println!(
            "pinned:  {} programs in {} keep enforcing with no agent",
            r.pinned_programs, r.pin_dir
        );
    } else {
        println!("pinned:  no programs in {}", r.pin_dir);
    }
    for p in &r.problems {
        println!("WARNING: {p}");
    }
    if r.held.is_empty() {
        println!("held jobs: none in the pinned state");
        return;
    }
    println!(
        "held jobs: {} stopped by guardrail, with no agent to answer:",
        r.held.len()
    );
    for h in &r.held {
        let head = format!(
            "  incident {}  pgid {}  user {}  {}  {} of {} processes stopped, held {}s, {} deletions outside its targets",
            h.incident,
            h.pgid,
            h.user,
            text::cap_command(&h.command),
            h.stopped,
            h.pids.len(),
            h.held_secs,
            h.total_count
        );
        println!("{}", text::escape_line(&head));
        if r.pinned_programs > 0 {
            println!(
                "        end it: kill -KILL -{}   (kill -CONT -{} resumes it only until its next deletion: the pinned programs stop it again)",
                h.pgid, h.pgid
            );
        } else {
            println!(
                "        continue it: kill -CONT -{}   end it: kill -KILL -{}",
                h.pgid, h.pgid
            );
        }
    }
    println!(
        "to free them all: `sudo guardrail off` (detaches the pinned programs and continues every held job), or start the agent (`systemctl start guardrail`): it adopts these holds, then `guardrail approve ID` or `guardrail deny ID`"
    );
}
