//! Blast radius: how many files a runaway deletion gets past its budget, guardrail's kernel tier
//! against a userspace-reactive baseline (the way detection tools and a responder work: each
//! deletion reported to userspace after it happened, counted there, the deleting job killed once
//! past the budget). The baseline is as quick as such a design gets: inotify read in this process,
//! SIGKILL to the process group, no log pipeline or network in between.
use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{
    Sizes, deletion,
    sys::{self, Agent, Load},
};

/// Directories the files are spread over: one per deleter of the parallel case.
const DIRS: usize = 16;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// The agent in the tier the kernel allows.
    Guardrail,
    /// The agent forced to its last resort (`--tier userspace`: fanotify, after the fact).
    Userspace,
    Responder,
}

pub struct BlastCase {
    pub guard: Guard,
    pub deleters: usize,
    pub load: bool,
    /// Files deleted past the budget, one per run.
    pub past: Vec<i64>,
}

pub struct BlastResult {
    pub files: usize,
    pub budget: u64,
    pub tier: String,
    pub load_how: &'static str,
    pub cases: Vec<BlastCase>,
}

fn dir_of(tree: &Path, d: usize) -> PathBuf {
    tree.join(format!("d{d:02}"))
}

/// Creates whatever a previous run deleted: `files` empty files over [`DIRS`] directories (one
/// listing per directory, then only the missing names: a run deletes a few thousand at most).
fn refill(tree: &Path, files: usize) -> Result<()> {
    for d in 0..DIRS {
        let dir = dir_of(tree, d);
        std::fs::create_dir_all(&dir)?;
        let have: std::collections::HashSet<std::ffi::OsString> = std::fs::read_dir(&dir)?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        for f in 0..files / DIRS {
            let name = format!("f{f:05}");
            if !have.contains(std::ffi::OsStr::new(&name)) {
                std::fs::File::create_new(dir.join(name))
                    .context("refilling the blast-radius tree")?;
            }
        }
    }
    Ok(())
}

fn count(tree: &Path) -> usize {
    (0..DIRS)
        .map(|d| std::fs::read_dir(dir_of(tree, d)).map_or(0, |r| r.count()))
        .sum()
}

/// States of the processes of process group `pg` (from /proc/PID/stat).
fn group_states(pg: i32) -> Vec<char> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let rest = stat.rsplit_once(") ")?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            (f.get(2)?.parse::<i32>().ok()? == pg).then(|| f[0].chars().next().unwrap_or('?'))
        })
        .collect()
}

/// The deleters, in a process group of their own (one job): one `rm -rf` over every directory,
/// or one `rm -rf` per directory in parallel.
fn spawn_deleters(tree: &Path, rm: &Path, deleters: usize) -> Result<Child> {
    let mut c = if deleters == 1 {
        let mut c = Command::new(rm);
        c.arg("-rf");
        for d in 0..DIRS {
            c.arg(dir_of(tree, d));
        }
        c
    } else {
        let mut script = String::new();
        for d in 0..deleters {
            script.push_str(&format!("{} -rf d{:02} & ", rm.display(), d % DIRS));
        }
        script.push_str("wait");
        let mut c = Command::new("sh");
        c.args(["-c", &script]).current_dir(tree);
        c
    };
    c.process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the deleters")
}

/// The baseline: inotify on the tree's directories, read by a thread of this process, which
/// counts IN_DELETE events and SIGKILLs the process group in `pg` once past `budget`.
struct Responder {
    fd: i32,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Responder {
    fn start(tree: &Path, budget: u64, pg: Arc<AtomicI32>) -> Result<Responder> {
        // SAFETY: inotify_init1 takes flags only.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            bail!("inotify_init1: {}", std::io::Error::last_os_error());
        }
        for d in 0..DIRS {
            let p = std::ffi::CString::new(dir_of(tree, d).to_string_lossy().into_owned())?;
            // SAFETY: a valid inotify fd and a NUL-terminated path.
            if unsafe { libc::inotify_add_watch(fd, p.as_ptr(), libc::IN_DELETE) } < 0 {
                let e = std::io::Error::last_os_error();
                // SAFETY: closing the fd we opened.
                unsafe { libc::close(fd) };
                bail!("inotify_add_watch: {e}");
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = 0u64;
            let mut killed = false;
            let mut buf = vec![0u8; 256 * 1024];
            while !st.load(Ordering::Relaxed) {
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, 20) };
                // SAFETY: reading into a buffer of the given length.
                let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    continue;
                }
                let mut off = 0usize;
                let n = n as usize;
                while off + 16 <= n {
                    let mask = u32::from_ne_bytes([
                        buf[off + 4],
                        buf[off + 5],
                        buf[off + 6],
                        buf[off + 7],
                    ]);
                    let len = u32::from_ne_bytes([
                        buf[off + 12],
                        buf[off + 13],
                        buf[off + 14],
                        buf[off + 15],
                    ]) as usize;
                    if mask & libc::IN_DELETE != 0 {
                        seen += 1;
                    }
                    // A lost count (queue overflow) is taken as past the budget: the kindest
                    // reading for the baseline.
                    if mask & libc::IN_Q_OVERFLOW != 0 {
                        seen = u64::MAX;
                    }
                    off += 16 + len;
                }
                if seen > budget && !killed {
                    let g = pg.load(Ordering::SeqCst);
                    if g > 0 {
                        // SAFETY: kill(2) of the process group of the deleters the bench started.
                        unsafe { libc::kill(-g, libc::SIGKILL) };
                        killed = true;
                    }
                }
            }
        });
        Ok(Responder {
            fd,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // SAFETY: closing the inotify fd this responder opened, its reader joined.
        unsafe { libc::close(self.fd) };
    }
}

