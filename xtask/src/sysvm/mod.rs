//! `cargo xtask sysvm`: the package on a booted Debian 12 system, tested over real SSH.
//!
//! 1. A Debian 12 root filesystem is built with debootstrap from the mirror apt uses here
//!    (systemd, openssh-server, sudo, rsyslog, the kernel, ...), configured (a sudo-capable user
//!    `tester` with a key generated here, networkd, a scratch-root toolbox), and turned into an
//!    ext4 image with `mkfs.ext4 -d` (no mount needed). Image, kernel, initrd and key are cached
//!    in `~/.cache/guardrail-sysvm/image-<hash>`, where the hash covers everything the image is
//!    built from (`image_inputs` in [`image`]): a change of the package list or of the
//!    configuration rebuilds it, nothing else does.
//! 2. Each run boots a throwaway qcow2 overlay of that image under qemu TCG (KVM hangs on these
//!    machines) with `lsm=...,bpf`, the kernel and initrd of the image, and the VM's sshd
//!    forwarded to a free loopback port.
//! 3. Over SSH as `tester` (sudo without a password) it installs the .deb built by
//!    `cargo xtask package` with dpkg, so the real maintainer scripts enable and start the unit,
//!    and runs the checks of [`run_checks`]. The runaway `rm -rf "$X/"*` only ever runs inside a
//!    chroot made for it in the VM.
//!
//! qemu is the only process started besides ssh; it is killed by its PID when the run ends.
//!
//! The parts: [`image`] (the cached image), [`machine`] (the booted VM and SSH), [`checks`] (what
//! is tested, by subject); qemu plumbing shared with `cargo xtask vm` is in [`crate::qemu`].
mod checks;
mod image;
mod machine;

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, Result, ensure};

use crate::apt_install;
use crate::qemu::tail_file as tail;
use checks::check_active_lsm;
use checks::deletion::{
    never_held_service, restart_during_hold, runaway_approved, runaway_denied, systemd_churn,
    upgrade_during_hold,
};
use checks::packaging::{install, remove_package, rpm_on_systemd};
use checks::shutdown::{
    argv_evasions_refused, confirmed_reboot, logind_inhibitor, shutdowns_refused,
};
use image::ensure_image;
use machine::{Vm, output_text};

/// Host tools: debootstrap builds the rootfs, qemu-img the overlay, e2fsprogs the image.
const HOST_PACKAGES: &[&str] = &[
    "debootstrap",
    "qemu-utils",
    "qemu-system-x86",
    "e2fsprogs",
    "openssh-client",
];
const USER: &str = "tester";
/// The VM's host name (CONFIGURE_SCRIPT), the name `guardrail confirm` wants.
const HOST: &str = "guardrail-vm";

#[derive(Debug, Clone, clap::Args)]
pub struct SysVmCli {
    /// Image cache [default: $GUARDRAIL_SYSVM_CACHE_DIR, $XDG_CACHE_HOME/guardrail-sysvm or
    /// ~/.cache/guardrail-sysvm].
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Use this .deb instead of building one with `cargo xtask package`.
    #[arg(long)]
    pub deb: Option<PathBuf>,
    /// Use this .rpm (its scriptlets are run on the VM's systemd after the .deb is purged);
    /// with `--deb` and no `--rpm`, that step is skipped.
    #[arg(long)]
    pub rpm: Option<PathBuf>,
    /// Overall limit for booting and checking (the image build is not counted).
    #[arg(long, default_value = "1200")]
    pub timeout_secs: u64,
    #[arg(long, default_value = "2048")]
    pub memory_mb: u32,
    /// Guest CPUs (TCG runs one host thread per CPU; more than one can stall the guest in
    /// cross-CPU waits when the host is busy).
    #[arg(long, default_value = "1")]
    pub cpus: u32,
    /// Keep the VM running after the checks, passed or failed (prints the ssh command; Ctrl-C
    /// ends it).
    #[arg(long)]
    pub keep: bool,
    /// Run only the steps whose name contains one of these (repeatable), besides installing
    /// the .deb: for iterating on one check. A full run is what counts.
    #[arg(long)]
    pub only: Vec<String>,
}

