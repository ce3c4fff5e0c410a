//! Test harness: start the real `guardrail agent` with a test policy, make scratch trees, run
//! deletion jobs in their own process groups, and count what is left on disk.
//!
//! Kernel tests need root and a kernel that loads BPF; they take a global lock so that only one
//! agent runs at a time (two agents would both judge every deletion).
use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

pub mod catalogue;
pub mod collectors;
mod harness;

pub use harness::*;

static KERNEL_LOCK: Mutex<()> = Mutex::new(());

/// Held while a test attaches BPF programs: the in-process mutex, and an `flock` on a file in
/// /run shared by every test process on the machine, so that test binaries run at the same time
/// (several checkouts, or `cargo test` beside `cargo xtask test`) never have two agents judging
/// the same deletions.
pub struct KernelLock {
    _flock: Option<std::fs::File>,
    _guard: MutexGuard<'static, ()>,
}

/// Serialises tests that attach BPF programs, within this process and across processes.
pub fn kernel_lock() -> KernelLock {
    use std::os::fd::AsRawFd;
    let guard = KERNEL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let flock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/guardrail-tests.lock")
        .ok();
    if let Some(f) = &flock {
        // SAFETY: flock on an fd we own; blocks until no other test process holds the lock.
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    }
    KernelLock {
        _flock: flock,
        _guard: guard,
    }
}

/// The guardrail binary under test: $GUARDRAIL_BIN (set by `cargo xtask test`), else the
/// workspace's release or debug build.
pub fn guardrail_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("GUARDRAIL_BIN") {
        return PathBuf::from(p);
    }
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    for profile in ["release", "debug"] {
        let p = target.join(profile).join("guardrail");
        if p.exists() {
            return p;
        }
    }
    panic!("no guardrail binary: run `cargo xtask test` (or build it and set GUARDRAIL_BIN)");
}

