//! `cargo xtask setup | run | test | vm | package | sysvm`: the README's commands and their parts.
//!
//! Everything a fresh Debian 12 machine needs is installed here, idempotently: Debian's packages,
//! bpf-linker from crates.io, and the test VM's kernel. Nothing installed by hand is assumed.
mod bench;
mod package;
mod qemu;
mod sysvm;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// Debian packages: the BPF toolchain, the VM, and the real components the tests start.
const APT_PACKAGES: &[&str] = &[
    // The eBPF build (toolchain.md): rustc with a prebuilt `core` for bpfel, LLVM for bpf-linker.
    "rustc-web",
    "libstd-rust-web-dev-bpf",
    // clippy of the same Debian toolchain, to lint the kernel crate for its own target.
    "rust-web-clippy",
    "llvm-22-dev",
    // The LSM-tier VM.
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    // Scenarios the tests replay, and bpftool to check what stays loaded.
    "python3",
    "findutils",
    // The bypass catalogue's `rsync --delete` row.
    "rsync",
    "bpftool",
    // The monitoring daemons the alert tests deliver to (tests/tests/alerts.rs).
    "rsyslog",
    "prometheus-alertmanager",
    // The remote-shutdown tests: a real sshd (PAM sets the audit session id), sudo and tmux.
    "openssh-server",
    "openssh-client",
    "sudo",
    "tmux",
    // The exemption tests run a user's logrotate (tests/tests/host_failsafe_jobs.rs).
    "logrotate",
    // The routine operations (tests/tests/host_routine_ops.rs): a venv for pip, a git repository,
    // a PostgreSQL 15 cluster. Node and npm come with the machine's nodejs (NodeSource on these
    // hosts; Debian's npm would conflict with it, so it is not named here).
    "python3-venv",
    "git",
    "postgresql-15",
];
const BPF_LINKER_VERSION: &str = "0.13.0";

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install everything the build and the tests need (idempotent; quick when done).
    Setup,
    /// Set up, build, and run `guardrail agent` in the foreground with the embedded default policy.
    Run {
        /// Extra arguments for `guardrail agent`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build, and run the whole test suite: lints, unit tests, host (tracepoint tier)
    /// tests, VM (LSM tier) tests, and the packages on a booted Debian 12 (sysvm).
    Test {
        /// Skip the VM (LSM tier) tests.
        #[arg(long)]
        no_vm: bool,
        /// Skip the packages' end-to-end test on Debian 12 with systemd (`cargo xtask sysvm`).
        #[arg(long)]
        no_sysvm: bool,
        /// Only run tests whose name contains this.
        #[arg(long)]
        filter: Option<String>,
    },
    /// Run only the VM (LSM tier) tests.
    Vm(vm::VmCli),
    /// Measure what guardrail costs and lets through (side by side, ratios) and write
    /// BENCHMARKS.md; `--quick` measures each thing once, small, and writes nothing.
    Bench(bench::BenchCli),
    /// Build the .deb and the .rpm into target/package/ (lintian and systemd-analyze checked).
    Package,
    /// Write README.md's coverage table from the bypass catalogue (tests/catalogue/bypass.toml);
    /// the unit test that does it fails in `test` when the README differs.
    Catalogue,
    /// Build the packages, boot Debian 12 with systemd under qemu, install the .deb and test
    /// the service over SSH.
    Sysvm(sysvm::SysVmCli),
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn run_cmd(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("running {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn cargo_bin(name: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    home.join("bin").join(name)
}

/// Installs the Debian packages of `packages` that are missing (one `apt-get update` first).
pub fn apt_install(who: &str, packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("{who}: installing Debian packages: {}", missing.join(" "));
    run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    run_cmd(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing),
    )
}

pub fn setup() -> Result<()> {
    let t = Instant::now();
    apt_install("setup", APT_PACKAGES)?;
    let linker = cargo_bin("bpf-linker");
    let have = Command::new(&linker)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if !have {
        println!(
            "setup: building bpf-linker {BPF_LINKER_VERSION} against Debian's LLVM 22 (about a minute)"
        );
        run_cmd(
            Command::new("cargo")
                .env("LLVM_PREFIX", "/usr/lib/llvm-22")
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--locked",
                ])
                .args(["--no-default-features", "--features", "llvm-22"]),
        )?;
    }
    let kernel = vm::ensure_kernel(&vm::default_cache_dir()?)?;
    println!(
        "setup: done in {:.1}s (VM kernel {})",
        t.elapsed().as_secs_f64(),
        kernel.display()
    );
    Ok(())
}

