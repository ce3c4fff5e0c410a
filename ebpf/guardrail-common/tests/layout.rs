//! The kernel/user ABI: every type that crosses a map or the ring buffer has no implicit padding
//! (a hole would hold whatever the writer's stack held, and differ between `bpfel-unknown-none`
//! and x86_64), and its size and field order are pinned here, so a change to the ABI is a
//! deliberate edit of this file too.
use core::mem::{align_of, offset_of, size_of};

use guardrail_common::*;

fn field_size<T, F>(_: fn(&T) -> &F) -> usize {
    size_of::<F>()
}

/// Asserts that the fields, in this order, tile the whole struct with no gap and that the size is
/// `$size`.
macro_rules! layout {
    ($t:ty, $size:expr, [$($f:ident),+ $(,)?]) => {{
        let mut end = 0usize;
        $(
            assert_eq!(
                offset_of!($t, $f),
                end,
                "{}::{} does not start right after the previous field (implicit padding?)",
                stringify!($t),
                stringify!($f)
            );
            end += field_size(|x: &$t| &x.$f);
        )+
        assert_eq!(size_of::<$t>(), end, "{} has trailing padding", stringify!($t));
        assert_eq!(size_of::<$t>(), $size, "{} changed size", stringify!($t));
        // BPF maps and the ring buffer align records to 8 bytes at most.
        assert!(align_of::<$t>() <= 8, "{} is over-aligned", stringify!($t));
    }};
}

#[test]
fn deletion_guard_tables() {
    layout!(DirKey, 24, [dev, ino, slot, _pad]);
    layout!(
        DirRule,
        24,
        [kind, data_dir_id, target_rules, data_owner_rules]
    );
    layout!(RuleParams, 24, [budget, window_ns, action, flags]);
    layout!(ExeKey, 24, [dev, ino, slot, _pad]);
    layout!(CgroupKey, 16, [cgroup_id, slot, _pad]);
    layout!(UidKey, 8, [uid, slot]);
    layout!(
        Config,
        48,
        [
            active_slot,
            mode,
            agent_tgid,
            policy_loaded,
            incident_base,
            agent_start_lo,
            agent_start_hi,
            policy_gen
        ]
    );
    layout!(JobKey, 8, [sid, pgid]);
    layout!(
        JobState,
        120,
        [
            state,
            rule,
            window_start_ns,
            count,
            prev_count,
            allowance,
            refused,
            total,
            incident,
            peak,
            cgroup_id,
            first_ns,
            uid,
            free_stops,
            comm,
            held_ns
        ]
    );
    layout!(HeldJob, 24, [state, rule, incident, held_ns]);
    layout!(RefusalKey, 16, [sid, pgid, kind, _pad]);
    layout!(LevelKey, 16, [id, level, _pad]);
    layout!(
        LevelState,
        48,
        [
            window_start_ns,
            count,
            prev_count,
            jobs,
            prev_jobs,
            reported
        ]
    );
}

#[test]
fn level_hit_round_trips_and_saturates() {
    assert_eq!(level_hit_unpack(0), None);
    assert_eq!(
        level_hit_unpack(level_hit_pack(LEVEL_USER, ACTION_BLOCK, 57, 301)),
        Some((LEVEL_USER, ACTION_BLOCK, 57, 301))
    );
    assert_eq!(
        level_hit_unpack(level_hit_pack(
            LEVEL_SESSION,
            ACTION_HOLD,
            1 << 40,
            u64::MAX
        )),
        Some((LEVEL_SESSION, ACTION_HOLD, 0x0fff_ffff, 0xffff_ffff))
    );
    assert_eq!(level_event_flag(LEVEL_UNIT), EVF_LEVEL_UNIT);
}

#[test]
fn agent_identity_needs_pid_and_start_time() {
    // The agent: pid 4242, started 5.000s..5.010s after boot (/proc's 10 ms tick).
    let (lo, hi) = (5_000_000_000, 5_010_000_000);
    assert!(is_agent(4242, 5_004_000_000, 4242, lo, hi));
    // The same pid, reused by a process started later: not the agent.
    assert!(!is_agent(4242, 9_000_000_000, 4242, lo, hi));
    // Another pid with the same start tick.
    assert!(!is_agent(4243, 5_004_000_000, 4242, lo, hi));
    // Zeroed configuration (the agent exited): nobody.
    assert!(!is_agent(4242, 5_004_000_000, 0, 0, 0));
    // Unknown start time (no BTF field): nobody.
    assert!(!is_agent(4242, 0, 4242, 0, u64::MAX));
}

#[test]
fn deletion_event() {
    layout!(
        Event,
        80 + 16 + NAME_LEN * EVENT_PATH_DEPTH,
        [
            kind,
            flags,
            rule,
            data_dir_id,
            tgid,
            pid,
            pgid,
            sid,
            uid,
            loginuid,
            audit_session,
            op,
            count,
            incident,
            cgroup_id,
            ktime_ns,
            comm,
            path
        ]
    );
}

#[test]
fn offsets_and_selftest() {
    layout!(
        KernelOffsets,
        4 * 36,
        [
            task_tgid,
            task_pid,
            task_loginuid,
            task_sessionid,
            task_signal,
            task_fs,
            task_files,
            task_mm,
            task_real_parent,
            signal_pids,
            pidtype_pgid,
            pidtype_sid,
            pid_numbers_nr,
            fs_pwd,
            fs_root,
            path_dentry,
            path_mnt,
            files_fdt,
            fdt_fd,
            fdt_max_fds,
            file_f_path,
            file_f_inode,
            dentry_d_parent,
            dentry_d_inode,
            dentry_d_name_name,
            inode_i_ino,
            inode_i_sb,
            sb_s_dev,
            mm_exe_file,
            io_uring_opcode,
            valid,
            task_flags,
            task_group_leader,
            task_start_boottime,
            task_cred,
            cred_euid
        ]
    );
    layout!(FsOffsets, 16, [sb_s_magic, sb_s_type, fstype_name, valid]);
    layout!(
        SelftestAnswer,
        64,
        [
            tgid, pid, pgid, sid, loginuid, sessionid, cwd_dev, cwd_ino, exe_dev, exe_ino, hits
        ]
    );
}

#[test]
fn shutdown_guard() {
    layout!(
        SdArgs,
        16 + SD_WORD_LEN * SD_ARGV_WORDS,
        [argv0, verb, target, options, words]
    );
    layout!(
        ShutdownConfig,
        4 * SD_CLASSES + 16 + 16 + 16,
        [
            action,
            enabled,
            mode,
            agent_tgid,
            sysrq_ino,
            cleared_ns,
            alive_until_ns,
            agent_start_lo,
            agent_start_hi
        ]
    );
    layout!(FileId, 16, [dev, ino]);
    layout!(
        ShutdownEvent,
        56 + 16 + 16 + SD_WORD_LEN * SD_ARGV_WORDS,
        [
            kind,
            op,
            outcome,
            class,
            action,
            exception,
            tgid,
            pid,
            ppid,
            uid,
            loginuid,
            audit_session,
            signal,
            _pad,
            cgroup_id,
            ktime_ns,
            comm,
            words
        ]
    );
    layout!(SdOffsets, 16, [bprm_file, file_f_mode, sb_s_magic, valid]);
}
