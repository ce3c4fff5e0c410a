//! `cargo xtask package`: the .deb (cargo-deb) and the .rpm (cargo-generate-rpm) in
//! `target/package/`, from a release build, checked by lintian and `systemd-analyze verify`.
//!
//! Everything it needs is installed here: the project's set-up, Debian's lintian and dpkg-dev
//! (dpkg-shlibdeps computes the .deb's library dependencies), and both packagers from crates.io
//! at pinned versions that build with rustc 1.95. The packaging metadata lives in
//! `agent/Cargo.toml` (`[package.metadata.deb]`, `[package.metadata.generate-rpm]`); the files
//! it installs in `packaging/`.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail, ensure};

use crate::{apt_install, cargo, cargo_bin, root, run_cmd};

const CARGO_DEB_VERSION: &str = "3.8.0";
const CARGO_GENERATE_RPM_VERSION: &str = "0.21.1";
/// lintian; dpkg-dev for dpkg-shlibdeps; systemd and procps (/bin/kill, the unit's ExecReload)
/// for `systemd-analyze verify`; binutils to strip the .rpm's binary.
const APT_PACKAGES: &[&str] = &["lintian", "dpkg-dev", "systemd", "procps", "binutils"];
/// Completion scripts shipped in the packages (clap_complete's file names).
const SHELLS: &[&str] = &["bash", "zsh", "fish"];

/// The built packages.
#[derive(Debug, Clone)]
pub struct Packages {
    pub deb: PathBuf,
    pub rpm: PathBuf,
}

/// Set-up, build, generate, package, check. Returns the two packages.
pub fn package() -> Result<Packages> {
    let t = Instant::now();
    crate::setup()?;
    setup_tools()?;
    let bin = crate::build_release()?;
    check_version(&bin)?;
    let out = root().join("target/package");
    generate_docs(&bin, &out)?;

    // --no-build: the binary above is the one checked. --strip: the release profile keeps
    // debug info for the developers' backtraces (35 MB); the packages do not need it.
    run_cmd(
        cargo(&[
            "deb",
            "-p",
            "guardrail",
            "--no-build",
            "--strip",
            "--output",
        ])
        .arg(&out)
        .env("PATH", path_with_cargo_bin()),
    )?;
    let stripped = out.join("bin/guardrail");
    fs::create_dir_all(out.join("bin"))?;
    run_cmd(Command::new("strip").arg("-o").arg(&stripped).arg(&bin))?;
    check_version(&stripped)?;
    run_cmd(
        cargo(&["generate-rpm", "-p", "agent", "--output"])
            .arg(&out)
            .env("PATH", path_with_cargo_bin()),
    )?;
    let deb = newest(&out, "deb")?;
    let rpm = newest(&out, "rpm")?;
    lintian(&deb)?;
    verify_unit(&deb)?;
    println!("package: done in {:.0}s", t.elapsed().as_secs_f64());
    Ok(Packages { deb, rpm })
}

fn path_with_cargo_bin() -> std::ffi::OsString {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.insert(0, cargo_bin(""));
    std::env::join_paths(dirs).unwrap_or(path)
}

fn setup_tools() -> Result<()> {
    apt_install("package", APT_PACKAGES)?;
    for (krate, bin, version) in [
        ("cargo-deb", "cargo-deb", CARGO_DEB_VERSION),
        (
            "cargo-generate-rpm",
            "cargo-generate-rpm",
            CARGO_GENERATE_RPM_VERSION,
        ),
    ] {
        let have = Command::new(cargo_bin(bin))
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains(version))
            .unwrap_or(false);
        if !have {
            println!("package: installing {krate} {version} from crates.io (once)");
            run_cmd(Command::new("cargo").args([
                "install",
                krate,
                "--version",
                version,
                "--locked",
            ]))?;
        }
    }
    Ok(())
}

