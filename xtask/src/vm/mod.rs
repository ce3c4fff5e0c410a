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
//!
//! The parts: [`kernel`] (the Debian kernel), [`initramfs`] (the archive), [`console`] (one boot
//! and its console markers); qemu plumbing shared with `cargo xtask sysvm` is in [`crate::qemu`].

mod console;
mod initramfs;
mod kernel;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};

use crate::qemu::{TempDir, prune_logs};
use console::{Outcome, boot_vm};
use initramfs::build_initramfs;
pub use kernel::{ensure_kernel, ensure_kernel_from};

/// The kernel command line before `lsm=`.
const KERNEL_CMDLINE: &str = "console=ttyS0 quiet panic=-1 cryptomgr.notests";
/// BPF LSM is only active when `bpf` is in the boot-time LSM list; Debian's default omits it.
pub const LSM_WITH_BPF: &str = "lockdown,capability,landlock,yama,bpf";
/// Ubuntu's active LSM list (22.04 to 25.04, minus integrity, which 6.1 does not list): BPF LSM
/// built but inactive, so the agent must pick the fmodret tier.
pub const LSM_UBUNTU: &str = "lockdown,capability,landlock,yama,apparmor";
/// Old console logs are pruned beyond this many, so the cache does not grow without bound.
const KEEP_LOGS: usize = 20;

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
    /// The kernel's `lsm=` list. The cases expect the lsm tier when it has `bpf`, else the
    /// fmodret tier (passed to them as `guardrail.tier=` on the command line).
    pub lsm: String,
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
            lsm: LSM_WITH_BPF.to_string(),
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
    crate::qemu::cache_dir("guardrail-vm")
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
    // One more log is about to be written.
    prune_logs(&log_dir, KEEP_LOGS - 1);
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
        let tier = if opts.lsm.split(',').any(|l| l == "bpf") {
            "lsm"
        } else {
            "fmodret"
        };
        let mut cmdline = format!(
            "{KERNEL_CMDLINE} lsm={} guardrail.tier={tier} guardrail.case_timeout={}",
            opts.lsm,
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
    /// Boot with Ubuntu's LSM list (no `bpf`): the cases expect the fmodret tier.
    #[arg(long)]
    pub ubuntu_lsm: bool,
    /// Debian package of the kernel to boot, e.g. linux-image-6.12-amd64 [default:
    /// linux-image-amd64, Debian 12's 6.1].
    #[arg(long)]
    pub kernel_package: Option<String>,
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
    let kernel = match &args.kernel_package {
        Some(package) => ensure_kernel_from(&cache_dir, package)?,
        None => ensure_kernel(&cache_dir)?,
    };
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
        lsm: if args.ubuntu_lsm {
            LSM_UBUNTU
        } else {
            LSM_WITH_BPF
        }
        .to_string(),
        ..VmOptions::new(args.cases_dir.unwrap_or_else(default_cases_dir))?
    };
    run_vm_tests(&opts)?.check()
}