/// The scenario helper binary, next to the agent.
pub fn testkit_bin() -> PathBuf {
    let p = guardrail_bin().with_file_name("guardrail-testkit");
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build --release --bins`",
        p.display()
    );
    p
}

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "kernel tests need root (BPF programs); run them through `cargo xtask test` as root"
        );
    }
}

/// A running agent with its own policy, socket and event log in a temporary directory.
pub struct Agent {
    child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub event_log: PathBuf,
    pub policy: PathBuf,
    pub output: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    pub fn start(policy_text: &str) -> Result<Agent> {
        Self::start_with(policy_text, &[])
    }

    pub fn start_with(policy_text: &str, extra: &[&str]) -> Result<Agent> {
        let dir = tempfile::Builder::new()
            .prefix("guardrail-agent-")
            .tempdir()?;
        let policy = dir.path().join("policy.toml");
        std::fs::write(&policy, policy_text)?;
        let socket = dir.path().join("guardrail.sock");
        let event_log = dir.path().join("events.jsonl");
        // Each test agent pins into a bpffs directory of its own, unless the test chooses one
        // (to restart an agent on the same pins).
        let own_pins = unique_pin_dir();
        let pin_args: Vec<&std::ffi::OsStr> = if extra.contains(&"--pin-dir") {
            Vec::new()
        } else {
            vec!["--pin-dir".as_ref(), own_pins.as_os_str()]
        };
        // Its own state directory (the last good policy) too, never the host's.
        let own_state = dir.path().join("state");
        let state_args: Vec<&std::ffi::OsStr> = if extra.contains(&"--state-dir") {
            Vec::new()
        } else {
            vec!["--state-dir".as_ref(), own_state.as_os_str()]
        };
        let mut child = Command::new(guardrail_bin())
            .arg("agent")
            .arg("--policy")
            .arg(&policy)
            .arg("--socket")
            .arg(&socket)
            .arg("--event-log")
            .arg(&event_log)
            .args(extra)
            .args(&pin_args)
            .args(&state_args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting guardrail agent")?;
        let output = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let out = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(|l| l.ok()) {
                    eprintln!("[agent] {line}");
                    out.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            });
        }
        let mut agent = Agent {
            child,
            dir,
            socket,
            event_log,
            policy,
            output,
        };
        let start = Instant::now();
        while !agent.saw("guardrail: ready") {
            if let Some(status) = agent.child.try_wait()? {
                bail!(
                    "the agent exited before it was ready ({status}):\n{}",
                    agent.log()
                );
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("the agent was not ready within 60s:\n{}", agent.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(agent)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: an agent crash. Whatever it pinned stays behind.
    pub fn crash(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        self.output
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }

    pub fn saw(&self, needle: &str) -> bool {
        self.output
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|l| l.contains(needle))
    }

    /// Runs the CLI against this agent.
    /// Runs the CLI like [`Agent::cli`] and asserts it succeeded (naming the subcommand and
    /// its stderr otherwise).
    pub fn cli_ok(&self, args: &[&str]) -> Output {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "{}: {}",
            args.first().copied().unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(guardrail_bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("running the guardrail CLI")
    }

    /// `guardrail deny ID` (asserted to succeed), then the denied job must end within 30 s.
    pub fn deny_and_wait(&self, id: u64, job: &mut Job) {
        self.cli_ok(&["deny", &id.to_string()]);
        assert!(
            job.wait(Duration::from_secs(30)).is_some(),
            "denied job ends"
        );
    }

    pub fn holds(&self) -> Vec<serde_json::Value> {
        let out = self.cli(&["holds", "--json"]);
        serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap_or_default()
    }

    /// Waits for exactly one open hold and returns its id.
    pub fn wait_hold(&self, timeout: Duration) -> Result<u64> {
        let start = Instant::now();
        loop {
            let holds = self.holds();
            if let Some(h) = holds.first() {
                return h["id"].as_u64().context("hold without id");
            }
            if start.elapsed() > timeout {
                bail!("no hold within {timeout:?}; agent log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Events recorded in the JSON event log.
    pub fn events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.event_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// SIGTERM, then wait: returns the exit status.
    pub fn stop(mut self) -> Result<ExitStatus> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = self.child.kill();
                bail!("the agent did not exit within 20s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = self.child.wait();
        }
    }
}

/// A bpffs path no other agent uses.
pub fn unique_pin_dir() -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    PathBuf::from(format!(
        "/sys/fs/bpf/guardrail-test-{}-{n}",
        std::process::id()
    ))
}

/// A scratch directory for one scenario.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("guardrail-scratch-")
        .tempdir_in("/var/tmp")
        .expect("scratch dir")
}

/// Creates `n` small files named f00000.. in `dir`.
pub fn fill(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).expect("mkdir");
    for i in 0..n {
        std::fs::write(dir.join(format!("f{i:05}")), b"x").expect("write file");
    }
}

/// Regular files below `dir` (recursively).
pub fn count_files(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(|e| e.ok())
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => count_files(&e.path()),
            Ok(_) => 1,
            Err(_) => 0,
        })
        .sum()
}

/// A cgroup v2 group of its own for a test's jobs. Host test policies put their small budgets on
/// a rule matched by this cgroup and leave the default rule unlimited, so an agent under test never
/// holds anything else running on the machine (builds, other tests).
pub struct TestCgroup {
    pub path: PathBuf,
    /// The cgroup path as the policy writes it ("/guardrail-test-...").
    pub name: String,
}

impl TestCgroup {
    pub fn new() -> TestCgroup {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let root = cgroup2_root();
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("/guardrail-test-{}-{n}", std::process::id());
        let path = root.join(name.trim_start_matches('/'));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        TestCgroup { path, name }
    }
}

impl TestCgroup {
    /// A cgroup at `rel` below the cgroup2 root (e.g. "system.slice/x.service"), created now.
    pub fn at(rel: &str) -> TestCgroup {
        let path = cgroup2_root().join(rel);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        TestCgroup {
            path,
            name: format!("/{rel}"),
        }
    }
}

impl Default for TestCgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Empty once our jobs are gone; retry briefly while the kernel reaps them.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Where cgroup v2 is mounted (/sys/fs/cgroup/unified on hybrid hosts).
pub fn cgroup2_root() -> PathBuf {
    std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                let (left, right) = line.split_once(" - ")?;
                if right.split_whitespace().next()? == "cgroup2" {
                    Some(PathBuf::from(left.split_whitespace().nth(4)?))
                } else {
                    None
                }
            })
        })
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))
}

/// A deletion job: a shell command in its own process group (what a shell calls a job).
pub struct Job {
    pub child: Child,
}

impl Job {
    /// Starts `script` as its own job, inside `cgroup` when given.
    pub fn spawn_in(script: &str, cwd: &Path, cgroup: Option<&TestCgroup>) -> Job {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(script)
            .current_dir(cwd)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(cg) = cgroup {
            guardrail_agent::cgroup::join_at_exec(&mut cmd, &cg.path).expect("cgroup path");
        }
        Job {
            child: cmd.spawn().expect("spawn job"),
        }
    }

    pub fn spawn(script: &str, cwd: &Path) -> Job {
        Self::spawn_in(script, cwd, None)
    }

    pub fn pgid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the job to end, up to `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Whether every live process of the job is stopped (state T in /proc; zombies waiting for
    /// a stopped parent count as stopped).
    pub fn stopped(&self) -> bool {
        let pids = pids_in_group(self.pgid());
        !pids.is_empty()
            && pids
                .iter()
                .all(|p| proc_state(*p).is_none_or(|state| matches!(state, 'T' | 't' | 'Z' | 'X')))
    }

    pub fn stderr(&mut self) -> String {
        use std::io::Read;
        let mut s = String::new();
        if let Some(e) = self.child.stderr.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        // Only our own job, by its process group id.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.pgid() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
    }
}

pub fn pids_in_group(pgid: u32) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = s[s.rfind(')')? + 2..].to_string();
                    rest.split_whitespace().nth(2)?.parse::<u32>().ok()
                })
                == Some(pgid)
        })
        .collect()
}

