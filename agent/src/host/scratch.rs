//! Private scratch directories for what the agent runs as root (`guardrail selftest`, the
//! userspace tier's blast-radius measurement).
//!
//! A predictable name in a world-writable directory (`/var/tmp/guardrail-selftest-<pid>`) lets
//! any user plant it beforehand: a directory of theirs that root then fills, or a symlink that
//! root follows and truncates (`f0000 -> /etc/shadow`). So every scratch directory here is made
//! fresh by `mkdtemp` (random suffix, mode 0700, fails rather than reuse an existing name)
//! inside a parent only root can write: the agent's runtime directory `/run/guardrail` when it is
//! root-owned and writable by no one else, otherwise the shared parent (`/var/tmp`), where a fresh
//! 0700 directory of root's is just as private (the sticky bit keeps others from renaming it).
//! Files inside are created `O_CREAT|O_EXCL|O_NOFOLLOW`: never an existing file, never through
//! a symlink. The directory and everything in it are removed on drop.
use std::{
    ffi::{CString, OsString},
    fs::{File, OpenOptions},
    io::Write,
    os::unix::{
        ffi::{OsStrExt, OsStringExt},
        fs::{DirBuilderExt, MetadataExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

/// The agent's runtime directory (the admin socket's), the first choice of parent.
pub const PRIVATE_PARENT: &str = "/run/guardrail";
/// Where scratch directories go when the runtime directory is not safe (or is `noexec` and the
/// directory must hold a program to run).
pub const SHARED_PARENT: &str = "/var/tmp";

/// A fresh directory only root can enter, removed (with its contents) on drop.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// A fresh `<purpose>-XXXXXX` in [`PRIVATE_PARENT`] (created 0755 root if missing: the admin
    /// socket lives there too and must stay reachable), else in [`SHARED_PARENT`].
    pub fn new(purpose: &str) -> Result<ScratchDir> {
        Self::pick(purpose, false)
    }

    /// Like [`ScratchDir::new`], on a filesystem that lets root execute the files it holds
    /// (`/run` is often mounted `noexec`).
    pub fn new_exec(purpose: &str) -> Result<ScratchDir> {
        Self::pick(purpose, true)
    }

    fn pick(purpose: &str, exec: bool) -> Result<ScratchDir> {
        let private = Path::new(PRIVATE_PARENT);
        if ensure_private_parent(private).is_ok() && (!exec || !noexec(private)) {
            return Self::in_parent(private, purpose);
        }
        // /tmp when there is no /var/tmp (a minimal system, the test VM's initramfs).
        let shared = [Path::new(SHARED_PARENT), Path::new("/tmp")];
        let usable = |p: &&&Path| check_parent(p).is_ok() && (!exec || !noexec(p));
        let parent = shared.iter().find(usable).unwrap_or(&shared[0]);
        Self::in_parent(parent, purpose)
    }

    /// A fresh `<purpose>-XXXXXX` (mode 0700) in `parent`, which must be a real directory that
    /// only root can write to, or a sticky one owned by root (like `/var/tmp`).
    pub fn in_parent(parent: &Path, purpose: &str) -> Result<ScratchDir> {
        check_parent(parent)?;
        let mut template = parent
            .join(format!("guardrail-{purpose}-XXXXXX"))
            .into_os_string();
        let c = CString::new(template.as_bytes()).context("a NUL in the scratch path")?;
        let mut buf = c.into_bytes_with_nul();
        // SAFETY: `buf` is a NUL-terminated, writable template ending in XXXXXX; mkdtemp
        // rewrites those six bytes in place and creates the directory with mode 0700, failing
        // instead of reusing a name that exists.
        let r = unsafe { libc::mkdtemp(buf.as_mut_ptr() as *mut libc::c_char) };
        if r.is_null() {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("creating a scratch directory in {}", parent.display()));
        }
        buf.pop();
        template = OsString::from_vec(buf);
        let path = PathBuf::from(template);
        // mkdtemp made it; check anyway that what is there now is ours (a real directory of
        // root's, 0700) before anything is written into it.
        let m =
            std::fs::symlink_metadata(&path).with_context(|| format!("stat {}", path.display()))?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if !m.file_type().is_dir() || m.uid() != me || m.mode() & 0o077 != 0 {
            bail!("{} is not the private directory just made", path.display());
        }
        Ok(ScratchDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the directory `rel` (mode 0700) inside; fails if anything is there already.
    pub fn mkdir(&self, rel: &str) -> Result<PathBuf> {
        let p = self.inside(rel)?;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&p)
            .with_context(|| format!("mkdir {}", p.display()))?;
        Ok(p)
    }

    /// Creates the file `rel` inside with `bytes` in it (mode 0600).
    pub fn write(&self, rel: &str, bytes: &[u8]) -> Result<PathBuf> {
        let p = self.inside(rel)?;
        let mut f = create_new(&p, 0o600)?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", p.display()))?;
        Ok(p)
    }

    /// Copies the program at `from` to `rel` inside (mode 0700), for root to run it from here.
    pub fn copy_program(&self, from: &Path, rel: &str) -> Result<PathBuf> {
        let p = self.inside(rel)?;
        let mut src = File::open(from).with_context(|| format!("opening {}", from.display()))?;
        let mut dst = create_new(&p, 0o700)?;
        std::io::copy(&mut src, &mut dst).with_context(|| format!("copying to {}", p.display()))?;
        Ok(p)
    }

    /// `rel` below the directory: relative, no `..`, so nothing lands outside.
    fn inside(&self, rel: &str) -> Result<PathBuf> {
        let r = Path::new(rel);
        if r.is_absolute()
            || r.components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            bail!("scratch name {rel:?} is not a plain relative path");
        }
        Ok(self.path.join(r))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        // remove_dir_all does not follow symlinks (it unlinks them).
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Opens a new file: `O_CREAT|O_EXCL` (never an existing file) and `O_NOFOLLOW` (never through
/// a symlink at the last component).
fn create_new(path: &Path, mode: u32) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))
}

/// Makes [`PRIVATE_PARENT`]-like `dir` if missing (0755 root: others may enter, never write),
/// and checks it: a real directory of root's that no one else can write to, under parents of
/// root's that others cannot write to either, or only with the sticky bit (a tmpfs /run is
/// often 1777: others cannot rename or remove what root made in it).
fn ensure_private_parent(dir: &Path) -> Result<()> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let r = std::fs::DirBuilder::new().mode(0o755).create(dir);
            if let Err(e) = r
                && e.kind() != std::io::ErrorKind::AlreadyExists
            {
                return Err(e).with_context(|| format!("mkdir {}", dir.display()));
            }
        }
        Err(e) => return Err(e).with_context(|| format!("stat {}", dir.display())),
        Ok(_) => {}
    }
    let m = std::fs::symlink_metadata(dir).with_context(|| format!("stat {}", dir.display()))?;
    if !m.file_type().is_dir() || m.uid() != 0 || m.mode() & 0o022 != 0 {
        bail!(
            "{} is not a directory only root can write to (owner {}, mode {:o})",
            dir.display(),
            m.uid(),
            m.mode() & 0o7777
        );
    }
    let mut d = dir.parent();
    while let Some(p) = d {
        check_parent(p)?;
        d = p.parent();
    }
    Ok(())
}

