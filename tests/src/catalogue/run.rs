//! Runs the catalogue's deletion rows against a running agent and compares what happened on disk
//! and in the event log with what the row says for the agent's tier. Shared by the host test
//! (tests/tests/host_bypass_catalogue.rs) and the VM (`guardrail-testkit catalogue`).
use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use super::{BUDGET, Check, Outcome, Row, SESSION_BUDGET, Victim};
use crate::{Agent, Job, TestCgroup, Tier, chown_nobody, fill, wait_until};

/// The scratch tree of a catalogue run: a target, a data directory (owners: root), a protected
/// root, and a directory per row.
pub struct Fixture {
    pub s: PathBuf,
    pub kit: PathBuf,
    /// GNU find (the VM's busybox find has no -delete).
    pub find: String,
}

impl Fixture {
    /// Makes the fixed directories below `s` (which nobody must be able to traverse).
    pub fn new(s: &Path, kit: PathBuf, find: String) -> Fixture {
        for d in ["target", "data", "prot", "rows"] {
            std::fs::create_dir_all(s.join(d)).expect("mkdir in the scratch directory");
        }
        std::fs::set_permissions(s, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        chown_nobody(&s.join("target"));
        Fixture {
            s: s.to_path_buf(),
            kit,
            find,
        }
    }

    pub fn target(&self) -> PathBuf {
        self.s.join("target")
    }

    /// The policy the catalogue's outcomes are written for: jobs in `cg` get BUDGET deletions
    /// outside the target, their login session SESSION_BUDGET, their user no limit; other jobs of
    /// the machine are not counted at all.
    pub fn policy(&self, cg: &TestCgroup) -> String {
        let q = |p: PathBuf| format!("{:?}", p.display().to_string());
        format!(
            r#"mode = "enforce"
[deletion]
budget = 100000000
window = "10m"
action = "hold"
hold_timeout = "10m"
on_deny = "kill"
targets = [{target}]
protected_roots = ["/", {prot}]
protect_mount_points = false
shared_budgets = false

[deletion.session]
budget = {SESSION_BUDGET}
window = "10m"
action = "hold"

[deletion.user]
budget = 100000000
window = "10m"
action = "hold"

[[deletion.rule]]
name = "catalogue"
match = {{ cgroup = "{cg}" }}
targets = [{target}]
budget = {BUDGET}
shared_budgets = true

[[deletion.data_dir]]
path = {data}
owners = {{ users = ["root"] }}
"#,
            target = q(self.target()),
            prot = q(self.s.join("prot")),
            data = q(self.s.join("data")),
            cg = cg.name,
        )
    }
}

/// Files below `dir` that still hold their original bytes ("x", as [`fill`] writes them).
fn intact(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(|e| e.ok())
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => intact(&e.path()),
            Ok(t) if t.is_file() => usize::from(std::fs::read(e.path()).is_ok_and(|b| b == b"x")),
            _ => 0,
        })
        .sum()
}

/// One row's directories and how to count what it lost.
struct Place {
    victim: PathBuf,
    /// $T, when the files intact there count as kept.
    also: Option<PathBuf>,
    files: usize,
    protected: bool,
}

impl Place {
    fn left(&self) -> usize {
        if self.protected {
            usize::from(self.victim.is_dir())
        } else {
            intact(&self.victim) + self.also.as_deref().map_or(0, intact)
        }
    }

    fn gone(&self) -> usize {
        self.files - self.left().min(self.files)
    }

