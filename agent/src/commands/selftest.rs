//! `guardrail selftest`: which tier this kernel supports (by loading and firing a program of each
//! type), whether the struct offsets resolved from BTF read the right values on this kernel, what
//! the tier cannot see, and a runaway deletion stopped for real by the tier in force (for the
//! userspace tier: its blast radius measured on this host). Exits non-zero when a check fails.
use std::{os::unix::fs::MetadataExt, path::Path, process::ExitCode};

use anyhow::{Context, Result};
use aya::programs::TracePoint;
use serde::Serialize;

use crate::{
    host::scratch::ScratchDir,
    tiers::decode::{KernelEvent, decode},
    tiers::{btf, probe, sensor, userspace as fallback},
};

#[derive(Serialize)]
struct Check {
    name: String,
    ok: bool,
    detail: String,
}

#[derive(Serialize)]
struct Report {
    tier: probe::Tier,
    why: String,
    gaps: Vec<String>,
    /// How to get a stronger tier on this host, where there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    stronger: Option<String>,
    checks: Vec<Check>,
}

fn proc_u32(path: &str) -> Option<u32> {
    std::fs::read_to_string(path)
        .ok()?
        .trim()
        .parse::<i64>()
        .ok()
        .map(|v| v as u32)
}

/// Reads, through the resolved offsets, values about this very process and compares each with
/// what /proc and stat(2) say. A wrong offset on this kernel shows up as a mismatch.
fn offsets_check(offsets: &guardrail_common::KernelOffsets) -> Result<Vec<Check>> {
    let mut ebpf = sensor::load(offsets)?;
    let prog: &mut TracePoint = ebpf
        .program_mut("selftest_getpgid")
        .context("no selftest program")?
        .try_into()?;
    prog.load()?;
    prog.attach("syscalls", "sys_enter_getpgid")?;
    let ans = sensor::selftest_answer(&mut ebpf)?;
    let me = std::process::id();
    let cwd = std::fs::metadata(".").context("stat .")?;
    let exe = std::fs::metadata("/proc/self/exe").context("stat /proc/self/exe")?;
    let kdev = |d: u64| guardrail_common::kernel_dev_from_user(d);
    // SAFETY: getpgid/getsid have no memory-safety preconditions.
    let (pgid, sid) = unsafe { (libc::getpgid(0) as u32, libc::getsid(0) as u32) };
    let want: [(&str, u64, u64); 9] = [
        ("task_struct.tgid", ans.tgid as u64, me as u64),
        ("task_struct.pid", ans.pid as u64, me as u64),
        ("signal_struct.pids[PGID]", ans.pgid as u64, pgid as u64),
        ("signal_struct.pids[SID]", ans.sid as u64, sid as u64),
        (
            "task_struct.loginuid",
            ans.loginuid as u64,
            proc_u32("/proc/self/loginuid").unwrap_or(u32::MAX) as u64,
        ),
        (
            "task_struct.sessionid",
            ans.sessionid as u64,
            proc_u32("/proc/self/sessionid").unwrap_or(u32::MAX) as u64,
        ),
        ("fs_struct.pwd → inode", ans.cwd_ino, cwd.ino()),
        ("super_block.s_dev (cwd)", ans.cwd_dev, kdev(cwd.dev())),
        ("mm_struct.exe_file → inode", ans.exe_ino, exe.ino()),
    ];
    Ok(want
        .iter()
        .map(|(name, got, expected)| Check {
            name: format!("offset {name}"),
            ok: got == expected,
            detail: format!("read {got} through BTF offsets, /proc says {expected}"),
        })
        .collect())
}

/// Files in the runaway test and its budget.
const RUNAWAY_FILES: usize = 300;
const RUNAWAY_BUDGET: u64 = 20;

