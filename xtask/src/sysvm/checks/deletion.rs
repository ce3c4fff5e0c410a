//! Runaway deletions in the VM: the README's `rm -rf "$X/"*` as root, in a scratch root made for
//! it (a chroot inside the VM, never on the host), held at the default budget; approved, denied,
//! and kept held across a restart and a package upgrade; and a `never_hold` service.
use std::{
    process::Child,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use super::check_active_lsm;
use crate::sysvm::HOST;
use crate::sysvm::machine::{Vm, output_text, wait_child, wait_child_or_keep};

/// The scratch root of the runaway deletions (inside the VM; never on the host).
const SCRATCH: &str = "/srv/guardrail-e2e";
/// Files in the scratch root's data directory. With the default policy's budget of 300 the
/// runaway is held after 300 deletions; a plain `guardrail approve` (the rest of the job) then
/// lets it finish.
const SCRATCH_FILES: u32 = 500;
const DEFAULT_BUDGET: u32 = 300;

/// A scratch root for one runaway: busybox as its shell and rm, and SCRATCH_FILES files.
/// Entries: bin/ with 4, data/ with SCRATCH_FILES.
fn make_scratch_root(vm: &mut Vm) -> Result<u32> {
    let script = format!(
        r#"set -eu
R={SCRATCH}/root
rm -rf {SCRATCH}
mkdir -p "$R/bin" "$R/data"
cp /bin/busybox "$R/bin/busybox"
for a in sh rm ls; do ln -s busybox "$R/bin/$a"; done
cd "$R/data"
i=0
while [ $i -lt {SCRATCH_FILES} ]; do : >"f$i"; i=$((i + 1)); done
find "$R" -mindepth 1 | wc -l
"#
    );
    let out = vm.ssh_stdin("sudo sh -s", Some(&script))?;
    out.trim()
        .parse()
        .with_context(|| format!("counting the scratch root: {out:?}"))
}

fn count_scratch(vm: &mut Vm) -> Result<u32> {
    let out = vm.ssh(&format!("sudo find {SCRATCH}/root -mindepth 1 | wc -l"))?;
    out.trim()
        .parse()
        .with_context(|| format!("counting the scratch root: {out:?}"))
}

/// The runaway of the README, as root, in the scratch root: `"$X/"*` with X empty is `/*`.
fn runaway_command() -> String {
    format!(r#"sudo chroot {SCRATCH}/root /bin/sh -c 'X=; rm -rf "$X/"*'"#)
}

/// Waits for the open hold; returns its id. Any other hold is a false positive on a plain
/// Debian system (logind was once held for its /run churn, and every SSH login then hung): it
/// fails the step at once, naming the job.
fn wait_hold(vm: &mut Vm, job: &mut Child) -> Result<u64> {
    let t = Instant::now();
    loop {
        let text = vm.ssh("sudo guardrail holds --json")?;
        let holds: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("parsing `guardrail holds --json`: {text}"))?;
        let holds = holds.as_array().cloned().unwrap_or_default();
        let (runaway, others): (Vec<_>, Vec<_>) = holds
            .iter()
            .partition(|h| h["command"].as_str().is_some_and(|c| c.contains("rm -rf")));
        ensure!(
            others.is_empty(),
            "jobs other than the runaway are held: {}",
            others
                .iter()
                .map(|h| format!("{} (pgid {}, {})", h["command"], h["pgid"], h["reason"]))
                .collect::<Vec<_>>()
                .join("; ")
        );
        if let Some(id) = runaway.first().and_then(|h| h["id"].as_u64()) {
            return Ok(id);
        }
        if let Some(status) = job.try_wait()? {
            bail!("the runaway ended ({status}) without being held");
        }
        ensure!(
            t.elapsed() < Duration::from_secs(120),
            "no hold within 120s"
        );
        thread::sleep(Duration::from_secs(1));
    }
}

/// Waits until the scratch root's entry count stops changing (held jobs delete nothing more).
fn settle(vm: &mut Vm) -> Result<u32> {
    let mut last = count_scratch(vm)?;
    for _ in 0..30 {
        thread::sleep(Duration::from_secs(2));
        let now = count_scratch(vm)?;
        if now == last {
            return Ok(now);
        }
        last = now;
    }
    bail!("the scratch root kept changing: {last} entries")
}

/// KNOWN ISSUE (reported; the agent's, not the packaging's): with a terminal, Debian's sudo
/// (`Defaults use_pty`) runs the command in a session of its own on a new pty and mirrors job
/// control: when guardrail stops the command's process group, the sudo front-end in the login
/// session stops itself too, and nothing resumes it when the hold is approved or denied (the
/// agent signals only the job's own group). The admin's shell shows the job as stopped until
/// `fg`. The test does what `fg` would do, and says so, so that the rest still runs.
fn resume_stopped_sudo(vm: &mut Vm) -> Result<()> {
    let stopped = vm.ssh("ps -o pid=,stat= -C sudo | awk '$2 ~ /^T/ {print $1}'")?;
    ensure!(
        !stopped.trim().is_empty(),
        "the denied job's SSH session did not end, and no stopped sudo explains it"
    );
    println!(
        "sysvm:      KNOWN ISSUE: sudo (use_pty) mirrored the hold's SIGSTOP and stays stopped after \
         the deny (pid {}); resuming it as `fg` would",
        stopped.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    vm.ssh(&format!(
        "sudo kill -CONT {}",
        stopped.split_whitespace().collect::<Vec<_>>().join(" ")
    ))?;
    Ok(())
}

pub fn runaway_approved(vm: &mut Vm) -> Result<()> {
    let total = make_scratch_root(vm)?;
    let mut job = vm.ssh_spawn(&runaway_command(), false)?;
    let id = wait_hold(vm, &mut job)?;
    let left = settle(vm)?;
    println!("sysvm:      held as incident {id}: {left} of {total} entries left");
    ensure!(
        total - left == DEFAULT_BUDGET,
        "expected exactly {DEFAULT_BUDGET} deletions before the hold (lsm tier), got {}",
        total - left
    );
    let msg = vm.ssh(&format!("sudo guardrail approve {id}"))?;
    println!("sysvm:      {}", msg.trim());
    let out = wait_child(job, Duration::from_secs(120))?;
    let text = output_text(&out);
    ensure!(
        text.contains("guardrail: held job"),
        "the job's stderr (the SSH session) got no hold message: {text}"
    );
    // In the lsm tier the deletion that crossed the budget was refused (EPERM) before the job
    // was stopped, and rm does not retry it: after the approval it deletes everything else and
    // exits 1 for that one file (and the directory holding it, which is not empty).
    let refused: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Operation not permitted"))
        .collect();
    ensure!(
        out.status.success() || refused.len() == 1,
        "the approved rm failed otherwise than on the one refused deletion: {text}"
    );
    let left = count_scratch(vm)?;
    ensure!(
        left <= 2,
        "the approved rm left {left} entries (expected at most the refused file and its directory)"
    );
    if let Some(line) = refused.first() {
        println!("sysvm:      the approved rm finished; refused at the hold: {line}");
    }
    // The shipped policy also budgets per login session and per login user (500 and 750 per
    // minute). This runaway ran under them; the steps after it run a dozen runaways a minute
    // from the same login, which those levels would (rightly) hold early, so they stand aside
    // here. The levels have their own tests (host_session_budget, VM case 39-session-budget).
    reload_with(
        vm,
        "sudo mkdir -p /etc/guardrail/policy.d && \
         printf '[deletion.session]\\naction = \"off\"\\n[deletion.user]\\naction = \"off\"\\n' | \
         sudo tee /etc/guardrail/policy.d/10-sysvm-no-levels.toml >/dev/null && \
         sudo systemctl reload guardrail",
    )?;
    Ok(())
}

pub fn runaway_denied(vm: &mut Vm) -> Result<()> {
    let total = make_scratch_root(vm)?;
    // With a terminal this time: the hold message goes to the job's /dev/pts/N.
    let mut job = vm.ssh_spawn(&runaway_command(), true)?;
    let id = wait_hold(vm, &mut job)?;
    let left = settle(vm)?;
    ensure!(
        total - left == DEFAULT_BUDGET,
        "expected exactly {DEFAULT_BUDGET} deletions before the hold, got {}",
        total - left
    );
    let msg = vm.ssh(&format!("sudo guardrail deny {id}"))?;
    println!("sysvm:      {}", msg.trim());
    let job = match wait_child_or_keep(job, Duration::from_secs(20))? {
        Ok(out) => out,
        Err(job) => {
            resume_stopped_sudo(vm)?;
            wait_child(job, Duration::from_secs(60))?
        }
    };
    let out = job;
    let text = output_text(&out);
    ensure!(
        text.contains("guardrail: held job"),
        "the job's terminal got no hold message: {text}"
    );
    ensure!(!out.status.success(), "the denied rm exited 0");
    let after = count_scratch(vm)?;
    ensure!(
        after == left,
        "files were deleted after the hold: {left} then {after}"
    );
    ensure!(
        vm.ssh("sudo guardrail holds --json")?
            .find("\"id\"")
            .is_none(),
        "a hold is still open after deny"
    );
    Ok(())
}

/// The open hold `id` as `guardrail holds --json` lists it (after a restart: as adopted).
fn hold_entry(vm: &mut Vm, id: u64) -> Result<Option<serde_json::Value>> {
    let text = vm.ssh("sudo guardrail holds --json")?;
    let holds: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing `guardrail holds --json`: {text}"))?;
    Ok(holds
        .as_array()
        .and_then(|a| a.iter().find(|h| h["id"].as_u64() == Some(id)).cloned()))
}

/// `ps` states of `pids` in the VM ("T" = stopped), one per pid still alive.
fn process_states(vm: &mut Vm, pids: &[u64]) -> Result<Vec<String>> {
    let list: Vec<String> = pids.iter().map(u64::to_string).collect();
    let out = vm.ssh_output(&format!("ps -o stat= -p {}", list.join(",")), None)?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect())
}

/// How many policy_reloaded events the current event log has.
fn reloads(vm: &mut Vm) -> Result<u32> {
    let out = vm.ssh("sudo grep -c policy_reloaded /var/log/guardrail/events.jsonl || true")?;
    Ok(out.trim().parse().unwrap_or(0))
}

/// Runs `command` (which reloads the agent) and waits for its policy_reloaded event.
fn reload_with(vm: &mut Vm, command: &str) -> Result<()> {
    let before = reloads(vm)?;
    vm.ssh(command)?;
    let t = Instant::now();
    while reloads(vm)? <= before {
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "no policy_reloaded event within 30s of `{command}`"
        );
        thread::sleep(Duration::from_secs(1));
    }
    Ok(())
}

