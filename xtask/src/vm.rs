//! The LSM-tier test VM: Debian 12's own kernel under qemu TCG with BPF LSM enabled.
//!
//! This machine's kernel refuses `BPF_PROG_LOAD` for LSM programs, so the LSM tier runs inside a
//! throwaway VM: Debian's 6.1 kernel (which has `CONFIG_BPF_LSM=y` and BTF) boots a busybox
//! initramfs built here, whose `/init` (`tests/vm/init.sh`) runs every `tests/vm/cases/*.sh` and
//! reports each on the serial console with marker lines that this module parses:
//!
//! ```text
//! GUARDRAIL-VM-START <case>
//! [<case>] <output line>
//! GUARDRAIL-VM-RESULT <case> PASS | FAIL rc=<n> [timeout] [no-poweroff] | EXPECT-POWEROFF
//! GUARDRAIL-VM-DONE
//! ```
//!
//! Conventions for cases (plain POSIX sh run by busybox, non-zero exit = failure):
//! - the case name is the file name without `.sh`; they run in byte order of their names;
//! - each runs in its own `/scratch/<case>` directory (`$GUARDRAIL_VM_SCRATCH`, tmpfs), with
//!   stdin from /dev/null, under a per-case timeout (`--case-timeout-secs`, or a
//!   `# vm-timeout: <secs>` line in the script); processes it leaves behind are killed after it;
//! - a case named `*-poweroff.sh` is expected to power the VM off: it runs after all others and
//!   passes if the kernel powers off cleanly (`reboot: Power down`, no panic) after its
//!   `EXPECT-POWEROFF` marker. If several are selected, the VM boots once more for each;
//! - `--filter <s>` selects the cases whose name contains `<s>` (passed as `guardrail.filter=`);
//!   a filter that selects no case is an error;
//! - binaries given with `--binary` land in `/bin`; busybox's sh runs its own applet for a bare
//!   command name even if `/bin/<name>` exists, so call them by full path (`guardrail` has no
//!   applet namesake; `stat`, `ls`, ... do);
//! - `poweroff -f`/`reboot -f` act at once; plain `poweroff`/`halt` (SIGUSR2/USR1 to PID 1) and
//!   `reboot` (SIGTERM) are honoured by /init as busybox init would.
//!
//! The kernel is fetched once into the cache dir by [`ensure_kernel`], which the project's setup
//! step calls too.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail, ensure};

/// The `/init` of the initramfs. Compiled in so that the harness and its init cannot drift apart.
const INIT_SCRIPT: &str = include_str!("../../tests/vm/init.sh");
/// The static busybox of Debian's `busybox-static` package.
const BUSYBOX: &str = "/bin/busybox";
const QEMU: &str = "qemu-system-x86_64";
/// BPF LSM is only active when `bpf` is in the boot-time LSM list; Debian's default omits it.
const KERNEL_CMDLINE: &str =
    "console=ttyS0 quiet panic=-1 cryptomgr.notests lsm=lockdown,capability,landlock,yama,bpf";
/// How many console lines of a failed case its report keeps.
const TAIL_LINES: usize = 40;
/// Old console logs are pruned beyond this many, so the cache does not grow without bound.
const KEEP_LOGS: usize = 20;

const MARK_START: &str = "GUARDRAIL-VM-START ";
const MARK_RESULT: &str = "GUARDRAIL-VM-RESULT ";
const MARK_DONE: &str = "GUARDRAIL-VM-DONE";
const MARK_LSM: &str = "GUARDRAIL-VM-LSM ";
/// Printed by the kernel (at emergency level, so even with `quiet`) when it powers off.
const KMSG_POWER_DOWN: &str = "reboot: Power down";
const KMSG_PANIC: &str = "Kernel panic";

/// What to run in the VM and how.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Host executables copied into the VM's `/bin`, with their shared libraries (from `ldd`).
    pub binaries: Vec<PathBuf>,
    /// `tests/vm/cases`: every file in it (recursively) is copied to `/cases`; `*.sh` at its top
    /// level are the cases.
    pub cases_dir: PathBuf,
    /// Run only the cases whose name contains this.
    pub filter: Option<String>,
    /// Overall limit for all boots together; qemu is killed when it runs out.
    pub timeout: Duration,
    /// Limit for one case inside the VM (a case can override it with `# vm-timeout: <secs>`).
    pub case_timeout: Duration,
    /// Where the kernel and the console logs live (outside the repo).
    pub cache_dir: PathBuf,
    /// Additional (host path, path in the VM) pairs; directories are copied recursively.
    pub extra_files: Vec<(PathBuf, PathBuf)>,
    pub memory_mb: u32,
    /// Guest CPUs; multi-threaded TCG uses one host core per guest CPU.
    pub cpus: u32,
    /// Kernel image to boot; `None` means [`ensure_kernel`] in `cache_dir`.
    pub kernel: Option<PathBuf>,
    /// Also copy every console line to stdout as it arrives (otherwise only results are printed).
    pub echo_console: bool,
}

