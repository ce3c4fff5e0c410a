//! What the userspace tier knows about processes and mounts, from /proc: a process's job,
//! name, cgroup and unit (cached briefly: deletions come in bursts from the same few
//! processes), whether a job is stopped, and the mount table.
use std::{
    collections::HashMap,
    ffi::OsString,
    os::unix::ffi::OsStringExt,
    path::{Path, PathBuf},
    time::Instant,
};

use guardrail_common::JobKey;

use super::dirs::kid;

/// What the judge needs about a process, read once per pid (cached, see [`ProcCache`]).
#[derive(Clone, Debug)]
pub(super) struct ProcInfo {
    pub(super) key: JobKey,
    pub(super) comm: [u8; 16],
    pub(super) read_at: Instant,
    /// The job's rule for the policy generation it was computed under.
    pub(super) rule: Option<(u64, u32)>,
    /// Identity for rules and reports: read only for a job's first deletion or an event.
    pub(super) details: Option<ProcDetails>,
}

#[derive(Clone, Debug)]
pub(super) struct ProcDetails {
    pub(super) uid: u32,
    pub(super) loginuid: u32,
    pub(super) sessionid: u32,
    pub(super) cgroup_id: Option<u64>,
    /// Its cgroup's id and its ancestors', deepest first: what units match against, as in the
    /// kernel (a `Delegate=yes` unit's sub-cgroups count as the unit).
    pub(super) cgroup_ancestors: Vec<u64>,
    /// Executables of the process and its ancestors (the kernel tags at exec, inherited at fork).
    pub(super) exes: Vec<(u64, u64)>,
}

/// (comm, state, ppid, pgrp, session) from /proc/PID/stat.
pub(super) fn proc_stat(pid: u32) -> Option<([u8; 16], char, u32, u32, u32)> {
    let s = crate::host::procinfo::stat(pid)?;
    let mut comm = [0u8; 16];
    let n = s.comm.len().min(15);
    comm[..n].copy_from_slice(&s.comm[..n]);
    Some((comm, s.state, s.ppid, s.pgrp, s.session))
}

pub(super) fn proc_u32(path: &str) -> u32 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .map(|v| v as u32)
        .unwrap_or(u32::MAX)
}

/// One read of /proc/PID/stat: the job and the command name.
pub(super) fn read_proc(pid: u32) -> Option<ProcInfo> {
    let (comm, _, _, pgrp, session) = proc_stat(pid)?;
    Some(ProcInfo {
        key: JobKey {
            sid: session,
            pgid: pgrp,
        },
        comm,
        read_at: Instant::now(),
        rule: None,
        details: None,
    })
}

pub(super) fn read_details(pid: u32, cgroot: &Path) -> Option<ProcDetails> {
    let uid = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())?;
    // The cgroup id the kernel reports is the cgroup directory's inode on cgroup2.
    let cgroup_ancestors: Vec<u64> = crate::host::cgroup::path_of(pid)
        .map(|p| crate::host::cgroup::ancestor_ids(cgroot, &p))
        .unwrap_or_default()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let cgroup_id = cgroup_ancestors.first().copied();
    let mut exes = Vec::new();
    let mut p = pid;
    for _ in 0..16 {
        if let Ok(m) = std::fs::metadata(format!("/proc/{p}/exe")) {
            exes.push(kid(&m));
        }
        match proc_stat(p) {
            Some((_, _, parent, _, _)) if parent > 1 => p = parent,
            _ => break,
        }
    }
    Some(ProcDetails {
        uid,
        loginuid: proc_u32(&format!("/proc/{pid}/loginuid")),
        sessionid: proc_u32(&format!("/proc/{pid}/sessionid")),
        cgroup_id,
        cgroup_ancestors,
        exes,
    })
}

/// pid → what /proc said, least recently used evicted: a filesystem-wide mark sees every process
/// on the host, a runaway is a handful of them.
pub(super) struct ProcCache {
    pub(super) map: HashMap<u32, (ProcInfo, u64)>,
    pub(super) tick: u64,
}

impl ProcCache {
    pub(super) fn new() -> Self {
        ProcCache {
            map: HashMap::with_capacity(PROC_CACHE),
            tick: 0,
        }
    }

    pub(super) fn get(&mut self, pid: u32) -> Option<&mut ProcInfo> {
        self.tick += 1;
        let tick = self.tick;
        self.map.get_mut(&pid).map(|(p, used)| {
            *used = tick;
            p
        })
    }

    pub(super) fn insert(&mut self, pid: u32, p: ProcInfo) {
        if self.map.len() >= PROC_CACHE
            && !self.map.contains_key(&pid)
            && let Some(old) = self
                .map
                .iter()
                .min_by_key(|(_, (_, u))| *u)
                .map(|(k, _)| *k)
        {
            self.map.remove(&old);
        }
        self.tick += 1;
        self.map.insert(pid, (p, self.tick));
    }
}

pub(super) const PROC_CACHE: usize = 1024;

pub(super) struct Mount {
    pub(super) dev: u64,
    pub(super) mount_point: PathBuf,
}

/// Mounts of this mount namespace: (user st_dev, mount point).
pub(super) fn mountinfo() -> Vec<Mount> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (left, _) = line.split_once(" - ")?;
            let f: Vec<&str> = left.split_whitespace().collect();
            let (maj, min) = f.get(2)?.split_once(':')?;
            let (maj, min): (u64, u64) = (maj.parse().ok()?, min.parse().ok()?);
            Some(Mount {
                dev: libc::makedev(maj as u32, min as u32),
                mount_point: PathBuf::from(unescape_mount(f.get(4)?)),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal.
pub(super) fn unescape_mount(s: &str) -> OsString {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    OsString::from_vec(out)
}

/// Whether every live member of the group is stopped (zombies count as stopped).
pub(super) fn group_stopped(pgid: u32) -> bool {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return false;
    };
    let mut any = false;
    for pid in rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()) {
        if let Some((_, state, _, pgrp, _)) = proc_stat(pid)
            && pgrp == pgid
        {
            any = true;
            if !matches!(state, 'T' | 't' | 'Z' | 'X') {
                return false;
            }
        }
    }
    any
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mount("/mnt/a\\040b"), OsString::from("/mnt/a b"));
        assert_eq!(unescape_mount("/plain"), OsString::from("/plain"));
    }
}
