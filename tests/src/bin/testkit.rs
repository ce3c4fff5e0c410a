//! Scenario helpers for the test suite, usable on the host and inside the VM:
//!   guardrail-testkit uring-unlink DIR        unlink every file of DIR through io_uring
//!   guardrail-testkit fork-unlink N DIR       N forked workers unlink DIR's files between them
//!   guardrail-testkit rename-over SRC DST     rename every file of SRC over its namesake in DST
//!   guardrail-testkit fill N DIR              create N small files f00000.. in DIR (fast, for the VM)
//!   guardrail-testkit count DIR               print the number of regular files below DIR
//!   guardrail-testkit rm-rf PATH              remove PATH recursively; prints what was refused
//!   guardrail-testkit mirror-stop CMD...      run CMD in a process group of its own and stop
//!                                             when it stops, like sudo with use_pty
//!   guardrail-testkit with-pid PID CMD...     run CMD as a child with exactly this pid
//!                                             (clone3 set_tid: root, Linux >= 5.5), to
//!                                             reproduce pid reuse on demand
//!   sshd-session SCRIPT                       (run through a copy of this binary named
//!                                             `sshd-session`) a stand-in for OpenSSH's
//!                                             per-connection process: take a new audit session
//!                                             (write /proc/self/loginuid, as pam_loginuid does),
//!                                             run `sh SCRIPT` as a child, exit with its status
//! Each prints how many operations succeeded and failed, and exits 0.
use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

fn files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    Ok(v)
}

fn uring_unlink(dir: &Path) -> Result<()> {
    use io_uring::{IoUring, opcode, types};
    let mut ring = IoUring::new(64).context("io_uring_setup")?;
    let names: Vec<CString> = files(dir)?
        .iter()
        .map(|p| CString::new(p.as_os_str().as_bytes()).context("NUL in path"))
        .collect::<Result<_>>()?;
    let (mut ok, mut failed) = (0u64, 0u64);
    for chunk in names.chunks(32) {
        for (i, name) in chunk.iter().enumerate() {
            let sqe = opcode::UnlinkAt::new(types::Fd(libc::AT_FDCWD), name.as_ptr())
                .build()
                .user_data(i as u64);
            // SAFETY: `name` outlives the submission: we wait for every completion below.
            unsafe { ring.submission().push(&sqe) }
                .map_err(|_| anyhow::anyhow!("submission queue full"))?;
        }
        ring.submit_and_wait(chunk.len())
            .context("io_uring_enter")?;
        for cqe in ring.completion() {
            if cqe.result() >= 0 {
                ok += 1;
            } else {
                failed += 1;
            }
        }
    }
    println!("uring-unlink: {ok} unlinked, {failed} failed");
    Ok(())
}

fn fork_unlink(workers: usize, dir: &Path) -> Result<()> {
    let all = files(dir)?;
    let mut children = Vec::new();
    for w in 0..workers {
        // SAFETY: the child only unlinks and exits; no locks are held across fork here.
        match unsafe { libc::fork() } {
            -1 => bail!("fork failed"),
            0 => {
                let mut failed = 0;
                for p in all.iter().skip(w).step_by(workers) {
                    if std::fs::remove_file(p).is_err() {
                        failed += 1;
                    }
                }
                // SAFETY: ending the forked child without running the parent's destructors.
                unsafe { libc::_exit(if failed > 0 { 1 } else { 0 }) };
            }
            pid => children.push(pid),
        }
    }
    let mut failed_workers = 0;
    for pid in children {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
            failed_workers += 1;
        }
    }
    println!("fork-unlink: {workers} workers, {failed_workers} saw failures");
    Ok(())
}

fn rename_over(src: &Path, dst: &Path) -> Result<()> {
    let (mut ok, mut failed) = (0u64, 0u64);
    for p in files(src)? {
        let Some(name) = p.file_name() else { continue };
        match std::fs::rename(&p, dst.join(name)) {
            Ok(()) => ok += 1,
            Err(_) => failed += 1,
        }
    }
    println!("rename-over: {ok} renamed, {failed} failed");
    Ok(())
}