impl VmOptions {
    /// Defaults for everything but the cases directory.
    pub fn new(cases_dir: PathBuf) -> Result<Self> {
        Ok(Self {
            binaries: Vec::new(),
            cases_dir,
            filter: None,
            timeout: Duration::from_secs(600),
            case_timeout: Duration::from_secs(120),
            cache_dir: default_cache_dir()?,
            extra_files: Vec::new(),
            memory_mb: 1024,
            cpus: 2,
            kernel: None,
            echo_console: false,
        })
    }
}

/// The outcome of a run. `failed` and `missing` being empty is not enough for success: see
/// [`VmReport::is_success`].
#[derive(Debug, Clone, Default)]
pub struct VmReport {
    pub passed: Vec<String>,
    /// (case, last console lines of the case, ending with the reason).
    pub failed: Vec<(String, String)>,
    /// Selected cases that never reported a result (the VM died, hung or never got to them).
    pub missing: Vec<String>,
    /// The overall timeout ran out and qemu was killed.
    pub timed_out: bool,
    /// Problems of the VM itself rather than of one case (panic, qemu error, no DONE marker).
    pub vm_errors: Vec<String>,
    /// The console log of the run.
    pub log_path: PathBuf,
    /// Wall time from starting qemu to its exit, summed over boots.
    pub elapsed: Duration,
}

impl VmReport {
    pub fn is_success(&self) -> bool {
        self.failed.is_empty()
            && self.missing.is_empty()
            && !self.timed_out
            && self.vm_errors.is_empty()
    }

    /// `vm: N passed, N failed[, N missing]`
    pub fn summary_line(&self) -> String {
        let mut line = format!(
            "vm: {} passed, {} failed",
            self.passed.len(),
            self.failed.len()
        );
        if !self.missing.is_empty() {
            line.push_str(&format!(", {} missing", self.missing.len()));
        }
        line
    }

    /// Turns anything short of success into an error, for a non-zero exit of the caller.
    pub fn check(&self) -> Result<()> {
        if self.is_success() {
            return Ok(());
        }
        let mut why = Vec::new();
        if !self.failed.is_empty() {
            let names: Vec<&str> = self.failed.iter().map(|(n, _)| n.as_str()).collect();
            why.push(format!("failed: {}", names.join(", ")));
        }
        if !self.missing.is_empty() {
            why.push(format!("missing: {}", self.missing.join(", ")));
        }
        if self.timed_out {
            why.push("timed out".to_owned());
        }
        why.extend(self.vm_errors.iter().cloned());
        bail!(
            "VM tests did not pass ({}); console log: {}",
            why.join("; "),
            self.log_path.display()
        )
    }
}

/// `guardrail-vm` under `$XDG_CACHE_HOME`, else under `~/.cache`.
pub fn default_cache_dir() -> Result<PathBuf> {
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME").filter(|v| Path::new(v).is_absolute()) {
        return Ok(PathBuf::from(xdg).join("guardrail-vm"));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .context("neither XDG_CACHE_HOME nor HOME is set: pass a cache dir explicitly")?;
    Ok(PathBuf::from(home).join(".cache").join("guardrail-vm"))
}

// ---------------------------------------------------------------------------------------------
// The kernel

/// Makes sure Debian's current kernel image (the one `linux-image-amd64` depends on) is extracted
/// under `cache_dir/kernel/<package>/boot/` and returns its `vmlinuz` path.
///
/// Quick and offline when that exact package is already extracted. Runs `apt-get update` only if
/// apt knows no candidate; if apt still knows none, falls back to a kernel cached earlier.
pub fn ensure_kernel(cache_dir: &Path) -> Result<PathBuf> {
    let kernel_root = cache_dir.join("kernel");
    fs::create_dir_all(&kernel_root)
        .with_context(|| format!("creating kernel cache {}", kernel_root.display()))?;

    // Failures of apt are not fatal yet: a kernel cached earlier still lets the VM run offline.
    let lookup = || {
        kernel_package().unwrap_or_else(|e| {
            eprintln!("vm: warning: {e:#}");
            None
        })
    };
    let package = match lookup() {
        Some(p) => Some(p),
        None => {
            eprintln!("vm: apt knows no linux-image-amd64 dependency; running apt-get update");
            match run_quiet(Command::new("apt-get").arg("update")) {
                Ok(_) => lookup(),
                Err(e) => {
                    eprintln!("vm: warning: {e:#}");
                    None
                }
            }
        }
    };
    let Some(package) = package else {
        if let Some(cached) = newest_cached_kernel(&kernel_root)? {
            eprintln!(
                "vm: warning: cannot resolve linux-image-amd64; using cached {}",
                cached.display()
            );
            return Ok(cached);
        }
        bail!("cannot find the package linux-image-amd64 depends on (apt-cache depends)");
    };

    let dest = kernel_root.join(&package);
    if let Some(vmlinuz) = find_vmlinuz(&dest)? {
        return Ok(vmlinuz);
    }

    eprintln!(
        "vm: fetching {package} into {} (once)",
        kernel_root.display()
    );
    // Work in pid-suffixed directories and rename at the end, so that an interrupted or
    // concurrent run never leaves a half-extracted kernel behind under the final name.
    let work = kernel_root.join(format!(".work-{}", std::process::id()));
    remove_dir_if_exists(&work)?;
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let result = fetch_kernel(&package, &work, &dest);
    remove_dir_if_exists(&work)?;
    result?;
    find_vmlinuz(&dest)?
        .with_context(|| format!("no boot/vmlinuz-* in {} after extraction", dest.display()))
}