fn cargo(args: &[&str]) -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root()).args(args);
    // bpf-linker is found through PATH by the agent's build script.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.push(cargo_bin(""));
    c.env("PATH", std::env::join_paths(dirs).unwrap_or(path));
    c
}

fn build_release() -> Result<PathBuf> {
    run_cmd(&mut cargo(&[
        "build",
        "--release",
        "-p",
        "guardrail",
        "-p",
        "guardrail-integration",
        "--bins",
    ]))?;
    Ok(target_dir().join("release/guardrail"))
}

/// Cargo's target directory: $CARGO_TARGET_DIR (a checkout that builds elsewhere), else target/.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|d| if d.is_absolute() { d } else { root().join(d) })
        .unwrap_or_else(|| root().join("target"))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Task::Setup => setup(),
        Task::Run { args } => {
            setup()?;
            let bin = build_release()?;
            println!("run: {} agent {}", bin.display(), args.join(" "));
            let err = {
                use std::os::unix::process::CommandExt;
                Command::new(&bin).arg("agent").args(&args).exec()
            };
            Err(err).with_context(|| format!("executing {}", bin.display()))
        }
        Task::Test {
            no_vm,
            no_sysvm,
            filter,
        } => test(no_vm, no_sysvm, filter),
        Task::Bench(args) => {
            setup()?;
            let bin = build_release()?;
            bench::run(&bin, &root().join("BENCHMARKS.md"), &args)
        }
        Task::Vm(args) => {
            setup()?;
            let bin = build_release()?;
            vm::cli_main(with_binaries(args, &bin))
        }
        Task::Package => {
            let p = package::package()?;
            println!("{}\n{}", p.deb.display(), p.rpm.display());
            Ok(())
        }
        Task::Sysvm(args) => sysvm::cli_main(args),
        Task::Catalogue => {
            let mut c = cargo(&[
                "test",
                "--release",
                "-p",
                "guardrail-integration",
                "--lib",
                "readme_coverage_table_is_generated_from_the_catalogue",
            ]);
            c.env("GUARDRAIL_CATALOGUE_WRITE", "1");
            run_cmd(&mut c)
        }
    }
}

fn with_binaries(mut args: vm::VmCli, agent: &Path) -> vm::VmCli {
    if args.binary.is_empty() {
        args.binary = vm_binaries(agent);
    }
    args
}

/// Helpers the tests run inside the VM, besides the agent.
fn vm_binaries(agent: &Path) -> Vec<PathBuf> {
    let dir = agent.parent().unwrap_or(Path::new("."));
    let mut v = vec![agent.to_path_buf()];
    let testkit = dir.join("guardrail-testkit");
    if testkit.exists() {
        v.push(testkit);
    }
    // GNU find for `find -delete` (busybox's find has no -delete), under a name no busybox applet
    // takes.
    let gnu_find = dir.join("gnu-find");
    if std::fs::copy("/usr/bin/find", &gnu_find).is_ok() {
        v.push(gnu_find);
    }
    v
}