/// `deletion.never_hold` with a real unit: a drop-in names a transient service, whose `rm -rf`
/// crosses the budget; the kernel stops it for a moment, the agent continues it and the kernel
/// refuses the rest. Exactly the budget is deleted, nothing is held, the unit fails.
pub fn never_held_service(vm: &mut Vm) -> Result<()> {
    const UNIT: &str = "guardrail-e2e-cleaner.service";
    reload_with(
        vm,
        &format!(
            "sudo mkdir -p /etc/guardrail/policy.d && \
             printf '[deletion]\\nnever_hold = [\"{UNIT}\"]\\n' | \
             sudo tee /etc/guardrail/policy.d/50-sysvm-never-hold.toml >/dev/null && \
             sudo systemctl reload guardrail"
        ),
    )?;
    let total = make_scratch_root(vm)?;
    let out = vm.ssh_output(
        // The kernel knows a never_hold unit by its cgroup id, which exists only once the unit
        // starts; the agent maps it on the reload its cgroup's appearance triggers (README: units
        // started after the agent). The service waits for that before it deletes.
        &format!(
            "sudo systemd-run --quiet --wait --collect --unit {UNIT} \
             /bin/sh -c 'sleep 5; exec /bin/rm -rf {SCRATCH}/root/data'"
        ),
        None,
    )?;
    ensure!(
        !out.status.success(),
        "the never_hold service's rm -rf succeeded: nothing was refused"
    );
    let left = count_scratch(vm)?;
    ensure!(
        total - left == DEFAULT_BUDGET,
        "expected exactly {DEFAULT_BUDGET} deletions by the never_hold service, got {}",
        total - left
    );
    let holds = vm.ssh("sudo guardrail holds --json")?;
    ensure!(
        !holds.contains("\"id\""),
        "a never_hold service was held: {holds}"
    );
    let lines = vm.ssh(&format!(
        "sudo grep -a '{UNIT} is never held' /var/log/guardrail/events.jsonl || true"
    ))?;
    ensure!(
        lines.contains("\"outcome\":\"refused\""),
        "no refused incident saying {UNIT} is never held; got: {lines}"
    );
    println!(
        "sysvm:      {UNIT}: exactly {DEFAULT_BUDGET} deleted, {left} of {total} entries left, not held"
    );
    reload_with(
        vm,
        "sudo rm /etc/guardrail/policy.d/50-sysvm-never-hold.toml && sudo systemctl reload guardrail",
    )
}

