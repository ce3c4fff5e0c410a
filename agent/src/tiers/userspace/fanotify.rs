//! fanotify, the userspace tier's first choice: its FID-mode records parsed (pure, unit-tested),
//! whole filesystems marked, and directory handles reopened to find where a deletion happened.
use std::{
    collections::HashSet,
    ffi::CString,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
    time::Instant,
};

use anyhow::{Context, Result};
use guardrail_common::{OP_RENAME, OP_RMDIR, OP_UNLINK};

use super::{Fallback, Marked, Mechanism, Seen};

/// A file handle as fanotify reports it: enough to reopen the object with `open_by_handle_at`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Fid {
    pub fsid: [i32; 2],
    pub handle_type: i32,
    pub handle: Vec<u8>,
}

/// One fanotify event in FID mode: its mask, the reporting process, the directory's handle and
/// the entry's name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FanRecord {
    pub mask: u64,
    pub pid: i32,
    /// An event fd, only outside FID mode (closed by the reader).
    pub fd: i32,
    pub dir: Option<Fid>,
    pub name: Option<Vec<u8>>,
    /// The deleted object's own handle (FAN_REPORT_TARGET_FID, Linux >= 5.17): lets the
    /// directory's earlier events be judged after it is gone.
    pub obj: Option<Fid>,
}

pub(super) const METADATA_LEN: usize = 24;

pub(super) const FAN_EVENT_INFO_TYPE_OLD_DFID_NAME: u8 = 10;

pub(super) const FAN_EVENT_INFO_TYPE_NEW_DFID_NAME: u8 = 12;

pub(super) fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

pub(super) fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

pub(super) fn i32_at(b: &[u8], at: usize) -> Option<i32> {
    u32_at(b, at).map(|v| v as i32)
}

pub(super) fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Parses what one `read` of a fanotify fd returned. Malformed or truncated records end the
/// parse (the kernel never splits a record across reads).
pub fn parse_fanotify(buf: &[u8]) -> Vec<FanRecord> {
    let mut out = Vec::new();
    let mut off = 0usize;
    while off + METADATA_LEN <= buf.len() {
        let rec = &buf[off..];
        let (Some(event_len), Some(vers), Some(meta_len), Some(mask), Some(fd), Some(pid)) = (
            u32_at(rec, 0),
            rec.get(4).copied(),
            u16_at(rec, 6),
            u64_at(rec, 8),
            i32_at(rec, 16),
            i32_at(rec, 20),
        ) else {
            break;
        };
        let event_len = event_len as usize;
        if vers != libc::FANOTIFY_METADATA_VERSION
            || event_len < METADATA_LEN
            || event_len > rec.len()
            || (meta_len as usize) < METADATA_LEN
        {
            break;
        }
        let mut r = FanRecord {
            mask,
            pid,
            fd,
            dir: None,
            name: None,
            obj: None,
        };
        let mut info = meta_len as usize;
        while info + 4 <= event_len {
            let (Some(ty), Some(len)) = (rec.get(info).copied(), u16_at(rec, info + 2)) else {
                break;
            };
            let len = len as usize;
            if len < 4 || info + len > event_len {
                break;
            }
            let body = &rec[info + 4..info + len];
            if ty == libc::FAN_EVENT_INFO_TYPE_FID
                && r.obj.is_none()
                && let Some((fid, _)) = parse_fid(body, false)
            {
                r.obj = Some(fid);
            } else if matches!(
                ty,
                libc::FAN_EVENT_INFO_TYPE_DFID_NAME
                    | libc::FAN_EVENT_INFO_TYPE_DFID
                    | FAN_EVENT_INFO_TYPE_OLD_DFID_NAME
                    | FAN_EVENT_INFO_TYPE_NEW_DFID_NAME
            ) && r.dir.is_none()
                && let Some((fid, name)) = parse_fid(body, ty != libc::FAN_EVENT_INFO_TYPE_DFID)
            {
                r.dir = Some(fid);
                r.name = name;
            }
            info += len;
        }
        out.push(r);
        off += event_len;
    }
    out
}

/// fsid (8 bytes), then `struct file_handle` (handle_bytes, handle_type, f_handle), then for the
/// `*_NAME` record types a NUL-terminated name.
pub(super) fn parse_fid(body: &[u8], with_name: bool) -> Option<(Fid, Option<Vec<u8>>)> {
    let fsid = [i32_at(body, 0)?, i32_at(body, 4)?];
    let bytes = u32_at(body, 8)? as usize;
    let handle_type = i32_at(body, 12)?;
    let handle = body.get(16..16 + bytes)?.to_vec();
    let name = if with_name {
        let rest = body.get(16 + bytes..)?;
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        (end > 0).then(|| rest[..end].to_vec())
    } else {
        None
    };
    Some((
        Fid {
            fsid,
            handle_type,
            handle,
        },
        name,
    ))
}

pub(super) fn cpath(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).context("path with a NUL byte")
}