fn fill(n: usize, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    for i in 0..n {
        let p = dir.join(format!("f{i:05}"));
        std::fs::write(&p, b"x").with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn count(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(|e| e.ok())
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => count(&e.path()),
            Ok(_) => 1,
            Err(_) => 0,
        })
        .sum()
}

/// What sudo does with `use_pty`: the command runs in its own process group; when it stops, the
/// wrapper stops itself (so the shell sees the job as stopped), and when the wrapper is continued
/// it continues the command.
fn mirror_stop(cmd: &[&str]) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let (prog, args) = cmd.split_first().context("mirror-stop needs a command")?;
    let child = std::process::Command::new(prog)
        .args(args)
        .process_group(0)
        .spawn()?;
    let pid = child.id() as i32;
    loop {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WUNTRACED) };
        if r < 0 {
            bail!("waitpid failed");
        }
        if libc::WIFSTOPPED(status) {
            // SAFETY: signalling ourselves, then our own child's group.
            unsafe {
                libc::raise(libc::SIGSTOP);
                libc::kill(-pid, libc::SIGCONT);
            }
            continue;
        }
        std::process::exit(if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            1
        });
    }
}

/// `struct clone_args` up to `set_tid_size` (CLONE_ARGS_SIZE_VER1).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
}

/// Forks a child with pid `pid` (fails if it is taken) that execs `cmd`; exits with its status.
fn with_pid(pid: i32, cmd: &[&str]) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let (prog, args) = cmd.split_first().context("with-pid needs a command")?;
    let tids = [pid];
    let ca = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: tids.as_ptr() as u64,
        set_tid_size: 1,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 without CLONE_VM or a stack is a fork; this process is single-threaded, and
    // the child only builds a Command and execs.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &ca as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match r {
        -1 => bail!("clone3 with pid {pid}: {}", std::io::Error::last_os_error()),
        0 => {
            let e = std::process::Command::new(prog).args(args).exec();
            eprintln!("with-pid: exec {prog}: {e}");
            // SAFETY: ending the forked child without running the parent's destructors.
            unsafe { libc::_exit(127) };
        }
        child => {
            let mut status = 0;
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(child as i32, &mut status, 0) };
            std::process::exit(if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            });
        }
    }
}

/// A stand-in for sshd's per-connection process. The agent's classifier goes by the executable's
/// file name (`/proc/PID/exe`), never by the command name a script or prctl could set, so the VM
/// cases run a copy of this binary named `sshd-session`.
fn sshd_session(script: &str) -> Result<()> {
    std::fs::write("/proc/self/loginuid", "0").map_err(|e| {
        eprintln!("sshd-session: writing /proc/self/loginuid: {e}");
        std::process::exit(90)
    })?;
    let st = std::process::Command::new("sh")
        .arg(script)
        .status()
        .context("running sh")?;
    std::process::exit(st.code().unwrap_or(1));
}

fn main() -> Result<()> {
    let argv0 = std::env::args().next().unwrap_or_default();
    if argv0.rsplit('/').next() == Some("sshd-session") {
        let script = std::env::args().nth(1).context("sshd-session SCRIPT")?;
        return sshd_session(&script);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["uring-unlink", dir] => uring_unlink(Path::new(dir)),
        ["fork-unlink", n, dir] => fork_unlink(n.parse().context("worker count")?, Path::new(dir)),
        ["rename-over", src, dst] => rename_over(Path::new(src), Path::new(dst)),
        ["fill", n, dir] => fill(n.parse().context("file count")?, Path::new(dir)),
        ["mirror-stop", cmd @ ..] => mirror_stop(cmd),
        ["with-pid", pid, cmd @ ..] => with_pid(pid.parse().context("pid")?, cmd),
        ["rm-rf", path] => match std::fs::remove_dir_all(path) {
            Ok(()) => {
                println!("rm-rf: removed {path}");
                Ok(())
            }
            Err(e) => {
                println!("rm-rf: {path}: {e}");
                Ok(())
            }
        },
        ["count", dir] => {
            println!("{}", count(Path::new(dir)));
            Ok(())
        }
        _ => bail!(
            "usage: guardrail-testkit uring-unlink DIR | fork-unlink N DIR | rename-over SRC DST | fill N DIR | count DIR | rm-rf PATH | mirror-stop CMD... | with-pid PID CMD..."
        ),
    }
}
