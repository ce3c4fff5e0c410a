//! One boot of the LSM-tier VM and what its serial console says: qemu's stdout is read line by
//! line, logged, and parsed for the marker lines of `/init` (see the module doc of
//! [`crate::vm`]) into an outcome per case.
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

use super::VmOptions;
use crate::qemu::{Boot, ChildGuard, QEMU};

/// How many console lines of a failed case its report keeps.
const TAIL_LINES: usize = 40;

const MARK_START: &str = "GUARDRAIL-VM-START ";
const MARK_RESULT: &str = "GUARDRAIL-VM-RESULT ";
const MARK_DONE: &str = "GUARDRAIL-VM-DONE";
const MARK_LSM: &str = "GUARDRAIL-VM-LSM ";
/// Printed by the kernel (at emergency level, so even with `quiet`) when it powers off.
const KMSG_POWER_DOWN: &str = "reboot: Power down";
const KMSG_PANIC: &str = "Kernel panic";

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Outcome {
    Pass,
    /// Tail of the case's console lines, ending with why it failed.
    Fail(String),
}

/// What one boot produced.
#[derive(Debug, Default)]
pub(super) struct BootResult {
    /// In the order they were reported.
    pub(super) outcomes: Vec<(String, Outcome)>,
    pub(super) timed_out: bool,
    pub(super) panicked: Option<String>,
    pub(super) status_ok: bool,
    /// A poweroff case powered the VM off as it should.
    pub(super) powered_off_by_case: bool,
    pub(super) vm_errors: Vec<String>,
    pub(super) elapsed: Duration,
}

/// One console line, from qemu's stdout (the serial console) or its stderr.
enum ConsoleLine {
    Serial(String),
    Stderr(String),
}

/// Boots the VM once with `cmdline` and follows its console until qemu exits or `deadline`
/// passes (then qemu is killed); every console line goes to `log`.
pub(super) fn boot_vm(
    opts: &VmOptions,
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    deadline: Instant,
    log: &mut File,
) -> Result<BootResult> {
    let mut cmd = Boot {
        kernel,
        initrd,
        append: cmdline,
        memory_mb: opts.memory_mb,
        cpus: opts.cpus,
    }
    .command();
    // The serial console on qemu's stdout, read line by line below.
    cmd.arg("-nographic")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    writeln!(log, "==== {cmd:?}").with_context(|| "writing the console log")?;

    let started = Instant::now();
    let mut child = ChildGuard::new(
        cmd.spawn()
            .with_context(|| format!("starting {QEMU} (is qemu-system-x86 installed?)"))?,
    );
    let (tx, rx) = mpsc::channel();
    let stdout = child
        .stdout
        .take()
        .context("qemu stdout was not captured")?;
    let stderr = child
        .stderr
        .take()
        .context("qemu stderr was not captured")?;
    let tx_err = tx.clone();
    let readers = [
        thread::spawn(move || forward_lines(stdout, |l| tx.send(ConsoleLine::Serial(l)).is_ok())),
        thread::spawn(move || {
            forward_lines(stderr, |l| tx_err.send(ConsoleLine::Stderr(l)).is_ok())
        }),
    ];

    let mut parser = ConsoleParser::default();
    let mut result = BootResult::default();
    let mut qemu_stderr: Vec<String> = Vec::new();
    let mut handle =
        |line: ConsoleLine, parser: &mut ConsoleParser, log: &mut File| -> Result<()> {
            match line {
                ConsoleLine::Serial(text) => {
                    writeln!(log, "{text}").with_context(|| "writing the console log")?;
                    if opts.echo_console {
                        // The firmware sends terminal resets (ESC c): keep them off the user's
                        // terminal.
                        let shown: String = text
                            .chars()
                            .filter(|c| !c.is_control() || *c == '\t')
                            .collect();
                        println!("{shown}");
                    }
                    if let Some(event) = parser.feed(&text, started.elapsed()) {
                        println!("vm: {event}");
                    }
                }
                ConsoleLine::Stderr(text) => {
                    writeln!(log, "qemu stderr: {text}")
                        .with_context(|| "writing the console log")?;
                    qemu_stderr.push(text);
                }
            }
            Ok(())
        };
    loop {
        let now = Instant::now();
        if now >= deadline {
            result.timed_out = true;
            break;
        }
        match rx.recv_timeout(deadline - now) {
            Ok(line) => handle(line, &mut parser, log)?,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                result.timed_out = true;
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    if result.timed_out {
        writeln!(
            log,
            "==== harness: overall timeout, killing qemu pid {}",
            child.id()
        )
        .with_context(|| "writing the console log")?;
        child
            .kill()
            .with_context(|| format!("killing qemu pid {}", child.id()))?;
    }
    let status: ExitStatus = child.wait().with_context(|| "waiting for qemu")?;
    // Both pipes are closed now that qemu is gone: drain what the readers still hold.
    for line in rx.iter() {
        handle(line, &mut parser, log)?;
    }
    for reader in readers {
        reader
            .join()
            .map_err(|_| anyhow!("console reader thread panicked"))??;
    }
    result.elapsed = started.elapsed();
    result.status_ok = status.success();
    writeln!(
        log,
        "==== qemu exited: {status} after {:.1}s",
        result.elapsed.as_secs_f64()
    )
    .with_context(|| "writing the console log")?;
    println!(
        "vm: qemu exited ({status}) after {:.1}s",
        result.elapsed.as_secs_f64()
    );

    let want_bpf = opts.lsm.split(',').any(|l| l == "bpf");
    parser.finish(&mut result, &status, &qemu_stderr, want_bpf);
    Ok(result)
}

/// Sends each line of `from` (lossily decoded, without line ending) to `send` until EOF or
/// until `send` says the receiver is gone.
fn forward_lines(from: impl Read, mut send: impl FnMut(String) -> bool) -> io::Result<()> {
    let mut reader = BufReader::new(from);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&buf);
        if !send(text.trim_end_matches(['\r', '\n']).to_owned()) {
            return Ok(());
        }
    }
}

