//! The agent's answers to admin requests on the socket: each request checked against the
//! caller's credentials, then handed to the guard it concerns; and `status`.
use std::time::Instant;

use crate::{
    control::{
        ipc::{Request, Response, StatusInfo},
        server as control,
    },
    daemon::Agent,
    incident::Outcome,
    tiers::backend::Backend,
};

impl Agent {
    /// One admin request, from `peer` (credentials from the kernel, see control.rs). Returns at
    /// once: nothing here waits on the client.
    pub(crate) fn answer(
        &mut self,
        req: Request,
        peer: &control::Peer,
        gate: &mut control::Gate,
        server: &control::Server,
    ) -> Response {
        let admin = gate.is_admin(peer);
        let what = match &req {
            Request::Approve { id, .. } => Some(format!("approve incident {id}")),
            Request::Deny { id } => Some(format!("deny incident {id}")),
            Request::Confirm { .. } => Some("confirm a shutdown".to_string()),
            _ => None,
        };
        if let Some(what) = &what
            && !admin
        {
            let verb = what.split(' ').next().unwrap_or("this");
            if gate.log_refusal(peer.uid, Instant::now()) {
                self.sink.agent_event(
                    "request_refused",
                    &format!(
                        "{} asked to {what}: refused, not root nor in the {} group",
                        peer.describe(),
                        control::ADMIN_GROUP
                    ),
                );
            }
            return Response::Error {
                message: gate.refusal(verb),
            };
        }
        if matches!(req, Request::Reload) && peer.uid != 0 {
            return Response::Error {
                message: "only root may reload (try sudo)".into(),
            };
        }
        // What a caller who is not an admin sees: their own jobs and session only.
        let view = (!admin).then_some(peer);
        let result = match req {
            Request::Status => return Response::Status(Box::new(self.status(view, server))),
            Request::Holds => {
                return Response::Holds {
                    holds: self
                        .deletion
                        .hold_infos(&self.host, self.tier, view.map(|p| p.uid)),
                    filtered: view.map(|_| filtered_note()),
                };
            }
            Request::SessionHolds => {
                // Only the caller's own audit session, as the kernel reports it for the caller:
                // a process without one (a service, cron without pam_loginuid) gets none.
                let mine = peer.session_id();
                let mut holds =
                    self.deletion
                        .hold_infos(&self.host, self.tier, view.map(|p| p.uid));
                holds.retain(|h| mine.is_some() && h.audit_session == mine);
                let note = match mine {
                    Some(s) => format!("only the holds of your audit session ({s}) are shown"),
                    None => "your process has no audit session (not started from a login), so no hold is yours to pick: name one, `guardrail approve ID` (see `guardrail holds`)".to_string(),
                };
                return Response::Holds {
                    holds,
                    filtered: Some(note),
                };
            }
            Request::Approve {
                id,
                budget,
                for_job,
            } => self.with_deletion(|g, cx| g.approve(cx, id, budget, for_job, peer)),
            Request::Deny { id } => {
                let by = format!("uid {}", peer.uid);
                self.with_deletion(|g, cx| g.deny(cx, id, Outcome::Denied, &by, Some(peer)))
            }
            Request::Confirm { host, session } => {
                if let Err(e) = gate.take_confirm(peer.uid, Instant::now()) {
                    if gate.log_refusal(peer.uid, Instant::now()) {
                        self.sink.agent_event(
                            "request_refused",
                            &format!("{} asked to confirm a shutdown: {e}", peer.describe()),
                        );
                    }
                    return Response::Error { message: e };
                }
                match &mut self.backend {
                    Backend::Bpf { sensor, .. } => {
                        self.shutdown
                            .confirm(&host, session, peer, sensor, &mut self.sink)
                    }
                    Backend::Userspace(_) => Err(anyhow::anyhow!(
                        "the shutdown guard needs BPF, and this host runs the userspace tier: nothing to confirm"
                    )),
                }
            }
            Request::Reload => {
                self.reload("guardrail reload");
                gate.refresh();
                match &self.last_reload_error {
                    None => Ok("policy reloaded".to_string()),
                    Some(e) => Err(anyhow::anyhow!(
                        "policy rejected, previous policy stays in force:\n{e}"
                    )),
                }
            }
        };
        match result {
            Ok(message) => Response::Done { message },
            Err(e) => Response::Error {
                message: format!("{e:#}"),
            },
        }
    }
    /// `view`: the caller, when they may see only their own jobs and session.
    pub(crate) fn status(
        &self,
        view: Option<&control::Peer>,
        server: &control::Server,
    ) -> StatusInfo {
        let on_disk = self.source.fingerprint_on_disk();
        let mut sessions = self.shutdown.sessions();
        if let Some(p) = view {
            sessions.retain(|s| Some(s.id) == p.session_id());
        }
        StatusInfo {
            host: self.host.clone(),
            version: crate::VERSION.to_string(),
            tier: self.tier.to_string(),
            why: self.why.clone(),
            gaps: self.tier.gaps().iter().map(|s| s.to_string()).collect(),
            mode: self.policy.mode_name().to_string(),
            policy_source: self.source.describe(),
            policy_in_force: self.policy.fingerprint.clone(),
            policy_on_disk_differs: on_disk.is_some_and(|f| f != self.policy.fingerprint),
            last_reload_error: self.last_reload_error.clone(),
            policy_fallback: self.policy_fallback.clone(),
            attached: self.backend.attached(),
            holds: self
                .deletion
                .hold_infos(&self.host, self.tier, view.map(|p| p.uid)),
            sessions,
            shutdown_inhibitor: self.shutdown.inhibitor_status(),
            job_messages: crate::guards::tell::status(),
            filtered: view.map(|_| filtered_note()),
            caller_check: server.caller_check(),
        }
    }
}

/// What `status` and `holds` say to a caller who is neither root nor in the admin group.
fn filtered_note() -> String {
    format!(
        "only your own jobs and session are shown (not root, not in the {} group)",
        control::ADMIN_GROUP
    )
}
