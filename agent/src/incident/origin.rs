//! Where a job came from: its login session's class (remote, local, none, unknown) and remote
//! host, from the one login classifier (crate::host::session). Best effort and read once per incident, never per deletion.
use serde::{Deserialize, Serialize};

use crate::host::session::Class;

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

/// How far up the process tree to look for the client address: past sudo, tmux's client, scripts.
const MAX_ANCESTORS: usize = 32;

fn ppid_of(pid: u32) -> Option<u32> {
    crate::host::procinfo::stat(pid).map(|s| s.ppid)
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

/// Classifies the session of `pid` with the shutdown guard's classifier (crate::host::session: the
/// one login classifier, positive evidence only): no audit session means a service or timer
/// (`none`); a session without evidence is `unknown`. The command name and the environment are
/// the job's to choose, so neither is evidence; SSH_CONNECTION only names the client of a
/// session already known to be remote.
pub fn classify(pid: u32, audit_session: Option<u32>, tty: Option<String>) -> Session {
    let Some(id) = audit_session else {
        return Session {
            id: None,
            class: "none".to_string(),
            remote_host: None,
            tty,
            service: None,
        };
    };
    let pids = crate::host::session::live_sessions()
        .remove(&id)
        .unwrap_or_else(|| vec![pid]);
    let origin = crate::host::session::classify(id, &pids);
    let (class, service) = match &origin {
        None => ("unknown", None),
        Some(o) => {
            let class = match o.class {
                Class::Remote => "remote",
                // The policy's default for a serial console; its tty says which it was.
                Class::Local | Class::Serial => "local",
                Class::None => "none",
            };
            let service = match o.service.as_str() {
                "ssh" => Some("sshd".to_string()),
                "" if o.class == Class::Local => Some("login".to_string()),
                "" => None,
                s => Some(s.to_string()),
            };
            (class, service)
        }
    };
    let mut remote_host = origin.as_ref().and_then(|o| o.host.clone());
    if class == "remote" && remote_host.is_none() {
        // sudo strips SSH_CONNECTION: look up the job's ancestors for it.
        let mut p = pid;
        for _ in 0..MAX_ANCESTORS {
            if let Ok(env) = std::fs::read(format!("/proc/{p}/environ"))
                && let Some(h) = ssh_client_from_environ(&env)
            {
                remote_host = Some(h);
                break;
            }
            match ppid_of(p) {
                Some(pp) if pp > 1 => p = pp,
                _ => break,
            }
        }
    }
    Session {
        id: audit_session,
        class: class.to_string(),
        remote_host,
        tty: tty.or_else(|| origin.and_then(|o| o.tty)),
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
