//! A shutdown request as people read it: the caller's process state and login session from
//! /proc, the operation (exec, reboot(2), a logind call), the command line and the verb it asks
//! for, for refusal messages and incidents.

use guardrail_common::*;

use super::cstr;
use crate::host::procinfo;

pub(super) fn stat_of(pid: u32) -> Option<(char, u32, u32)> {
    let s = procinfo::stat(pid)?;
    Some((s.state, s.ppid, s.pgrp))
}

pub(super) fn state_of(pid: u32) -> Option<char> {
    stat_of(pid).map(|s| s.0)
}

pub(super) fn session_of(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/sessionid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

pub(super) fn session_text(s: u32) -> String {
    if s == AUDIT_SESSION_UNSET {
        "none".to_string()
    } else {
        s.to_string()
    }
}

pub(super) fn op_name(op: u32) -> &'static str {
    match op {
        SD_OP_EXEC => "exec",
        SD_OP_REBOOT => "reboot(2) (CAP_SYS_BOOT)",
        SD_OP_SYSRQ => "write to /proc/sysrq-trigger",
        SD_OP_SIGNAL => "signal to PID 1",
        _ => "shutdown",
    }
}

/// The request as the user typed it and the verb of "To VERB HOST".
pub(super) fn request_text(ev: &ShutdownEvent) -> (String, String) {
    match ev.op {
        SD_OP_EXEC => {
            let mut words: Vec<String> = ev
                .words
                .iter()
                .map(|w| cstr(w))
                .take_while(|w| !w.is_empty())
                .collect();
            // The kernel keeps the tail of argv[0]; the message names the program.
            if let Some(first) = words.first_mut()
                && let Some((_, base)) = first.rsplit_once('/')
            {
                *first = base.to_string();
            }
            // A dedicated command is named by itself ("reboot"); a multi-call one by its verb
            // and target ("systemctl reboot -i", "init 0").
            let cmd = match words.first().map(String::as_str) {
                None => cstr(&ev.comm),
                Some("systemctl" | "init" | "telinit") => words.join(" "),
                Some(first) => first.to_string(),
            };
            (cmd, verb_of(&words))
        }
        SD_OP_REBOOT => (
            format!("reboot(2) by {}", cstr(&ev.comm)),
            "shut down".into(),
        ),
        SD_OP_SYSRQ => (
            format!("{} writing /proc/sysrq-trigger", cstr(&ev.comm)),
            "shut down".into(),
        ),
        SD_OP_SIGNAL => (
            format!("{}: signal {} to PID 1", cstr(&ev.comm), ev.signal),
            "shut down".into(),
        ),
        _ => (cstr(&ev.comm), "shut down".into()),
    }
}

pub(super) fn verb_of(words: &[String]) -> String {
    let v = |w: &str| -> Option<&'static str> {
        let w = w.trim_end_matches(".target");
        Some(match w {
            "reboot" | "kexec" | "soft-reboot" | "runlevel6" | "6" | "ctrl-alt-del" => "reboot",
            "poweroff" | "runlevel0" | "0" => "power off",
            "halt" => "halt",
            "shutdown" => "shut down",
            "suspend" | "hibernate" | "hybrid-sleep" | "suspend-then-hibernate" => "suspend",
            _ => return None,
        })
    };
    let first = words.first().map(String::as_str).unwrap_or("");
    if matches!(first, "systemctl" | "init" | "telinit") {
        if let Some(x) = words[1..]
            .iter()
            .filter(|w| !w.starts_with('-'))
            .find_map(|w| v(w))
        {
            return x.to_string();
        }
    } else if let Some(x) = v(first) {
        return x.to_string();
    }
    "shut down".to_string()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::guards::shutdown::window_text;

    #[test]
    pub(super) fn verbs_follow_the_command() {
        let w = |s: &str| s.split(' ').map(str::to_string).collect::<Vec<_>>();
        assert_eq!(verb_of(&w("reboot")), "reboot");
        assert_eq!(verb_of(&w("poweroff -f")), "power off");
        assert_eq!(verb_of(&w("systemctl -i poweroff")), "power off");
        assert_eq!(verb_of(&w("systemctl isolate runlevel6.target")), "reboot");
        assert_eq!(verb_of(&w("init 0")), "power off");
        assert_eq!(verb_of(&w("my-fleet-job")), "shut down");
        assert_eq!(window_text(Duration::from_secs(120)), "2 minutes");
        assert_eq!(window_text(Duration::from_secs(90)), "90 seconds");
    }
}
