//! The admin CLI talks to the daemon over a Unix socket: one JSON request line, one JSON
//! response line. The daemon checks the caller's credentials (SO_PEERCRED, SO_PEERGROUPS,
//! SO_PEERPIDFD) itself; see `control.rs` for the server side.
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

/// The longest request line the daemon reads (newline included). Every real request is well
/// under 200 bytes; anything longer is refused and the connection closed, so a client cannot make
/// the daemon buffer more than this.
pub const MAX_REQUEST: usize = 4096;

/// Why a request line was not understood. The text goes back to the client only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("request longer than {MAX_REQUEST} bytes")]
    TooLong,
    #[error("empty request")]
    Empty,
    #[error("the request is not UTF-8")]
    NotUtf8,
    #[error("more than one line in the request")]
    MultipleLines,
    #[error("malformed request: {0}")]
    Malformed(String),
}

/// The one place a request line becomes a [`Request`]: `line` is what the client sent, with or
/// without its final newline. Pure, total and panic-free on any bytes (property-tested below).
pub fn decode_request(line: &[u8]) -> Result<Request, DecodeError> {
    if line.len() > MAX_REQUEST {
        return Err(DecodeError::TooLong);
    }
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.contains(&b'\n') {
        return Err(DecodeError::MultipleLines);
    }
    let text = std::str::from_utf8(line).map_err(|_| DecodeError::NotUtf8)?;
    if text.trim().is_empty() {
        return Err(DecodeError::Empty);
    }
    serde_json::from_str::<Request>(text).map_err(|e| {
        // serde quotes the offending input (`unknown variant "..."`): keep the answer short.
        let mut msg = e.to_string();
        if msg.len() > 200 {
            let mut end = 200;
            while !msg.is_char_boundary(end) {
                end -= 1;
            }
            msg.truncate(end);
            msg.push('…');
        }
        DecodeError::Malformed(msg)
    })
}

/// The request line the CLI sends for `req`, newline included.
pub fn encode_request(req: &Request) -> String {
    // A Request has no map with non-string keys and no float: serialising cannot fail.
    let mut line = serde_json::to_string(req).unwrap_or_default();
    line.push('\n');
    line
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// `guardrail approve` with no id: the open holds of the caller's own audit session (the
    /// daemon finds it through the caller's pidfd; nothing the client says counts).
    SessionHolds,
    /// `guardrail confirm HOST`: one shutdown pass for the caller's audit session (the daemon
    /// checks `session` against the caller's own, found through its pidfd, SO_PEERPIDFD).
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
    /// As [`crate::incident::Incident::total_count`].
    #[serde(default)]
    pub total_count: u64,
    /// As [`crate::incident::Incident::earlier_approvals`].
    #[serde(default)]
    pub earlier_approvals: Vec<crate::incident::EarlierApproval>,
    /// The audit session of the job's process that crossed (None: it had none).
    #[serde(default)]
    pub audit_session: Option<u32>,
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
    /// How held jobs and refused shutdown callers are told ("" from agents that predate it).
    #[serde(default)]
    pub job_messages: String,
    /// Set when the caller is neither root nor in the `guardrail` group: holds and sessions
    /// are the caller's own only, and this says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filtered: Option<String>,
    /// How the agent tells which audit session a `guardrail confirm` comes from (pidfd, or
    /// only the pid on kernels without SO_PEERPIDFD).
    #[serde(default)]
    pub caller_check: String,
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
    Holds {
        holds: Vec<HoldInfo>,
        /// As in [`StatusInfo::filtered`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        filtered: Option<String>,
    },
    Done {
        message: String,
    },
    Error {
        message: String,
    },
}

/// Sends one request to the daemon and returns its answer.
pub fn call(socket: &Path, req: &Request) -> Result<Response> {
    let stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to the guardrail agent at {} (is `guardrail agent` running?)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let line = encode_request(req);
    // An agent that turns the connection away (too many open) answers before reading: its
    // reason is worth more than our EPIPE.
    let wrote = (&stream).write_all(line.as_bytes());
    let mut answer = String::new();
    let read = BufReader::new(&stream).read_line(&mut answer);
    if answer.is_empty() {
        wrote.with_context(|| format!("writing to {}", socket.display()))?;
    }
    read.with_context(|| format!("reading the answer from {}", socket.display()))?;
    if answer.is_empty() {
        bail!(
            "the agent at {} closed the connection without answering",
            socket.display()
        );
    }
    serde_json::from_str(&answer)
        .with_context(|| format!("malformed answer from the agent: {answer}"))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn request() -> impl Strategy<Value = Request> {
        prop_oneof![
            Just(Request::Status),
            Just(Request::Holds),
            Just(Request::Reload),
            Just(Request::SessionHolds),
            (
                any::<u64>(),
                proptest::option::of(any::<u64>()),
                any::<bool>()
            )
                .prop_map(|(id, budget, for_job)| Request::Approve {
                    id,
                    budget,
                    for_job
                }),
            any::<u64>().prop_map(|id| Request::Deny { id }),
            (".{0,80}", any::<u32>())
                .prop_map(|(host, session)| Request::Confirm { host, session }),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..6000)) {
            let r = decode_request(&bytes);
            if bytes.len() > MAX_REQUEST {
                prop_assert_eq!(r, Err(DecodeError::TooLong));
            }
        }

        #[test]
        fn json_like_text_never_panics(s in r#"\{"request":"[a-z_]{0,12}"(,"[a-z_]{1,8}":[-0-9a-z"\[\]{}.]{0,20}){0,4}\}"#) {
            let _ = decode_request(s.as_bytes());
        }

        #[test]
        fn every_request_round_trips(req in request()) {
            let line = encode_request(&req);
            prop_assert!(line.len() <= MAX_REQUEST);
            prop_assert_eq!(decode_request(line.as_bytes()), Ok(req.clone()));
            // Without its newline too (a client that sends the line and shuts down).
            prop_assert_eq!(decode_request(line.trim_end().as_bytes()), Ok(req));
        }

        #[test]
        fn over_long_input_is_rejected(pad in MAX_REQUEST - 20..MAX_REQUEST * 4) {
            // A valid request padded with spaces past the cap is still refused: the cap is on
            // bytes, not on what they mean.
            let mut line = String::from(r#"{"request":"status""#);
            line.push_str(&" ".repeat(pad));
            line.push('}');
            let r = decode_request(line.as_bytes());
            if line.len() > MAX_REQUEST {
                prop_assert_eq!(r, Err(DecodeError::TooLong));
            } else {
                prop_assert_eq!(r, Ok(Request::Status));
            }
        }
    }

    #[test]
    fn known_bad_lines_get_clear_errors() {
        assert_eq!(decode_request(b""), Err(DecodeError::Empty));
        assert_eq!(decode_request(b"\n"), Err(DecodeError::Empty));
        assert_eq!(decode_request(b"\xff\n"), Err(DecodeError::NotUtf8));
        assert_eq!(
            decode_request(b"{\"request\":\"status\"}\n{}\n"),
            Err(DecodeError::MultipleLines)
        );
        let e = decode_request(b"{\"request\":\"format_disk\"}").expect_err("unknown request");
        assert!(
            e.to_string()
                .starts_with("malformed request: unknown variant"),
            "{e}"
        );
        assert_eq!(
            decode_request(b"{\"request\":\"deny\",\"id\":7}\r\n"),
            Ok(Request::Deny { id: 7 })
        );
    }
}
