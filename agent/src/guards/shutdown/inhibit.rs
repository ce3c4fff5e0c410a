//! A logind **block** inhibitor for "shutdown", held while the shutdown policy confirms or blocks
//! anything, so that requests sent straight to logind over D-Bus (`busctl`, `gdbus`, a desktop's
//! power menu), which the kernel programs never see as an exec, are refused by logind itself.
//!
//! What logind does with it (README, "Remote shutdowns"): before systemd 257 a block lock binds
//! only callers other than its owner's uid (root) that polkit does not authorize for
//! `*-ignore-inhibit`; root bypasses it. From 257 it binds everyone, root included, unless the
//! request asks to skip inhibitors (`systemctl -i`, `--check-inhibitors=no`).
//!
//! How it is held: a `systemd-inhibit --mode=block` child, rather than a D-Bus client in the
//! agent. systemd-inhibit ships with systemd wherever logind runs, calls
//! `org.freedesktop.login1.Manager.Inhibit` and keeps the lock's file descriptor for as long as
//! its own child runs; a D-Bus crate (zbus) would add an async runtime and some forty crates to
//! the agent for one method call. The child is `sh -c 'echo held; exec cat'` with its stdin on a
//! pipe from the agent: systemd-inhibit starts it only once the lock is taken, so the line
//! `held` proves the lock, and `cat` ends when the agent's end of the pipe closes, however the
//! agent ends (stop, crash, SIGKILL), which ends systemd-inhibit and releases the lock. No
//! PR_SET_PDEATHSIG is needed (it would fire on the death of the spawning *thread*, and needs
//! an unsafe pre_exec hook).
//!
//! A granted `guardrail confirm` releases the lock for the pass's window (logind's locks are not
//! per session: while a pass is open, the lock is off for every caller), so that a confirmed
//! `systemctl reboot` goes through logind on 257 too. It is taken again when the window ends, or
//! a few seconds after the kernel reports the pass used.
use std::{
    collections::HashMap,
    io::{ErrorKind, Read},
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Where logind runs, both exist: logind creates the first when it starts (libsystemd's own
/// test), and it answers on the second. (A container image can carry a stale
/// /run/systemd/seats with no bus at all.)
const LOGIND_RUNNING: [&str; 2] = ["/run/systemd/seats", "/run/dbus/system_bus_socket"];
/// How long taking the lock may take before the attempt is given up (and retried).
const TAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long after a failure or an unexpected end the lock is tried again.
const RETRY: Duration = Duration::from_secs(5);

/// Whether and why the lock is wanted, from the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    /// Held, with this `Why=`.
    Hold { why: String },
    /// Not held, for this reason (shown in `guardrail status`).
    No { reason: String },
}

enum State {
    Idle,
    /// systemd-inhibit started; waiting for its child's `held` line.
    Taking {
        child: Child,
        since: Instant,
    },
    Held {
        child: Child,
    },
}

pub struct Inhibitor {
    /// The command that takes the lock and runs the child given after it.
    program: Vec<String>,
    /// Paths that exist where logind runs.
    logind_paths: Vec<PathBuf>,
    want: Want,
    state: State,
    /// Open confirmation passes by audit session, with when each stops releasing the lock.
    passes: HashMap<u32, Instant>,
    /// Why the last attempt failed (cleared once the lock is held).
    last_error: Option<String>,
    next_try: Instant,
}

/// The child systemd-inhibit runs while it holds the lock: says so, then lives as long as its
/// stdin (the agent's pipe) stays open.
const HOLDER: [&str; 3] = ["/bin/sh", "-c", "echo held && exec cat >/dev/null"];

impl Inhibitor {
    // Public since the modules moved into the library; `new` is the real systemd-inhibit, not a
    // neutral default value.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Self::with_program(
            vec![
                "systemd-inhibit".into(),
                "--what=shutdown".into(),
                "--who=guardrail".into(),
                "--mode=block".into(),
            ],
            &LOGIND_RUNNING.map(PathBuf::from),
        )
    }

    /// `program` takes the lock (`--why=` is appended) and runs the holder given after it; tests
    /// pass a stand-in.
    fn with_program(program: Vec<String>, logind_paths: &[PathBuf]) -> Self {
        Inhibitor {
            program,
            logind_paths: logind_paths.to_vec(),
            want: Want::No {
                reason: "the shutdown guard is not running (no BPF)".into(),
            },
            state: State::Idle,
            passes: HashMap::new(),
            last_error: None,
            next_try: Instant::now(),
        }
    }

    /// What the policy wants. A change of `Why=` takes the lock anew.
    pub fn set_want(&mut self, want: Want) {
        if want == self.want {
            return;
        }
        self.release();
        self.want = want;
        self.last_error = None;
        self.next_try = Instant::now();
    }

    #[cfg(test)]
    fn held(&self) -> bool {
        matches!(self.state, State::Held { .. })
    }

    /// Takes the lock now if it is wanted and not released for a pass, waiting up to `within`
    /// (at start-up: READY=1 then means the lock is held). Failures are kept for `status` and
    /// retried by [`Inhibitor::tick`].
    pub fn take_now(&mut self, within: Duration) {
        let until = Instant::now() + within;
        self.tick_at(Instant::now());
        // A stop asked for meanwhile ends the wait (start-up checks for it right after).
        while matches!(self.state, State::Taking { .. })
            && Instant::now() < until
            && crate::host::lifecycle::stop_noted().is_none()
            && crate::host::lifecycle::stop_requested().is_none()
        {
            std::thread::sleep(Duration::from_millis(20));
            self.tick_at(Instant::now());
        }
    }

    /// A confirmation pass was granted to `session` until `until`: the lock is off until then.
    pub fn pass_granted(&mut self, session: u32, until: Instant) {
        self.passes.insert(session, until);
        self.tick_at(Instant::now());
    }

    /// The kernel reported `session`'s pass used: its request may still need logind for `grace`
    /// (`systemctl reboot` execs, then calls logind), then the lock comes back.
    pub fn pass_used(&mut self, session: u32, grace: Duration) {
        let end = Instant::now() + grace;
        if let Some(until) = self.passes.get_mut(&session) {
            *until = (*until).min(end);
        }
    }

    /// Periodic work: take, confirm, re-take or release the lock as wanted.
    pub fn tick(&mut self) {
        self.tick_at(Instant::now());
    }

    fn tick_at(&mut self, now: Instant) {
        self.passes.retain(|_, until| *until > now);
        let why = match &self.want {
            Want::Hold { why } if self.passes.is_empty() => why.clone(),
            _ => {
                self.release();
                return;
            }
        };
        match &mut self.state {
            State::Idle => {
                if now < self.next_try {
                    return;
                }
                if let Some(missing) = self.logind_paths.iter().find(|p| !p.exists()) {
                    self.last_error = Some(format!(
                        "logind is not running ({} does not exist)",
                        missing.display()
                    ));
                    self.next_try = now + RETRY;
                    return;
                }
                match self.spawn(&why) {
                    Ok(child) => self.state = State::Taking { child, since: now },
                    Err(e) => self.failed(e, now),
                }
            }
            State::Taking { child, since } => match holder_said_held(child) {
                Ok(true) => {
                    let State::Taking { child, .. } =
                        std::mem::replace(&mut self.state, State::Idle)
                    else {
                        return;
                    };
                    println!(
                        "guardrail: logind block inhibitor for shutdown held (systemd-inhibit pid {})",
                        child.id()
                    );
                    self.last_error = None;
                    self.state = State::Held { child };
                }
                Ok(false) if now.duration_since(*since) < TAKE_TIMEOUT => {}
                Ok(false) => self.failed(
                    format!("no answer from logind within {}s", TAKE_TIMEOUT.as_secs()),
                    now,
                ),
                Err(e) => self.failed(e, now),
            },
            State::Held { child } => {
                if let Ok(Some(status)) = child.try_wait() {
                    let err = child_stderr(child);
                    self.state = State::Idle;
                    self.failed(
                        format!("systemd-inhibit ended ({status}) while holding the lock{err}"),
                        now,
                    );
                }
            }
        }
    }

    fn spawn(&self, why: &str) -> Result<Child, String> {
        let (program, args) = self
            .program
            .split_first()
            .ok_or_else(|| "no inhibitor program".to_string())?;
        let child = Command::new(program)
            .args(args)
            .arg(format!("--why={why}"))
            .args(HOLDER)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting {program}: {e}"))?;
        if let Some(out) = child.stdout.as_ref() {
            // Read in tick() without blocking the agent's loop.
            let fd = out.as_raw_fd();
            let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL)
                .map_err(|e| format!("fcntl on {program}'s stdout: {e}"))?;
            let flags =
                nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
            nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(flags))
                .map_err(|e| format!("fcntl on {program}'s stdout: {e}"))?;
        }
        Ok(child)
    }

    fn failed(&mut self, error: String, now: Instant) {
        if let State::Taking { child, .. } | State::Held { child } =
            std::mem::replace(&mut self.state, State::Idle)
        {
            stop(child);
        }
        if self.last_error.as_deref() != Some(error.as_str()) {
            eprintln!("guardrail: logind block inhibitor not held: {error}; retrying");
        }
        self.last_error = Some(error);
        self.next_try = now + RETRY;
    }

    /// Drops the lock (if held or being taken).
    pub fn release(&mut self) {
        if let State::Taking { child, .. } | State::Held { child } =
            std::mem::replace(&mut self.state, State::Idle)
        {
            let pid = child.id();
            stop(child);
            println!("guardrail: logind block inhibitor released (systemd-inhibit pid {pid})");
        }
    }

    /// One line for `guardrail status`.
    pub fn status(&self) -> String {
        let now = Instant::now();
        match (&self.want, &self.state) {
            (Want::No { reason }, _) => format!("not held: {reason}"),
            (Want::Hold { .. }, State::Held { child }) => format!(
                "held (logind block inhibitor on shutdown, systemd-inhibit pid {})",
                child.id()
            ),
            (Want::Hold { .. }, _) if !self.passes.is_empty() => {
                let left = self
                    .passes
                    .values()
                    .map(|u| u.saturating_duration_since(now).as_secs())
                    .max()
                    .unwrap_or(0);
                format!(
                    "released for a confirmation pass ({left}s left; logind's lock is not per session)"
                )
            }
            (Want::Hold { .. }, State::Taking { .. }) => "being taken".to_string(),
            (Want::Hold { .. }, State::Idle) => format!(
                "NOT held: {}",
                self.last_error.as_deref().unwrap_or("not taken yet")
            ),
        }
    }
}

