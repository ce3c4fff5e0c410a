//! `cargo xtask package`: the .deb (cargo-deb) and the .rpm (cargo-generate-rpm) in
//! `target/package/`, from a release build, checked by lintian and `systemd-analyze verify`.
//!
//! Everything it needs is installed here: the project's set-up, Debian's lintian and dpkg-dev
//! (dpkg-shlibdeps computes the .deb's library dependencies), and both packagers from crates.io
//! at pinned versions that build with rustc 1.95. The packaging metadata lives in
//! `agent/Cargo.toml` (`[package.metadata.deb]`, `[package.metadata.generate-rpm]`); the files
//! it installs in `packaging/`.
use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail, ensure};

use crate::{apt_install, cargo, cargo_bin, root, run_cmd};

const CARGO_DEB_VERSION: &str = "3.8.0";
const CARGO_GENERATE_RPM_VERSION: &str = "0.21.1";
/// lintian; dpkg-dev for dpkg-shlibdeps; systemd and procps (/bin/kill, the unit's ExecReload)
/// for `systemd-analyze verify`; binutils to strip the .rpm's binary; rpm to install the .rpm
/// into a scratch root.
const APT_PACKAGES: &[&str] = &[
    "lintian", "dpkg-dev", "systemd", "procps", "binutils", "rpm",
];
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
    let deb_tree = verify_unit(&deb)?;
    check_rpm(&rpm, &deb, &deb_tree)?;
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
/// Returns the unpacked tree (the .rpm is compared with it).
fn verify_unit(deb: &Path) -> Result<PathBuf> {
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
    Ok(tree)
}

/// Paths only the .deb has: Debian's copyright file and changelog (the .rpm keeps both in its
/// header).
const DEB_ONLY: &[&str] = &[
    "/usr/share/doc/guardrail/copyright",
    "/usr/share/doc/guardrail/changelog.Debian.gz",
];
/// Where the .rpm puts a file the .deb puts elsewhere, by each distribution's convention.
const RPM_PATHS: &[(&str, &str)] = &[(
    "/usr/share/zsh/vendor-completions/_guardrail",
    "/usr/share/zsh/site-functions/_guardrail",
)];

