//! The packages on systemd: the .deb installed with dpkg (its maintainer scripts start the unit),
//! removed with `dpkg -r` (nothing stays attached), and the .rpm's scriptlets after a purge.
use std::{path::Path, time::Duration};

use anyhow::{Context, Result, ensure};

use super::check_active_lsm;
use super::shutdown::{inhibitor_line, wait_inhibitor};
use crate::sysvm::machine::{Vm, output_text};

/// Uploads the .deb and installs it with dpkg (its maintainer scripts enable and start the
/// unit); the installed binary must name its commit.
pub fn install(vm: &mut Vm, deb: &Path) -> Result<()> {
    vm.upload(deb, "/tmp/guardrail.deb")?;
    let out = vm.ssh("sudo DEBIAN_FRONTEND=noninteractive dpkg -i /tmp/guardrail.deb 2>&1")?;
    for line in out.lines() {
        println!("sysvm:      {line}");
    }
    let version = vm.ssh("guardrail --version")?;
    println!("sysvm:      {}", version.trim());
    ensure!(
        !version.contains("unknown commit"),
        "--version names no commit"
    );
    Ok(())
}

/// The .rpm's scriptlets on a real systemd (the .deb purged first): %post enables and starts
/// the unit, %preun stops and disables it. Debian's rpm warns that it is not Debian's package
/// manager; --nodeps because its database knows nothing of Debian's packages (/usr/bin/kill).
pub fn rpm_on_systemd(vm: &mut Vm, rpm: &Path) -> Result<()> {
    vm.ssh("sudo DEBIAN_FRONTEND=noninteractive dpkg -P guardrail")?;
    vm.ssh("! test -e /etc/guardrail/policy.toml && ! test -e /var/lib/guardrail && ! test -e /var/log/guardrail")
        .context("dpkg -P left the conffile or the state directories")?;
    vm.upload(rpm, "/tmp/guardrail.rpm")?;
    let rpm_cmd = "sudo rpm --dbpath /var/lib/rpm";
    vm.ssh(&format!("{rpm_cmd} -i --nodeps /tmp/guardrail.rpm"))?;
    let verify = vm.ssh_output(&format!("{rpm_cmd} -V --nodeps guardrail"), None)?;
    ensure!(
        verify.status.success(),
        "rpm -V guardrail: {}",
        output_text(&verify)
    );
    vm.ssh("systemctl is-enabled guardrail")
        .context("the .rpm's %post did not enable the unit")?;
    check_active_lsm(vm).context("the .rpm's %post did not start the unit")?;
    wait_inhibitor(vm, Duration::from_secs(10))?;
    vm.ssh(&format!("{rpm_cmd} -e guardrail"))?;
    let state = vm.ssh_output("systemctl is-active guardrail", None)?;
    let state = String::from_utf8_lossy(&state.stdout).trim().to_string();
    ensure!(state != "active", "guardrail is still active after rpm -e");
    let after = vm.ssh("sudo bpftool prog show")?;
    for name in PROGRAM_NAMES {
        ensure!(
            !after.contains(name),
            "{name} is still attached after rpm -e:\n{after}"
        );
    }
    vm.ssh("! test -e /usr/bin/guardrail && ! test -e /usr/lib/systemd/system/guardrail.service")
        .context("rpm -e left the package's files")?;
    Ok(())
}

/// The names of the kernel programs (bpftool shows at most 15 characters).
const PROGRAM_NAMES: &[&str] = &["inode_unlink", "inode_rmdir", "inode_rename"];

pub fn remove_package(vm: &mut Vm) -> Result<()> {
    let before = vm.ssh("sudo bpftool prog show")?;
    for name in PROGRAM_NAMES {
        ensure!(
            before.contains(name),
            "{name} is not attached before removal (so the check after it proves nothing):\n{before}"
        );
    }
    // With the agent dead: SIGKILL (no clean-up of its own), then `systemctl stop` so systemd does
    // not restart it. Its programs stay pinned and enforcing; the package's prerm must switch
    // them off (`guardrail off`), as nothing else will.
    vm.ssh("sudo systemctl kill --signal=SIGKILL --kill-whom=main guardrail && sleep 0.5 && sudo systemctl stop guardrail")?;
    let pinned = vm.ssh("sudo bpftool prog show")?;
    ensure!(
        PROGRAM_NAMES.iter().all(|n| pinned.contains(n)),
        "the programs did not stay pinned after the agent was killed (so removal proves nothing):\n{pinned}"
    );
    ensure!(
        !vm.ssh_output("pgrep -x guardrail", None)?.status.success(),
        "the agent still runs after SIGKILL and stop"
    );
    let out = vm.ssh("sudo DEBIAN_FRONTEND=noninteractive dpkg -r guardrail 2>&1")?;
    for line in out.lines() {
        println!("sysvm:      {line}");
    }
    vm.ssh("! test -e /sys/fs/bpf/guardrail")
        .context("dpkg -r with the agent dead left /sys/fs/bpf/guardrail")?;
    let state = vm.ssh_output("systemctl is-active guardrail", None)?;
    let state = String::from_utf8_lossy(&state.stdout).trim().to_string();
    ensure!(state != "active", "guardrail is still active after dpkg -r");
    let after = vm.ssh("sudo bpftool prog show")?;
    for name in PROGRAM_NAMES {
        ensure!(
            !after.contains(name),
            "{name} is still attached after dpkg -r:\n{after}"
        );
    }
    let procs = vm.ssh_output("pgrep -x guardrail", None)?;
    ensure!(
        !procs.status.success(),
        "a guardrail process survived dpkg -r: {}",
        String::from_utf8_lossy(&procs.stdout)
    );
    // The logind lock goes with the agent.
    let list = vm.ssh("systemd-inhibit --list")?;
    ensure!(
        inhibitor_line(&list).is_none(),
        "guardrail's logind inhibitor outlived the agent:\n{list}"
    );
    // The conffile stays until purge, as Debian policy wants.
    vm.ssh("test -f /etc/guardrail/policy.toml")?;
    Ok(())
}
