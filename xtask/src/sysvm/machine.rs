//! The booted systemd VM ([`Vm`]): qemu on a throwaway qcow2 overlay of the image, sshd forwarded
//! to a free loopback port; commands, uploads and background jobs over SSH as the test user; a
//! reboot the guest was asked for is followed by a new boot of the same disk.
use std::{
    fs,
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use super::USER;
use super::image::Image;
use crate::qemu::{Boot, ChildGuard, QEMU, TempDir, free_port, prune_logs, tail_file as tail};
use crate::run_cmd;

/// BPF LSM is only active when `bpf` is in the boot-time LSM list; Debian's default omits it.
const KERNEL_CMDLINE: &str = "console=ttyS0 root=/dev/vda rw net.ifnames=0 \
     lsm=lockdown,capability,landlock,yama,bpf systemd.show_status=false";

/// Fields drop in order: qemu is killed (if still running) before the overlay's directory goes.
pub struct Vm {
    /// Only the qemu we started, killed by its PID when the run ends.
    pub(super) qemu: ChildGuard,
    port: u16,
    key: PathBuf,
    /// The serial console of the current boot, written by qemu.
    pub console: PathBuf,
    deadline: Instant,
    /// What a boot needs again after a reboot (same overlay: the installed package stays).
    boot: BootConfig,
    boots: u32,
    _work: TempDir,
}

struct BootConfig {
    image: Image,
    overlay: PathBuf,
    logs: PathBuf,
    memory_mb: u32,
    cpus: u32,
}

/// What the guest kernel prints last when it reboots (`machine_restart`), as opposed to
/// "reboot: Power down" or a panic.
const KERNEL_REBOOT_LINE: &str = "reboot: Restarting system";

impl Vm {
    pub fn boot(
        image: &Image,
        cache: &Path,
        memory_mb: u32,
        cpus: u32,
        timeout_secs: u64,
    ) -> Result<Self> {
        // Under the cache, not the temp dir: the overlay grows by what the VM writes.
        let work = TempDir::new_in(cache, "run")?;
        let overlay = work.path().join("overlay.qcow2");
        // Copy-on-write over the cached image: the run's changes vanish with it.
        run_cmd(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                .arg(&image.disk)
                .arg(&overlay),
        )?;
        let logs = cache.join("logs");
        fs::create_dir_all(&logs)?;
        prune_logs(&logs, 10);
        let boot = BootConfig {
            image: image.clone(),
            overlay,
            logs,
            memory_mb,
            cpus,
        };
        let (qemu, port, console) = start_qemu(&boot, 1)?;
        let mut vm = Vm {
            qemu,
            port,
            key: image.key.clone(),
            console,
            deadline: Instant::now() + Duration::from_secs(timeout_secs),
            boot,
            boots: 1,
            _work: work,
        };
        vm.wait_for_ssh()?;
        Ok(vm)
    }

    /// The guest was asked to reboot. qemu runs with -no-reboot, so the guest's reset ends qemu
    /// instead (an unexpected reboot anywhere else fails the run): wait for that, make sure the
    /// kernel said it restarts (not "Power down", not a panic), and boot the same disk again,
    /// as the reset would.
    pub fn expect_reboot(&mut self, requested: Instant, within: Duration) -> Result<()> {
        let t = requested;
        let status = loop {
            if let Some(status) = self.qemu.try_wait()? {
                break status;
            }
            ensure!(
                t.elapsed() < within,
                "the VM did not reboot within {within:?} (qemu still runs; console {})",
                self.console.display()
            );
            thread::sleep(Duration::from_millis(500));
        };
        let lines = tail(&self.console, 15);
        ensure!(
            lines.iter().any(|l| l.contains(KERNEL_REBOOT_LINE)),
            "qemu exited ({status}) but the guest kernel did not say {KERNEL_REBOOT_LINE:?}; last console lines:\n{}",
            lines.join("\n")
        );
        println!(
            "sysvm:      the guest rebooted {:.0}s after the request (qemu -no-reboot exited, {status}; console: {KERNEL_REBOOT_LINE:?}); booting the same disk again",
            t.elapsed().as_secs_f64()
        );
        self.boots += 1;
        let (qemu, port, console) = start_qemu(&self.boot, self.boots)?;
        self.qemu = qemu;
        self.port = port;
        self.console = console;
        self.wait_for_ssh()
    }

    fn ssh_base(&self) -> Command {
        let mut c = Command::new("ssh");
        c.arg("-i")
            .arg(&self.key)
            .args(["-p", &self.port.to_string()])
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
                "-o",
                "ConnectTimeout=20",
                "-o",
                "ServerAliveInterval=15",
            ]);
        c
    }

    pub fn ssh_command_line(&self) -> String {
        format!(
            "ssh -i {} -p {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null {USER}@127.0.0.1",
            self.key.display(),
            self.port
        )
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.qemu.try_wait()? {
            let mut err = String::new();
            if let Some(mut e) = self.qemu.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            bail!("qemu exited ({status}): {}", err.trim());
        }
        ensure!(
            Instant::now() < self.deadline,
            "the overall timeout ran out"
        );
        Ok(())
    }

    fn wait_for_ssh(&mut self) -> Result<()> {
        let t = Instant::now();
        loop {
            self.check_alive()?;
            let out = self
                .ssh_base()
                .arg(format!("{USER}@127.0.0.1"))
                .arg("true")
                .stdin(Stdio::null())
                .output()?;
            if out.status.success() {
                println!(
                    "sysvm: sshd answered after {:.0}s",
                    t.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            thread::sleep(Duration::from_secs(3));
        }
    }

    /// Runs `command` (a shell command line for the login shell of `tester`) and returns its
    /// output, whatever its exit status.
    pub fn ssh_output(&mut self, command: &str, stdin: Option<&str>) -> Result<Output> {
        self.check_alive()?;
        let mut cmd = self.ssh_base();
        cmd.arg(format!("{USER}@127.0.0.1"))
            .arg(command)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        let mut child = cmd.spawn().context("starting ssh")?;
        if let Some(text) = stdin {
            let mut w = child.stdin.take().context("ssh stdin")?;
            w.write_all(text.as_bytes())?;
        }
        Ok(child.wait_with_output()?)
    }

    /// Runs `command` over SSH; fails with its output unless it exits 0. Returns stdout.
    pub fn ssh(&mut self, command: &str) -> Result<String> {
        self.ssh_stdin(command, None)
    }

    pub fn ssh_stdin(&mut self, command: &str, stdin: Option<&str>) -> Result<String> {
        let out = self.ssh_output(command, stdin)?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.code() == Some(255) {
            // ssh itself failed, and LogLevel=ERROR hides why (a refused login says nothing):
            // ask again, verbosely.
            bail!(
                "`{command}`: ssh failed (exit status 255): {}{}\nssh -v says:\n{}",
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim(),
                self.ssh_diagnosis()
            );
        }
        ensure!(
            out.status.success(),
            "`{command}` over ssh failed ({}): {}{}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(stdout)
    }

    /// The last lines of a verbose `ssh ... true`: why logins fail (nologin, sshd gone, ...).
    fn ssh_diagnosis(&self) -> String {
        let out = self
            .ssh_base()
            .args(["-v", "-o", "LogLevel=VERBOSE"])
            .arg(format!("{USER}@127.0.0.1"))
            .arg("true")
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(out) => {
                let text = output_text(&out);
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(12)..].join("\n")
            }
            Err(e) => format!("(ssh -v did not run: {e})"),
        }
    }

    /// Starts `command` over SSH in the background (stdout and stderr collected), e.g. a job
    /// that is going to be held. `tty` gives it a terminal (ssh -tt).
    pub fn ssh_spawn(&mut self, command: &str, tty: bool) -> Result<Child> {
        self.check_alive()?;
        let mut cmd = self.ssh_base();
        if tty {
            cmd.arg("-tt");
        }
        cmd.arg(format!("{USER}@127.0.0.1"))
            .arg(command)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.spawn().context("starting ssh")
    }

    /// Copies a host file to `dest` in the VM (over the same SSH connection type).
    pub fn upload(&mut self, src: &Path, dest: &str) -> Result<()> {
        let data = fs::read(src).with_context(|| format!("reading {}", src.display()))?;
        self.check_alive()?;
        let mut child = self
            .ssh_base()
            .arg(format!("{USER}@127.0.0.1"))
            .arg(format!("cat >{dest}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        child.stdin.take().context("ssh stdin")?.write_all(&data)?;
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "uploading {} failed: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }
}

/// Starts qemu for boot number `n` of the run's overlay; returns it, the ssh port and the
/// console file.
fn start_qemu(boot: &BootConfig, n: u32) -> Result<(ChildGuard, u16, PathBuf)> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let console = boot
        .logs
        .join(format!("sysvm-{stamp}-{}-boot{n}.log", std::process::id()));
    let port = free_port()?;
    // TCG only (KVM hangs on these machines). -no-reboot: a reboot ends qemu, so an unexpected
    // one fails the run instead of going unnoticed; the check that confirms a reboot expects
    // it (Vm::expect_reboot) and boots again.
    let mut cmd = Boot {
        kernel: &boot.image.kernel,
        initrd: &boot.image.initrd,
        append: KERNEL_CMDLINE,
        memory_mb: boot.memory_mb,
        cpus: boot.cpus,
    }
    .command();
    cmd.args(["-display", "none", "-monitor", "none"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-drive")
        .arg(format!(
            "file={},if=virtio,format=qcow2,cache=unsafe",
            boot.overlay.display()
        ))
        // User-mode networking only, sshd reachable on loopback only.
        .arg("-netdev")
        .arg(format!("user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:22"))
        .args(["-device", "virtio-net-pci,netdev=net0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    println!(
        "sysvm: booting (ssh on 127.0.0.1:{port}, console {})",
        console.display()
    );
    let qemu = ChildGuard::new(cmd.spawn().with_context(|| format!("starting {QEMU}"))?);
    Ok((qemu, port, console))
}

/// What a finished command printed, stdout then stderr.
pub(super) fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Like [`wait_child`], but gives the child back if it has not ended within `within`.
pub(super) fn wait_child_or_keep(
    mut job: Child,
    within: Duration,
) -> Result<std::result::Result<Output, Child>> {
    let t = Instant::now();
    while t.elapsed() < within {
        if job.try_wait()?.is_some() {
            return Ok(Ok(job.wait_with_output()?));
        }
        thread::sleep(Duration::from_millis(500));
    }
    Ok(Err(job))
}

/// Waits at most `within` for a job started with [`Vm::ssh_spawn`] to end; returns its output.
pub(super) fn wait_child(job: Child, within: Duration) -> Result<Output> {
    let (tx, rx) = std::sync::mpsc::channel();
    let pid = job.id();
    thread::spawn(move || {
        let _ = tx.send(job.wait_with_output());
    });
    match rx.recv_timeout(within) {
        Ok(out) => Ok(out?),
        Err(_) => bail!("the ssh session of the job (pid {pid}) did not end within {within:?}"),
    }
}
