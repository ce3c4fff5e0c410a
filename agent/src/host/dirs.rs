//! Directories the agent keeps its own files in (the event log's, the state directory): the
//! directory itself is root's alone (0700), and any parent it has to create is an ordinary
//! system directory (0755). Creating the parents 0700 as well (`DirBuilder::recursive` applies
//! one mode to every level) made a missing `/var` root-only on a minimal system, after which no
//! other user could reach `/var/tmp`: the agent must never change what other programs can do.
use std::{io, os::unix::fs::DirBuilderExt, path::Path};

/// Creates `dir` with mode 0700 (subject to the umask) and its missing parents with 0755; an
/// existing `dir` is left as it is (callers check or fix its mode).
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    if let Some(parent) = dir.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn only_the_directory_itself_is_private() {
        let d = std::env::temp_dir().join(format!("guardrail-dirs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let leaf = d.join("var/lib/guardrail");
        create_private_dir(&leaf).expect("create");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&leaf), 0o700 & !umask());
        assert_eq!(mode(&d.join("var")), 0o755 & !umask());
        assert_eq!(mode(&d.join("var/lib")), 0o755 & !umask());
        create_private_dir(&leaf).expect("an existing directory is fine");
        let _ = std::fs::remove_dir_all(&d);
    }

    fn umask() -> u32 {
        // SAFETY: umask(2) cannot fail; the old mask is put back at once.
        let old = unsafe { libc::umask(0o022) };
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        old
    }
}
