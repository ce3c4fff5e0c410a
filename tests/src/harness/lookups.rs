//! What tests ask a running agent beyond the CLI: incidents in its event log, a hold that was not
//! there before, its exit.
use std::{os::unix::fs::PermissionsExt, time::Duration};

use serde_json::Value;

use crate::{Agent, proc_state, wait_until};

impl Agent {
    /// Every incident in the event log, oldest first.
    pub fn incidents(&self) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter_map(|e| e.get("incident").cloned())
            .collect()
    }

    /// The incidents whose `outcome` is `outcome`.
    pub fn incidents_with_outcome(&self, outcome: &str) -> Vec<Value> {
        self.incidents()
            .into_iter()
            .filter(|i| i["outcome"] == outcome)
            .collect()
    }

    /// The first incident `pred` accepts, waiting up to `timeout` for the agent to record it.
    pub fn wait_incident(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Option<Value> {
        let mut found = None;
        wait_until(timeout, || {
            found = self.incidents().into_iter().find(|i| pred(i));
            found.is_some()
        });
        found
    }

    /// The outcomes recorded for incident `id`, in order.
    pub fn outcomes_of(&self, id: u64) -> Vec<String> {
        self.incidents()
            .iter()
            .filter(|i| i["id"].as_u64() == Some(id))
            .filter_map(|i| i["outcome"].as_str().map(str::to_string))
            .collect()
    }

    /// The ids of the open holds.
    pub fn hold_ids(&self) -> Vec<u64> {
        self.holds()
            .iter()
            .filter_map(|h| h["id"].as_u64())
            .collect()
    }

    /// Waits (60 s at most) for an open hold whose id is not in `not`; returns its id.
    pub fn wait_new_hold(&self, not: &[u64]) -> u64 {
        let mut id = None;
        assert!(
            wait_until(Duration::from_secs(60), || {
                id = self.hold_ids().into_iter().find(|i| !not.contains(i));
                id.is_some()
            }),
            "a hold other than {not:?} within 60 s; agent log:\n{}",
            self.log()
        );
        id.expect("hold")
    }

    /// SIGTERM, then waits (20 s at most) until the agent has exited, without reaping it: its
    /// event log and output (in its temporary directory, removed when the `Agent` goes) can still
    /// be read. [`Agent::stop`] reaps it and gives the exit status instead.
    pub fn sigterm_and_wait(&self) {
        let pid = self.pid();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
        let exited = wait_until(Duration::from_secs(20), || {
            proc_state(pid).is_none_or(|c| c == 'Z')
        });
        assert!(exited, "the agent exits within 20 s of SIGTERM");
    }

    /// Lets other users (nobody) reach the agent's socket: the harness makes its directory 0700.
    pub fn open_to_others(&self) {
        std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o711))
            .expect("chmod the agent's directory");
    }
}

/// The BPF program ids an agent printed at start-up ("guardrail: program ids ..."), from its
/// output `log` (kept by the caller: the output goes with the `Agent`).
pub fn program_ids(log: &str) -> Vec<String> {
    log.lines()
        .find_map(|l| l.strip_prefix("guardrail: program ids "))
        .expect("the agent prints its program ids")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}
