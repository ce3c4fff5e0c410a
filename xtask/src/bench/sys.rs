//! What the bench starts and changes on the host, each behind a guard whose Drop undoes it even
//! when a measurement fails half-way: the agent, mounts (tmpfs, an ext4 image on a loop device),
//! the `kernel.bpf_stats_enabled` sysctl, auditd and its one rule, a CPU load. Every process is
//! stopped by the PID the bench got when it started it.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use std::os::unix::process::CommandExt;

/// Runs a command, failing with its stderr.
pub fn sh(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// SIGTERM to a child the bench started, SIGKILL after 10 s, then reaped.
pub fn stop_child(child: &mut Child) {
    if child.try_wait().ok().flatten().is_some() {
        return;
    }
    // SAFETY: kill(2) on the PID of a child we started and have not reaped yet.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A filesystem mounted by the bench at `dir`: tmpfs, or ext4 on a loop device over an image
/// file beside it. Drop unmounts, detaches the loop device and removes the image.
pub struct Mount {
    pub dir: PathBuf,
    loop_dev: Option<String>,
    image: Option<PathBuf>,
}

impl Mount {
    pub fn tmpfs(dir: &Path) -> Result<Mount> {
        std::fs::create_dir_all(dir)?;
        sh(Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1g,mode=0700", "guardrail-bench"])
            .arg(dir))?;
        Ok(Mount {
            dir: dir.to_path_buf(),
            loop_dev: None,
            image: None,
        })
    }

    /// A 2 GiB sparse image with inodes for 250,000 files, formatted ext4, on a loop device.
    pub fn ext4(dir: &Path, image: &Path) -> Result<Mount> {
        std::fs::create_dir_all(dir)?;
        let f = std::fs::File::create(image)?;
        f.set_len(2 << 30)?;
        drop(f);
        let mut m = Mount {
            dir: dir.to_path_buf(),
            loop_dev: None,
            image: Some(image.to_path_buf()),
        };
        sh(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-N", "250000", "-E", "nodiscard"])
            .arg(image))?;
        let dev = sh(Command::new("losetup")
            .args(["--find", "--show"])
            .arg(image))?;
        m.loop_dev = Some(dev.trim().to_string());
        sh(Command::new("mount").arg(dev.trim()).arg(dir))?;
        Ok(m)
    }

    pub fn kind(&self) -> &'static str {
        if self.loop_dev.is_some() {
            "ext4"
        } else {
            "tmpfs"
        }
    }
}

fn mounted(dir: &Path) -> bool {
    let Ok(canon) = dir.canonicalize() else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(&*canon.to_string_lossy()))
}

impl Drop for Mount {
    fn drop(&mut self) {
        if mounted(&self.dir) && sh(Command::new("umount").arg(&self.dir)).is_err() {
            // Something still has it open (a stopped deleter): detach it now, freed when closed.
            let _ = sh(Command::new("umount").arg("-l").arg(&self.dir));
        }
        if let Some(dev) = &self.loop_dev {
            let _ = sh(Command::new("losetup").arg("-d").arg(dev));
        }
        if let Some(image) = &self.image {
            let _ = std::fs::remove_file(image);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// `kernel.bpf_stats_enabled` set for the guard's life, then the value found restored.
pub struct BpfStats {
    old: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    pub fn enable() -> Result<BpfStats> {
        let old = std::fs::read_to_string(BPF_STATS).context("reading kernel.bpf_stats_enabled")?;
        std::fs::write(BPF_STATS, "1").context("setting kernel.bpf_stats_enabled=1")?;
        Ok(BpfStats {
            old: old.trim().to_string(),
        })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, &self.old);
    }
}

/// Per-program counters read from the agent's own descriptors (`/proc/PID/fdinfo`).
#[derive(Clone, Debug, Default)]
pub struct ProgStat {
    pub id: u32,
    pub name: String,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

fn fdinfo_fields(pid: u32) -> Vec<Vec<(String, String)>> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .map(|t| {
            t.lines()
                .filter_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    Some((k.trim().to_string(), v.trim().to_string()))
                })
                .collect()
        })
        .collect()
}

fn field<'a>(f: &'a [(String, String)], k: &str) -> Option<&'a str> {
    f.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
}

/// Locked memory of the maps the process holds descriptors of, each map once (by id), in KiB.
pub fn maps_memlock_kib(pid: u32) -> u64 {
    let mut seen = std::collections::BTreeMap::new();
    for f in fdinfo_fields(pid) {
        if let (Some(id), Some(mem)) = (field(&f, "map_id"), field(&f, "memlock")) {
            seen.insert(id.to_string(), mem.parse::<u64>().unwrap_or(0));
        }
    }
    seen.values().sum::<u64>() / 1024
}