/// Turns console lines into case outcomes.
#[derive(Debug, Default)]
struct ConsoleParser {
    outcomes: Vec<(String, Outcome)>,
    /// The case between its START and RESULT markers, with the console lines seen meanwhile.
    running: Option<(String, Vec<String>, Duration)>,
    /// A poweroff case whose EXPECT-POWEROFF marker was seen and that has not reported since.
    expect_poweroff: Option<(String, Vec<String>)>,
    done: bool,
    powered_down: bool,
    panic: Option<String>,
    lsm: Option<String>,
}

impl ConsoleParser {
    /// Takes one console line; returns a line worth printing live, if any.
    fn feed(&mut self, raw: &str, at: Duration) -> Option<String> {
        // The firmware and the kernel may put terminal escapes or carriage returns around lines.
        let line = strip_leading_escapes(raw).trim_end();
        // What a case prints (prefixed `[<case>]` by /init) must not pass for kernel messages.
        let from_case = self
            .running
            .as_ref()
            .is_some_and(|(name, _, _)| line.starts_with(&format!("[{name}")));
        if !from_case && line.contains(KMSG_POWER_DOWN) {
            self.powered_down = true;
        }
        if !from_case && line.contains(KMSG_PANIC) && self.panic.is_none() {
            self.panic = Some(line.to_owned());
        }
        // Marker lines are the harness's own bookkeeping, not the case's output.
        if !line.starts_with("GUARDRAIL-VM-") {
            if let Some((_, lines, _)) = &mut self.running {
                lines.push(line.to_owned());
            }
            if let Some((_, lines)) = &mut self.expect_poweroff {
                lines.push(line.to_owned());
            }
        }

        if let Some(lsm) = line.strip_prefix(MARK_LSM) {
            self.lsm = Some(lsm.trim().to_owned());
            // Without bpf is the fmodret tier's mode (Ubuntu's list); say so either way.
            let warn = if lsm.split(',').any(|l| l.trim() == "bpf") {
                ""
            } else {
                " (no bpf: BPF LSM inactive)"
            };
            return Some(format!("guest LSMs: {}{warn}", lsm.trim()));
        }
        if let Some(name) = line.strip_prefix(MARK_START) {
            self.running = Some((name.trim().to_owned(), Vec::new(), at));
            return None;
        }
        if line == MARK_DONE {
            self.done = true;
            return Some(format!(
                "all cases ran ({:.1}s after start)",
                at.as_secs_f64()
            ));
        }
        let rest = line.strip_prefix(MARK_RESULT)?;
        let (name, verdict) = rest.split_once(' ')?;
        let verdict = verdict.trim();
        let took = match &self.running {
            Some((running, _, since)) if running == name => at.saturating_sub(*since),
            _ => Duration::ZERO,
        };
        if verdict == "EXPECT-POWEROFF" {
            self.expect_poweroff = Some((name.to_owned(), Vec::new()));
            return Some(format!("{name}: expecting it to power the VM off"));
        }
        // A real result: the case is over.
        let lines = match self.running.take() {
            Some((running, lines, _)) if running == name => lines,
            _ => Vec::new(),
        };
        if self
            .expect_poweroff
            .as_ref()
            .is_some_and(|(n, _)| n == name)
        {
            self.expect_poweroff = None;
        }
        if verdict == "PASS" {
            self.outcomes.push((name.to_owned(), Outcome::Pass));
            Some(format!("PASS {name} ({:.1}s)", took.as_secs_f64()))
        } else {
            let reason = verdict
                .strip_prefix("FAIL")
                .unwrap_or(verdict)
                .trim()
                .to_owned();
            self.outcomes
                .push((name.to_owned(), Outcome::Fail(tail(&lines, &reason))));
            Some(format!(
                "FAIL {name} ({reason}, {:.1}s)",
                took.as_secs_f64()
            ))
        }
    }

