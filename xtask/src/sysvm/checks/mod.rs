//! The checks of [`super::run_checks`], by subject: [`deletion`] (runaway deletions held,
//! approved, denied, kept across restarts and upgrades), [`shutdown`] (remote shutdowns refused,
//! logind's inhibitor, confirmed reboot), [`packaging`] (install, remove, the .rpm).
pub(super) mod deletion;
pub(super) mod packaging;
pub(super) mod shutdown;

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, bail, ensure};

use super::machine::Vm;

/// The unit is active (READY=1 came) and `guardrail status` says tier lsm.
pub(super) fn check_active_lsm(vm: &mut Vm) -> Result<()> {
    // Type=notify: `active` means READY=1 came, i.e. the programs are attached. Right after a
    // boot sshd answers before that (attaching takes seconds under TCG): wait out `activating`,
    // as long as the unit's TimeoutStartSec.
    let t = Instant::now();
    let state = loop {
        let active = vm.ssh_output("systemctl is-active guardrail", None)?;
        let state = String::from_utf8_lossy(&active.stdout).trim().to_string();
        if state != "activating" || t.elapsed() > Duration::from_secs(120) {
            break state;
        }
        thread::sleep(Duration::from_secs(2));
    };
    if state != "active" {
        let status = vm.ssh_output(
            "systemctl status guardrail --no-pager; sudo journalctl -u guardrail --no-pager | tail -n 40",
            None,
        )?;
        bail!(
            "systemctl is-active guardrail: {state}\n{}",
            String::from_utf8_lossy(&status.stdout)
        );
    }
    let status = vm.ssh("sudo guardrail status")?;
    ensure!(
        status
            .lines()
            .any(|l| l.starts_with("tier:") && l.contains(" lsm ")),
        "guardrail status does not say tier lsm:\n{status}"
    );
    Ok(())
}