fn test(no_vm: bool, no_sysvm: bool, filter: Option<String>) -> Result<()> {
    let t = Instant::now();
    setup()?;
    let mut failures = Vec::new();
    let mut step = |name: &str, r: Result<()>| match &r {
        Ok(()) => println!("test: {name}: ok"),
        Err(e) => {
            println!("test: {name}: FAILED: {e:#}");
            failures.push(name.to_string());
        }
    };
    step("rustfmt", run_cmd(&mut cargo(&["fmt", "--all", "--check"])));
    step(
        "clippy",
        run_cmd(&mut cargo(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])),
    );
    step("clippy (kernel crate, bpfel)", clippy_ebpf());
    let bin = build_release()?;
    let mut unit = cargo(&["test", "--release", "--workspace", "--no-fail-fast"]);
    unit.env("GUARDRAIL_BIN", &bin);
    if let Some(f) = &filter {
        unit.args(["--", f]);
    }
    step("unit and host tests (tracepoint tier)", run_cmd(&mut unit));
    // Every measurement of the bench once, small: it fails only when one cannot be taken.
    if filter.as_deref().is_none_or(|f| "bench".contains(f)) {
        let quick = bench::BenchCli {
            quick: true,
            ..Default::default()
        };
        step(
            "bench --quick",
            bench::run(&bin, &root().join("BENCHMARKS.md"), &quick),
        );
    }
    if !no_vm {
        let args = vm::VmCli {
            binary: Vec::new(),
            filter: filter.clone(),
            // Limits for a hung VM, not for speed: a busy host (TCG) doubles the usual ~10 min.
            timeout_secs: 1800,
            case_timeout_secs: 300,
            cases_dir: None,
            cache_dir: None,
            extra: Vec::new(),
            memory_mb: 2048,
            // One vCPU: TCG with two starves a vCPU thread when the host is busy and the guest
            // can stall in a cross-CPU wait (soft lockups seen here); one is as fast.
            cpus: 1,
            verbose: false,
            ubuntu_lsm: false,
            kernel_package: None,
        };
        // The kernel matrix: every case on Debian 12's 6.1 and 6.12 (other struct layouts, the
        // 6.9+ LSM static calls), each booted with BPF LSM active (lsm tier) and the way Ubuntu
        // boots (BPF LSM built, not active: the agent must pick the fmodret tier and give the
        // same outcomes). About 4 min each on an idle host, up to 9 on a busy one.
        for (name, ubuntu_lsm, kernel_package) in [
            ("VM tests (LSM tier)", false, None),
            (
                "VM tests (fmod_ret tier, 6.1 with Ubuntu's LSM list)",
                true,
                None,
            ),
            (
                "VM tests (LSM tier, 6.12)",
                false,
                Some("linux-image-6.12-amd64"),
            ),
            (
                "VM tests (fmod_ret tier, 6.12 with Ubuntu's LSM list)",
                true,
                Some("linux-image-6.12-amd64"),
            ),
        ] {
            let args = vm::VmCli {
                ubuntu_lsm,
                kernel_package: kernel_package.map(str::to_string),
                ..args.clone()
            };
            step(name, vm::cli_main(with_binaries(args, &bin)));
        }
    }
    // A filter names cases of the other suites; this one runs with none, or with "sysvm".
    if !no_sysvm && filter.as_deref().is_none_or(|f| "sysvm".contains(f)) {
        let args = sysvm::SysVmCli {
            cache_dir: None,
            deb: None,
            rpm: None,
            // Usually ~6 min; a busy host has taken 20 (the image build is not counted).
            timeout_secs: 2400,
            memory_mb: 2048,
            // One vCPU, as for the VM tests: with two, a TCG vCPU thread starved by the busy host
            // left the other spinning in a cross-CPU wait while the agent attached its programs
            // after the reboot (soft lockups of 44 s, sshd unanswered).
            cpus: 1,
            keep: false,
            only: Vec::new(),
        };
        step(
            "packages on Debian 12 with systemd (sysvm)",
            sysvm::cli_main(args),
        );
    }
    println!("test: finished in {:.0}s", t.elapsed().as_secs_f64());
    if !failures.is_empty() {
        bail!("failed: {}", failures.join(", "));
    }
    Ok(())
}

/// Lints the kernel crate for the target it is built for (as aya lints its eBPF crates): the
/// host workspace never compiles it, so `cargo clippy --workspace` does not see it. Debian's
/// clippy-driver matches Debian's rustc, whose prebuilt `core` for bpfel the crate needs; it is
/// run as cargo's workspace wrapper around that rustc (rustup's `cargo clippy` would put its own
/// driver, of another rustc version, in between).
fn clippy_ebpf() -> Result<()> {
    let mut c = cargo(&[
        "check",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "--target-dir",
    ]);
    c.arg(target_dir().join("ebpf-clippy"))
        .current_dir(root().join("ebpf/guardrail-ebpf"))
        .env("RUSTC", "/usr/bin/rustc")
        .env("RUSTC_WORKSPACE_WRAPPER", "/usr/bin/clippy-driver")
        .env(
            "CLIPPY_ARGS",
            "-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__",
        )
        .env("RUSTC_BOOTSTRAP", "1")
        .env(
            "CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER",
            cargo_bin("bpf-linker"),
        )
        .env(
            "CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS",
            "-C link-arg=--btf -C target-cpu=v3",
        );
    run_cmd(&mut c)
}
