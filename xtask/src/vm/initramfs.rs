//! The LSM-tier VM's initramfs, written here as a newc cpio archive (gzipped): busybox with its
//! applets, `/init` (`tests/vm/init.sh`), the cases, and host executables with the shared
//! libraries `ldd` names for them.
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};

use super::VmOptions;
use crate::qemu::{ChildGuard, run_quiet};

/// The `/init` of the initramfs. Compiled in so that the harness and its init cannot drift apart.
const INIT_SCRIPT: &str = include_str!("../../../tests/vm/init.sh");
/// The static busybox of Debian's `busybox-static` package.
const BUSYBOX: &str = "/bin/busybox";

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

/// Writes the VM's initramfs (gzipped newc) to `out`: busybox and its applets, `/init`, the
/// cases, the binaries and extra files of `opts`.
pub(super) fn build_initramfs(opts: &VmOptions, out: &Path) -> Result<()> {
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
    let mut gzip = ChildGuard::new(
        Command::new("gzip")
            .args(["-n", "-c"])
            .stdin(Stdio::piped())
            .stdout(file)
            .spawn()
            .context("starting gzip")?,
    );
    let stdin = gzip.stdin.take().context("gzip stdin was not captured")?;
    let mut writer = io::BufWriter::new(stdin);
    write_newc(&tree, &mut writer).context("writing the initramfs archive")?;
    writer.flush().context("writing to gzip")?;
    drop(writer);
    let status = gzip.wait().context("waiting for gzip")?;
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

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;

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
}
