//! The kernel the LSM-tier VM boots: a Debian kernel image package, fetched once with apt into
//! the cache dir and kept there (only `boot/vmlinuz-*` and `boot/config-*`).
//!
//! Which kernel is named by its package: [`DEFAULT_KERNEL`] is the meta package that follows
//! Debian 12's current kernel. Another one (e.g. a newer series, to run the cases on two
//! kernels) only needs another name passed to [`ensure_kernel_from`]: every extracted package has
//! its own directory `kernel/<package>/`.
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

use crate::qemu::{remove_dir_if_exists, run_quiet};

/// The package whose image the VM boots unless told otherwise: it depends on Debian's current
/// kernel image package (`linux-image-6.1.0-<abi>-amd64` on Debian 12), with `CONFIG_BPF_LSM=y`
/// and BTF.
pub const DEFAULT_KERNEL: &str = "linux-image-amd64";

/// [`ensure_kernel_from`] for [`DEFAULT_KERNEL`].
pub fn ensure_kernel(cache_dir: &Path) -> Result<PathBuf> {
    ensure_kernel_from(cache_dir, DEFAULT_KERNEL)
}

/// Makes sure the kernel image package that `meta` (e.g. [`DEFAULT_KERNEL`]) depends on is
/// extracted under `cache_dir/kernel/<package>/boot/` and returns its `vmlinuz` path.
///
/// Quick and offline when that exact package is already extracted. Runs `apt-get update` only if
/// apt knows no candidate; if apt still knows none, falls back to a kernel cached earlier.
pub fn ensure_kernel_from(cache_dir: &Path, meta: &str) -> Result<PathBuf> {
    let kernel_root = cache_dir.join("kernel");
    fs::create_dir_all(&kernel_root)
        .with_context(|| format!("creating kernel cache {}", kernel_root.display()))?;

    // Failures of apt are not fatal yet: a kernel cached earlier still lets the VM run offline.
    let lookup = || {
        kernel_package(meta).unwrap_or_else(|e| {
            eprintln!("vm: warning: {e:#}");
            None
        })
    };
    let package = match lookup() {
        Some(p) => Some(p),
        None => {
            eprintln!("vm: apt knows no {meta} dependency; running apt-get update");
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
                "vm: warning: cannot resolve {meta}; using cached {}",
                cached.display()
            );
            return Ok(cached);
        }
        bail!("cannot find the package {meta} depends on (apt-cache depends)");
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

/// The exact image package `meta` depends on, e.g. `linux-image-6.1.0-56-amd64` for
/// `linux-image-amd64`.
fn kernel_package(meta: &str) -> Result<Option<String>> {
    let out = run_quiet(Command::new("apt-cache").args(["depends", meta]))?;
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

/// The most recently extracted kernel of any package: the offline fallback. (With a second kernel
/// package in use, this would have to be told which one it stands in for.)
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

#[cfg(test)]
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
}
