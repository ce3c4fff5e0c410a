//! The `[shutdown]` section: the action per session class, the serial console's class, the
//! shutdown commands and the exceptions.
use super::{RawOwnersLike, V, defaults, quoted};
use crate::diag::Code;
use crate::model::*;
use crate::raw::*;

const SHUTDOWN: &[(&str, ShutdownAction)] = &[
    ("allow", ShutdownAction::Allow),
    ("confirm", ShutdownAction::Confirm),
    ("block", ShutdownAction::Block),
];

const SERIAL: &[(&str, SessionClass)] = &[
    ("local", SessionClass::Local),
    ("remote", SessionClass::Remote),
];

pub(super) fn validate_shutdown(s: &RawShutdown, v: &mut V<'_, '_, '_>) -> Shutdown {
    let remote = v.choice(
        &s.remote,
        "shutdown.remote",
        SHUTDOWN,
        ShutdownAction::Confirm,
    );
    let local = v.choice(&s.local, "shutdown.local", SHUTDOWN, ShutdownAction::Allow);
    let none = v.choice(&s.none, "shutdown.none", SHUTDOWN, ShutdownAction::Allow);
    let unknown = v.choice(
        &s.unknown,
        "shutdown.unknown",
        SHUTDOWN,
        ShutdownAction::Confirm,
    );
    let serial_console = v.choice(
        &s.serial_console,
        "shutdown.serial_console",
        SERIAL,
        SessionClass::Local,
    );
    let confirm_window = v.duration(
        &s.confirm_window,
        "shutdown.confirm_window",
        defaults::CONFIRM_WINDOW,
        MAX_CONFIRM_WINDOW,
    );
    let logind_inhibitor = s.logind_inhibitor.as_ref().is_none_or(|b| b.value);
    let mut commands = Vec::new();
    for c in s.commands.iter().flatten() {
        if let Some(p) = v.exe(c, "shutdown.commands")
            && !commands.contains(&p)
        {
            commands.push(p);
        }
    }
    let mut exceptions = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for e in s.exception.iter().flatten() {
        let name = v.name(&e.value.name, &e.span, "shutdown.exception");
        let label = name.clone().unwrap_or_else(|| "?".to_string());
        let field = format!("shutdown.exception[{label}]");
        if let (Some(n), Some(ns)) = (&name, &e.value.name) {
            if names.contains(n) {
                v.push(
                    Code::Duplicate,
                    &ns.span,
                    format!("two shutdown exceptions are named {}", quoted(n)),
                    "give each one its own name",
                );
            }
            names.push(n.clone());
        }
        let o = RawOwnersLike {
            units: e.value.units.as_ref(),
            executables: e.value.executables.as_ref(),
            users: None,
            cgroups: None,
        };
        let (who, _) = v.identities(Some(&o), &field);
        if who.is_empty() {
            v.push(
                Code::MatchesNothing,
                &e.span,
                format!("{field} names no unit or executable"),
                "list what may shut down, e.g. units = [\"unattended-upgrades.service\"]",
            );
        }
        if let Some(name) = name {
            exceptions.push(ShutdownException {
                name,
                units: who.units,
                executables: who.executables,
            });
        }
    }
    Shutdown {
        remote,
        local,
        none,
        unknown,
        serial_console,
        confirm_window,
        logind_inhibitor,
        commands,
        exceptions,
    }
}