/// Pinning: a restart during a hold leaves the kernel holding the job, and the next agent adopts
/// the hold with its incident id.
pub fn restart_during_hold(vm: &mut Vm) -> Result<()> {
    held_across(vm, "restart", "sudo systemctl restart guardrail")
}

/// The same across a package upgrade: dpkg over the installed package runs the maintainer
/// scripts of an upgrade, which restart the unit after unpacking (restart-after-upgrade: no stop
/// before it).
pub fn upgrade_during_hold(vm: &mut Vm) -> Result<()> {
    held_across(
        vm,
        "upgrade",
        "sudo DEBIAN_FRONTEND=noninteractive dpkg -i /tmp/guardrail.deb",
    )
}

/// Runs `command` (a restart of the agent, one way or another) while a runaway is held, then
/// checks that the hold, its incident id and the stopped job are all still there, and that
/// approve finishes the job.
fn held_across(vm: &mut Vm, what: &str, command: &str) -> Result<()> {
    let total = make_scratch_root(vm)?;
    let mut job = vm.ssh_spawn(&runaway_command(), false)?;
    let id = wait_hold(vm, &mut job)?;
    let left = settle(vm)?;
    ensure!(
        total - left == DEFAULT_BUDGET,
        "expected exactly {DEFAULT_BUDGET} deletions before the hold, got {}",
        total - left
    );
    let before = hold_entry(vm, id)?.context("the hold is not listed")?;
    let pgid = before["pgid"].as_u64().context("the hold has no pgid")?;
    let pids: Vec<u64> = before["pids"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p.as_u64()).collect())
        .unwrap_or_default();
    ensure!(!pids.is_empty(), "the hold lists no processes: {before}");
    let states = process_states(vm, &pids)?;
    ensure!(
        states.iter().all(|s| s.starts_with('T')),
        "the held job is not stopped before the {what}: {states:?}"
    );

    let agent_before = vm.ssh("systemctl show -p MainPID --value guardrail")?;
    vm.ssh(command)?;
    check_active_lsm(vm)?;
    let agent_after = vm.ssh("systemctl show -p MainPID --value guardrail")?;
    ensure!(
        agent_before.trim() != agent_after.trim(),
        "`{command}` did not restart the agent (MainPID {} before and after)",
        agent_before.trim()
    );
    let after = hold_entry(vm, id)?.with_context(|| {
        format!("after the {what}, hold {id} is not listed by `guardrail holds`")
    })?;
    ensure!(
        after["pgid"].as_u64() == Some(pgid),
        "after the {what}, hold {id} names another job: {after}"
    );
    // The hold's line in `guardrail status` ("   3  guardrail-vm  pgid 763  user root ..."; the
    // session lines above it also start with a number).
    let status = vm.ssh("sudo guardrail status")?;
    let hold_line = format!("{id}  {HOST}  pgid {pgid} ");
    ensure!(
        status
            .lines()
            .any(|l| l.trim_start().starts_with(&hold_line)),
        "guardrail status does not list hold {id} after the {what}:\n{status}"
    );
    // Long enough for a job that was let go to delete a good part of 200 files under TCG.
    thread::sleep(Duration::from_secs(5));
    let count = count_scratch(vm)?;
    ensure!(
        count == left,
        "files were deleted across the {what}: {left} then {count}"
    );
    let states = process_states(vm, &pids)?;
    ensure!(
        !states.is_empty() && states.iter().all(|s| s.starts_with('T')),
        "the held job is not stopped after the {what}: {states:?}"
    );
    ensure!(
        job.try_wait()?.is_none(),
        "the held job ended across the {what}"
    );
    println!(
        "sysvm:      hold {id} (pgid {pgid}) adopted by the agent after the {what}: job stopped ({}), {count} entries left as before",
        states.join(" ")
    );

    let msg = vm.ssh(&format!("sudo guardrail approve {id}"))?;
    println!("sysvm:      {}", msg.trim());
    let out = wait_child(job, Duration::from_secs(120))?;
    let left = count_scratch(vm)?;
    ensure!(
        out.status.success() && left == 0,
        "the approved rm ({}) left {left} entries: {}",
        out.status,
        output_text(&out)
    );
    Ok(())
}