/// `GUARDRAIL_SYSVM_CACHE_DIR`, else $XDG_CACHE_HOME/guardrail-sysvm, else
/// ~/.cache/guardrail-sysvm. (Two checkouts whose images differ each rebuild the one image a
/// cache holds: give one of them its own cache.)
pub fn default_cache_dir() -> Result<PathBuf> {
    if let Some(dir) =
        std::env::var_os("GUARDRAIL_SYSVM_CACHE_DIR").filter(|v| Path::new(v).is_absolute())
    {
        return Ok(PathBuf::from(dir));
    }
    crate::qemu::cache_dir("guardrail-sysvm")
}

pub fn cli_main(args: SysVmCli) -> Result<()> {
    let t = Instant::now();
    let (deb, rpm) = match args.deb {
        Some(d) => (d, args.rpm),
        None => {
            let built = crate::package::package()?;
            (built.deb, Some(args.rpm.unwrap_or(built.rpm)))
        }
    };
    setup_host()?;
    let cache = match args.cache_dir {
        // debootstrap wants an absolute --cache-dir.
        Some(d) => std::path::absolute(&d)?,
        None => default_cache_dir()?,
    };
    let t_image = Instant::now();
    let image = ensure_image(&cache)?;
    let image_secs = t_image.elapsed().as_secs_f64();
    let t_vm = Instant::now();
    let mut vm = Vm::boot(&image, &cache, args.memory_mb, args.cpus, args.timeout_secs)?;
    let result = run_checks(&mut vm, &deb, rpm.as_deref(), &args.only);
    let vm_secs = t_vm.elapsed().as_secs_f64();
    if let Err(e) = &result {
        println!("sysvm: FAILED: {e:#}");
        // What the VM looked like, if it still answers: processes and the agent's journal.
        if let Ok(out) = vm.ssh_output(
            "ps -eo pid,ppid,pgid,sid,stat,tty,args --forest | grep -v ' \\[' ; \
             sudo journalctl -u guardrail --no-pager | tail -n 30",
            None,
        ) {
            println!("sysvm: the VM's processes and the agent's journal:");
            for line in output_text(&out).lines() {
                println!("    {line}");
            }
        }
        println!("sysvm: last console lines ({}):", vm.console.display());
        for line in tail(&vm.console, 30) {
            println!("    {line}");
        }
    }
    if args.keep {
        // Also after a failure: the VM as the failing check left it, to look around.
        println!(
            "sysvm: VM kept running: {} (Ctrl-C ends it)",
            vm.ssh_command_line()
        );
        let _ = vm.qemu.wait();
    }
    drop(vm);
    println!(
        "sysvm: image {image_secs:.0}s, VM {vm_secs:.0}s, total {:.0}s",
        t.elapsed().as_secs_f64()
    );
    result
}

