//! The admin CLI talks to the daemon over a Unix socket: one JSON request line, one JSON
//! response line. The daemon checks the caller's credentials (SO_PEERCRED) itself.
use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

pub const DEFAULT_SOCKET: &str = "/run/guardrail/guardrail.sock";

pub fn socket_path(explicit: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("GUARDRAIL_SOCKET").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    Status,
    Holds,
    Approve {
        id: u64,
        budget: Option<u64>,
        for_job: bool,
    },
    Deny {
        id: u64,
    },
    Reload,
    /// `guardrail confirm HOST`: one shutdown pass for the caller's audit session (the daemon
    /// checks `session` against the caller's own, found through SO_PEERCRED).
    Confirm {
        host: String,
        session: u32,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HoldInfo {
    pub id: u64,
    pub host: String,
    pub rule: String,
    pub pgid: u32,
    pub sid: u32,
    pub pids: Vec<u32>,
    pub user: String,
    pub uid: u32,
    pub command: String,
    pub count: u64,
    pub first_path: String,
    pub session: String,
    pub tier: String,
    pub reason: String,
    pub age_secs: u64,
    pub timeout_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusInfo {
    pub host: String,
    pub version: String,
    pub tier: String,
    pub why: String,
    pub gaps: Vec<String>,
    pub mode: String,
    pub policy_source: String,
    pub policy_in_force: String,
    pub policy_on_disk_differs: bool,
    pub last_reload_error: Option<String>,
    /// Why the policy in force is not the configured one: it had errors when the agent started,
    /// and the last good policy (or the embedded default) runs instead. None from older agents.
    #[serde(default)]
    pub policy_fallback: Option<String>,
    pub attached: Vec<String>,
    pub holds: Vec<HoldInfo>,
    /// Login sessions the shutdown guard has classified, by audit session id.
    #[serde(default)]
    pub sessions: Vec<SessionInfo>,
    /// Whether the logind block inhibitor on shutdown is held, and if not why ("" from agents
    /// that predate it).
    #[serde(default)]
    pub shutdown_inhibitor: String,
}

/// One classified login session, as `guardrail status` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionInfo {
    /// The kernel's audit session id (what `/proc/PID/sessionid` says).
    pub id: u32,
    /// remote, local, none or serial.
    pub class: String,
    /// "ssh 10.0.0.5", "a local session", ...
    pub origin: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum Response {
    Status(Box<StatusInfo>),
    Holds { holds: Vec<HoldInfo> },
    Done { message: String },
    Error { message: String },
}

/// Sends one request to the daemon and returns its answer.
pub fn call(socket: &Path, req: &Request) -> Result<Response> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to the guardrail agent at {} (is `guardrail agent` running?)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .with_context(|| format!("writing to {}", socket.display()))?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .with_context(|| format!("reading the answer from {}", socket.display()))?;
    if answer.is_empty() {
        bail!(
            "the agent at {} closed the connection without answering",
            socket.display()
        );
    }
    serde_json::from_str(&answer)
        .with_context(|| format!("malformed answer from the agent: {answer}"))
}