/// systemd's own work is never a runaway: 500 transient services started and stopped within
/// about a minute make PID 1 remove 500 cgroups (cgroupfs: not a deletion) and 500 unit files in
/// /run (a target), more than the budget. Nothing is held or refused, every cgroup is gone, and
/// systemd still starts and disables units afterwards. (Before this round PID 1 was counted: at
/// its budget it was held, which it cannot be, and then refused until reboot.)
///
/// Under TCG 500 `systemd-run`s take about three minutes, slower than a real host's minute, so the
/// step lowers the default budget to 50 for its duration (a policy.d drop-in): PID 1's removals run
/// far past that, as they would past 300 on a host that stops 500 units a minute.
pub fn systemd_churn(vm: &mut Vm) -> Result<()> {
    const UNITS: u32 = 500;
    reload_with(
        vm,
        "sudo mkdir -p /etc/guardrail/policy.d && \
         printf '[deletion]\\nbudget = 50\\n' | \
         sudo tee /etc/guardrail/policy.d/50-sysvm-churn.toml >/dev/null && \
         sudo systemctl reload guardrail",
    )?;
    let before = vm.ssh("sudo grep -c '\"incident\"' /var/log/guardrail/events.jsonl || true")?;
    let t = Instant::now();
    vm.ssh(&format!(
        "seq {UNITS} | sudo xargs -P 8 -I N systemd-run --quiet --wait --collect \\
           --unit gr-churn-N.service /bin/true"
    ))?;
    let secs = t.elapsed().as_secs_f64();
    let left = vm.ssh("ls /sys/fs/cgroup/system.slice | grep -c '^gr-churn-' || true")?;
    ensure!(
        left.trim() == "0",
        "{} gr-churn cgroups were left behind",
        left.trim()
    );
    let holds = vm.ssh("sudo guardrail holds --json")?;
    ensure!(
        !holds.contains("\"id\""),
        "systemd's churn was held: {holds}"
    );
    let after = vm.ssh("sudo grep -c '\"incident\"' /var/log/guardrail/events.jsonl || true")?;
    ensure!(
        before.trim() == after.trim(),
        "systemd's churn made incidents ({} before, {} after):\n{}",
        before.trim(),
        after.trim(),
        vm.ssh("sudo tail -n 3 /var/log/guardrail/events.jsonl")?
    );
    vm.ssh(
        "sudo systemd-run --quiet --wait --collect --unit gr-churn-after.service /bin/true && \
         sudo systemctl disable --now rsyslog.service && sudo systemctl enable --now rsyslog.service",
    )
    .context("systemd could not start, disable or enable a unit after the churn")?;
    println!(
        "sysvm:      {UNITS} transient services in {secs:.0}s under a budget of 50: no hold, no incident, no cgroup left"
    );
    reload_with(
        vm,
        "sudo rm /etc/guardrail/policy.d/50-sysvm-churn.toml && sudo systemctl reload guardrail",
    )
}