impl Drop for Inhibitor {
    /// On agent stop the lock goes with it (the pipe would end it anyway; this is immediate).
    fn drop(&mut self) {
        self.release();
    }
}

/// Whether the holder printed its line; an error if systemd-inhibit ended first.
fn holder_said_held(child: &mut Child) -> Result<bool, String> {
    let mut buf = [0u8; 64];
    if let Some(out) = child.stdout.as_mut() {
        match out.read(&mut buf) {
            Ok(n) if n > 0 && buf[..n].starts_with(b"held") => return Ok(true),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("reading systemd-inhibit's output: {e}")),
        }
    }
    match child.try_wait() {
        Ok(Some(status)) => Err(format!(
            "systemd-inhibit failed ({status}){}",
            child_stderr(child)
        )),
        Ok(None) => Ok(false),
        Err(e) => Err(format!("waiting for systemd-inhibit: {e}")),
    }
}

/// What an ended systemd-inhibit said ("Failed to inhibit: Access denied"), as ": ...".
fn child_stderr(child: &mut Child) -> String {
    let mut text = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut text);
    }
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

/// Ends systemd-inhibit (our own child, by its handle): the kernel closes its lock descriptor,
/// logind drops the lock; its holder child gets systemd-inhibit's death signal and EOF.
fn stop(mut child: Child) {
    drop(child.stdin.take());
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use std::path::Path;

    use super::*;

    /// A stand-in for systemd-inhibit: `sh -c 'exec "$@"' inhibit --why=... HOLDER...` runs the
    /// holder right away, as systemd-inhibit does once logind granted the lock.
    fn fake(dir: &Path) -> Inhibitor {
        let dir = [dir.to_path_buf()];
        Inhibitor::with_program(
            vec![
                "/bin/sh".into(),
                "-c".into(),
                "shift; exec \"$@\"".into(),
                "fake-inhibit".into(),
            ],
            &dir,
        )
    }

    fn want() -> Want {
        Want::Hold { why: "test".into() }
    }

    fn holder_pid(i: &Inhibitor) -> Option<u32> {
        match &i.state {
            State::Held { child } => Some(child.id()),
            _ => None,
        }
    }

    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.rsplit(')').next().is_some_and(|r| !r.starts_with(" Z")))
    }

    #[test]
    fn held_released_for_a_pass_and_taken_again() {
        let dir = std::env::temp_dir();
        let mut i = fake(&dir);
        assert!(!i.held());
        assert!(i.status().starts_with("not held"));
        i.set_want(want());
        i.take_now(Duration::from_secs(10));
        assert!(i.held(), "{}", i.status());
        let pid = holder_pid(&i).unwrap();

        // A pass releases it, for everyone, until the pass's window ends.
        let start = Instant::now();
        i.pass_granted(7, start + Duration::from_secs(120));
        assert!(!i.held());
        assert!(!alive(pid), "the old holder still runs");
        assert!(i.status().starts_with("released"), "{}", i.status());
        i.tick_at(start + Duration::from_secs(60));
        assert!(!i.held());

        // Used: back a grace period later, not at the window's end.
        i.pass_used(7, Duration::from_millis(0));
        i.take_now(Duration::from_secs(10));
        assert!(i.held(), "{}", i.status());
    }

    #[test]
    fn a_pass_used_does_not_shorten_another_sessions_window() {
        let mut i = fake(&std::env::temp_dir());
        i.set_want(want());
        let now = Instant::now();
        i.pass_granted(1, now + Duration::from_secs(120));
        i.pass_granted(2, now + Duration::from_secs(120));
        i.pass_used(1, Duration::from_millis(0));
        i.tick_at(now + Duration::from_secs(1));
        assert!(!i.held(), "session 2's window is still open");
        i.tick_at(now + Duration::from_secs(121));
        i.take_now(Duration::from_secs(10));
        assert!(i.held(), "{}", i.status());
    }

    #[test]
    fn taken_again_after_the_holder_dies_and_released_on_drop() {
        let mut i = fake(&std::env::temp_dir());
        i.set_want(want());
        i.take_now(Duration::from_secs(10));
        let pid = holder_pid(&i).unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        i.tick();
        assert!(!i.held());
        assert!(i.status().contains("ended"), "{}", i.status());
        // Retried after RETRY.
        i.next_try = Instant::now();
        i.take_now(Duration::from_secs(10));
        let pid = holder_pid(&i).unwrap();
        drop(i);
        assert!(!alive(pid), "the holder outlived the inhibitor");
    }

    #[test]
    fn not_taken_without_logind_nor_when_unwanted() {
        let mut i = fake(Path::new("/nonexistent/seats"));
        i.set_want(want());
        i.take_now(Duration::from_secs(1));
        assert!(!i.held());
        assert!(
            i.status().contains("logind is not running"),
            "{}",
            i.status()
        );

        let mut i = fake(&std::env::temp_dir());
        i.set_want(Want::No {
            reason: "the policy allows every shutdown".into(),
        });
        i.take_now(Duration::from_secs(1));
        assert!(!i.held());
        assert_eq!(i.status(), "not held: the policy allows every shutdown");
    }

    #[test]
    fn a_failing_inhibit_is_reported_with_its_message() {
        let mut i = Inhibitor::with_program(
            vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo 'Failed to inhibit: Access denied' >&2; exit 1".into(),
            ],
            &[std::env::temp_dir()],
        );
        i.set_want(want());
        i.take_now(Duration::from_secs(10));
        assert!(!i.held());
        assert!(i.status().contains("Access denied"), "{}", i.status());
    }
}