/// run_time_ns and run_cnt of every program the process holds a descriptor of (counted only
/// while kernel.bpf_stats_enabled=1), named by bpftool where it is installed.
pub fn prog_stats(pid: u32) -> Vec<ProgStat> {
    let mut out: Vec<ProgStat> = Vec::new();
    for f in fdinfo_fields(pid) {
        let Some(id) = field(&f, "prog_id").and_then(|v| v.parse().ok()) else {
            continue;
        };
        if out.iter().any(|p| p.id == id) {
            continue;
        }
        out.push(ProgStat {
            id,
            name: String::new(),
            run_time_ns: field(&f, "run_time_ns")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            run_cnt: field(&f, "run_cnt")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        });
    }
    for p in &mut out {
        p.name = Command::new("bpftool")
            .args(["prog", "show", "id", &p.id.to_string(), "--json"])
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
            .and_then(|v| v["name"].as_str().map(str::to_string))
            .unwrap_or_else(|| format!("prog {}", p.id));
    }
    out.sort_by_key(|p| p.id);
    out
}

/// One field of /proc/PID/status in KiB (VmRSS, VmHWM).
pub fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// User + system CPU time of a process, in clock ticks (USER_HZ).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat(5): 11 and 12 after the command name.
    n(11) + n(12)
}

/// The agent, started with the bench's policy, its own socket, event log, pin and state
/// directories in the scratch directory. Drop stops it by its PID.
pub struct Agent {
    child: Child,
    pub log: PathBuf,
    pub events: PathBuf,
}

impl Agent {
    pub fn start(bin: &Path, policy_text: &str, dir: &Path) -> Result<Agent> {
        Self::start_with(bin, policy_text, dir, &[])
    }

