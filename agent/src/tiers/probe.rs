//! Which enforcement tier this kernel really supports, found by loading and firing a tiny
//! program of each type (never by reading config files: a kernel can list `bpf` in its LSMs and
//! still refuse LSM programs, as this project's CI host does).
use std::{fmt, path::Path};

use anyhow::{Context, Result, anyhow};
use aya::{
    Btf,
    maps::Array,
    programs::{FModRet, Lsm, TracePoint},
};
use guardrail_common::KernelOffsets;
use serde::Serialize;

use crate::tiers::sensor;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// BPF LSM: deletions and shutdowns refused in the kernel before they happen.
    Lsm,
    /// The `lsm` tier's programs attached as fmod_ret (BPF_MODIFY_RETURN) to the kernel's
    /// `security_*` functions, where BPF LSM is built but not in the active LSM list (Ubuntu):
    /// the same refusals, before they happen.
    #[serde(rename = "fmodret")]
    FModRet,
    /// Syscall and sched tracepoints: counted in the kernel, the job stopped by a signal from the
    /// kernel right after the syscall that crossed the budget.
    Tracepoint,
    /// No usable BPF: fanotify/inotify, reacting from userspace.
    Userspace,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Lsm => "lsm",
            Tier::FModRet => "fmodret",
            Tier::Tracepoint => "tracepoint",
            Tier::Userspace => "userspace",
        })
    }
}

impl Tier {
    /// Parses a `--tier` value; `auto` (and anything else) is None.
    pub fn from_name(name: &str) -> Option<Tier> {
        match name {
            "lsm" => Some(Tier::Lsm),
            "fmodret" => Some(Tier::FModRet),
            "tracepoint" => Some(Tier::Tracepoint),
            "userspace" => Some(Tier::Userspace),
            _ => None,
        }
    }

    /// Refuses in the kernel before the operation happens (EPERM, or a hold before the
    /// deletion), rather than stopping the job after it.
    pub fn refuses(self) -> bool {
        matches!(self, Tier::Lsm | Tier::FModRet)
    }