    /// Waits until the count stops changing for 700 ms (60 s at most); returns files gone.
    fn settle(&self) -> usize {
        let mut last = self.gone();
        let (start, mut since) = (Instant::now(), Instant::now());
        while since.elapsed() < Duration::from_millis(700)
            && start.elapsed() < Duration::from_secs(60)
        {
            std::thread::sleep(Duration::from_millis(50));
            let now = self.gone();
            if now != last {
                (last, since) = (now, Instant::now());
            }
        }
        last
    }
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Prepares the row's files and writes its script; returns the place to count and the script.
fn prepare(
    fx: &Fixture,
    row: &Row,
    victim: Victim,
    setup: Option<&str>,
    run: &str,
) -> Result<(Place, PathBuf), String> {
    let dir = fx.s.join("rows").join(&row.id);
    let t = fx.target().join(&row.id);
    let o = dir.join("out");
    for d in [&dir, &t, &o] {
        std::fs::create_dir_all(d).map_err(|e| format!("mkdir {}: {e}", d.display()))?;
    }
    let (v, protected) = match victim {
        Victim::Plain => (dir.join("victim"), false),
        Victim::Data => (fx.s.join("data").join(&row.id), false),
        Victim::Protected => (fx.s.join("prot"), true),
        Victim::Deep => (dir.join("victim"), false),
    };
    if !protected {
        let mut bottom = v.clone();
        if victim == Victim::Deep {
            for _ in 0..70 {
                bottom.push("d");
            }
        }
        fill(&bottom, super::N);
        chown_nobody(&v);
    }
    chown_nobody(&dir);
    chown_nobody(&t);
    let vars = [
        ("S", fx.s.display().to_string()),
        ("V", v.display().to_string()),
        ("T", t.display().to_string()),
        ("O", o.display().to_string()),
        ("N", super::N.to_string()),
        ("B", BUDGET.to_string()),
        ("SB", SESSION_BUDGET.to_string()),
        ("KIT", fx.kit.display().to_string()),
        ("FIND", fx.find.clone()),
    ];
    let exports: String = vars
        .iter()
        .map(|(k, v)| format!("export {k}={}\n", sh_quote(v)))
        .collect();
    if let Some(setup) = setup {
        let out = Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("{exports}{setup}"))
            .current_dir(&fx.s)
            .output()
            .map_err(|e| format!("setup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "setup failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    let script = dir.join("run.sh");
    std::fs::write(&script, format!("{exports}{run}\n")).map_err(|e| format!("{e}"))?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("{e}"))?;
    let files = if protected { 1 } else { super::N };
    Ok((
        Place {
            victim: v,
            also: None,
            files,
            protected,
        },
        script,
    ))
}

/// What the job wrote to stderr so far, without waiting: a held process it left behind (a stopped
/// `setsid rm`) may keep the pipe open.
fn stderr_now(job: &mut Job) -> String {
    use std::{io::Read, os::fd::AsRawFd};
    let Some(err) = job.child.stderr.as_mut() else {
        return String::new();
    };
    // SAFETY: fcntl on a pipe fd this Job owns; only its status flags change.
    unsafe { libc::fcntl(err.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let mut buf = Vec::new();
    let _ = err.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).trim().to_string()
}

/// What a row did.
enum Seen {
    /// A new hold `id` opened with `gone` files gone.
    Held { id: u64, gone: usize },
    /// The job ended by itself with `gone` files gone.
    Ended { gone: usize },
    /// Neither within the time allowed.
    Running { gone: usize },
}

impl Seen {
    /// In words, for the summary and a failure message.
    fn describe(&self, files: usize) -> String {
        match self {
            Seen::Held { id, gone } => format!("held as incident {id} with {gone} of {files} gone"),
            Seen::Ended { gone } => format!("ended by itself with {gone} of {files} gone"),
            Seen::Running { gone } => {
                format!("still running after 90 s with {gone} of {files} gone")
            }
        }
    }
}

/// Runs one deletion row against `agent` (which runs `tier`); `Ok` with a one-line summary, or
/// `Err` saying what differed. Rows that are not scripts, or `untested` for the tier, are skipped
/// (`Ok`).
pub fn run_row(
    agent: &Agent,
    fx: &Fixture,
    cg: &TestCgroup,
    row: &Row,
    tier: Tier,
) -> Result<String, String> {
    let Check::Script {
        setup,
        run,
        root,
        victim,
        needs,
        kept_in_target,
    } = &row.check
    else {
        return Ok(format!("{}: shown by its proofs", row.id));
    };
    let want = row.expect(tier).clone();
    if want == Outcome::Untested {
        return Ok(format!("{}: not tested in the {tier} tier", row.id));
    }
    if let Some(prog) = needs {
        let found = Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("command -v {prog}"))
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Err(format!(
                "{}: needs {prog}, which is not installed (`cargo xtask setup`)",
                row.id
            ));
        }
    }
    let (mut place, script) = prepare(fx, row, *victim, setup.as_deref(), run)?;
    if *kept_in_target {
        place.also = Some(fx.target().join(&row.id));
    }
    let before_incidents = agent.incidents().len();
    let before_holds = agent.hold_ids();
    // A new audit session per row (what pam_loginuid does at a login): the session budget of one
    // row never carries into the next.
    // The testkit drops to nobody: busybox's setpriv (the VM) has no --reuid.
    let as_user = if *root {
        String::new()
    } else {
        format!("{} as-nobody ", sh_quote(&fx.kit.display().to_string()))
    };
    let job_script = format!(
        "echo 65534 > /proc/self/loginuid || exit 90\nexec {as_user}/bin/sh {}",
        sh_quote(&script.display().to_string())
    );
    let mut job = Job::spawn_in(&job_script, &fx.s, Some(cg));
    // A sibling's SIGCONT loop (a `killed` row) keeps going while the job it resumes is held:
    // wait for the end there; anywhere else a hold is what the row did.
    let waits_for_hold = !matches!(want, Outcome::Killed(_));
    let start = Instant::now();
    let mut new_hold = None;
    let mut ended = None;
    while start.elapsed() < Duration::from_secs(90) {
        if let Ok(Some(status)) = job.child.try_wait() {
            ended = Some(status);
            break;
        }
        if waits_for_hold {
            new_hold = agent
                .hold_ids()
                .into_iter()
                .find(|i| !before_holds.contains(i));
            if new_hold.is_some() {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if ended.is_some() && waits_for_hold {
        // The hold may be recorded just after the job's last process stopped.
        wait_until(Duration::from_secs(2), || {
            new_hold = agent
                .hold_ids()
                .into_iter()
                .find(|i| !before_holds.contains(i));
            new_hold.is_some()
        });
    }
    let gone = place.settle();
    let seen = match (new_hold, ended) {
        (Some(id), _) => Seen::Held { id, gone },
        (None, Some(_)) => Seen::Ended { gone },
        (None, None) => Seen::Running { gone },
    };
    // What the job said, for a failure message (only once it ended: reading waits for the end).
    let said = match ended {
        Some(status) => format!("; {status}, stderr {:?}", stderr_now(&mut job)),
        None => String::new(),
    };
    // End the row: the job first (a loop would start the next `rm`), then every hold it made.
    drop(job);
    let mut denied_more = None;
    for id in agent.hold_ids() {
        if !before_holds.contains(&id) {
            let _ = agent.cli(&["deny", &id.to_string()]);
        }
    }
    wait_until(Duration::from_secs(10), || {
        agent.hold_ids().iter().all(|i| before_holds.contains(i))
    });
    if let Seen::Held { gone, .. } = seen {
        let after = place.settle();
        if after != gone {
            denied_more = Some(after);
        }
    }
    let incidents: Vec<serde_json::Value> = agent
        .incidents()
        .into_iter()
        .skip(before_incidents)
        .collect();
    let outcomes: Vec<String> = incidents
        .iter()
        .map(|i| {
            format!(
                "{}:{} ({})",
                i["kind"].as_str().unwrap_or("?"),
                i["outcome"].as_str().unwrap_or("?"),
                i["reason"].as_str().unwrap_or("")
            )
        })
        .collect();
    let files = place.files;
    let range = want.gone(files);
    let what = format!("{}, incidents {outcomes:?}{said}", seen.describe(files));
    let fail = |why: &str| {
        Err(format!(
            "{} [{tier}]: expected {want}; {why} ({what})",
            row.id
        ))
    };
    if let Some(after) = denied_more {
        return fail(&format!("{after} gone after deny"));
    }
    let has = |o: &str| incidents.iter().any(|i| i["outcome"] == o);
    match (&want, &seen) {
        (Outcome::Held(_) | Outcome::Stopped(_), Seen::Held { gone, .. }) => {
            if !range.contains(gone) {
                return fail(&format!("{gone} gone at the hold"));
            }
            if matches!(want, Outcome::Stopped(_))
                && !incidents.iter().any(|i| i["kind"] != "budget_crossed")
            {
                return fail("no data_dir or protected_root incident");
            }
        }
        (Outcome::Held(_) | Outcome::Stopped(_), _) => return fail("no hold"),
        (_, Seen::Running { .. }) => return fail("the job did not end within 90 s"),
        (_, Seen::Held { .. }) => return fail("held"),
        (Outcome::Refused(_), Seen::Ended { gone }) => {
            if !range.contains(gone) || !has("refused") {
                return fail("not refused as expected");
            }
        }
        (Outcome::Killed(_), Seen::Ended { gone }) => {
            if !range.contains(gone) || !has("killed") {
                return fail("not killed as expected");
            }
        }
        (Outcome::Free, Seen::Ended { gone }) => {
            if *gone != files {
                return fail(&format!("{gone} of {files} gone, not all"));
            }
        }
        (Outcome::NotSeen, Seen::Ended { gone }) => {
            if *gone != files || !incidents.is_empty() {
                return fail("seen, or not all gone");
            }
        }
        (Outcome::Untested, _) => {}
    }
    Ok(format!("{} [{tier}]: {want} ({what})", row.id))
}

/// Runs every row of `rows` whose id contains `filter`; returns the summaries and the failures.
pub fn run_all(
    agent: &Agent,
    fx: &Fixture,
    cg: &TestCgroup,
    rows: &[Row],
    tier: Tier,
    filter: Option<&str>,
) -> (Vec<String>, Vec<String>) {
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    for row in rows {
        if filter.is_some_and(|f| !row.id.contains(f)) {
            continue;
        }
        match run_row(agent, fx, cg, row, tier) {
            Ok(s) => {
                eprintln!("catalogue ok: {s}");
                ok.push(s);
            }
            Err(e) => {
                eprintln!("catalogue FAILED: {e}");
                failed.push(e);
            }
        }
    }
    (ok, failed)
}
