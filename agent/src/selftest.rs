//! `guardrail selftest`: which tier this kernel supports (by loading and firing a program of each
//! type), whether the struct offsets resolved from BTF read the right values on this kernel, and
//! what the tier cannot see. Exits non-zero when no enforcement is possible.
use std::{os::unix::fs::MetadataExt, path::Path, process::ExitCode};

use anyhow::{Context, Result};
use aya::programs::TracePoint;
use serde::Serialize;

use crate::{btf, probe, sensor};

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

pub fn run(json: bool) -> Result<ExitCode> {
    crate::mount_kernel_filesystems();
    let offsets = btf::resolve_offsets(Path::new(btf::VMLINUX_BTF));
    let report = probe::probe(offsets.as_ref().ok());
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
    let out = Report {
        tier: report.tier,
        why: report.why(),
        gaps: report.tier.gaps().iter().map(|s| s.to_string()).collect(),
        checks,
    };
    let offsets_ok = out
        .checks
        .iter()
        .filter(|c| c.name.starts_with("offset "))
        .all(|c| c.ok);
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("tier: {}", out.tier);
        println!("why:  {}", out.why);
        for g in &out.gaps {
            println!("cannot: {g}");
        }
        for c in &out.checks {
            println!(
                "[{}] {}: {}",
                if c.ok { " ok " } else { "FAIL" },
                c.name,
                c.detail
            );
        }
    }
    if out.tier == probe::Tier::Userspace {
        eprintln!("guardrail selftest: no kernel enforcement is possible here");
        return Ok(ExitCode::from(2));
    }
    Ok(if offsets_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
