//! The last policy that loaded, kept for a start whose policy is broken.
//!
//! A policy with errors at boot used to fail the start (the unit's `policy check`, then the
//! agent itself): one typo in /etc/guardrail and the host ran unguarded after its next reboot.
//! Now every policy that loads is copied, file by file with its source names, to
//! `STATE_DIR/last-good.json`; a start whose policy has errors runs on that copy instead, says so
//! loudly (stderr, the event log's `policy_fallback`, `guardrail status`), and goes back to the
//! policy on disk as soon as it is fixed (the policy watcher reloads it). The embedded default is
//! the last resort, when no copy exists.
//!
//! The copy decides what is enforced, so it is root's alone: written as a new file (O_EXCL,
//! O_NOFOLLOW, mode 0600) in a directory of root's with mode 0700, then renamed over the old
//! one; a copy or directory that anybody else owns or may write is ignored.
use std::{
    io::Write,
    os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::{LoadedPolicy, PolicySource};

pub const STATE_DIR: &str = "/var/lib/guardrail";
const FILE: &str = "last-good.json";

#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    /// When it was saved (RFC 3339 UTC).
    saved_at: String,
    /// Where it came from (`/etc/guardrail/policy.toml + /etc/guardrail/policy.d/*.toml`).
    source: String,
    /// Every file, in merge order: (name, text).
    files: Vec<(String, String)>,
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// `dir` exists, is a directory (not a link to one) of ours that nobody else may write.
fn check_dir(dir: &Path) -> Result<()> {
    let m = std::fs::symlink_metadata(dir).with_context(|| format!("{}", dir.display()))?;
    if !m.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    if m.uid() != euid() || m.mode() & 0o022 != 0 {
        bail!(
            "{} is not root's alone (owner uid {}, mode {:o})",
            dir.display(),
            m.uid(),
            m.mode() & 0o7777
        );
    }
    Ok(())
}

/// Saves the policy `source` holds now, if it still loads (it may have changed since the agent
/// loaded it: what is saved must be a policy that loads).
pub fn save(dir: &Path, source: &PolicySource) -> Result<()> {
    let files = source
        .snapshot()
        .context("reading the policy files again")?;
    super::load_sources(&files)
        .map_err(|_| anyhow::anyhow!("the policy changed on disk since it loaded"))?;
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            crate::host::dirs::create_private_dir(dir)
                .with_context(|| format!("creating {}", dir.display()))?
        }
        _ => {
            check_dir(dir)?;
            // tmpfiles.d used to create it 0750: the copy is root's alone.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    check_dir(dir)?;
    let saved = Saved {
        saved_at: crate::timefmt::now_rfc3339(),
        source: source.describe(),
        files,
    };
    let tmp = dir.join(format!(".{FILE}.{}", std::process::id()));
    // A leftover of a crashed save under our pid: never followed, removed.
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    let written = serde_json::to_vec_pretty(&saved)
        .map_err(anyhow::Error::from)
        .and_then(|b| f.write_all(&b).map_err(Into::into))
        .and_then(|_| f.sync_all().map_err(Into::into));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("writing {}", tmp.display())));
    }
    std::fs::rename(&tmp, dir.join(FILE))
        .with_context(|| format!("renaming {} into place", tmp.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The last good policy: (it, "saved TIME from SOURCE").
pub fn load(dir: &Path) -> Result<(LoadedPolicy, String)> {
    check_dir(dir)?;
    let path: PathBuf = dir.join(FILE);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let m = f.metadata()?;
    if !m.is_file() || m.uid() != euid() || m.mode() & 0o022 != 0 {
        bail!("{} is not root's alone", path.display());
    }
    let saved: Saved =
        serde_json::from_reader(f).with_context(|| format!("reading {}", path.display()))?;
    let policy = super::load_sources(&saved.files).map_err(|report| {
        anyhow::anyhow!(
            "{} no longer loads: {}",
            path.display(),
            report.lines().next().unwrap_or("")
        )
    })?;
    Ok((
        policy,
        format!("saved {} from {}", saved.saved_at, saved.source),
    ))
}

/// The policy to start on: `source`'s, else the last good one, else the embedded default. The
/// second value, when not the source's, says why, for the log, the event log and `status`.
pub fn policy_at_start(
    source: &PolicySource,
    state_dir: &Path,
) -> Result<(LoadedPolicy, Option<String>)> {
    let report = match source.load() {
        Ok(p) => {
            if let Err(e) = save(state_dir, source) {
                eprintln!("guardrail: WARNING: the last good policy was not saved: {e:#}");
            }
            return Ok((p, None));
        }
        Err(report) => report,
    };
    eprintln!("{report}");
    let first = report.lines().next().unwrap_or("").to_string();
    let broken = format!("the policy {} has errors ({first})", source.describe());
    let (policy, why) = match load(state_dir) {
        Ok((p, saved)) => (
            p,
            format!("{broken}: the last good policy ({saved}) is in force instead"),
        ),
        Err(e) => {
            let p = PolicySource::Embedded
                .load()
                .map_err(|r| anyhow::anyhow!("the embedded default policy has errors:\n{r}"))?;
            (
                p,
                format!(
                    "{broken}, and there is no last good policy ({e:#}): the embedded default is in force instead"
                ),
            )
        }
    };
    eprintln!(
        "guardrail: WARNING: {why}. Fix it and the agent loads it at once (`guardrail policy check`)."
    );
    Ok((policy, Some(why)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("guardrail-lastgood-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn saved_policy_loads_back_and_is_the_owners_alone() {
        let top = scratch("roundtrip");
        let dir = top.join("state");
        save(&dir, &PolicySource::Embedded).expect("saved");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(FILE)), 0o600);
        let (p, saved) = load(&dir).expect("loads back");
        assert!(saved.ends_with("from (embedded default)"), "{saved}");
        let embedded = PolicySource::Embedded.load().expect("default");
        assert_eq!(p.fingerprint, embedded.fingerprint);
        // A second save replaces the first (rename over it), leaving no temporary file.
        save(&dir, &PolicySource::Embedded).expect("saved again");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(FILE)]);
        // A directory anybody may write: its copy could be anybody's, so it is not used.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let err = load(&dir).expect_err("a world-writable state dir is ignored");
        assert!(err.to_string().contains("is not root's alone"), "{err:#}");
        let _ = std::fs::remove_dir_all(&top);
    }
}