/// The .rpm, installed with rpm itself into a scratch root (`rpm --root`, its own database
/// there): `rpm -V` finds every file as the header says; the files are the .deb's payload
/// (same contents and modes, the binary aside, which each packager strips itself), the
/// conffiles are `%config(noreplace)`, and the installed binary runs and names the same
/// version and commit. Not proven here: the scriptlets (no systemd in a scratch root, so
/// `--noscripts`; `cargo xtask sysvm` runs them on Debian's systemd) and the dependencies on
/// an RPM-based distribution (`--nodeps`: the scratch root has no packages).
fn check_rpm(rpm: &Path, deb: &Path, deb_tree: &Path) -> Result<()> {
    let scratch = root().join("target/package/rpm-root");
    if scratch.exists() {
        fs::remove_dir_all(&scratch).with_context(|| format!("removing {}", scratch.display()))?;
    }
    fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let rpm_in = |args: &[&str]| {
        let mut c = Command::new("rpm");
        c.arg("--root")
            .arg(&scratch)
            .args(["--dbpath", "/var/lib/rpm"])
            .args(args);
        c
    };
    // Debian's rpm says on stderr that it is not Debian's package manager: shown on failure only.
    let out = rpm_in(&["-i", "--nodeps", "--noscripts"])
        .arg(rpm)
        .output()
        .context("running rpm -i")?;
    ensure!(
        out.status.success(),
        "rpm --root {} -i {}: {}",
        scratch.display(),
        rpm.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let verify = rpm_in(&["-V", "--nodeps", "guardrail"])
        .output()
        .context("running rpm -V")?;
    ensure!(
        verify.status.success(),
        "rpm -V guardrail in {}: {}{}",
        scratch.display(),
        String::from_utf8_lossy(&verify.stdout).trim(),
        String::from_utf8_lossy(&verify.stderr).trim()
    );

    // The installed files, with rpm's flags (c: %config, n: noreplace, d: %doc).
    let out = rpm_in(&[
        "-q",
        "--qf",
        "[%{FILENAMES}\t%{FILEFLAGS:fflags}\t%{FILEMODES:octal}\n]",
        "guardrail",
    ])
    .output()
    .context("running rpm -q")?;
    ensure!(out.status.success(), "rpm -q guardrail failed");
    let mut rpm_files: BTreeMap<String, (String, u32)> = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut f = line.split('\t');
        let (Some(path), Some(flags), Some(mode)) = (f.next(), f.next(), f.next()) else {
            bail!("unexpected rpm -q line: {line:?}");
        };
        let mode = u32::from_str_radix(mode, 8)
            .with_context(|| format!("mode of {path} in rpm -q: {mode:?}"))?;
        rpm_files.insert(path.to_string(), (flags.to_string(), mode));
    }

    // The .deb's payload, as `dpkg -x` unpacked it for verify_unit, mapped to the .rpm's paths.
    let mut deb_files: BTreeMap<String, PathBuf> = BTreeMap::new();
    collect_files(deb_tree, deb_tree, &mut deb_files)?;
    let mut expected: BTreeMap<String, PathBuf> = BTreeMap::new();
    for (path, file) in deb_files {
        if DEB_ONLY.contains(&path.as_str()) {
            continue;
        }
        let path = RPM_PATHS
            .iter()
            .find(|(d, _)| *d == path)
            .map_or(path.clone(), |(_, r)| r.to_string());
        expected.insert(path, file);
    }
    let missing: Vec<&String> = expected
        .keys()
        .filter(|p| !rpm_files.contains_key(*p))
        .collect();
    let extra: Vec<&String> = rpm_files
        .keys()
        .filter(|p| !expected.contains_key(*p))
        .collect();
    ensure!(
        missing.is_empty() && extra.is_empty(),
        "the .rpm's files differ from the .deb's payload: missing {missing:?}, extra {extra:?}"
    );
    for (path, deb_file) in &expected {
        let installed = scratch.join(path.trim_start_matches('/'));
        let (_, rpm_mode) = &rpm_files[path];
        let deb_mode = fs::metadata(deb_file)
            .with_context(|| format!("reading {}", deb_file.display()))?
            .permissions()
            .mode();
        ensure!(
            rpm_mode & 0o7777 == deb_mode & 0o7777,
            "{path}: mode {:o} in the .rpm, {:o} in the .deb",
            rpm_mode & 0o7777,
            deb_mode & 0o7777
        );
        if path != "/usr/bin/guardrail" {
            let a =
                fs::read(&installed).with_context(|| format!("reading {}", installed.display()))?;
            let b =
                fs::read(deb_file).with_context(|| format!("reading {}", deb_file.display()))?;
            ensure!(a == b, "{path} differs between the .rpm and the .deb");
        }
    }

    // The conffiles: the .deb's list, each %config(noreplace) in the .rpm, and nothing else.
    let out = Command::new("dpkg-deb")
        .args(["--info"])
        .arg(deb)
        .arg("conffiles")
        .output()
        .context("running dpkg-deb --info")?;
    ensure!(
        out.status.success(),
        "dpkg-deb --info {} conffiles failed",
        deb.display()
    );
    let mut conffiles: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    conffiles.sort();
    let configs: Vec<&String> = rpm_files
        .iter()
        .filter(|(_, (flags, _))| flags.contains('c'))
        .map(|(p, _)| p)
        .collect();
    ensure!(
        configs
            .iter()
            .map(|p| p.as_str())
            .eq(conffiles.iter().map(String::as_str)),
        "%config files in the .rpm {configs:?}, conffiles in the .deb {conffiles:?}"
    );
    for p in &configs {
        ensure!(
            rpm_files[*p].0.contains('n'),
            "{p} is %config but not noreplace in the .rpm: an upgrade would replace a local edit"
        );
    }

    // The installed binary runs and is the .deb's build.
    let version = |bin: &Path| -> Result<String> {
        let out = Command::new(bin)
            .arg("--version")
            .output()
            .with_context(|| format!("running {} --version", bin.display()))?;
        ensure!(out.status.success(), "{} --version failed", bin.display());
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let from_rpm = version(&scratch.join("usr/bin/guardrail"))?;
    let from_deb = version(&deb_tree.join("usr/bin/guardrail"))?;
    ensure!(
        from_rpm == from_deb && !from_rpm.contains("unknown commit"),
        "the .rpm's guardrail says {from_rpm:?}, the .deb's {from_deb:?}"
    );

    // The scriptlets at least parse (they run in `cargo xtask sysvm`).
    for tag in ["POSTIN", "PREUN", "POSTUN"] {
        let out = Command::new("rpm")
            .args(["-qp", "--qf", &format!("%{{{tag}}}")])
            .arg(rpm)
            .output()
            .context("running rpm -qp")?;
        let script = String::from_utf8_lossy(&out.stdout).to_string();
        ensure!(
            out.status.success() && script != "(none)",
            "the .rpm has no %{tag} scriptlet"
        );
        run_cmd(Command::new("sh").args(["-n", "-c", &script]))
            .with_context(|| format!("the .rpm's %{tag} scriptlet does not parse"))?;
    }
    println!(
        "package: .rpm installed with rpm --root into {}: rpm -V clean, {} files as in the .deb, %config(noreplace) {}, {from_rpm}",
        scratch.display(),
        rpm_files.len(),
        configs
            .iter()
            .map(|p| p.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(())
}

/// Regular files below `dir`, by their path from `base` ("/usr/bin/guardrail").
fn collect_files(base: &Path, dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let meta = fs::symlink_metadata(&path)?;
        if meta.is_dir() {
            collect_files(base, &path, out)?;
        } else {
            let rel = path.strip_prefix(base).unwrap_or(&path);
            out.insert(format!("/{}", rel.display()), path.clone());
        }
    }
    Ok(())
}
