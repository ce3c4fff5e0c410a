//! Small facts about this host's processes, and the unprivileged user of the attack scenarios.
use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Command, Output},
};

use crate::{pids_in_group, scratch};

/// User and group id of `nobody`, the unprivileged attacker of the security tests.
pub const NOBODY: u32 = 65534;

/// The state letter of `pid` in /proc/PID/stat (R, S, T, Z, ...), or None once it is gone.
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the state follows the last ')'.
    stat[stat.rfind(')')? + 2..].chars().next()
}

/// The state letters of the live processes of process group `pgid` (T: stopped).
pub fn group_states(pgid: u32) -> Vec<char> {
    pids_in_group(pgid)
        .into_iter()
        .filter_map(proc_state)
        .collect()
}

/// A command's stdout and stderr as text.
pub fn output_text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `program args` as user nobody through setpriv: no supplementary groups, or exactly `group`.
pub fn nobody_command(group: Option<u32>, program: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={NOBODY}"))
        .arg(format!("--regid={NOBODY}"));
    match group {
        Some(g) => c.arg(format!("--groups={g}")),
        None => c.arg("--clear-groups"),
    };
    c.arg("--").arg(program).args(args);
    c
}

/// A scratch directory others (nobody) can traverse, like a real /home's parent (tempfile makes
/// it 0700).
pub fn open_scratch() -> tempfile::TempDir {
    let s = scratch();
    std::fs::set_permissions(s.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    s
}

/// SIGCONT to process group `pgid` (a test's own job).
pub fn sigcont_job(pgid: u32) {
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pgid as i32),
        nix::sys::signal::Signal::SIGCONT,
    )
    .expect("SIGCONT");
}