/// Proves enforcement for real: a tree in a fresh private scratch directory, a runaway `rm -rf` in a cgroup of
/// its own whose rule has a small budget (every other job keeps an unlimited one), and a count of
/// the files that went past the budget before the job stopped.
fn runaway_check(offsets: &guardrail_common::KernelOffsets, tier: probe::Tier) -> Result<Check> {
    use guardrail_common::{ACTION_HOLD, EV_BUDGET_CROSSED, RuleParams};
    use std::os::unix::process::CommandExt;

    let pid = std::process::id();
    // A fresh private directory (never a predictable /var/tmp name a user could plant).
    let scratch = ScratchDir::new("selftest")?;
    let victim = scratch.mkdir("victim")?;
    for i in 0..RUNAWAY_FILES {
        scratch
            .write(&format!("victim/f{i:04}"), b"x")
            .context("filling the scratch tree")?;
    }
    let cgroup = guardrail_policy::cgroup2_root().join(format!("guardrail-selftest-{pid}"));
    std::fs::create_dir_all(&cgroup)
        .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
    let cleanup = |cgroup: &Path| {
        for _ in 0..50 {
            if std::fs::remove_dir(cgroup).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let result = (|| -> Result<Check> {
        let window_ns = 60_000_000_000;
        let policy = sensor::KernelPolicy {
            mode: guardrail_common::MODE_ENFORCE,
            dirs: Vec::new(),
            // No budget above the job: the self-test judges one job only.
            levels: Vec::new(),
            rules: vec![
                RuleParams {
                    budget: u64::MAX / 8,
                    window_ns,
                    action: ACTION_HOLD,
                    flags: 0,
                },
                RuleParams {
                    budget: RUNAWAY_BUDGET,
                    window_ns,
                    action: ACTION_HOLD,
                    flags: 0,
                },
            ],
            exes: Vec::new(),
            cgroups: vec![(std::fs::metadata(&cgroup)?.ino(), 1)],
            uids: Vec::new(),
            never_hold: Vec::new(),
        };
        let mut s = sensor::Sensor::new(offsets)?;
        s.install_policy(&policy)?;
        s.attach(tier)?;
        let mut ring = s.take_events()?;
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.args(["-c", "rm -rf victim"])
            .current_dir(scratch.path())
            .process_group(0);
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        crate::host::cgroup::join_at_exec(&mut cmd, &cgroup)?;
        let mut child = cmd.spawn().context("starting the runaway job")?;
        let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
        let start = std::time::Instant::now();
        let mut crossed = false;
        while !crossed && start.elapsed() < std::time::Duration::from_secs(20) {
            while let Some(item) = ring.next() {
                if let Some(KernelEvent::Deletion(ev)) = decode(&item) {
                    crossed |= ev.kind == EV_BUDGET_CROSSED && ev.pgid == child.id();
                }
            }
            if !crossed {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        // What the agent does on the event: stop the whole job.
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGSTOP);
        std::thread::sleep(std::time::Duration::from_millis(300));
        let left = std::fs::read_dir(&victim).map(|d| d.count()).unwrap_or(0);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();
        let gone = (RUNAWAY_FILES - left) as u64;
        let past = gone.saturating_sub(RUNAWAY_BUDGET);
        let promised = if tier.refuses() { 0 } else { 1 };
        Ok(Check {
            name: "runaway deletion".into(),
            ok: crossed && gone >= RUNAWAY_BUDGET.saturating_sub(1) && past <= promised,
            detail: format!(
                "rm -rf over {RUNAWAY_FILES} files with budget {RUNAWAY_BUDGET}: {} ; {gone} files gone, {past} past the budget (this tier promises at most {promised} per deleting task)",
                if crossed {
                    "stopped at the budget"
                } else {
                    "NOT stopped within 20s"
                }
            ),
        })
    })();
    cleanup(&cgroup);
    drop(scratch);
    result
}

/// A shutdown request from a session classified remote, for real through the tier's shutdown
/// programs: a copy of /bin/touch named `reboot` (never a real shutdown command) is the policy's
/// shutdown command; a child takes a new audit session by writing /proc/self/loginuid (what
/// pam_loginuid does for an SSH login), the session is marked remote, and the child execs the
/// stand-in, which would create a marker file if it ran. Passes when the kernel refused or
/// stopped it (an event says so) and the marker does not exist.
fn shutdown_check(offsets: &guardrail_common::KernelOffsets, tier: probe::Tier) -> Result<Check> {
    use guardrail_common::{SD_OUT_REFUSED, SD_OUT_STOPPED};
    use std::io::{BufRead, BufReader, Write};

    // A fresh private directory that allows exec: root runs the stand-in from it, so it must be
    // a copy no one else could have planted or can swap.
    let scratch = ScratchDir::new_exec("selftest-sd")?;
    let result = (|| -> Result<Check> {
        let standin = scratch
            .copy_program(Path::new("/bin/touch"), "reboot")
            .context("copying /bin/touch as the stand-in")?;
        let marker = scratch.path().join("stand-in-ran");
        // No logind lock: the check must not touch what the host's logind allows.
        let policy_path = scratch.write(
            "policy.toml",
            format!(
                "mode = \"enforce\"\n[shutdown]\nremote = \"confirm\"\nlocal = \"allow\"\nnone = \"allow\"\nunknown = \"confirm\"\nlogind_inhibitor = false\ncommands = [{:?}]\n",
                standin.display().to_string()
            )
            .as_bytes(),
        )?;
        let policy = crate::policy::PolicySource::File {
            main: policy_path.clone(),
            dropins: None,
        }
        .load()
        .map_err(|e| anyhow::anyhow!("the self-test policy: {e}"))?;
        let mut s = sensor::Sensor::new(offsets)?;
        let mut guard = crate::guards::shutdown::Guard::new("selftest", tier, &policy);
        guard.install(&mut s, &policy)?;
        guard.attach(&mut s, tier)?;
        let mut ring = s.take_events()?;

        // The child reports its new session id, waits for the word, then execs the stand-in.
        let mut child = std::process::Command::new("/bin/sh")
            .args([
                "-c",
                "echo 0 >/proc/self/loginuid || exit 90; cat /proc/self/sessionid; echo; read go; exec \"$0\" \"$1\"",
            ])
            .arg(&standin)
            .arg(&marker)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting the would-be remote session")?;
        let child_pid = child.id();
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            BufReader::new(out).read_line(&mut line)?;
        }
        let Ok(session) = line.trim().parse::<u32>() else {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!(
                "could not start a new audit session (writing /proc/self/loginuid needs CAP_AUDIT_CONTROL and a kernel with audit)"
            );
        };
        guard.mark_remote_quietly(&mut s, session)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(b"go\n")?;
        }
        let start = std::time::Instant::now();
        let mut outcome = None;
        while outcome.is_none() && start.elapsed() < std::time::Duration::from_secs(10) {
            while let Some(item) = ring.next() {
                if let Some(KernelEvent::Shutdown(ev)) = decode(&item)
                    && ev.tgid == child_pid
                    && matches!(ev.outcome, SD_OUT_REFUSED | SD_OUT_STOPPED)
                {
                    outcome = Some(ev.outcome);
                }
            }
            if outcome.is_none() {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        // The kernel stopped the caller for the agent's message; this check ends it instead.
        let _ = child.kill();
        let _ = child.wait();
        let ran = marker.exists();
        let what = match outcome {
            Some(SD_OUT_REFUSED) => "refused with EPERM before it ran",
            Some(_) => "stopped before its first instruction",
            None => "NOT stopped within 10s",
        };
        Ok(Check {
            name: "remote shutdown".into(),
            ok: outcome.is_some() && !ran,
            detail: format!(
                "a stand-in \"reboot\" exec'd from a session classified remote (audit session {session}): {what}{}",
                if ran { "; the stand-in RAN" } else { "" }
            ),
        })
    })();
    drop(scratch);
    result
}

/// Files and budget of the userspace tier's measurement (what its promise is made for).
const USERSPACE_FILES: usize = 10_000;
const USERSPACE_BUDGET: u64 = 100;

/// The userspace tier has no kernel side to prove: a runaway `rm -rf` in a fresh private scratch
/// directory under /var/tmp (a disk filesystem, where fanotify reports what it does on the host's
/// data; /run may be a tmpfs), judged alone (nothing else on the host counts), and the files that went past
/// the budget before the watcher's stop landed, against the tier's promise.
fn userspace_runaway_check() -> Check {
    let promised = fallback::PROMISED_OVERSHOOT;
    match fallback::measure_blast_radius(
        Path::new("/var/tmp"),
        USERSPACE_BUDGET,
        USERSPACE_FILES,
        false,
    ) {
        Ok(past) => Check {
            name: "runaway deletion".into(),
            ok: past <= promised,
            detail: format!(
                "rm -rf over {USERSPACE_FILES} files with budget {USERSPACE_BUDGET}, stopped from userspace (fanotify): {past} past the budget (this tier promises at most {promised})"
            ),
        },
        Err(e) => Check {
            name: "runaway deletion".into(),
            ok: false,
            detail: format!("{e:#}"),
        },
    }
}

pub fn run(json: bool, forced: Option<probe::Tier>) -> Result<ExitCode> {
    crate::host::mounts::mount_kernel_filesystems();
    let offsets = btf::resolve_offsets(Path::new(btf::VMLINUX_BTF));
    let mut report = probe::probe(offsets.as_ref().ok());
    let probed = report.why();
    if let Some(t) = forced {
        report.tier = t;
    }
    let mut checks = vec![
        Check {
            name: "kernel BTF offsets".into(),
            ok: offsets.is_ok(),
            detail: match &offsets {
                Ok(_) => format!("resolved from {}", btf::VMLINUX_BTF),
                Err(e) => format!("{e:#}"),
            },
        },
        Check {
            name: "BPF LSM".into(),
            ok: report.lsm.is_ok(),
            detail: report
                .lsm
                .clone()
                .err()
                .unwrap_or_else(|| "loads and fires".into()),
        },
        Check {
            name: "fmod_ret".into(),
            ok: report.fmodret.is_ok(),
            detail: report
                .fmodret
                .clone()
                .err()
                .unwrap_or_else(|| "loads, fires and refuses on security_* functions".into()),
        },
        Check {
            name: "tracepoints".into(),
            ok: report.tracepoint.is_ok(),
            detail: report
                .tracepoint
                .clone()
                .err()
                .unwrap_or_else(|| "load and fire".into()),
        },
    ];
    if let (Ok(o), Ok(())) = (&offsets, &report.tracepoint) {
        match offsets_check(o) {
            Ok(c) => checks.extend(c),
            Err(e) => checks.push(Check {
                name: "offsets".into(),
                ok: false,
                detail: format!("{e:#}"),
            }),
        }
    }
    if report.tier == probe::Tier::Userspace {
        checks.push(userspace_runaway_check());
        checks.push(Check {
            name: "remote shutdown".into(),
            ok: false,
            detail:
                "not guarded: the shutdown guard decides in the kernel and this tier has no BPF"
                    .into(),
        });
    } else if let Ok(o) = &offsets {
        match runaway_check(o, report.tier) {
            Ok(c) => checks.push(c),
            Err(e) => checks.push(Check {
                name: "runaway deletion".into(),
                ok: false,
                detail: format!("{e:#}"),
            }),
        }
        match shutdown_check(o, report.tier) {
            Ok(c) => checks.push(c),
            Err(e) => checks.push(Check {
                name: "remote shutdown".into(),
                ok: false,
                detail: format!("{e:#}"),
            }),
        }
    }
    let out = Report {
        tier: report.tier,
        why: match forced {
            Some(t) => format!("forced by --tier {t}; probe: {probed}"),
            None => probed,
        },
        gaps: report.tier.gaps().iter().map(|s| s.to_string()).collect(),
        stronger: report.stronger().map(str::to_string),
        checks,
    };
    let offsets_ok = out
        .checks
        .iter()
        .filter(|c| c.name.starts_with("offset "))
        .all(|c| c.ok);
    let runaway_ok = out
        .checks
        .iter()
        .filter(|c| c.name == "runaway deletion")
        .all(|c| c.ok);
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("tier: {}", out.tier);
        println!("why:  {}", out.why);
        for g in &out.gaps {
            println!("cannot: {g}");
        }
        if let Some(s) = &out.stronger {
            println!("stronger: {s}");
        }
        for c in &out.checks {
            // A tier this kernel lacks is a "no", not a failure; the rest must pass.
            let capability = matches!(c.name.as_str(), "BPF LSM" | "fmod_ret" | "tracepoints")
                || (c.name == "remote shutdown" && out.tier == probe::Tier::Userspace);
            let mark = match (c.ok, capability) {
                (true, _) => " ok ",
                (false, true) => " no ",
                (false, false) => "FAIL",
            };
            println!("[{mark}] {}: {}", c.name, c.detail);
        }
    }
    if out.tier == probe::Tier::Userspace {
        eprintln!(
            "guardrail selftest: no kernel enforcement{}; the userspace last resort stops runaways after the fact",
            if forced.is_some() {
                " tested (forced)"
            } else {
                " is possible here"
            }
        );
        return Ok(if runaway_ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let proofs_ok = out
        .checks
        .iter()
        .filter(|c| c.name == "remote shutdown")
        .all(|c| c.ok);
    Ok(if offsets_ok && runaway_ok && proofs_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