/// Polls `cond` until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    cond()
}

/// Waits until the number of files in `dir` stops changing for `quiet`.
pub fn settle(dir: &Path, quiet: Duration) -> usize {
    let mut last = count_files(dir);
    let mut since = Instant::now();
    let start = Instant::now();
    while since.elapsed() < quiet && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(50));
        let now = count_files(dir);
        if now != last {
            last = now;
            since = Instant::now();
        }
    }
    last
}

fn toml_list(ps: &[&Path]) -> String {
    ps.iter()
        .map(|p| format!("{:?}", p.display().to_string()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A host test policy: jobs in `cgroup` get `budget` deletions outside `targets` per window and
/// are held past it; every other job on the machine is left alone (the default rule's budget is
/// the maximum), so a test agent never stops anything but the test's own jobs.
pub fn policy(budget: u64, targets: &[&Path], protected: &[&Path], cgroup: &TestCgroup) -> String {
    policy_with(budget, targets, protected, cgroup, "")
}

/// [`policy`] with extra TOML appended (data directories, more rules).
pub fn policy_with(
    budget: u64,
    targets: &[&Path],
    protected: &[&Path],
    cgroup: &TestCgroup,
    extra: &str,
) -> String {
    format!(
        r#"mode = "enforce"
[deletion]
budget = 100000000
window = "10m"
action = "hold"
hold_timeout = "10m"
on_deny = "kill"
targets = [{targets}]
protected_roots = ["/", {protected}]
protect_mount_points = false

[[deletion.rule]]
name = "test-job"
match = {{ cgroup = "{cg}" }}
targets = [{targets}]
budget = {budget}
{extra}
"#,
        targets = toml_list(targets),
        protected = toml_list(protected),
        cg = cgroup.name,
    )
}

/// `guardrail-testkit` run as user nobody (uid/gid 65534, no groups): the unprivileged attacker
/// of the security tests. Where nobody cannot reach the built binary (a target directory under
/// /root), a copy in a scratch directory of its own, removed with this value.
pub struct NobodyKit {
    path: PathBuf,
    _copy: Option<tempfile::TempDir>,
}

impl NobodyKit {
    pub fn new() -> NobodyKit {
        use std::os::unix::fs::PermissionsExt;
        let built = testkit_bin();
        let reachable = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&built)
            .arg("usage")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stderr).contains("usage:"));
        if reachable {
            return NobodyKit {
                path: built,
                _copy: None,
            };
        }
        let dir = scratch();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let path = dir.path().join("guardrail-testkit");
        std::fs::copy(&built, &path).expect("copying the testkit");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        NobodyKit {
            path,
            _copy: Some(dir),
        }
    }

    /// The testkit with `args`, as nobody.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&self.path)
            .args(args);
        c
    }
}

impl Default for NobodyKit {
    fn default() -> Self {
        Self::new()
    }
}

/// `setpriv` arguments that run a command as `uid` (group `uid`, no supplementary groups): an
/// unprivileged user for attack scenarios (65534 is `nobody`).
pub fn as_uid(uid: u32) -> String {
    format!("setpriv --reuid={uid} --regid={uid} --clear-groups")
}

/// Runs `argv` as `uid` (see [`as_uid`]) and returns its output.
pub fn run_as(uid: u32, argv: &[&str]) -> Output {
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups")
        .args(argv)
        .output()
        .expect("running setpriv")
}

/// Prefix of a shell command line that runs the rest of it as user nobody (uid and gid 65534, no
/// supplementary groups): the unprivileged attacker of the security tests.
pub const AS_NOBODY: &str = "setpriv --reuid=65534 --regid=65534 --clear-groups";

/// Gives `path` and everything below it to nobody, so a job run as nobody may delete in it.
pub fn chown_nobody(path: &Path) {
    let status = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(path)
        .status()
        .expect("running chown");
    assert!(status.success(), "chown -R nobody {}", path.display());
}