/// `guardrail --version` must name the commit the package was built from.
fn check_version(bin: &Path) -> Result<()> {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", bin.display()))?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ensure!(
        out.status.success() && !version.contains("unknown commit"),
        "`guardrail --version` should show the version and the commit, got {version:?}"
    );
    println!("package: {version}");
    Ok(())
}

/// Man pages (gzipped, as Debian policy wants) and completions from the binary's own CLI.
fn generate_docs(bin: &Path, out: &Path) -> Result<()> {
    let man = out.join("man");
    let completions = out.join("completions");
    // Start clean so a renamed subcommand leaves no stale page behind.
    for dir in [&man, &completions] {
        if dir.exists() {
            fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    run_cmd(Command::new(bin).args(["generate", "man"]).arg(&man))?;
    for shell in SHELLS {
        run_cmd(
            Command::new(bin)
                .args(["generate", "completions", shell])
                .arg(&completions),
        )?;
    }
    let mut pages = 0;
    for entry in fs::read_dir(&man).with_context(|| format!("listing {}", man.display()))? {
        let page = entry?.path();
        if page.extension().is_some_and(|e| e == "1") {
            // -n: no name or time stamp in the header, so the package is reproducible.
            run_cmd(Command::new("gzip").args(["-9", "-n", "-f"]).arg(&page))?;
            pages += 1;
        }
    }
    ensure!(pages > 0, "no man page generated in {}", man.display());
    Ok(())
}

fn newest(dir: &Path, ext: &str) -> Result<PathBuf> {
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = entry?.path();
        if p.extension().is_some_and(|e| e == ext) {
            let m = fs::metadata(&p)?.modified()?;
            if best.as_ref().is_none_or(|(t, _)| m > *t) {
                best = Some((m, p));
            }
        }
    }
    best.map(|(_, p)| p)
        .with_context(|| format!("no .{ext} in {}", dir.display()))
}

/// Errors fail the build; warnings are printed (packaging/README.md explains the one that stays).
fn lintian(deb: &Path) -> Result<()> {
    let out = Command::new("lintian")
        .args(["--fail-on", "error"])
        .arg(deb)
        .output()
        .context("running lintian")?;
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines() {
        println!("package: lintian: {line}");
    }
    if !out.status.success() {
        bail!(
            "lintian found errors in {}: {}",
            deb.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    println!("package: lintian: no errors");
    Ok(())
}

/// `systemd-analyze verify` of the unit as packaged. It runs against the host (a tree without
/// systemd's own units cannot be verified), so the one complaint allowed is that a command the
/// package itself installs is missing on the host; the tree must have it, executable.
/// (`cargo xtask sysvm` verifies the unit again on the installed system, with nothing allowed.)
fn verify_unit(deb: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tree = root().join("target/package/tree");
    if tree.exists() {
        fs::remove_dir_all(&tree).with_context(|| format!("removing {}", tree.display()))?;
    }
    run_cmd(Command::new("dpkg").arg("-x").arg(deb).arg(&tree))?;
    let unit = tree.join("usr/lib/systemd/system/guardrail.service");
    ensure!(unit.is_file(), "the .deb has no {}", unit.display());
    let out = Command::new("systemd-analyze")
        // The man page is in the tree, not in the host's man database.
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .context("running systemd-analyze verify")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut problems = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let shipped = line
            .split_once("Command ")
            .and_then(|(_, rest)| {
                rest.strip_suffix(" is not executable: No such file or directory")
            })
            .filter(|cmd| !Path::new(cmd).exists())
            .map(|cmd| tree.join(cmd.trim_start_matches('/')))
            .is_some_and(|p| {
                fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            });
        if !shipped {
            problems.push(line.to_string());
        }
    }
    ensure!(
        problems.is_empty(),
        "systemd-analyze verify {}:\n{}",
        unit.display(),
        problems.join("\n")
    );
    println!("package: systemd-analyze verify: ok");
    Ok(())
}
