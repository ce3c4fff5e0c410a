//! Who a process is beyond its pid: when it started. Pids and process group ids are reused; a
//! pid together with its start time is not. The kernel programs exempt the agent only by both
//! (`Config::agent_start_lo`), and a hold is only ever re-stopped on processes that are older
//! than the hold (`JobState::held_ns`).
use guardrail_common::JobKey;

fn ns_per_tick() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    1_000_000_000 / if hz > 0 { hz as u64 } else { 100 }
}

/// (pgrp, session, starttime in clock ticks) of a process, from /proc/PID/stat (the fields after
/// the command name, whose parentheses may enclose anything).
fn stat_ids(pid: u32) -> Option<(u32, u32, u64)> {
    let s = super::procinfo::stat(pid)?;
    Some((s.pgrp, s.session, s.starttime?))
}

/// The range `[lo, hi)` that `task_struct.start_boottime` (ns) of `pid` lies in: /proc gives it
/// in clock ticks (10 ms), so a process is only told from another one with the same pid that
/// started within the same tick, which pid reuse cannot do while the first one lives.
pub fn start_range(pid: u32) -> Option<(u64, u64)> {
    let (_, _, ticks) = stat_ids(pid)?;
    let tick = ns_per_tick();
    let lo = ticks.checked_mul(tick)?;
    Some((lo, lo + tick))
}

/// This process's start range, or (0, 0) (nobody is the agent) when /proc cannot say.
pub fn own_start_range() -> (u64, u64) {
    start_range(std::process::id()).unwrap_or((0, 0))
}

/// Whether a live process of the job (process group `key.pgid` in session `key.sid`) started no
/// later than `held_ns` (boottime ns; 0: unknown, then any member of the right session counts):
/// that is the job that was held, not a newer one that got the same process group id.
pub fn job_predates(key: &JobKey, held_ns: u64) -> bool {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return false;
    };
    let tick = ns_per_tick();
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(stat_ids)
        .any(|(pgrp, sid, ticks)| {
            pgrp == key.pgid
                && sid == key.sid
                && (held_ns == 0 || ticks.saturating_mul(tick) <= held_ns)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::clock::boottime_ns;

    #[test]
    fn own_start_is_in_the_past_and_one_tick_wide() {
        let (lo, hi) = own_start_range();
        assert!(lo > 0 && lo < boottime_ns(), "start {lo} not before now");
        assert_eq!(hi - lo, ns_per_tick());
    }

    #[test]
    fn this_job_predates_now_but_not_the_past() {
        let key = JobKey {
            pgid: nix::unistd::getpgrp().as_raw() as u32,
            sid: nix::unistd::getsid(None)
                .map(|p| p.as_raw() as u32)
                .unwrap_or(0),
        };
        assert!(job_predates(&key, boottime_ns()));
        assert!(!job_predates(&key, 1), "no process started 1 ns after boot");
        let other_session = JobKey {
            sid: key.sid.wrapping_add(1_000_000),
            ..key
        };
        assert!(!job_predates(&other_session, boottime_ns()));
    }
}