fn setup_host() -> Result<()> {
    apt_install("sysvm", HOST_PACKAGES)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The checks

/// Named steps, run in order; the first failure ends the run.
pub fn run_checks(vm: &mut Vm, deb: &Path, rpm: Option<&Path>, only: &[String]) -> Result<()> {
    let t = Instant::now();
    let mut step = |name: &str, f: &mut dyn FnMut(&mut Vm) -> Result<()>| -> Result<()> {
        let wanted = only.is_empty()
            || name.starts_with("install the .deb")
            || only.iter().any(|o| name.contains(o.as_str()));
        if !wanted {
            println!("sysvm: skip {name} (--only)");
            return Ok(());
        }
        let s = Instant::now();
        f(vm).with_context(|| format!("step `{name}`"))?;
        println!("sysvm: ok   {name} ({:.0}s)", s.elapsed().as_secs_f64());
        Ok(())
    };
    step("install the .deb with dpkg", &mut |vm| install(vm, deb))?;
    step("service active, tier lsm", &mut check_active_lsm)?;
    step("unit verifies on the target", &mut |vm| {
        // --man=no: the image has no man-db (a minimal server); the page is checked below.
        let out = vm.ssh_output("systemd-analyze verify --man=no guardrail.service", None)?;
        let msg = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            out.status.success() && msg.trim().is_empty(),
            "systemd-analyze verify: {}",
            msg.trim()
        );
        vm.ssh("test -s /usr/share/man/man1/guardrail.1.gz")?;
        let sec = vm.ssh("systemd-analyze security guardrail.service --no-pager | tail -n 1")?;
        println!("sysvm:      systemd-analyze security: {}", sec.trim());
        Ok(())
    })?;
    step(
        "runaway rm held at the budget, approve finishes it",
        &mut runaway_approved,
    )?;
    step(
        "runaway rm held at the budget, deny ends it",
        &mut runaway_denied,
    )?;
    step("rsyslog has the agent's lines", &mut |vm| {
        let lines = vm.ssh("sudo grep -a 'guardrail' /var/log/syslog")?;
        for want in ["tier lsm in force", "approved", "denied"] {
            ensure!(
                lines.lines().any(|l| l.contains(want)),
                "no line with {want:?} in /var/log/syslog; its guardrail lines:\n{lines}"
            );
        }
        Ok(())
    })?;
    step(
        "systemd's own churn (500 transient services) is never held",
        &mut systemd_churn,
    )?;
    step("logrotate and reload reopen the event log", &mut |vm| {
        vm.ssh(
            "sudo logrotate --force /etc/logrotate.d/guardrail && \
             sudo test -e /var/log/guardrail/events.jsonl.1",
        )?;
        // SIGHUP also re-reads the policy: its policy_reloaded event in the new file proves
        // the agent reopened it.
        vm.ssh("sudo systemctl reload guardrail")?;
        vm.ssh(
            "for i in $(seq 30); do \
               sudo grep -q policy_reloaded /var/log/guardrail/events.jsonl && exit 0; sleep 1; \
             done; exit 1",
        )
        .context("no policy_reloaded event in the new events.jsonl")?;
        vm.ssh("systemctl is-active guardrail")?;
        Ok(())
    })?;
    step("systemctl restart", &mut |vm| {
        vm.ssh("sudo systemctl restart guardrail")?;
        check_active_lsm(vm)
    })?;
    step(
        "systemctl restart during a hold keeps it held",
        &mut restart_during_hold,
    )?;
    step(
        "package upgrade (dpkg -i over the installed package) during a hold keeps it held",
        &mut upgrade_during_hold,
    )?;
    step(
        "a never_hold service is continued at its budget, the rest refused",
        &mut never_held_service,
    )?;
    // The shutdown guard over this SSH session: logind says REMOTE=yes for it.
    step(
        "shutdown requests over ssh refused, the VM keeps running",
        &mut shutdowns_refused,
    )?;
    step(
        "shutdown argv evasions over ssh refused (options, -c -r, exec -a, 32-bit)",
        &mut argv_evasions_refused,
    )?;
    step(
        "logind block inhibitor refuses D-Bus reboots, released for a pass",
        &mut logind_inhibitor,
    )?;
    step(
        "guardrail confirm: wrong name refused, right name lets reboot through",
        &mut confirmed_reboot,
    )?;
    step(
        "dpkg -r with the agent killed leaves nothing attached",
        &mut remove_package,
    )?;
    match rpm {
        Some(rpm) => step(
            "the .rpm on systemd: rpm -i starts it, rpm -e stops it",
            &mut |vm| rpm_on_systemd(vm, rpm),
        )?,
        None => println!("sysvm: skip the .rpm on systemd (--deb without --rpm)"),
    }
    println!(
        "sysvm: all checks passed in {:.0}s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
