//! What the two VM harnesses share: `cargo xtask vm` (a busybox initramfs for the LSM-tier cases,
//! [`crate::vm`]) and `cargo xtask sysvm` (a booted Debian 12 with systemd, [`crate::sysvm`]).
//!
//! The common part of their qemu command line, the qemu child that never outlives the run, the
//! cache directory base, console-log pruning, temporary directories and small process helpers.
use std::{
    ffi::OsStr,
    fs, io,
    net::TcpListener,
    ops::{Deref, DerefMut},
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};

/// The emulator both harnesses run.
pub const QEMU: &str = "qemu-system-x86_64";

/// One boot of a kernel (and its initrd) under qemu.
pub struct Boot<'a> {
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    /// The kernel command line.
    pub append: &'a str,
    pub memory_mb: u32,
    /// Guest CPUs (at least one); multi-threaded TCG uses one host thread per guest CPU.
    pub cpus: u32,
}

impl Boot<'_> {
    /// `qemu-system-x86_64` with what every boot of either harness has: TCG, the CPU model,
    /// memory, CPUs, kernel, initrd and command line, and `-no-reboot`. The caller adds how the
    /// console is reached (and disks, network) and the child's stdio.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(QEMU);
        // KVM hangs on these machines (after "Probing EDD"): TCG only. -no-reboot: a guest reset
        // ends qemu, so a reboot is never silent (the harness decides what it means).
        cmd.args(["-accel", "tcg", "-cpu", "max", "-no-reboot"])
            .arg("-m")
            .arg(self.memory_mb.to_string())
            .arg("-smp")
            .arg(self.cpus.max(1).to_string())
            .arg("-kernel")
            .arg(self.kernel)
            .arg("-initrd")
            .arg(self.initrd)
            .arg("-append")
            .arg(self.append);
        cmd
    }
}

/// Kills a child we started (qemu, or a helper such as gzip) by its own PID, nothing else, if
/// the harness leaves early, e.g. on an error or a panic, so no VM outlives the run. A child that
/// has already exited is only reaped.
pub struct ChildGuard(Child);

impl ChildGuard {
    pub fn new(child: Child) -> Self {
        Self(child)
    }
}

impl Deref for ChildGuard {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A free loopback port for a host forwarding (the kernel picks it; qemu binds it right after).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(l.local_addr()?.port())
}

/// `name` under `$XDG_CACHE_HOME` (if absolute), else under `~/.cache`: where kernels, images
/// and console logs are kept, outside the repo.
pub fn cache_dir(name: &str) -> Result<PathBuf> {
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME").filter(|v| Path::new(v).is_absolute()) {
        return Ok(PathBuf::from(xdg).join(name));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .context("neither XDG_CACHE_HOME nor HOME is set: pass --cache-dir")?;
    Ok(PathBuf::from(home).join(".cache").join(name))
}

/// Removes the oldest `*.log` files of `dir` beyond the newest `keep`, so the cache does not grow
/// without bound. Console log names start with the unix time, so name order is age order.
pub fn prune_logs(dir: &Path, keep: usize) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut logs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension() == Some(OsStr::new("log")))
        .collect();
    logs.sort();
    let excess = logs.len().saturating_sub(keep);
    for old in &logs[..excess] {
        let _ = fs::remove_file(old);
    }
}

/// The last `n` lines of a console log written by qemu, without control characters (the guest's
/// terminal escapes); none if it cannot be read.
pub fn tail_file(path: &Path, n: usize) -> Vec<String> {
    let text = fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<String> = text
        .lines()
        .map(|l| l.chars().filter(|c| !c.is_control()).collect())
        .collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// Runs a command to completion and returns its stdout; on failure the error names the command
/// and carries its output.
pub fn run_quiet(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(stdout)
}

pub fn remove_dir_if_exists(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// A fresh directory of this run, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// `<prefix>-<pid>-<nanos>` under the system temp dir.
    pub fn new(prefix: &str) -> Result<Self> {
        Self::create(&std::env::temp_dir(), &format!("{prefix}-"))
    }

    /// `.<prefix>-<pid>-<nanos>` under `parent` (created if missing): for what is too big for
    /// the temp dir, e.g. a qcow2 overlay that grows by what the VM writes, kept next to its
    /// image in the cache.
    pub fn new_in(parent: &Path, prefix: &str) -> Result<Self> {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        Self::create(parent, &format!(".{prefix}-"))
    }

    fn create(parent: &Path, prefix: &str) -> Result<Self> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = parent.join(format!("{prefix}{}-{nanos}", std::process::id()));
        // create_dir (not _all) fails if it exists, so we never reuse someone else's directory.
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;

    #[test]
    fn prune_keeps_the_newest_logs_only() {
        let dir = TempDir::new("guardrail-xtask-test").unwrap();
        for name in ["vm-3.log", "vm-1.log", "vm-2.log", "vm-4.log", "notes.txt"] {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        prune_logs(dir.path(), 2);
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["notes.txt", "vm-3.log", "vm-4.log"]);
    }

    #[test]
    fn temp_dirs_are_fresh_and_removed() {
        let parent = TempDir::new("guardrail-xtask-test").unwrap();
        let a = TempDir::new_in(parent.path(), "run").unwrap();
        let b = TempDir::new_in(parent.path(), "run").unwrap();
        assert_ne!(a.path(), b.path());
        assert!(a.path().starts_with(parent.path()));
        let name = a.path().file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with(".run-"), "{name}");
        let kept = a.path().to_path_buf();
        drop(a);
        assert!(!kept.exists());
        assert!(b.path().is_dir());
    }

    #[test]
    fn tail_of_a_console_log() {
        let dir = TempDir::new("guardrail-xtask-test").unwrap();
        let log = dir.path().join("console.log");
        fs::write(&log, "one\n\u{7}two\r\nthree\n").unwrap();
        assert_eq!(tail_file(&log, 2), ["two", "three"]);
        assert_eq!(tail_file(&log, 9), ["one", "two", "three"]);
        assert!(tail_file(&dir.path().join("missing"), 3).is_empty());
    }
}