/// One runaway: refill, start the deleters (and the responder), wait until every process of the
/// job is stopped or gone and the file count stands still, count, kill the job.
fn one_run(
    tree: &Path,
    rm: &Path,
    files: usize,
    budget: u64,
    deleters: usize,
    guard: Guard,
) -> Result<i64> {
    refill(tree, files)?;
    let before = count(tree);
    if before != files {
        bail!("the blast-radius tree has {before} files, not {files}");
    }
    let pg = Arc::new(AtomicI32::new(0));
    let responder = match guard {
        Guard::Responder => Some(Responder::start(tree, budget, pg.clone())?),
        Guard::Guardrail | Guard::Userspace => None,
    };
    let mut child = spawn_deleters(tree, rm, deleters)?;
    let g = child.id() as i32;
    pg.store(g, Ordering::SeqCst);
    let t = Instant::now();
    let mut last = usize::MAX;
    let left = loop {
        let states = group_states(g);
        let settled = states.iter().all(|s| matches!(s, 'T' | 't' | 'Z' | 'X'));
        if settled {
            let n = count(tree);
            if n == last {
                break n;
            }
            last = n;
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        if t.elapsed() > Duration::from_secs(120) {
            // SAFETY: kill(2) of the process group the bench started.
            unsafe { libc::kill(-g, libc::SIGKILL) };
            let _ = child.wait();
            bail!("the deleters neither stopped nor ended in 120 s");
        }
        // Scanning /proc is not free: often enough to notice the end, not to steal the CPU
        // the deleters and the guard compete for (nothing is counted until it has settled).
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(responder);
    // SAFETY: kill(2) of the process group the bench started (stopped or ended by now).
    unsafe { libc::kill(-g, libc::SIGKILL) };
    let _ = child.wait();
    sys::wait_until(Duration::from_secs(10), || group_states(g).is_empty());
    Ok((before - left) as i64 - budget as i64)
}

pub fn run(bin: &Path, scratch: &Path, rm: &Path, s: &Sizes) -> Result<BlastResult> {
    let tree = scratch.join("blast");
    let elsewhere = scratch.join("blast-target");
    std::fs::create_dir_all(&elsewhere)?;
    let agent_dir = scratch.join("agent-blast");
    let pol = deletion::scoped_policy(
        &elsewhere,
        rm,
        s.blast_budget,
        "[alerts.syslog]\nenabled = false\n",
    );
    let mut r = BlastResult {
        files: s.blast_files,
        budget: s.blast_budget,
        tier: String::new(),
        load_how: "",
        cases: Vec::new(),
    };
    for load in [false, true] {
        let l = load.then(Load::start);
        if let Some(l) = &l {
            r.load_how = l.how;
        }
        for deleters in [1, DIRS] {
            for guard in [Guard::Guardrail, Guard::Userspace, Guard::Responder] {
                let agent = match guard {
                    Guard::Guardrail => Some(Agent::start(bin, &pol, &agent_dir)?),
                    Guard::Userspace => Some(Agent::start_with(
                        bin,
                        &pol,
                        &agent_dir,
                        &["--tier", "userspace"],
                    )?),
                    Guard::Responder => None,
                };
                if let Some(a) = &agent
                    && guard == Guard::Guardrail
                {
                    r.tier = a.tier();
                }
                let mut past = Vec::new();
                for _ in 0..s.blast_runs {
                    past.push(one_run(
                        &tree,
                        rm,
                        s.blast_files,
                        s.blast_budget,
                        deleters,
                        guard,
                    )?);
                }
                if let Some(a) = &agent
                    && guard == Guard::Guardrail
                    && a.incidents().is_empty()
                {
                    bail!("the agent logged no incident for {} runaways", s.blast_runs);
                }
                drop(agent);
                let _ = std::fs::remove_dir_all(&agent_dir);
                println!(
                    "bench: blast radius, {} deleter(s), {}, {}: past the budget {past:?}",
                    deleters,
                    if load { "CPU load" } else { "idle" },
                    match guard {
                        Guard::Guardrail => "guardrail",
                        Guard::Userspace => "guardrail --tier userspace",
                        Guard::Responder => "responder",
                    }
                );
                r.cases.push(BlastCase {
                    guard,
                    deleters,
                    load,
                    past,
                });
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tree);
    let _ = std::fs::remove_dir_all(&elsewhere);
    Ok(r)
}
