//! Where a job came from: its login session's class (remote, local, none) and remote host, from
//! /proc. Best effort and read once per incident, never per deletion.
use serde::{Deserialize, Serialize};

/// The session part of the event schema.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// The audit session id (`/proc/PID/sessionid`), absent for processes outside any login.
    pub id: Option<u32>,
    /// remote | local | none | unknown
    pub class: String,
    /// The client address of an SSH login.
    pub remote_host: Option<String>,
    /// The controlling terminal (`pts/3`).
    pub tty: Option<String>,
    /// What made the session: `sshd`, `login`, or absent when unknown.
    pub service: Option<String>,
}

/// How far up the process tree to look for the login: past sudo, tmux's client, scripts.
const MAX_ANCESTORS: usize = 32;

fn ppid_and_comm(pid: u32) -> Option<(u32, String)> {
    let s = crate::procinfo::stat(pid)?;
    Some((s.ppid, s.comm_lossy()))
}

/// The client address in `SSH_CONNECTION` ("client port server port") or `SSH_CLIENT`.
pub fn ssh_client_from_environ(environ: &[u8]) -> Option<String> {
    environ.split(|b| *b == 0).find_map(|var| {
        let var = std::str::from_utf8(var).ok()?;
        let value = var
            .strip_prefix("SSH_CONNECTION=")
            .or_else(|| var.strip_prefix("SSH_CLIENT="))?;
        value.split_whitespace().next().map(str::to_string)
    })
}

/// Classifies the session of `pid`: an `sshd` ancestor or SSH variables in the environment of
/// the job or an ancestor make it remote; a terminal without them makes it local; no audit
/// session means a service or timer.
pub fn classify(pid: u32, audit_session: Option<u32>, tty: Option<String>) -> Session {
    let mut remote_host = None;
    let mut via_sshd = false;
    let mut p = pid;
    for _ in 0..MAX_ANCESTORS {
        if remote_host.is_none()
            && let Ok(env) = std::fs::read(format!("/proc/{p}/environ"))
        {
            remote_host = ssh_client_from_environ(&env);
        }
        let Some((ppid, comm)) = ppid_and_comm(p) else {
            break;
        };
        if comm == "sshd" || comm.starts_with("sshd-") {
            via_sshd = true;
            break;
        }
        if ppid <= 1 {
            break;
        }
        p = ppid;
    }
    let (class, service) = if via_sshd || remote_host.is_some() {
        ("remote", Some("sshd".to_string()))
    } else if audit_session.is_none() {
        ("none", None)
    } else if tty.is_some() {
        ("local", Some("login".to_string()))
    } else {
        ("unknown", None)
    };
    Session {
        id: audit_session,
        class: class.to_string(),
        remote_host,
        tty,
        service,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_connection_gives_the_client_address() {
        let env = b"PATH=/bin\0SSH_CONNECTION=10.0.0.5 50022 10.0.0.1 22\0TERM=xterm\0";
        assert_eq!(ssh_client_from_environ(env).as_deref(), Some("10.0.0.5"));
        assert_eq!(ssh_client_from_environ(b"PATH=/bin\0"), None);
    }
}