    /// Settles what the end of the boot means for the case in flight.
    /// `want_bpf`: whether the boot's `lsm=` list asked for BPF LSM (the fmodret mode does not).
    fn finish(
        mut self,
        result: &mut BootResult,
        status: &ExitStatus,
        qemu_stderr: &[String],
        want_bpf: bool,
    ) {
        let ended_how = if result.timed_out {
            "the overall timeout ran out".to_owned()
        } else if let Some(panic) = &self.panic {
            format!("the kernel panicked: {panic}")
        } else if !status.success() {
            format!("qemu exited with {status}")
        } else {
            "the VM stopped".to_owned()
        };

        if let Some((name, lines)) = self.expect_poweroff.take() {
            let clean = !result.timed_out && self.panic.is_none() && status.success();
            if clean && self.powered_down {
                println!("vm: PASS {name} (powered the VM off)");
                self.outcomes.push((name, Outcome::Pass));
                result.powered_off_by_case = true;
                // The case was also "running"; it is settled now.
                self.running = None;
            } else {
                let why = format!("expected a clean power-off, but {ended_how}");
                println!("vm: FAIL {name} ({why})");
                self.outcomes
                    .push((name.clone(), Outcome::Fail(tail(&lines, &why))));
                if self.running.as_ref().is_some_and(|(n, _, _)| *n == name) {
                    self.running = None;
                }
            }
        }
        if let Some((name, lines, _)) = self.running.take() {
            let why = format!("no result: {ended_how} while it ran");
            println!("vm: FAIL {name} ({why})");
            self.outcomes
                .push((name, Outcome::Fail(tail(&lines, &why))));
        }

        if let Some(panic) = &self.panic {
            result.vm_errors.push(format!("kernel panic: {panic}"));
        }
        if !status.success() && !result.timed_out {
            let last = qemu_stderr
                .iter()
                .rev()
                .take(5)
                .rev()
                .cloned()
                .collect::<Vec<_>>()
                .join(" | ");
            result
                .vm_errors
                .push(format!("qemu exited with {status}: {last}"));
        }
        if !self.done && !result.powered_off_by_case && !result.timed_out && self.panic.is_none() {
            result
                .vm_errors
                .push(format!("the VM ended without {MARK_DONE}"));
        }
        if self
            .lsm
            .as_deref()
            .is_some_and(|l| l.split(',').any(|x| x.trim() == "bpf") != want_bpf)
        {
            result.vm_errors.push(format!(
                "bpf {} an active LSM in the guest, against its lsm= list: {:?}",
                if want_bpf { "is not" } else { "is" },
                self.lsm
            ));
        }
        result.panicked = self.panic;
        result.outcomes = self.outcomes;
    }
}

/// Removes ANSI escape sequences (`ESC [ ... letter`, `ESC c`, ...) at the start of a line, which
/// firmware and terminal setup can leave in front of the first lines.
fn strip_leading_escapes(mut line: &str) -> &str {
    loop {
        let Some(rest) = line.strip_prefix('\u{1b}') else {
            return line.trim_start_matches(|c: char| c.is_control());
        };
        line = match rest.strip_prefix('[') {
            Some(csi) => {
                let end = csi
                    .find(|c: char| c.is_ascii_alphabetic())
                    .map_or(csi.len(), |i| i + 1);
                &csi[end..]
            }
            None => rest.get(1..).unwrap_or(""),
        };
    }
}

fn tail(lines: &[String], reason: &str) -> String {
    let start = lines.len().saturating_sub(TAIL_LINES);
    let mut out = lines[start..].join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(reason);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_markers() {
        let mut p = ConsoleParser::default();
        let t = Duration::ZERO;
        p.feed(
            "\u{1b}[?7lGUARDRAIL-VM-LSM lockdown,capability,landlock,yama,bpf",
            t,
        );
        p.feed("GUARDRAIL-VM-START 00-a", t);
        p.feed("[00-a] ok", t);
        p.feed("GUARDRAIL-VM-RESULT 00-a PASS", t);
        p.feed("GUARDRAIL-VM-START 01-b", t);
        // A case cannot forge a marker: its lines are prefixed.
        p.feed("[01-b] GUARDRAIL-VM-RESULT 01-b PASS", t);
        p.feed("GUARDRAIL-VM-RESULT 01-b FAIL rc=3", t);
        p.feed("GUARDRAIL-VM-START 02-c", t);
        assert_eq!(p.outcomes[0], ("00-a".to_owned(), Outcome::Pass));
        let (name, Outcome::Fail(tail)) = &p.outcomes[1] else {
            panic!("01-b should fail")
        };
        assert_eq!(name, "01-b");
        assert!(tail.ends_with("rc=3"), "{tail}");
        assert!(p.running.is_some());
        p.feed("[02-c] Kernel panic - not syncing: just a string", t);
        assert!(p.panic.is_none());
        p.feed(
            "[    2.641177] Kernel panic - not syncing: sysrq triggered crash",
            t,
        );
        assert!(p.panic.is_some());
    }
}
