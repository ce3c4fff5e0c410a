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
//!   guardrail-testkit sock MODE SOCKET ARG    a hostile or raw client of the admin socket
//!                                             (see `sock_client`, `sock_reuse`)
//!   guardrail-testkit plant-links TARGET FROM COUNT TEMPLATE...
//!                                             symlinks to TARGET at each TEMPLATE with {n}
//!                                             from FROM on (an attacker pre-planting names)
//!   guardrail-testkit dribble ADDR SECS       a slowloris HTTP client; prints when the server
//!                                             hung up
//!   guardrail-testkit elf32-unlink OUT        write a static 32-bit x86 program to OUT that
//!                                             unlinks each argument with `int 0x80`
//!   guardrail-testkit as-nobody CMD...        run CMD as user nobody (uid and gid 65534, no
//!                                             groups): setpriv's --reuid, which busybox lacks
//!   guardrail-testkit catalogue [FILTER]      run the bypass catalogue's deletion rows against
//!                                             an agent of its own in the tier it gets (the VM:
//!                                             lsm, fmodret); exits 1 when a row fails
//!   guardrail-testkit fd-unlink DIR WARM THEN unlink WARM files of DIR through one directory fd,
//!                                             then THEN (`rename=DEST`: move DIR to DEST;
//!                                             `wait=FILE`: wait until FILE exists), then unlink
//!                                             the rest through the same fd, in one thread
//!                                             (the tracepoint tier's scope cache, see
//!                                             host_verdict_cache.rs)
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

/// `exec-loop N`: forks and execs `/bin/true` N times, one after the other, and prints
/// `exec-loop: N in T ns`. What every exec costs with the tier's exec programs attached (the
/// shutdown guard's exec hooks, the fmod_ret tier's `security_bprm_check` and `security_file_open`
/// trampolines).
fn exec_loop(n: usize) -> Result<()> {
    let prog = std::ffi::CString::new("/bin/true")?;
    let argv = [prog.as_ptr(), std::ptr::null()];
    let start = std::time::Instant::now();
    for _ in 0..n {
        // SAFETY: fork in a single-threaded process; the child only execs or exits.
        match unsafe { libc::fork() } {
            -1 => bail!("fork failed"),
            // SAFETY: async-signal-safe calls on data built before the fork.
            0 => unsafe {
                libc::execv(prog.as_ptr(), argv.as_ptr());
                libc::_exit(127);
            },
            child => {
                let mut status = 0;
                // SAFETY: waiting for our own child.
                unsafe { libc::waitpid(child, &mut status, 0) };
            }
        }
    }
    println!("exec-loop: {n} in {} ns", start.elapsed().as_nanos());
    Ok(())
}

/// `chown-loop N FILE`: N `fchownat` calls giving FILE (owned by uid 65534) to uid 65534 again,
/// as root: each is a capability check (CAP_CHOWN), so each runs the fmod_ret tier's
/// `security_capable` trampoline. Prints `chown-loop: N in T ns`.
fn chown_loop(n: usize, file: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(file.as_os_str().as_bytes())?;
    let start = std::time::Instant::now();
    for _ in 0..n {
        // SAFETY: a NUL-terminated path we own.
        if unsafe { libc::fchownat(libc::AT_FDCWD, path.as_ptr(), 65534, 65534, 0) } != 0 {
            bail!(
                "chown {}: {}",
                file.display(),
                std::io::Error::last_os_error()
            );
        }
    }
    println!("chown-loop: {n} in {} ns", start.elapsed().as_nanos());
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

/// `plant-links TARGET FROM COUNT TEMPLATE...`: what an attacker does ahead of a root command
/// with predictable scratch names: for COUNT numbers from FROM on (wrapping at pid_max), each
/// TEMPLATE with `{n}` replaced becomes a symlink to TARGET, its parent directories created.
/// Prints how many links it made.
fn plant_links(target: &Path, from: u32, count: u32, templates: &[&str]) -> Result<()> {
    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4_194_304);
    let mut made = 0;
    for i in 0..count {
        let n = (from - 1 + i) % pid_max + 1;
        for t in templates {
            let p = PathBuf::from(t.replace("{n}", &n.to_string()));
            if let Some(dir) = p.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            if std::os::unix::fs::symlink(target, &p).is_ok() {
                made += 1;
            }
        }
    }
    println!("{made}");
    Ok(())
}