pub(super) fn mark_filesystem(fan: BorrowedFd<'_>, path: &Path) -> Result<Marked> {
    let c = cpath(path)?;
    // SAFETY: `c` is a NUL-terminated path; the flags and mask are plain integers.
    let rc = unsafe {
        libc::fanotify_mark(
            fan.as_raw_fd(),
            libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM,
            libc::FAN_DELETE | libc::FAN_MOVED_FROM | libc::FAN_MOVED_TO | libc::FAN_ONDIR,
            libc::AT_FDCWD,
            c.as_ptr(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("fanotify_mark(FAN_MARK_FILESYSTEM)");
    }
    // Not O_PATH: open_by_handle_at refuses an O_PATH mount fd (EBADF).
    // SAFETY: opening a directory read-only; the fd is owned below.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening the mount for handles");
    }
    // SAFETY: a fresh fd owned by nobody else.
    let mount_fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: statfs into a zeroed buffer we own.
    let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `mount_fd` is open; `sfs` is a valid out-pointer.
    if unsafe { libc::fstatfs(mount_fd.as_raw_fd(), &mut sfs) } != 0 {
        return Err(std::io::Error::last_os_error()).context("fstatfs");
    }
    // SAFETY: `fsid_t` is two c_ints (its fields are private in libc); fanotify reports the same
    // `__kernel_fsid_t`.
    let fsid: [i32; 2] = unsafe { std::mem::transmute(sfs.f_fsid) };
    Ok(Marked {
        path: path.to_path_buf(),
        fsid,
        mount_fd,
    })
}

/// `open_by_handle_at(O_PATH)`: the directory if it still exists.
pub(super) fn open_by_handle(mount_fd: BorrowedFd<'_>, fid: &Fid) -> Option<OwnedFd> {
    // struct file_handle { u32 handle_bytes; i32 handle_type; u8 f_handle[]; }, 4-aligned.
    let mut buf = vec![0u32; 2 + fid.handle.len().div_ceil(4)];
    buf[0] = fid.handle.len() as u32;
    buf[1] = fid.handle_type as u32;
    // SAFETY: the buffer holds 8 + handle.len() bytes; we copy handle.len() bytes after the
    // 8-byte header.
    unsafe {
        std::ptr::copy_nonoverlapping(
            fid.handle.as_ptr(),
            (buf.as_mut_ptr() as *mut u8).add(8),
            fid.handle.len(),
        );
    }
    // SAFETY: `buf` is a valid, aligned `struct file_handle` of the size it declares.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount_fd.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::file_handle,
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh fd owned by nobody else.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Fallback {
    pub(super) fn new_fanotify() -> Result<Mechanism> {
        let base = libc::FAN_CLASS_NOTIF
            | libc::FAN_CLOEXEC
            | libc::FAN_NONBLOCK
            | libc::FAN_UNLIMITED_QUEUE;
        let init = |report: libc::c_uint| {
            // SAFETY: plain syscall; the fd it returns is owned below.
            unsafe {
                libc::fanotify_init(
                    base | report,
                    (libc::O_RDONLY | libc::O_CLOEXEC) as libc::c_uint,
                )
            }
        };
        // The deleted object's own handle too where the kernel has it (>= 5.17), else parent and
        // name only (>= 5.9).
        let mut fd = init(libc::FAN_REPORT_DFID_NAME_TARGET);
        if fd < 0 {
            fd = init(libc::FAN_REPORT_DFID_NAME);
        }
        if fd < 0 {
            return Err(std::io::Error::last_os_error())
                .context("fanotify_init(FAN_REPORT_DFID_NAME) (needs Linux >= 5.9 and root)");
        }
        // SAFETY: a fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Mechanism::Fanotify {
            fd,
            marked: Vec::new(),
            marked_devs: HashSet::new(),
        })
    }

    /// A directory deleted or renamed: its handle now names its parent (deleted: its earlier
    /// records can still be judged) and cached ancestor chains below it may be stale.
    pub(super) fn link_parents(&mut self, records: &[FanRecord]) {
        for r in records {
            if r.mask & libc::FAN_ONDIR == 0 {
                continue;
            }
            if r.mask & libc::FAN_MOVED_FROM != 0 {
                // Moved: every chain through it changed. Rare next to file deletions.
                self.dir_cache.clear();
                self.ancestors.clear();
            }
            if r.mask & (libc::FAN_DELETE | libc::FAN_MOVED_FROM) != 0
                && let (Some(obj), Some(dir)) = (&r.obj, &r.dir)
            {
                if self.parent_of.len() > 65536 {
                    self.parent_of.clear();
                }
                self.parent_of.insert(obj.clone(), dir.clone());
            }
        }
    }

    /// One record as a deletion to judge; `None` for what is not one (or is our own).
    pub(super) fn seen_of(&mut self, r: FanRecord) -> Option<Seen> {
        if r.fd >= 0 {
            // SAFETY: an event fd the kernel gave us, closed once.
            drop(unsafe { OwnedFd::from_raw_fd(r.fd) });
        }
        if r.mask & libc::FAN_Q_OVERFLOW != 0 {
            self.lost += 1;
            // A rename among the lost events would leave cached ancestors wrong.
            self.dir_cache.clear();
            self.ancestors.clear();
            log::warn!("fanotify queue overflowed: deletions were not counted");
            return None;
        }
        let pid = (r.pid > 0).then_some(r.pid as u32);
        if pid == Some(self.me) {
            return None;
        }
        let (op, moved_from) = if r.mask & libc::FAN_MOVED_FROM != 0 {
            (OP_RENAME, true)
        } else if r.mask & libc::FAN_MOVED_TO != 0 {
            (OP_RENAME, false)
        } else if r.mask & libc::FAN_DELETE != 0 {
            if r.mask & libc::FAN_ONDIR != 0 {
                (OP_RMDIR, false)
            } else {
                (OP_UNLINK, false)
            }
        } else {
            return None;
        };
        Some(Seen {
            pid,
            op,
            is_dir: r.mask & libc::FAN_ONDIR != 0,
            name: r.name,
            dir: None,
            fid: r.dir,
            since: Instant::now(),
            moved_from,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds one FID-mode record the way the kernel lays it out.
    pub(super) fn record(
        mask: u64,
        pid: i32,
        ty: u8,
        fsid: [i32; 2],
        handle: &[u8],
        name: &[u8],
    ) -> Vec<u8> {
        let mut info = Vec::new();
        info.extend_from_slice(&fsid[0].to_ne_bytes());
        info.extend_from_slice(&fsid[1].to_ne_bytes());
        info.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
        info.extend_from_slice(&1i32.to_ne_bytes());
        info.extend_from_slice(handle);
        if !name.is_empty() {
            info.extend_from_slice(name);
            info.push(0);
        }
        while (info.len() + 4) % 4 != 0 {
            info.push(0);
        }
        let info_len = info.len() + 4;
        let event_len = METADATA_LEN + info_len;
        let mut b = Vec::new();
        b.extend_from_slice(&(event_len as u32).to_ne_bytes());
        b.push(libc::FANOTIFY_METADATA_VERSION);
        b.push(0);
        b.extend_from_slice(&(METADATA_LEN as u16).to_ne_bytes());
        b.extend_from_slice(&mask.to_ne_bytes());
        b.extend_from_slice(&libc::FAN_NOFD.to_ne_bytes());
        b.extend_from_slice(&pid.to_ne_bytes());
        b.push(ty);
        b.push(0);
        b.extend_from_slice(&(info_len as u16).to_ne_bytes());
        b.extend_from_slice(&info);
        b
    }

    #[test]
    pub(super) fn parses_consecutive_dfid_name_records() {
        let mut buf = record(
            libc::FAN_DELETE,
            42,
            libc::FAN_EVENT_INFO_TYPE_DFID_NAME,
            [7, 9],
            &[1, 2, 3, 4, 5, 6, 7, 8],
            b"f00001",
        );
        buf.extend(record(
            libc::FAN_DELETE | libc::FAN_ONDIR,
            43,
            libc::FAN_EVENT_INFO_TYPE_DFID_NAME,
            [7, 9],
            &[9, 9, 9, 9, 9, 9, 9, 9],
            b"sub",
        ));
        let r = parse_fanotify(&buf);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].pid, 42);
        assert_eq!(r[0].mask, libc::FAN_DELETE);
        assert_eq!(r[0].name.as_deref(), Some(&b"f00001"[..]));
        let fid = r[0].dir.as_ref().expect("a directory handle");
        assert_eq!(fid.fsid, [7, 9]);
        assert_eq!(fid.handle_type, 1);
        assert_eq!(fid.handle, vec![1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(r[1].pid, 43);
        assert_ne!(r[1].mask & libc::FAN_ONDIR, 0);
        assert_eq!(r[1].name.as_deref(), Some(&b"sub"[..]));
    }

    #[test]
    pub(super) fn fid_records_carry_no_name_and_truncated_records_stop_the_parse() {
        let buf = record(
            libc::FAN_DELETE,
            5,
            libc::FAN_EVENT_INFO_TYPE_FID,
            [1, 2],
            &[1, 2, 3, 4],
            b"",
        );
        let r = parse_fanotify(&buf);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].name, None);
        // A plain FID record names the object itself, not its directory.
        assert_eq!(r[0].dir, None);
        assert_eq!(r[0].obj.as_ref().map(|f| f.handle.len()), Some(4));
        // A record cut short (a bad length) is dropped, not read past the buffer.
        assert!(parse_fanotify(&buf[..buf.len() - 1]).is_empty());
        assert!(parse_fanotify(&buf[..10]).is_empty());
        let mut bad = buf.clone();
        bad[4] = 2; // metadata version
        assert!(parse_fanotify(&bad).is_empty());
    }

    #[test]
    pub(super) fn an_info_record_claiming_more_than_its_event_is_ignored() {
        let mut buf = record(
            libc::FAN_DELETE,
            5,
            libc::FAN_EVENT_INFO_TYPE_DFID_NAME,
            [1, 2],
            &[1, 2, 3, 4],
            b"x",
        );
        // info header len field at METADATA_LEN + 2
        buf[METADATA_LEN + 2] = 0xff;
        let r = parse_fanotify(&buf);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].dir, None);
    }
}