fn fetch_kernel(package: &str, work: &Path, dest: &Path) -> Result<()> {
    // apt-get download writes into its working directory.
    run_quiet(
        Command::new("apt-get")
            .args(["download", package])
            .current_dir(work),
    )?;
    let deb = fs::read_dir(work)
        .with_context(|| format!("listing {}", work.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension() == Some(OsStr::new("deb")))
        .with_context(|| {
            format!(
                "apt-get download {package} left no .deb in {}",
                work.display()
            )
        })?;
    let tree = work.join("tree");
    run_quiet(Command::new("dpkg").arg("-x").arg(&deb).arg(&tree))?;

    // Only the image and its config are kept: the modules are hundreds of MB the VM never
    // loads (its initramfs needs no drivers).
    let staged = work.join("staged");
    let staged_boot = staged.join("boot");
    fs::create_dir_all(&staged_boot)
        .with_context(|| format!("creating {}", staged_boot.display()))?;
    let boot = tree.join("boot");
    for entry in fs::read_dir(&boot).with_context(|| format!("listing {}", boot.display()))? {
        let entry = entry.with_context(|| format!("listing {}", boot.display()))?;
        let name = entry.file_name();
        let name_str = name.to_string_lossy();
        if name_str.starts_with("vmlinuz-") || name_str.starts_with("config-") {
            let to = staged_boot.join(&name);
            fs::rename(entry.path(), &to).with_context(|| {
                format!("moving {} to {}", entry.path().display(), to.display())
            })?;
        }
    }
    match fs::rename(&staged, dest) {
        Ok(()) => Ok(()),
        // Another run finished first: its copy is as good as ours.
        Err(_) if find_vmlinuz(dest)?.is_some() => Ok(()),
        Err(e) => {
            Err(e).with_context(|| format!("renaming {} to {}", staged.display(), dest.display()))
        }
    }
}

/// The exact image package `linux-image-amd64` depends on, e.g. `linux-image-6.1.0-56-amd64`.
fn kernel_package() -> Result<Option<String>> {
    let out = run_quiet(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
    Ok(parse_kernel_package(&out))
}

fn parse_kernel_package(apt_cache_depends: &str) -> Option<String> {
    apt_cache_depends.lines().find_map(|line| {
        let dep = line.trim().strip_prefix("Depends:")?.trim();
        // `<...>` marks a virtual package: not something apt-get download can fetch.
        (dep.starts_with("linux-image-") && !dep.starts_with('<')).then(|| dep.to_owned())
    })
}

fn find_vmlinuz(package_dir: &Path) -> Result<Option<PathBuf>> {
    let boot = package_dir.join("boot");
    if !boot.is_dir() {
        return Ok(None);
    }
    for entry in fs::read_dir(&boot).with_context(|| format!("listing {}", boot.display()))? {
        let path = entry
            .with_context(|| format!("listing {}", boot.display()))?
            .path();
        let is_vmlinuz = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"));
        if is_vmlinuz && path.is_file() {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

fn newest_cached_kernel(kernel_root: &Path) -> Result<Option<PathBuf>> {
    let mut best: Option<(SystemTime, PathBuf)> = None;
    for entry in
        fs::read_dir(kernel_root).with_context(|| format!("listing {}", kernel_root.display()))?
    {
        let dir = entry
            .with_context(|| format!("listing {}", kernel_root.display()))?
            .path();
        if let Some(vmlinuz) = find_vmlinuz(&dir)? {
            let mtime = fs::metadata(&vmlinuz)
                .and_then(|m| m.modified())
                .unwrap_or(UNIX_EPOCH);
            if best.as_ref().is_none_or(|(t, _)| mtime > *t) {
                best = Some((mtime, vmlinuz));
            }
        }
    }
    Ok(best.map(|(_, p)| p))
}

// ---------------------------------------------------------------------------------------------
// Running the cases

/// A case the host expects the VM to report.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Case {
    name: String,
    poweroff: bool,
}

/// Builds the initramfs, boots the VM (more than once only for extra poweroff cases) and reports
/// what each selected case did. Prints results as they come and the summary line at the end.
/// Returns `Err` only when the harness itself cannot work (bad options, missing tools); test
/// failures, missing cases and timeouts are in the report: see [`VmReport::check`].
pub fn run_vm_tests(opts: &VmOptions) -> Result<VmReport> {
    if let Some(filter) = &opts.filter {
        // It travels on the kernel command line, which is split on whitespace and has quoting.
        ensure!(
            !filter.is_empty()
                && !filter
                    .chars()
                    .any(|c| c.is_whitespace() || c == '"' || c == '\\'),
            "the VM filter must be non-empty without whitespace, quotes or backslashes: {filter:?}"
        );
    }
    let cases = list_cases(&opts.cases_dir, opts.filter.as_deref())?;
    ensure!(
        !cases.is_empty(),
        "no case in {} matches the filter {:?}",
        opts.cases_dir.display(),
        opts.filter
    );
    let kernel = match &opts.kernel {
        Some(k) => k.clone(),
        None => ensure_kernel(&opts.cache_dir)?,
    };

    let work = TempDir::new("guardrail-vm")?;
    let initrd = work.path().join("initrd.gz");
    let build_started = Instant::now();
    build_initramfs(opts, &initrd)?;
    let initrd_size = fs::metadata(&initrd).map(|m| m.len()).unwrap_or(0);
    println!(
        "vm: initramfs {:.1} MiB built in {:.1}s; kernel {}",
        initrd_size as f64 / (1024.0 * 1024.0),
        build_started.elapsed().as_secs_f64(),
        kernel.display()
    );

    let log_dir = opts.cache_dir.join("logs");
    fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    prune_logs(&log_dir);
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let log_path = log_dir.join(format!("vm-{stamp}-{}.log", std::process::id()));
    let mut log = File::create(&log_path)
        .with_context(|| format!("creating console log {}", log_path.display()))?;
    println!("vm: console log: {}", log_path.display());

    let deadline = Instant::now() + opts.timeout;
    let mut report = VmReport {
        log_path: log_path.clone(),
        ..VmReport::default()
    };
    let mut reported: BTreeSet<String> = BTreeSet::new();
    let mut only: Option<String> = None;
    loop {
        let mut cmdline = format!(
            "{KERNEL_CMDLINE} guardrail.case_timeout={}",
            opts.case_timeout.as_secs().max(1)
        );
        match (&only, &opts.filter) {
            (Some(name), _) => cmdline.push_str(&format!(" guardrail.only={name}")),
            (None, Some(filter)) => cmdline.push_str(&format!(" guardrail.filter={filter}")),
            (None, None) => {}
        }
        let boot = boot_vm(opts, &kernel, &initrd, &cmdline, deadline, &mut log)?;
        report.elapsed += boot.elapsed;
        let clean_exit = !boot.timed_out && boot.panicked.is_none() && boot.status_ok;
        for (name, outcome) in &boot.outcomes {
            reported.insert(name.clone());
            match outcome {
                Outcome::Pass => report.passed.push(name.clone()),
                Outcome::Fail(tail) => report.failed.push((name.clone(), tail.clone())),
            }
        }
        report.timed_out |= boot.timed_out;
        report.vm_errors.extend(boot.vm_errors);
        // A poweroff case ends the boot, so the poweroff cases after it need a boot each. Only
        // worth it if this boot ended cleanly and made progress (no endless loop on a VM that
        // reports nothing).
        let next = cases
            .iter()
            .find(|c| c.poweroff && !reported.contains(&c.name));
        let progress = !boot.outcomes.is_empty();
        match next {
            Some(c) if clean_exit && progress && only.as_ref() != Some(&c.name) => {
                println!("vm: booting again for {}", c.name);
                only = Some(c.name.clone());
            }
            _ => break,
        }
    }
    report.missing = cases
        .iter()
        .filter(|c| !reported.contains(&c.name))
        .map(|c| c.name.clone())
        .collect();
    log.flush()
        .with_context(|| format!("writing {}", log_path.display()))?;

    for (name, tail) in &report.failed {
        println!("vm: ---- {name} (last console lines) ----");
        for line in tail.lines() {
            println!("    {line}");
        }
    }
    for err in &report.vm_errors {
        println!("vm: error: {err}");
    }
    if report.timed_out {
        println!(
            "vm: error: the overall timeout of {}s ran out",
            opts.timeout.as_secs()
        );
    }
    for name in &report.missing {
        println!("vm: MISSING {name}");
    }
    println!(
        "vm: qemu ran {:.1}s; console log: {}",
        report.elapsed.as_secs_f64(),
        log_path.display()
    );
    println!("{}", report.summary_line());
    Ok(report)
}

/// The `*.sh` at the top of `dir` whose names contain `filter`: ordinary cases in name order,
/// then poweroff cases in name order (the order `/init` runs them in).
fn list_cases(dir: &Path, filter: Option<&str>) -> Result<Vec<Case>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("listing cases in {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        if path.extension() != Some(OsStr::new("sh")) || !path.is_file() {
            continue;
        }
        let name = path
            .file_stem()
            .and_then(OsStr::to_str)
            .with_context(|| format!("case file name is not UTF-8: {}", path.display()))?
            .to_owned();
        ensure!(
            !name.chars().any(|c| c.is_whitespace() || c.is_control()),
            "case names must not contain whitespace: {}",
            path.display()
        );
        if filter.is_none_or(|f| name.contains(f)) {
            names.push(name);
        }
    }
    names.sort();
    let (mut cases, poweroff): (Vec<Case>, Vec<Case>) = names
        .into_iter()
        .map(|name| Case {
            poweroff: name.ends_with("-poweroff"),
            name,
        })
        .partition(|c| !c.poweroff);
    cases.extend(poweroff);
    Ok(cases)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Pass,
    /// Tail of the case's console lines, ending with why it failed.
    Fail(String),
}

/// What one boot produced.
#[derive(Debug, Default)]
struct BootResult {
    /// In the order they were reported.
    outcomes: Vec<(String, Outcome)>,
    timed_out: bool,
    panicked: Option<String>,
    status_ok: bool,
    /// A poweroff case powered the VM off as it should.
    powered_off_by_case: bool,
    vm_errors: Vec<String>,
    elapsed: Duration,
}

/// One console line, from qemu's stdout (the serial console) or its stderr.
enum ConsoleLine {
    Serial(String),
    Stderr(String),
}

/// Kills qemu (by the PID of the child we started, nothing else) if the harness leaves early,
/// e.g. on an error or a panic, so no VM outlives the run.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn boot_vm(
    opts: &VmOptions,
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    deadline: Instant,
    log: &mut File,
) -> Result<BootResult> {
    let mut cmd = Command::new(QEMU);
    // KVM hangs on these machines (after "Probing EDD"): TCG only.
    cmd.args(["-accel", "tcg", "-cpu", "max", "-nographic", "-no-reboot"])
        .arg("-m")
        .arg(opts.memory_mb.to_string())
        .arg("-smp")
        .arg(opts.cpus.max(1).to_string())
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(cmdline)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    writeln!(log, "==== {cmd:?}").with_context(|| "writing the console log")?;

    let started = Instant::now();
    let mut child = ChildGuard(
        cmd.spawn()
            .with_context(|| format!("starting {QEMU} (is qemu-system-x86 installed?)"))?,
    );
    let (tx, rx) = mpsc::channel();
    let stdout = child
        .0
        .stdout
        .take()
        .context("qemu stdout was not captured")?;
    let stderr = child
        .0
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
            child.0.id()
        )
        .with_context(|| "writing the console log")?;
        child
            .0
            .kill()
            .with_context(|| format!("killing qemu pid {}", child.0.id()))?;
    }
    let status: ExitStatus = child.0.wait().with_context(|| "waiting for qemu")?;
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

    parser.finish(&mut result, &status, &qemu_stderr);
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
            let warn = if lsm.split(',').any(|l| l.trim() == "bpf") {
                ""
            } else {
                " (bpf missing!)"
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
    fn finish(mut self, result: &mut BootResult, status: &ExitStatus, qemu_stderr: &[String]) {
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
            .is_some_and(|l| !l.split(',').any(|x| x.trim() == "bpf"))
        {
            result.vm_errors.push(format!(
                "bpf is not an active LSM in the guest: {:?}",
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

fn prune_logs(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut logs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension() == Some(OsStr::new("log")))
        .collect();
    logs.sort(); // names start with the unix time
    let excess = logs.len().saturating_sub(KEEP_LOGS - 1);
    for old in &logs[..excess] {
        let _ = fs::remove_file(old);
    }
}

// ---------------------------------------------------------------------------------------------
// The initramfs

/// One entry of the initramfs.
#[derive(Debug, Clone)]
enum Node {
    Dir,
    File { source: Source, mode: u32 },
    Symlink(String),
    CharDev { mode: u32, major: u32, minor: u32 },
}

#[derive(Debug, Clone)]
enum Source {
    Host(PathBuf),
    Bytes(Vec<u8>),
}

/// The initramfs content, keyed by path without the leading `/`. A `BTreeMap` puts every
/// directory before its contents (a prefix sorts first), the order the kernel's unpacker needs.
#[derive(Debug, Default)]
struct Tree {
    nodes: BTreeMap<String, Node>,
}

impl Tree {
    /// Adds (or replaces) `path`, creating missing parent directories.
    fn add(&mut self, path: &str, node: Node) {
        let path = path.trim_matches('/');
        let mut parent = String::new();
        for part in path
            .split('/')
            .collect::<Vec<_>>()
            .iter()
            .rev()
            .skip(1)
            .rev()
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            self.nodes.entry(parent.clone()).or_insert(Node::Dir);
        }
        self.nodes.insert(path.to_owned(), node);
    }

    fn add_host_file(&mut self, host: &Path, vm: &str, mode: Option<u32>) -> Result<()> {
        let meta = fs::metadata(host).with_context(|| format!("reading {}", host.display()))?;
        ensure!(meta.is_file(), "{} is not a regular file", host.display());
        let mode = mode.unwrap_or(meta.permissions().mode() & 0o7777);
        self.add(
            vm,
            Node::File {
                source: Source::Host(host.to_owned()),
                mode,
            },
        );
        Ok(())
    }

    /// Copies a host file or directory tree (following symlinks) to `vm`.
    fn add_host_path(&mut self, host: &Path, vm: &str) -> Result<()> {
        let meta = fs::metadata(host).with_context(|| format!("reading {}", host.display()))?;
        if !meta.is_dir() {
            return self.add_host_file(host, vm, None);
        }
        self.add(vm, Node::Dir);
        let mut entries = fs::read_dir(host)
            .with_context(|| format!("listing {}", host.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<io::Result<Vec<_>>>()
            .with_context(|| format!("listing {}", host.display()))?;
        entries.sort();
        for path in entries {
            let name = path
                .file_name()
                .and_then(OsStr::to_str)
                .with_context(|| format!("file name is not UTF-8: {}", path.display()))?;
            self.add_host_path(&path, &format!("{}/{name}", vm.trim_end_matches('/')))?;
        }
        Ok(())
    }

    /// Copies an executable and everything its dynamic loader needs, at the same paths.
    fn add_executable(&mut self, host: &Path, vm: &str) -> Result<()> {
        self.add_host_file(host, vm, Some(0o755))?;
        for lib in shared_libraries(host)? {
            let vm_path = lib
                .to_str()
                .with_context(|| format!("library path not UTF-8: {}", lib.display()))?;
            self.add_host_file(&lib, vm_path, Some(0o755))?;
        }
        Ok(())
    }
}

/// The shared libraries and the ELF interpreter of an executable, per `ldd`. (Libraries it
/// `dlopen`s at run time are not listed: pass those as extra files.)
fn shared_libraries(exe: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(exe)
        .output()
        .with_context(|| format!("running ldd {}", exe.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stdout.contains("statically linked")
        || stderr.contains("not a dynamic executable")
        || stdout.contains("not a dynamic executable")
    {
        return Ok(Vec::new());
    }
    ensure!(
        out.status.success(),
        "ldd {} failed: {}{}",
        exe.display(),
        stdout,
        stderr
    );
    parse_ldd(&stdout).with_context(|| format!("ldd {}", exe.display()))
}

fn parse_ldd(output: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = match line.split_once("=>") {
            Some((name, target)) => {
                let target = target.trim();
                ensure!(
                    !target.starts_with("not found"),
                    "shared library {} not found",
                    name.trim()
                );
                target.split(" (").next().unwrap_or("").trim()
            }
            // No arrow: the interpreter (`/lib64/ld-linux-x86-64.so.2 (0x...)`) or the vDSO.
            None => line.split(" (").next().unwrap_or("").trim(),
        };
        // The vDSO has no file; everything else is an absolute path.
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

fn build_initramfs(opts: &VmOptions, out: &Path) -> Result<()> {
    let mut tree = Tree::default();
    for dir in [
        "dev", "proc", "sys", "tmp", "scratch", "run", "root", "etc", "cases",
    ] {
        tree.add(dir, Node::Dir);
    }
    // The kernel opens /dev/console for init before anything is mounted: it must be in the
    // archive, or /init starts without stdin/stdout. Writing newc ourselves lets an unprivileged
    // build create the device node.
    tree.add(
        "dev/console",
        Node::CharDev {
            mode: 0o600,
            major: 5,
            minor: 1,
        },
    );

    tree.add_executable(Path::new(BUSYBOX), "bin/busybox")
        .context("busybox (apt-get install busybox-static)")?;
    let list = run_quiet(Command::new(BUSYBOX).arg("--list-full"))?;
    let mut applet_names = BTreeSet::new();
    for applet in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        applet_names.insert(applet.rsplit('/').next().unwrap_or(applet).to_owned());
        // Never let an applet shadow /init or busybox itself.
        if applet != "init" && applet != "bin/busybox" && applet != "linuxrc" {
            tree.add(applet, Node::Symlink("/bin/busybox".to_owned()));
        }
    }

    // Explicit binaries go after the applets so that e.g. a real `stat` replaces busybox's.
    for bin in &opts.binaries {
        let name = bin
            .file_name()
            .and_then(OsStr::to_str)
            .with_context(|| format!("bad binary path {}", bin.display()))?;
        ensure!(
            name != "busybox" && name != "sh",
            "{} would replace the VM's shell",
            bin.display()
        );
        if applet_names.contains(name) {
            // Debian's busybox-static is built with FEATURE_SH_STANDALONE: its sh runs its own
            // applet for a bare command name whatever PATH says.
            println!("vm: note: {name} is also a busybox applet; cases must run it as /bin/{name}");
        }
        tree.add_executable(bin, &format!("bin/{name}"))
            .with_context(|| format!("adding binary {}", bin.display()))?;
    }
    tree.add_host_path(&opts.cases_dir, "cases")
        .with_context(|| format!("adding cases from {}", opts.cases_dir.display()))?;
    for (host, vm) in &opts.extra_files {
        let vm = vm
            .to_str()
            .with_context(|| format!("VM path not UTF-8: {}", vm.display()))?;
        ensure!(
            vm.starts_with('/') && vm.len() > 1,
            "VM path must be absolute: {vm}"
        );
        ensure!(vm != "/init", "/init is the harness's");
        tree.add_host_path(host, vm)
            .with_context(|| format!("adding extra file {}", host.display()))?;
    }
    tree.add(
        "init",
        Node::File {
            source: Source::Bytes(INIT_SCRIPT.as_bytes().to_vec()),
            mode: 0o755,
        },
    );

    let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    // gzip is everywhere and keeps the crate free of a compression dependency; the kernel's
    // initramfs unpacker understands it.
    let mut gzip = ChildGuard(
        Command::new("gzip")
            .args(["-n", "-c"])
            .stdin(Stdio::piped())
            .stdout(file)
            .spawn()
            .context("starting gzip")?,
    );
    let stdin = gzip.0.stdin.take().context("gzip stdin was not captured")?;
    let mut writer = io::BufWriter::new(stdin);
    write_newc(&tree, &mut writer).context("writing the initramfs archive")?;
    writer.flush().context("writing to gzip")?;
    drop(writer);
    let status = gzip.0.wait().context("waiting for gzip")?;
    ensure!(status.success(), "gzip failed: {status}");
    Ok(())
}

/// Writes `tree` as a newc ("070701") cpio archive, all owned by root.
fn write_newc(tree: &Tree, w: &mut impl Write) -> Result<()> {
    const S_IFDIR: u32 = 0o040000;
    const S_IFREG: u32 = 0o100000;
    const S_IFLNK: u32 = 0o120000;
    const S_IFCHR: u32 = 0o020000;
    for (ino, (path, node)) in (1u32..).zip(&tree.nodes) {
        let (mode, nlink, rdev, data): (u32, u32, (u32, u32), Vec<u8>) = match node {
            Node::Dir => (S_IFDIR | 0o755, 2, (0, 0), Vec::new()),
            Node::File { source, mode } => {
                let data = match source {
                    Source::Host(p) => {
                        fs::read(p).with_context(|| format!("reading {}", p.display()))?
                    }
                    Source::Bytes(b) => b.clone(),
                };
                (S_IFREG | mode, 1, (0, 0), data)
            }
            Node::Symlink(target) => (S_IFLNK | 0o777, 1, (0, 0), target.as_bytes().to_vec()),
            Node::CharDev { mode, major, minor } => {
                (S_IFCHR | mode, 1, (*major, *minor), Vec::new())
            }
        };
        // newc sizes are 32-bit.
        u32::try_from(data.len()).with_context(|| format!("{path} is too big for cpio"))?;
        newc_entry(w, ino, mode, nlink, rdev, path.as_bytes(), &data)?;
    }
    newc_entry(w, 0, 0, 1, (0, 0), b"TRAILER!!!", &[])
}

fn newc_entry(
    w: &mut impl Write,
    ino: u32,
    mode: u32,
    nlink: u32,
    (rdev_major, rdev_minor): (u32, u32),
    name: &[u8],
    data: &[u8],
) -> Result<()> {
    let name_size = name.len() + 1; // with its NUL
    // Fields: ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor
    // namesize check. mtime 0 keeps the archive reproducible.
    write!(
        w,
        "070701{ino:08X}{mode:08X}{:08X}{:08X}{nlink:08X}{:08X}{:08X}{:08X}{:08X}{rdev_major:08X}{rdev_minor:08X}{name_size:08X}{:08X}",
        0,
        0,
        0,
        data.len(),
        0,
        0,
        0
    )?;
    w.write_all(name)?;
    w.write_all(&[0])?;
    // The header is 110 bytes; name and data are each padded to a multiple of 4.
    w.write_all(&[0; 3][..(4 - (110 + name_size) % 4) % 4])?;
    w.write_all(data)?;
    w.write_all(&[0; 3][..(4 - data.len() % 4) % 4])?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Small helpers

/// Runs a command to completion and returns its stdout; on failure the error names the command
/// and carries its output.
fn run_quiet(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(stdout)
}

fn remove_dir_if_exists(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> Result<Self> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
        // create_dir (not _all) fails if it exists, so we never reuse someone else's directory.
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Command line

/// `cargo xtask vm`: fetch the kernel if needed, run the VM cases, fail unless all pass.
#[derive(Debug, Clone, clap::Args)]
pub struct VmCli {
    /// Host executable to copy into the VM's /bin, with its shared libraries (repeatable).
    #[arg(long)]
    pub binary: Vec<PathBuf>,
    /// Run only the cases whose name contains this.
    #[arg(long)]
    pub filter: Option<String>,
    /// Overall limit; qemu is killed when it runs out.
    #[arg(long, default_value = "600")]
    pub timeout_secs: u64,
    /// Limit for each case inside the VM (a case may override it with `# vm-timeout: <secs>`).
    #[arg(long, default_value = "120")]
    pub case_timeout_secs: u64,
    /// Directory of the cases [default: tests/vm/cases of the workspace].
    #[arg(long)]
    pub cases_dir: Option<PathBuf>,
    /// Kernel and console-log cache [default: $XDG_CACHE_HOME/guardrail-vm or ~/.cache/guardrail-vm].
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Extra file or directory for the VM, as HOST_PATH:VM_PATH (repeatable).
    #[arg(long = "extra", value_parser = parse_extra)]
    pub extra: Vec<(PathBuf, PathBuf)>,
    #[arg(long, default_value = "1024")]
    pub memory_mb: u32,
    /// Guest CPUs (TCG runs one host thread per CPU).
    #[arg(long, default_value = "1")]
    pub cpus: u32,
    /// Copy the whole serial console to stdout while it runs.
    #[arg(long)]
    pub verbose: bool,
}

fn parse_extra(s: &str) -> Result<(PathBuf, PathBuf), String> {
    let (host, vm) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("expected HOST_PATH:VM_PATH, got {s:?}"))?;
    if !vm.starts_with('/') {
        return Err(format!("the VM path must be absolute: {vm:?}"));
    }
    Ok((PathBuf::from(host), PathBuf::from(vm)))
}

/// The cases of this workspace, found from xtask's own manifest directory.
pub fn default_cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("tests")
        .join("vm")
        .join("cases")
}

pub fn cli_main(args: VmCli) -> Result<()> {
    let cache_dir = match args.cache_dir {
        Some(dir) => dir,
        None => default_cache_dir()?,
    };
    let kernel = ensure_kernel(&cache_dir)?;
    let opts = VmOptions {
        binaries: args.binary,
        filter: args.filter,
        timeout: Duration::from_secs(args.timeout_secs),
        case_timeout: Duration::from_secs(args.case_timeout_secs),
        cache_dir,
        extra_files: args.extra,
        memory_mb: args.memory_mb,
        cpus: args.cpus,
        kernel: Some(kernel),
        echo_console: args.verbose,
        ..VmOptions::new(args.cases_dir.unwrap_or_else(default_cases_dir))?
    };
    run_vm_tests(&opts)?.check()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;

    #[test]
    fn kernel_package_from_apt_cache() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            parse_kernel_package(out).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        assert_eq!(parse_kernel_package("linux-image-amd64\n"), None);
        assert_eq!(
            parse_kernel_package("x\n  Depends: <linux-image-virtual>\n"),
            None
        );
    }

    #[test]
    fn ldd_output() {
        let out = "\tlinux-vdso.so.1 (0x00007ffc)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f6b)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f6b)\n";
        let libs = parse_ldd(out).unwrap();
        assert_eq!(
            libs,
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
    }

    #[test]
    fn newc_layout() {
        let mut tree = Tree::default();
        tree.add(
            "a/b/c",
            Node::File {
                source: Source::Bytes(b"hello".to_vec()),
                mode: 0o644,
            },
        );
        let keys: Vec<&str> = tree.nodes.keys().map(String::as_str).collect();
        assert_eq!(keys, ["a", "a/b", "a/b/c"]);
        let mut out = Vec::new();
        write_newc(&tree, &mut out).unwrap();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
    }

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
