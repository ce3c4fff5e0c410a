//! `guardrail selftest`'s measurement of this tier: how many files a real `rm -rf` deletes past
//! the budget before the stop lands.
use std::{
    os::unix::process::CommandExt,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use guardrail_common::{EV_BUDGET_CROSSED, EVF_SIGNALLED, RuleParams};
use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};

use super::procs::group_stopped;
use super::{Fallback, Watch};
use crate::tiers::sensor::KernelPolicy;

/// What `guardrail selftest` reports for this tier: creates `files` files in a scratch
/// directory under `scratch_parent`, runs `rm -rf` on them as its own process group under a test
/// budget (judged alone: nothing else on the host is counted), and returns how many files went
/// past the budget before the stop landed.
pub fn measure_blast_radius(
    scratch_parent: &Path,
    budget: u64,
    files: usize,
    force_inotify: bool,
) -> Result<u64> {
    // A fresh 0700 directory with a random name: root fills and deletes it, so it must not be a
    // name a user could have planted (see scratch.rs).
    let dir = crate::host::scratch::ScratchDir::in_parent(scratch_parent, "blast")?;
    let scratch = dir.path().to_path_buf();
    let victim = dir.mkdir("victim")?;
    let result = (|| {
        for i in 0..files {
            dir.write(&format!("victim/f{i:05}"), b"x")
                .context("filling")?;
        }
        let policy = KernelPolicy {
            rules: vec![RuleParams {
                budget,
                window_ns: 60_000_000_000,
                action: guardrail_common::ACTION_HOLD,
                flags: 0,
            }],
            ..KernelPolicy::default()
        };
        let watch = if force_inotify {
            Watch::Inotify
        } else {
            Watch::Fanotify
        };
        let mut fb = Fallback::new(&policy, std::slice::from_ref(&scratch), watch)?;
        let mut child = Command::new("rm")
            .arg("-rf")
            .arg(&victim)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting rm")?;
        let pgid = child.id();
        fb.only_pgid = Some(pgid);
        let start = Instant::now();
        let mut crossed = false;
        while start.elapsed() < Duration::from_secs(30) {
            let mut pfd = [nix::poll::PollFd::new(
                fb.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let _ = nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(50u16));
            if fb
                .process()
                .iter()
                .any(|e| e.kind == EV_BUDGET_CROSSED && e.flags & EVF_SIGNALLED != 0)
            {
                crossed = true;
                break;
            }
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
        }
        // Let the stop land, then count what is left.
        let stopped = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            group_stopped(pgid) || matches!(child.try_wait(), Ok(Some(_)))
        });
        let left = std::fs::read_dir(&victim).map(|rd| rd.count()).unwrap_or(0);
        let _ = killpg(Pid::from_raw(pgid as i32), Signal::SIGKILL);
        let _ = child.wait();
        if !crossed || !stopped {
            bail!(
                "the runaway deletion was not stopped ({} of {files} files deleted)",
                files - left
            );
        }
        Ok(((files - left) as u64).saturating_sub(budget))
    })();
    drop(dir);
    result
}