/// `dribble ADDR SECS`: a slow HTTP client (slowloris): sends a request one byte every 200 ms
/// for SECS seconds, never finishing it. Prints `closed after <ms>` when the server hung up,
/// or `open after <ms>` when it still listened at the end.
fn dribble(addr: &str, secs: u64) -> Result<()> {
    use std::io::{Read, Write};
    let start = std::time::Instant::now();
    let mut s = std::net::TcpStream::connect(addr).context("connecting")?;
    s.set_read_timeout(Some(std::time::Duration::from_millis(200)))?;
    let req = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: "
        .iter()
        .chain(std::iter::repeat(&b'a'));
    for b in req {
        if start.elapsed().as_secs() >= secs {
            println!("open after {}", start.elapsed().as_millis());
            return Ok(());
        }
        if s.write_all(&[*b]).is_err() {
            break;
        }
        let mut buf = [0u8; 256];
        match s.read(&mut buf) {
            Ok(_) => break,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    println!("closed after {}", start.elapsed().as_millis());
    Ok(())
}

/// `n` short-lived jobs, one after the other: each a forked process in a session of its own (so a
/// job of its own) that deletes one file, `dir/f00000`, `dir/f00001`, ... (as `fill` names them).
/// What a flood of new jobs looks like to the kernel's job table.
fn setsid_unlink(n: usize, dir: &Path) -> Result<()> {
    // Relative names: the tracepoint tier judges a path by the directory it starts from.
    std::env::set_current_dir(dir).with_context(|| format!("cd {}", dir.display()))?;
    for i in 0..n {
        let path = std::ffi::CString::new(format!("f{i:05}"))?;
        // SAFETY: fork in a single-threaded process; the child only calls async-signal-safe
        // functions (setsid, unlink, _exit).
        match unsafe { libc::fork() } {
            -1 => bail!("fork failed"),
            // SAFETY: async-signal-safe calls on a NUL-terminated path built before the fork.
            0 => unsafe {
                libc::setsid();
                libc::unlink(path.as_ptr());
                libc::_exit(0);
            },
            child => {
                let mut status = 0;
                // SAFETY: waiting for our own child.
                unsafe { libc::waitpid(child, &mut status, 0) };
            }
        }
    }
    Ok(())
}

/// `ptrace-nostop CMD...`: runs CMD in a session of its own (a job of its own) as its ptracer and
/// swallows every stop signal CMD gets (SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU), passing the others
/// on: what a same-user debugger can do to a job that should be held. Exits with CMD's status
/// (128 + N when signal N ended it).
fn ptrace_nostop(cmd: &[&str]) -> Result<()> {
    let argv: Vec<std::ffi::CString> = cmd
        .iter()
        .map(|a| std::ffi::CString::new(*a))
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(!argv.is_empty(), "ptrace-nostop CMD...");
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let null = std::ptr::null_mut::<libc::c_void>();
    // SAFETY: fork in a single-threaded process; the child only calls async-signal-safe
    // functions (setsid, ptrace, execvp, _exit) on data built before the fork.
    let child = match unsafe { libc::fork() } {
        -1 => bail!("fork failed"),
        // SAFETY: as above.
        0 => unsafe {
            libc::setsid();
            libc::ptrace(libc::PTRACE_TRACEME, 0, null, null);
            libc::execvp(ptrs[0], ptrs.as_ptr());
            libc::_exit(127)
        },
        child => child,
    };
    loop {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        if unsafe { libc::waitpid(child, &mut status, 0) } < 0 {
            bail!("waitpid: {}", std::io::Error::last_os_error());
        }
        if libc::WIFEXITED(status) {
            std::process::exit(libc::WEXITSTATUS(status));
        }
        if libc::WIFSIGNALED(status) {
            std::process::exit(128 + libc::WTERMSIG(status));
        }
        if libc::WIFSTOPPED(status) {
            let pass = match libc::WSTOPSIG(status) {
                // The exec's trap, and every stop signal: swallowed.
                libc::SIGTRAP | libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU => 0,
                s => s,
            };
            // SAFETY: our own tracee, in a ptrace stop.
            unsafe {
                libc::ptrace(
                    libc::PTRACE_CONT,
                    child,
                    null,
                    pass as usize as *mut libc::c_void,
                )
            };
        }
    }
}

/// `sock reuse SOCKET HOST`: a confirmation from a reused pid. A child A connects to the socket
/// and hands the connection to its own child C, then exits; this process reaps A and starts B
/// with A's pid (clone3 set_tid) in a new audit session; C then claims B's session for A's
/// connection. An agent that reads /proc/<peer pid>/sessionid believes it.
fn sock_reuse(socket: &Path, host: &str) -> Result<()> {
    use std::{
        io::{BufRead, BufReader, Write},
        os::unix::net::UnixStream,
        time::{Duration, Instant},
    };
    let session_of = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/sessionid"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
    };
    // SAFETY: this process is single-threaded; the children only use the socket, /proc and exit.
    let a = unsafe { libc::fork() };
    if a == 0 {
        let me = std::process::id() as i32;
        let Ok(mut s) = UnixStream::connect(socket) else {
            // SAFETY: ending the forked child.
            unsafe { libc::_exit(1) };
        };
        // SAFETY: as above.
        if unsafe { libc::fork() } != 0 {
            // SAFETY: A leaves its connection to C.
            unsafe { libc::_exit(0) };
        }
        let mine = session_of(std::process::id() as i32);
        let start = Instant::now();
        let claimed = loop {
            if let Some(s) = session_of(me).filter(|s| Some(*s) != mine) {
                break s;
            }
            if start.elapsed() > Duration::from_secs(10) {
                println!("sock reuse: pid {me} was not reused");
                // SAFETY: ending the forked child.
                unsafe { libc::_exit(1) };
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let line =
            format!("{{\"request\":\"confirm\",\"host\":\"{host}\",\"session\":{claimed}}}\n");
        let _ = s.write_all(line.as_bytes());
        let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
        let mut answer = String::new();
        let _ = BufReader::new(&s).read_line(&mut answer);
        println!(
            "sock reuse: claimed session {claimed}; answer: {}",
            answer.trim_end()
        );
        // SAFETY: ending the forked child.
        unsafe { libc::_exit(0) };
    }
    if a < 0 {
        bail!("fork: {}", std::io::Error::last_os_error());
    }
    let mut status = 0;
    // SAFETY: reaping our own child A, which frees its pid.
    unsafe { libc::waitpid(a, &mut status, 0) };
    let tids = [a];
    let ca = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: tids.as_ptr() as u64,
        set_tid_size: 1,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 without CLONE_VM or a stack is a fork of this single-threaded process.
    let b = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &ca as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match b {
        -1 => bail!("clone3 with pid {a}: {}", std::io::Error::last_os_error()),
        0 => {
            // B: a new audit session (as a login would make), kept while C asks.
            let _ = std::fs::write("/proc/self/loginuid", "0");
            std::thread::sleep(Duration::from_secs(5));
            // SAFETY: ending the forked child.
            unsafe { libc::_exit(0) };
        }
        b => {
            // SAFETY: waiting for our own child B.
            unsafe { libc::waitpid(b as i32, &mut status, 0) };
        }
    }
    Ok(())
}

/// Clients of the admin socket, for the tests of its server (tests/tests/host_socket.rs):
///   dribble SOCKET SECS   one byte a second for SECS seconds, never a newline (reconnects
///                         when cut off)
///   stream SOCKET MIB     MIB MiB without a newline, as fast as the agent takes them
///   noread SOCKET SECS    sends a status request, then neither reads nor closes for SECS
///   send SOCKET LINE      sends LINE and a newline, prints the answer line
/// Each prints what it managed (bytes written, how it ended, the answer if any).
fn sock_client(mode: &str, socket: &Path, arg: &str) -> Result<()> {
    use std::{
        io::{BufRead, BufReader, Write},
        os::unix::net::UnixStream,
        time::Duration,
    };
    let mut s =
        UnixStream::connect(socket).with_context(|| format!("connecting {}", socket.display()))?;
    let answer = |s: &UnixStream| {
        let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
        let mut line = String::new();
        let _ = BufReader::new(s).read_line(&mut line);
        line.trim_end().to_string()
    };
    match mode {
        "dribble" => {
            // An attacker reconnects whenever the agent cuts it off.
            let secs: u64 = arg.parse().context("seconds")?;
            let end = std::time::Instant::now() + Duration::from_secs(secs);
            // Said at once, so a test knows the connection is made.
            println!("sock dribble: connected");
            let (mut sent, mut connections) = (0, 1);
            while std::time::Instant::now() < end {
                if s.write_all(b"{").is_err() {
                    s = UnixStream::connect(socket)?;
                    connections += 1;
                    continue;
                }
                sent += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
            println!("sock dribble: sent {sent} bytes over {connections} connections");
            return Ok(());
        }
        "stream" => {
            let mib: usize = arg.parse().context("MiB")?;
            let chunk = vec![b'x'; 64 * 1024];
            let mut sent = 0usize;
            let mut end = "done".to_string();
            while sent < mib * 1024 * 1024 {
                match s.write(&chunk) {
                    Ok(n) => sent += n,
                    Err(e) => {
                        end = e.to_string();
                        break;
                    }
                }
            }
            println!("sock stream: wrote {sent} bytes, then {end}");
        }
        "noread" => {
            let secs: u64 = arg.parse().context("seconds")?;
            s.write_all(b"{\"request\":\"status\"}\n")?;
            std::thread::sleep(Duration::from_secs(secs));
            println!("sock noread: done");
            return Ok(());
        }
        "send" => {
            // An agent that turns the connection away answers before reading: a failed write
            // still leaves its answer to read.
            if let Err(e) = s.write_all(format!("{arg}\n").as_bytes()) {
                println!("write: {e}");
            }
        }
        _ => bail!("sock MODE: dribble | stream | noread | send"),
    }
    println!("answer: {}", answer(&s));
    Ok(())
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

/// The code of `elf32-unlink`: i386, Linux `int 0x80` ABI, position independent, 27 bytes.
///   pop ecx; pop ebx; dec ecx          argc - 1 arguments after argv[0]
/// next:
///   jz done
///   pop ebx; mov eax, 10; int 0x80     unlink(argv[i]) (__NR_unlink on i386; ecx survives)
///   dec ecx; jmp next
/// done:
///   xor ebx, ebx; mov eax, 1; int 0x80 exit(0)
const UNLINK32_CODE: [u8; 27] = [
    0x59, 0x5b, 0x49, // pop ecx; pop ebx; dec ecx
    0x74, 0x0b, // jz done (+11)
    0x5b, // pop ebx
    0xb8, 0x0a, 0x00, 0x00, 0x00, // mov eax, 10
    0xcd, 0x80, // int 0x80
    0x49, // dec ecx
    0xeb, 0xf3, // jmp next (-13)
    0x31, 0xdb, // done: xor ebx, ebx
    0xb8, 0x01, 0x00, 0x00, 0x00, // mov eax, 1
    0xcd, 0x80, // int 0x80
    0x90, 0x90, // padding
];

/// A static ELF32 executable (one PT_LOAD segment at 0x08048000) running [`UNLINK32_CODE`]: the
/// 32-bit compat syscall path, with no 32-bit toolchain needed.
fn elf32_unlink_image() -> Vec<u8> {
    const BASE: u32 = 0x0804_8000;
    const EHDR: u32 = 52;
    const PHDR: u32 = 32;
    let total = EHDR + PHDR + UNLINK32_CODE.len() as u32;
    let mut v = Vec::with_capacity(total as usize);
    v.extend_from_slice(&[0x7f, b'E', b'L', b'F', 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    v.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    v.extend_from_slice(&3u16.to_le_bytes()); // EM_386
    v.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
    v.extend_from_slice(&(BASE + EHDR + PHDR).to_le_bytes()); // e_entry
    v.extend_from_slice(&EHDR.to_le_bytes()); // e_phoff
    v.extend_from_slice(&0u32.to_le_bytes()); // e_shoff
    v.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    v.extend_from_slice(&(EHDR as u16).to_le_bytes());
    v.extend_from_slice(&(PHDR as u16).to_le_bytes());
    v.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    v.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
    v.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    v.extend_from_slice(&0u32.to_le_bytes()); // p_offset
    v.extend_from_slice(&BASE.to_le_bytes()); // p_vaddr
    v.extend_from_slice(&BASE.to_le_bytes()); // p_paddr
    v.extend_from_slice(&total.to_le_bytes()); // p_filesz
    v.extend_from_slice(&total.to_le_bytes()); // p_memsz
    v.extend_from_slice(&5u32.to_le_bytes()); // PF_R | PF_X
    v.extend_from_slice(&0x1000u32.to_le_bytes()); // p_align
    v.extend_from_slice(&UNLINK32_CODE);
    v
}

fn elf32_unlink(out: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(out, elf32_unlink_image())
        .with_context(|| format!("writing {}", out.display()))?;
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o755))?;
    println!("elf32-unlink: wrote {}", out.display());
    Ok(())
}

fn as_nobody(cmd: &[&str]) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let (prog, args) = cmd.split_first().context("as-nobody CMD...")?;
    let nobody = nix::unistd::Gid::from_raw(65534);
    nix::unistd::setgroups(&[]).context("setgroups")?;
    nix::unistd::setresgid(nobody, nobody, nobody).context("setresgid")?;
    let uid = nix::unistd::Uid::from_raw(65534);
    nix::unistd::setresuid(uid, uid, uid).context("setresuid")?;
    let e = std::process::Command::new(prog).args(args).exec();
    bail!("exec {prog}: {e}")
}

/// `catalogue [FILTER]`: the catalogue's rows against an agent started here on the catalogue's
/// policy (GUARDRAIL_BIN names the agent), in whatever tier it attaches.
fn catalogue(filter: Option<&str>) -> Result<()> {
    use guardrail_integration::{Scene, catalogue as cat};
    let scene = Scene::new().open_to_others();
    let kit = std::env::current_exe().context("own path")?;
    let find = if Path::new("/bin/gnu-find").exists() {
        "/bin/gnu-find"
    } else {
        "find"
    };
    let fx = cat::run::Fixture::new(scene.path(), kit, find.to_string());
    let text = fx.policy(&scene.cg);
    let setup = scene.start(&text);
    let tier = setup.agent.tier().context("the agent named no tier")?;
    println!("catalogue: tier {tier}");
    let rows = cat::rows();
    let (ok, failed) = cat::run::run_all(&setup.agent, &fx, &setup.cg, &rows, tier, filter);
    for s in &ok {
        println!("catalogue ok: {s}");
    }
    for f in &failed {
        println!("catalogue FAILED: {f}");
    }
    println!(
        "catalogue: {} rows passed, {} failed in the {tier} tier",
        ok.len(),
        failed.len()
    );
    drop(setup);
    if !failed.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

/// `fd-unlink DIR WARM THEN`: see the module doc. Every unlink is `unlinkat(dirfd, name)` from
/// the same thread, the way `rm -rf` deletes, so every one after the first may be judged from
/// the cached verdict of DIR.
fn fd_unlink(dir: &Path, warm: usize, then: &str) -> Result<()> {
    use std::os::fd::AsRawFd;
    let d = std::fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    let names: Vec<CString> = files(dir)?
        .iter()
        .filter_map(|p| p.file_name().map(|n| CString::new(n.as_bytes())))
        .collect::<Result<_, _>>()?;
    let unlink = |name: &CString| {
        // SAFETY: a valid directory fd and a NUL-terminated name.
        unsafe { libc::unlinkat(d.as_raw_fd(), name.as_ptr(), 0) == 0 }
    };
    let (mut ok, mut failed) = (0u64, 0u64);
    for n in names.iter().take(warm) {
        if unlink(n) { ok += 1 } else { failed += 1 }
    }
    match then.split_once('=') {
        Some(("rename", dest)) => std::fs::rename(dir, dest)
            .with_context(|| format!("renaming {} to {dest}", dir.display()))?,
        Some(("wait", file)) => {
            let start = std::time::Instant::now();
            while !Path::new(file).exists() {
                if start.elapsed() > std::time::Duration::from_secs(120) {
                    bail!("{file} did not appear within 120 s");
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        _ => bail!("THEN: rename=DEST | wait=FILE"),
    }
    for n in names.iter().skip(warm) {
        if unlink(n) { ok += 1 } else { failed += 1 }
    }
    println!("fd-unlink: {ok} unlinked, {failed} failed");
    Ok(())
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
        ["timed-rm-rf", path] => {
            let start = std::time::Instant::now();
            std::fs::remove_dir_all(path).with_context(|| format!("removing {path}"))?;
            println!("timed-rm-rf: {path} in {} ns", start.elapsed().as_nanos());
            Ok(())
        }
        ["exec-loop", n] => exec_loop(n.parse().context("exec count")?),
        ["chown-loop", n, file] => chown_loop(n.parse().context("chown count")?, Path::new(file)),
        ["fd-unlink", dir, warm, then] => {
            fd_unlink(Path::new(dir), warm.parse().context("warm count")?, then)
        }
        ["fill", n, dir] => fill(n.parse().context("file count")?, Path::new(dir)),
        ["mirror-stop", cmd @ ..] => mirror_stop(cmd),
        ["with-pid", pid, cmd @ ..] => with_pid(pid.parse().context("pid")?, cmd),
        ["ptrace-nostop", cmd @ ..] => ptrace_nostop(cmd),
        ["sock", "reuse", socket, host] => sock_reuse(Path::new(socket), host),
        ["sock", mode, socket, arg] => sock_client(mode, Path::new(socket), arg),
        ["setsid-unlink", n, dir] => setsid_unlink(n.parse().context("job count")?, Path::new(dir)),
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
        ["plant-links", target, from, count, templates @ ..] => plant_links(
            Path::new(target),
            from.parse().context("from")?,
            count.parse().context("count")?,
            templates,
        ),
        ["dribble", addr, secs] => dribble(addr, secs.parse().context("seconds")?),
        ["elf32-unlink", out] => elf32_unlink(Path::new(out)),
        ["as-nobody", cmd @ ..] => as_nobody(cmd),
        ["catalogue"] => catalogue(None),
        ["catalogue", filter] => catalogue(Some(filter)),
        ["count", dir] => {
            println!("{}", count(Path::new(dir)));
            Ok(())
        }
        _ => bail!(
            "usage: guardrail-testkit uring-unlink DIR | exec-loop N | chown-loop N FILE | timed-rm-rf PATH | fork-unlink N DIR | rename-over SRC DST | fill N DIR | count DIR | rm-rf PATH | mirror-stop CMD... | with-pid PID CMD... | ptrace-nostop CMD... | plant-links TARGET FROM COUNT TEMPLATE... | dribble ADDR SECS | setsid-unlink N DIR | elf32-unlink OUT | catalogue [FILTER] | sock dribble|stream|noread|send SOCKET ARG"
        ),
    }
}
