//! inotify, the userspace tier's fallback where fanotify is unavailable: watches per directory
//! over the policy's declared trees only, and its records turned into the same deletions.
use std::{
    collections::HashMap, ffi::OsStr, os::unix::ffi::OsStrExt, path::Path, rc::Rc, time::Instant,
};

use anyhow::{Context, Result};
use guardrail_common::{OP_RENAME, OP_RMDIR, OP_UNLINK};

use super::dirs::{DirInfo, ancestor_chain};
use super::{Fallback, MAX_READS_PER_CALL, Mechanism, Seen};

impl Fallback {
    pub(super) fn new_inotify() -> Result<Mechanism> {
        let inotify = inotify::Inotify::init().context("inotify_init")?;
        Ok(Mechanism::Inotify {
            inotify,
            dirs: HashMap::new(),
        })
    }

    pub(super) fn read_inotify(&mut self) -> Vec<Seen> {
        let mut seen = Vec::new();
        let mut new_dirs = Vec::new();
        {
            let Mechanism::Inotify { inotify, dirs } = &mut self.mech else {
                return seen;
            };
            let mut buf = vec![0u8; 64 * 1024];
            for _ in 0..MAX_READS_PER_CALL {
                let Ok(events) = inotify.read_events(&mut buf) else {
                    break;
                };
                let mut any = false;
                for ev in events {
                    any = true;
                    use inotify::EventMask as M;
                    if ev.mask.contains(M::Q_OVERFLOW) {
                        self.lost += 1;
                        continue;
                    }
                    if ev.mask.contains(M::IGNORED) {
                        dirs.remove(&ev.wd);
                        continue;
                    }
                    let Some(dir) = dirs.get(&ev.wd).cloned() else {
                        continue;
                    };
                    let is_dir = ev.mask.contains(M::ISDIR);
                    let name = ev.name.map(|n| n.as_bytes().to_vec());
                    if ev.mask.contains(M::CREATE) || ev.mask.contains(M::MOVED_TO) && is_dir {
                        if let (true, Some(p), Some(n)) = (is_dir, &dir.path, &name) {
                            new_dirs.push(p.join(OsStr::from_bytes(n)));
                        }
                        if ev.mask.contains(M::CREATE) {
                            continue;
                        }
                    }
                    let (op, moved_from) = if ev.mask.contains(M::MOVED_FROM) {
                        (OP_RENAME, true)
                    } else if ev.mask.contains(M::MOVED_TO) {
                        (OP_RENAME, false)
                    } else if ev.mask.contains(M::DELETE) {
                        (if is_dir { OP_RMDIR } else { OP_UNLINK }, false)
                    } else {
                        continue;
                    };
                    seen.push(Seen {
                        pid: None,
                        op,
                        is_dir,
                        name,
                        dir: Some(dir),
                        fid: None,
                        since: Instant::now(),
                        moved_from,
                    });
                }
                if !any {
                    break;
                }
            }
        }
        for d in new_dirs {
            if let Err(e) = self.inotify_add_tree(&d) {
                log::warn!("inotify: not watching {}: {e:#}", d.display());
            }
        }
        seen
    }

    /// One inotify watch per directory below `root` (inotify watches are not recursive).
    pub(super) fn inotify_add_tree(&mut self, root: &Path) -> Result<()> {
        let Mechanism::Inotify { inotify, dirs } = &mut self.mech else {
            return Ok(());
        };
        use inotify::WatchMask as W;
        let mask =
            W::DELETE | W::MOVED_FROM | W::MOVED_TO | W::CREATE | W::ONLYDIR | W::DONT_FOLLOW;
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            let wd = match inotify.watches().add(&d, mask) {
                Ok(wd) => wd,
                Err(e) if d == root => {
                    return Err(e).with_context(|| format!("inotify watch on {}", d.display()));
                }
                Err(e) => {
                    log::warn!("inotify: not watching {}: {e}", d.display());
                    continue;
                }
            };
            dirs.insert(
                wd,
                Rc::new(DirInfo {
                    chain: ancestor_chain(&d),
                    path: Some(d.clone()),
                }),
            );
            if let Ok(rd) = std::fs::read_dir(&d) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(e.path());
                    }
                }
            }
        }
        Ok(())
    }
}