/// A parent for mkdtemp: a real directory of root's that others cannot write, or can only with
/// the sticky bit (so they cannot rename or delete what root makes in it).
fn check_parent(dir: &Path) -> Result<()> {
    let m = std::fs::symlink_metadata(dir).with_context(|| format!("stat {}", dir.display()))?;
    let others_write = m.mode() & 0o022 != 0;
    let sticky = m.mode() & 0o1000 != 0;
    if !m.file_type().is_dir() || m.uid() != 0 || (others_write && !sticky) {
        bail!(
            "{} is no place for root's scratch files (owner {}, mode {:o})",
            dir.display(),
            m.uid(),
            m.mode() & 0o7777
        );
    }
    Ok(())
}

/// Whether `dir`'s filesystem is mounted `noexec`.
fn noexec(dir: &Path) -> bool {
    let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else {
        return true;
    };
    // SAFETY: a zeroed statvfs is a valid out-parameter; `c` is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    r != 0 || st.f_flag & libc::ST_NOEXEC != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn fresh_private_and_removed_on_drop() {
        if !root() {
            return;
        }
        let a = ScratchDir::in_parent(Path::new("/var/tmp"), "unit").expect("test step");
        let b = ScratchDir::in_parent(Path::new("/var/tmp"), "unit").expect("test step");
        assert_ne!(
            a.path(),
            b.path(),
            "two scratch directories never share a name"
        );
        let m = std::fs::symlink_metadata(a.path()).expect("test step");
        assert_eq!(m.mode() & 0o7777, 0o700);
        a.mkdir("d").expect("test step");
        a.write("d/f", b"x").expect("test step");
        assert!(
            a.write("d/f", b"y").is_err(),
            "an existing file is not reused"
        );
        assert!(a.mkdir("d").is_err(), "an existing directory is not reused");
        assert_eq!(
            std::fs::read(a.path().join("d/f")).expect("test step"),
            b"x"
        );
        std::os::unix::fs::symlink("/etc/hostname", a.path().join("l")).expect("test step");
        assert!(a.write("l", b"y").is_err(), "a symlink is not followed");
        assert!(a.write("../x", b"y").is_err() && a.write("/x", b"y").is_err());
        let p = a.path().to_path_buf();
        drop(a);
        assert!(!p.exists(), "removed on drop");
    }

    #[test]
    fn a_parent_others_can_write_without_sticky_is_refused() {
        if !root() {
            return;
        }
        let s = ScratchDir::in_parent(Path::new("/var/tmp"), "unit").expect("test step");
        let open = s.mkdir("open").expect("test step");
        std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .expect("test step");
        assert!(ScratchDir::in_parent(&open, "x").is_err());
        assert!(ensure_private_parent(&open).is_err());
        assert!(
            ensure_private_parent(&open.join("below")).is_err(),
            "not under a parent others can write to without the sticky bit"
        );
        // Under a sticky, world-writable parent (/var/tmp; a tmpfs /run): made 0755 and used.
        let private = s.path().join("private");
        ensure_private_parent(&private).expect("a private parent below /var/tmp");
        let m = std::fs::symlink_metadata(&private).expect("test step");
        assert_eq!(m.mode() & 0o7777, 0o755);
        let link = s.path().join("link");
        std::os::unix::fs::symlink(s.path(), &link).expect("test step");
        assert!(
            ScratchDir::in_parent(&link, "x").is_err(),
            "no symlinked parent"
        );
    }
}
