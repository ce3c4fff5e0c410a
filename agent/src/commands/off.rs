//! `guardrail off`: the emergency switch. Refuses while an agent answers on its socket (stopping
//! the agent detaches everything itself), then removes the pinned programs and state.
use std::path::Path;

use crate::tiers::pins::switch_off;

/// `guardrail off`.
pub fn run(pin_dir: &Path, socket: &Path, force: bool) -> anyhow::Result<std::process::ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!("guardrail off needs root (try sudo)");
    }
    if !force && crate::control::ipc::call(socket, &crate::control::ipc::Request::Holds).is_ok() {
        anyhow::bail!(
            "an agent is running (it answers on {}): stop it first (`systemctl stop guardrail`, which detaches everything), or say --force",
            socket.display()
        );
    }
    let r = switch_off(pin_dir);
    for l in &r.lines {
        println!("guardrail off: {l}");
    }
    for p in &r.problems {
        eprintln!("guardrail off: {p}");
    }
    Ok(if r.problems.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}