    /// With extra arguments (`--tier userspace`).
    pub fn start_with(bin: &Path, policy_text: &str, dir: &Path, extra: &[&str]) -> Result<Agent> {
        std::fs::create_dir_all(dir)?;
        let policy = dir.join("policy.toml");
        std::fs::write(&policy, policy_text)?;
        let log = dir.join("agent.log");
        let events = dir.join("events.jsonl");
        let socket = dir.join("bench.sock");
        let pins = format!("/sys/fs/bpf/guardrail-bench-{}", std::process::id());
        let child = Command::new(bin)
            .arg("agent")
            .arg("--policy")
            .arg(&policy)
            .arg("--socket")
            .arg(&socket)
            .arg("--event-log")
            .arg(&events)
            .arg("--pin-dir")
            .arg(&pins)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::options().append(true).open(&log)?)
            .spawn()
            .context("starting the agent")?;
        let mut agent = Agent { child, log, events };
        let t = Instant::now();
        while !agent.log_text().contains("guardrail: ready") {
            if let Ok(Some(st)) = agent.child.try_wait() {
                bail!(
                    "the agent exited ({st}) before it was ready: {}",
                    agent.log_text()
                );
            }
            if t.elapsed() > Duration::from_secs(90) {
                bail!("the agent did not get ready in 90 s: {}", agent.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(agent)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The tier the agent said it enforces with ("tracepoint", "lsm", "userspace").
    pub fn tier(&self) -> String {
        self.log_text()
            .lines()
            .find_map(|l| l.strip_prefix("guardrail: tier ")?.split(' ').next())
            .unwrap_or("unknown")
            .to_string()
    }

    /// Incident events in the event log so far (the agent's own `agent` events not counted).
    pub fn incidents(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v.get("incident").cloned())
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

fn proc_comm_pids(comm: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .collect()
}

/// The CIS delete rule, as `auditctl` takes it after `-a` / `-d`.
pub const AUDIT_RULE: &[&str] = &[
    "always,exit",
    "-F",
    "arch=b64",
    "-S",
    "unlink,unlinkat,rename,renameat,rmdir",
    "-k",
    "delete",
];

/// auditd for the bench's rows. The host is left as found: a daemon that was running keeps
/// running (only the bench's rule is added and deleted); otherwise the bench runs its own auditd
/// (`-n`, its configuration and log in the scratch directory) only while a row needs it.
pub struct Auditd {
    was_running: bool,
    /// AUDIT_SETTINGS' values before the bench, restored after each row.
    settings_before: Vec<Option<String>>,
    conf_dir: PathBuf,
    ours: Option<Child>,
    rule_added: bool,
}

/// One value of `auditctl -s` (`enabled`, `backlog_limit`, `backlog_wait_time`).
fn audit_status(key: &str) -> Option<String> {
    let s = sh(Command::new("auditctl").arg("-s")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .map(|v| v.trim().to_string())
}

/// The kernel settings auditd's rows change (as Debian's shipped rules.d/audit.rules does at
/// the service's start), with the auditctl option that sets each.
const AUDIT_SETTINGS: &[(&str, &str, &str)] = &[
    ("enabled", "-e", ""),
    ("backlog_limit", "-b", "8192"),
    ("backlog_wait_time", "--backlog_wait_time", "60000"),
];

impl Auditd {
    /// Installs Debian's auditd when it is missing. A daemon the package's scripts started is
    /// stopped again: the host had none running.
    pub fn prepare(scratch: &Path) -> Result<Auditd> {
        let was_running = !proc_comm_pids("auditd").is_empty();
        if !crate::installed("auditd") {
            crate::apt_install("bench", &["auditd"])?;
            if !was_running {
                for pid in proc_comm_pids("auditd") {
                    // SAFETY: kill(2) of the auditd the package installation just started.
                    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                }
                wait_until(Duration::from_secs(10), || {
                    proc_comm_pids("auditd").is_empty()
                });
            }
        }
        let conf_dir = scratch.join("audit");
        std::fs::create_dir_all(&conf_dir)?;
        let conf = std::fs::read_to_string("/etc/audit/auditd.conf")
            .context("reading /etc/audit/auditd.conf")?;
        // Its own log in the scratch directory; the host's /var/log/audit is not written.
        let conf: String = conf
            .lines()
            .map(|l| {
                if l.trim_start().starts_with("log_file") {
                    format!("log_file = {}\n", conf_dir.join("audit.log").display())
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        std::fs::write(conf_dir.join("auditd.conf"), conf)?;
        Ok(Auditd {
            was_running,
            settings_before: AUDIT_SETTINGS
                .iter()
                .map(|(k, _, _)| audit_status(k))
                .collect(),
            conf_dir,
            ours: None,
            rule_added: false,
        })
    }

    /// The daemon running and the rule in force.
    pub fn begin(&mut self) -> Result<()> {
        if !self.was_running && self.ours.is_none() {
            let child = Command::new("auditd")
                .args(["-n", "-c"])
                .arg(&self.conf_dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting auditd")?;
            let pid = child.id();
            self.ours = Some(child);
            let ready = wait_until(Duration::from_secs(20), || {
                sh(Command::new("auditctl").arg("-s"))
                    .is_ok_and(|s| s.lines().any(|l| l == format!("pid {pid}")))
            });
            if !ready {
                bail!("auditd (pid {pid}) did not register with the kernel in 20 s");
            }
        }
        for (_, opt, val) in AUDIT_SETTINGS {
            if !val.is_empty() {
                sh(Command::new("auditctl").args([opt, val]))?;
            }
        }
        let listed = sh(Command::new("auditctl").arg("-l"))?;
        if !listed.lines().any(|l| l.contains("-k delete")) {
            sh(Command::new("auditctl").arg("-a").args(AUDIT_RULE))?;
            self.rule_added = true;
        }
        Ok(())
    }

    /// The rule deleted (only if the bench added it) and the bench's daemon stopped.
    pub fn end(&mut self) {
        if self.rule_added {
            let _ = sh(Command::new("auditctl").arg("-d").args(AUDIT_RULE));
            self.rule_added = false;
        }
        if let Some(mut c) = self.ours.take() {
            stop_child(&mut c);
        }
        for ((key, opt, _), old) in AUDIT_SETTINGS.iter().zip(&self.settings_before) {
            if let Some(old) = old
                && audit_status(key).as_ref() != Some(old)
            {
                let _ = sh(Command::new("auditctl").args([*opt, old.as_str()]));
            }
        }
    }
}

impl Drop for Auditd {
    fn drop(&mut self) {
        self.end();
    }
}

pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// CPU load on every core: stress-ng (Debian's, installed when missing) or, where that cannot be
/// had, busy-loop threads. Drop stops it.
pub struct Load {
    child: Option<Child>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    pub how: &'static str,
}

impl Load {
    pub fn start() -> Load {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let have =
            crate::installed("stress-ng") || crate::apt_install("bench", &["stress-ng"]).is_ok();
        if have
            && let Ok(child) = Command::new("stress-ng")
                .args(["--cpu", &cpus.to_string(), "--timeout", "3600s", "--quiet"])
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
        {
            return Load {
                child: Some(child),
                stop,
                threads: Vec::new(),
                how: "stress-ng --cpu",
            };
        }
        let threads = (0..cpus)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                    }
                })
            })
            .collect();
        Load {
            child: None,
            stop,
            threads,
            how: "busy-loop threads",
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // stress-ng's workers are its children, in the process group it was started in.
            // SAFETY: kill(2) of our child's process group.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGTERM) };
            stop_child(&mut c);
        }
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