    /// What this tier cannot see or do, stated wherever the tier is reported.
    pub fn gaps(self) -> &'static [&'static str] {
        match self {
            Tier::Lsm => &[
                "deletions by kernel threads for remote clients (nfsd, ksmbd) are judged as the kernel thread, not the client",
                "overwrites in place (truncate, O_TRUNC, dd over a file) are not counted as deletions",
                "btrfs subvolume deletion (an ioctl) is not seen",
                "shutdown requests sent straight over D-Bus (busctl, gdbus) are not seen: logind refuses them through guardrail's block inhibitor, except from root before systemd 257 (or a caller polkit lets ignore inhibitors); those to PID 1 (org.freedesktop.systemd1 StartUnit reboot.target) go through",
            ],
            Tier::FModRet => &[
                "deletions by kernel threads for remote clients (nfsd, ksmbd) are judged as the kernel thread, not the client",
                "overwrites in place (truncate, O_TRUNC, dd over a file) are not counted as deletions",
                "btrfs subvolume deletion (an ioctl) is not seen",
                "shutdown requests sent straight over D-Bus (busctl, gdbus) are not seen: logind refuses them through guardrail's block inhibitor, except from root before systemd 257 (or a caller polkit lets ignore inhibitors); those to PID 1 (org.freedesktop.systemd1 StartUnit reboot.target) go through",
                "a BPF trampoline runs on every capability check (security_capable) and file open (security_file_open) on the host, not only on guarded ones: a small cost the lsm tier does not have",
                "another tool's fmod_ret program on the same security_* function that refuses first ends the call before guardrail's runs (the refusal still stands; guardrail just does not count it)",
            ],
            Tier::Tracepoint => &[
                "cannot refuse a single syscall: a job is stopped right after the deletion that crossed its budget (at most one file past the budget per task deleting at that moment)",
                "a deletion in a data directory by a job not named for it goes through: the job is held right after that one file (killed under a `block` rule; a never_hold unit's job is only reported); `approve --more N` lets it go on until its next one, a plain `approve` for the rest of the job",
                "a held job resumed without approval (a `kill -CONT` loop, a ptracer swallowing SIGSTOP) deletes one file per resume: at its 8th deletion since the hold (SELF_RESUME_LIMIT; each task's first stop at the hold, parallel workers included, is not counted) the kernel kills it",
                "a protected root itself is not recognised (a path string names no directory the kernel can look up here): removing or renaming one counts as one deletion against the budget",
                "misses 32-bit compat syscalls (int 0x80) on x86_64",
                "io_uring deletions are counted without their path (always against the budget)",
                "absolute paths and multi-component relative paths are judged by the directory the syscall starts from (see README: tracepoint approximations)",
                "a rename is judged from path strings after it succeeded: a move to another directory counts for its source's scope (judged from the directory its path starts from); a rename within one directory counts for its destination unless it could not replace anything (RENAME_NOREPLACE, as GNU mv uses; it cannot tell whether a file was there)",
                "reboot(2) cannot be stopped: reboot -f, systemctl -ff and a custom binary calling reboot(2)/kexec from a guarded session go through",
                "writes to /proc/sysrq-trigger and shutdown signals to PID 1 are not stopped",
                "a refused shutdown program is stopped before its first instruction, then killed by the agent after it wrote the message (not refused with EPERM)",
                "shutdown requests sent straight over D-Bus (busctl, gdbus) are not seen: logind refuses them through guardrail's block inhibitor, except from root before systemd 257 (or a caller polkit lets ignore inhibitors); those to PID 1 (org.freedesktop.systemd1 StartUnit reboot.target) go through",
            ],
            Tier::Userspace => &[
                "cannot refuse anything: deletions are seen after they happen (fanotify; inotify where fanotify is unavailable) and the job is stopped by the agent from userspace",
                "files past the budget before the stop lands: at most 5000 per runaway job (measured on a busy 2-core host with rm -rf, find -delete and 8 forked workers: usually under 250, at worst 2086; more if the agent gets no CPU for tens of milliseconds); `guardrail selftest --tier userspace` measures this host",
                "a process that exits before the agent reads its deletions (one short-lived `rm` per file, forked workers) is named by who forked it (process events connector): its nearest live ancestor's job, held as a guess, unless that job is its session's own (a service, a login shell, a cron or ssh command); otherwise it counts for an unknown job under the default rule, and at that job's crossing only a live job holding the directory is stopped (as a guess)",
                "needs fanotify (Linux >= 5.9): it watches the filesystems of / and of every declared path; without it, inotify watches only the data directories and protected roots below /, names no process (every deletion counts for one unknown job under the default rule), and at its crossing only a job holding the directory open is stopped (as a guess)",
                "a directory deleted before the agent reads its events has no known ancestors: those deletions count against the budget even inside a target",
                "protected roots are noticed only where their path is found (mount points, top-level directories, watched roots); deleting one is reported and the job stopped after the fact",
                "a file moved to another directory is judged at its destination only (fanotify reports where it left and where it arrived as two unpaired records): moving files out of a non-target directory into a target, or out of a data directory, is not counted; a rename counts whenever its destination is outside scope; overwrites in place are not seen",
                "the sliding window is timed when the agent reads an event, not when the deletion happened",
                "reboot(2) cannot be stopped",
            ],
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    pub tier: Tier,
    /// Ok, or why BPF LSM is not usable.
    pub lsm: Result<(), String>,
    /// Ok, or why fmod_ret programs on `security_*` functions cannot refuse here.
    pub fmodret: Result<(), String>,
    pub tracepoint: Result<(), String>,
}

impl ProbeReport {
    pub fn why(&self) -> String {
        match self.tier {
            Tier::Lsm => "BPF LSM programs load and fire on this kernel".to_string(),
            Tier::FModRet => format!(
                "BPF LSM is not usable ({}); fmod_ret programs on security_* functions load, fire and refuse",
                err(&self.lsm)
            ),
            Tier::Tracepoint => format!(
                "BPF LSM is not usable ({}); fmod_ret is not usable ({}); tracepoint programs load and fire",
                err(&self.lsm),
                err(&self.fmodret)
            ),
            Tier::Userspace => format!(
                "BPF LSM is not usable ({}); fmod_ret is not usable ({}); tracepoints are not usable ({})",
                err(&self.lsm),
                err(&self.fmodret),
                self.tracepoint
                    .as_ref()
                    .err()
                    .map(String::as_str)
                    .unwrap_or("?")
            ),
        }
    }
}

impl ProbeReport {
    /// How to get a stronger tier than the one probed, where this kernel could give one.
    pub fn stronger(&self) -> Option<&'static str> {
        match self.tier {
            Tier::Lsm => None,
            Tier::FModRet => Some(
                "BPF LSM is built but not active: boot with lsm=<the list in /sys/kernel/security/lsm>,bpf (GRUB_CMDLINE_LINUX in /etc/default/grub, then update-grub) for the lsm tier, which has no trampoline on every capability check and file open",
            ),
            Tier::Tracepoint | Tier::Userspace => Some(
                "a kernel with BPF LSM active (lsm= list containing bpf), or x86_64 >= 5.7 with BTF and BPF trampolines for the fmodret tier, refuses in the kernel",
            ),
        }
    }
}

fn err(r: &Result<(), String>) -> &str {
    r.as_ref().err().map(String::as_str).unwrap_or("?")
}

fn chain(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

/// Probes the running kernel. `offsets` come from its BTF; without BTF neither BPF tier works.
pub fn probe(offsets: Option<&KernelOffsets>) -> ProbeReport {
    let Some(offsets) = offsets else {
        let why = "no usable kernel BTF at /sys/kernel/btf/vmlinux".to_string();
        return ProbeReport {
            tier: Tier::Userspace,
            lsm: Err(why.clone()),
            fmodret: Err(why.clone()),
            tracepoint: Err(why),
        };
    };
    let lsm = probe_lsm(offsets).map_err(|e| chain(&e));
    let fmodret = probe_fmodret(offsets).map_err(|e| chain(&e));
    let tracepoint = probe_tracepoint(offsets).map_err(|e| chain(&e));
    let tier = if lsm.is_ok() {
        Tier::Lsm
    } else if fmodret.is_ok() {
        Tier::FModRet
    } else if tracepoint.is_ok() {
        Tier::Tracepoint
    } else {
        Tier::Userspace
    };
    ProbeReport {
        tier,
        lsm,
        fmodret,
        tracepoint,
    }
}

fn probe_lsm(offsets: &KernelOffsets) -> Result<()> {
    let mut ebpf = sensor::load(offsets)?;
    {
        let mut target: Array<_, u32> = Array::try_from(
            ebpf.map_mut("SELFTEST_TARGET")
                .ok_or_else(|| anyhow!("no SELFTEST_TARGET"))?,
        )?;
        target.set(0, std::process::id(), 0)?;
    }
    let btf = Btf::from_sys_fs().context("reading kernel BTF")?;
    let prog: &mut Lsm = ebpf
        .program_mut("probe_lsm")
        .ok_or_else(|| anyhow!("no probe_lsm program"))?
        .try_into()?;
    prog.load("inode_getattr", &btf)
        .context("loading a BPF LSM program")?;
    let link = prog.attach().context("attaching a BPF LSM program")?;
    let _ = std::fs::metadata(Path::new("/"));
    let prog: &mut Lsm = ebpf
        .program_mut("probe_lsm")
        .ok_or_else(|| anyhow!("no probe_lsm"))?
        .try_into()?;
    prog.detach(link)?;
    let hits: Array<_, u64> = Array::try_from(
        ebpf.map("PROBE_LSM_HITS")
            .ok_or_else(|| anyhow!("no PROBE_LSM_HITS"))?,
    )?;
    if hits.get(&0, 0)? == 0 {
        anyhow::bail!(
            "a BPF LSM program attached but never ran (bpf is not in the kernel's active lsm= list)"
        );
    }
    Ok(())
}

/// Loads an fmod_ret program on `security_inode_getattr` that refuses a `stat` by this thread
/// only, and proves both that it ran and that the `stat` failed with EPERM: on this kernel the
/// return value of an fmod_ret program on a `security_*` function really refuses the call (the
/// kernel's BTF lists the function, it has a BPF trampoline, and nothing blocks the attach).
/// Then loads the tier's deletion programs.
fn probe_fmodret(offsets: &KernelOffsets) -> Result<()> {
    let mut ebpf = sensor::load(offsets)?;
    let tid = nix::unistd::gettid().as_raw() as u32;
    {
        let mut target: Array<_, u32> = Array::try_from(
            ebpf.map_mut("SELFTEST_TARGET")
                .ok_or_else(|| anyhow!("no SELFTEST_TARGET"))?,
        )?;
        target.set(0, tid, 0)?;
    }
    let btf = Btf::from_sys_fs().context("reading kernel BTF")?;
    let prog: &mut FModRet = ebpf
        .program_mut("probe_fmodret")
        .ok_or_else(|| anyhow!("no probe_fmodret program"))?
        .try_into()?;
    prog.load("security_inode_getattr", &btf)
        .context("loading an fmod_ret program on security_inode_getattr")?;
    let link = prog
        .attach()
        .context("attaching an fmod_ret program to security_inode_getattr")?;
    let refused = std::fs::metadata(Path::new("/"));
    let prog: &mut FModRet = ebpf
        .program_mut("probe_fmodret")
        .ok_or_else(|| anyhow!("no probe_fmodret"))?
        .try_into()?;
    prog.detach(link)?;
    let hits: Array<_, u64> = Array::try_from(
        ebpf.map("PROBE_LSM_HITS")
            .ok_or_else(|| anyhow!("no PROBE_LSM_HITS"))?,
    )?;
    if hits.get(&0, 0)? == 0 {
        anyhow::bail!("an fmod_ret program attached but never ran");
    }
    match refused {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
        Err(e) => {
            anyhow::bail!("an fmod_ret program ran but stat failed with {e} instead of EPERM")
        }
        Ok(_) => anyhow::bail!("an fmod_ret program ran but its return value did not refuse stat"),
    }
    // Chosen only when its deletion programs also pass this kernel's verifier (loaded, never
    // attached here): a kernel that refuses one gets the tracepoint tier, not an agent that
    // cannot start.
    for (name, func) in sensor::FMODRET_PROGRAMS {
        let prog: &mut FModRet = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("no {name} program"))?
            .try_into()?;
        prog.load(func, &btf)
            .with_context(|| format!("loading fmod_ret program {name} for {func}"))?;
    }
    Ok(())
}

fn probe_tracepoint(offsets: &KernelOffsets) -> Result<()> {
    let mut ebpf = sensor::load(offsets)?;
    let prog: &mut TracePoint = ebpf
        .program_mut("selftest_getpgid")
        .ok_or_else(|| anyhow!("no selftest_getpgid program"))?
        .try_into()?;
    prog.load().context("loading a tracepoint program")?;
    prog.attach("syscalls", "sys_enter_getpgid")
        .context("attaching to syscalls/sys_enter_getpgid")?;
    let ans = sensor::selftest_answer(&mut ebpf)?;
    if ans.hits == 0 {
        anyhow::bail!("a tracepoint program attached but never ran");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_userspace_gaps_state_the_promised_bound() {
        let bound = format!(
            "at most {} per runaway job",
            crate::tiers::userspace::PROMISED_OVERSHOOT
        );
        assert!(
            Tier::Userspace.gaps().iter().any(|g| g.contains(&bound)),
            "probe.rs and fallback::PROMISED_OVERSHOOT disagree"
        );
    }
}
