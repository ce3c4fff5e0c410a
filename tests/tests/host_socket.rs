//! The admin socket against hostile local users (review H2, M3, M12, L1): the real agent on the
//! host kernel, with clients run as user `nobody` (setpriv). Nobody can stall the agent, nobody
//! but root and the `guardrail` group approves, denies or confirms, and other users see only
//! their own jobs. Deletion jobs run in scratch directories under /var/tmp, in a test cgroup.
use std::{
    os::unix::fs::PermissionsExt,
    process::{Command, Output},
    time::{Duration, Instant},
};

use guardrail_integration::{collectors::hostname, *};

/// The `guardrail` group's gid, created if missing (the packages create it; the agent looks it
/// up by name when it starts).
fn admin_group() -> u32 {
    let out = Command::new("groupadd")
        .args(["-f", "--system", "guardrail"])
        .output()
        .expect("groupadd");
    assert!(out.status.success(), "groupadd: {out:?}");
    let out = Command::new("getent")
        .args(["group", "guardrail"])
        .output()
        .expect("getent");
    String::from_utf8_lossy(&out.stdout)
        .split(':')
        .nth(2)
        .and_then(|g| g.trim().parse().ok())
        .expect("the guardrail group has a gid")
}

/// The guardrail CLI against `agent`, as nobody (with `group` as its only supplementary group).
fn nobody_cli(agent: &Agent, group: Option<u32>, args: &[&str]) -> Output {
    let mut all = vec![
        "--socket",
        agent.socket.to_str().expect("utf-8 socket path"),
    ];
    all.extend_from_slice(args);
    nobody_command(group, &guardrail_bin(), &all)
        .output()
        .expect("running the CLI as nobody")
}

/// A command in a new audit session of its own: `sh` writes /proc/self/loginuid (allowed while
/// it is unset, and to root), which starts a new session, then execs `cmd` in it.
fn in_new_session(loginuid: u32, cmd: &Command) -> Output {
    let mut line = format!("echo {loginuid} > /proc/self/loginuid && exec");
    line.push_str(&format!(" '{}'", cmd.get_program().to_string_lossy()));
    for a in cmd.get_args() {
        line.push_str(&format!(" '{}'", a.to_string_lossy()));
    }
    Command::new("sh").arg("-c").arg(line).output().expect("sh")
}

/// VmHWM (peak resident memory) of `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

/// The plain scene, with the agent's socket open to nobody.
fn setup() -> Setup {
    let setup = Setup::with_budget(100);
    setup.agent.open_to_others();
    setup
}

/// Starts `script` over the 1000 files it deletes in `dir` (filled by the caller) and waits for
/// its hold; returns the job, the hold id and the files left at the hold.
fn held(setup: &Setup, dir: &str, script: &str) -> (Job, u64, usize) {
    let victim = setup.s.path().join(dir);
    let before = setup.agent.hold_ids();
    let job = Job::spawn_in(script, setup.s.path(), Some(&setup.cg));
    let id = setup.agent.wait_new_hold(&before);
    assert!(
        wait_until(Duration::from_secs(10), || job.stopped()),
        "the held job is stopped"
    );
    let left = settle(&victim, Duration::from_millis(500));
    (job, id, left)
}

/// The old agent served clients inline in its only thread: a client that dribbled a byte every
/// few seconds, streamed without a newline (buffering all of it) or never read a large answer
/// froze it, and `guardrail status` timed out. Now each of those costs its own connection only.
#[test]
fn status_answers_at_once_while_hostile_clients_hold_connections() {
    let _k = kernel_lock();
    let setup = setup();
    fill(&setup.s.path().join("victim"), 1000);
    // A command line over 180 KB (two arguments of 100 KB, the kernel's limit per argument is
    // 128 KiB): its answer alone would fill the socket buffer of a client that never reads.
    let (job, id, left) = held(
        &setup,
        "victim",
        r"x=$(head -c 100000 /dev/zero | tr '\0' x); rm -rf victim $x $x",
    );
    let pid = setup.agent.pid();
    let peak_before = peak_rss_kib(pid);
    let sock = setup.agent.socket.to_str().expect("utf-8").to_string();
    let kit = testkit_bin();
    let spawn = |mode: &str, arg: &str| {
        nobody_command(None, &kit, &["sock", mode, &sock, arg])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("hostile client")
    };
    // A dribbler, a stream of 50 MB without a newline, and a status request never read.
    let dribble = spawn("dribble", "8");
    let noread = spawn("noread", "8");
    let stream = spawn("stream", "50");
    std::thread::sleep(Duration::from_millis(300));
    // Meanwhile root's `guardrail status` answers within a second, every time.
    let start = Instant::now();
    let mut answered = 0;
    while start.elapsed() < Duration::from_secs(5) {
        let t = Instant::now();
        let out = setup.agent.cli(&["status"]);
        let took = t.elapsed();
        let (o, e) = output_text(&out);
        assert!(out.status.success(), "status failed after {took:?}: {e}");
        assert!(
            took < Duration::from_secs(1),
            "status took {took:?} while hostile clients were connected"
        );
        assert!(o.contains("open holds: 1"), "status:\n{o}");
        answered += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(answered >= 5);

    let (o, _) = output_text(&stream.wait_with_output().expect("stream client"));
    let wrote: usize = o
        .split_whitespace()
        .nth(3)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("stream client said: {o}"));
    assert!(
        wrote < 50 * 1024 * 1024,
        "the agent took all 50 MB without a newline: {o}"
    );
    let (o, _) = output_text(&dribble.wait_with_output().expect("dribble client"));
    let connections: u32 = o
        .lines()
        .last()
        .unwrap_or_default()
        .split_whitespace()
        .nth(6)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("dribble client said: {o}"));
    assert!(
        connections >= 3,
        "the dribbler is cut off 2 s into each connection: {o}"
    );
    let (o, _) = output_text(&noread.wait_with_output().expect("noread client"));
    assert_eq!(o.trim(), "sock noread: done");
    let peak_after = peak_rss_kib(pid);
    assert!(
        peak_after < peak_before + 10 * 1024,
        "the agent's peak memory grew from {peak_before} KiB to {peak_after} KiB"
    );

    // Four slow connections of one uid are all it gets: a fifth is turned away at once.
    let mut slow: Vec<_> = (0..4).map(|_| spawn("dribble", "2")).collect();
    for c in &mut slow {
        use std::io::BufRead;
        let mut line = String::new();
        let out = c.stdout.as_mut().expect("piped");
        std::io::BufReader::new(out)
            .read_line(&mut line)
            .expect("dribbler");
        assert_eq!(line.trim(), "sock dribble: connected");
    }
    // Connected is queued: give the accept thread a moment to take all four.
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let fifth = nobody_command(
        None,
        &kit,
        &["sock", "send", &sock, r#"{"request":"holds"}"#],
    )
    .output()
    .expect("fifth client");
    let (o, _) = output_text(&fifth);
    assert!(
        t.elapsed() < Duration::from_secs(1) && o.contains("uid 65534 has 4 requests open already"),
        "fifth connection of nobody (after {:?}):\n{o}",
        t.elapsed()
    );
    for c in slow {
        let _ = c.wait_with_output();
    }

    let holds = setup.agent.holds();
    let command = holds
        .iter()
        .find(|h| h["id"].as_u64() == Some(id))
        .and_then(|h| h["command"].as_str())
        .expect("the hold's command")
        .to_string();
    assert!(
        command.starts_with("rm -rf victim xxxx") && command.ends_with('…'),
        "the command is clipped: {:.80}",
        command
    );
    assert!(
        command.len() <= 520,
        "clipped to 512 bytes: {}",
        command.len()
    );

    // The hold is untouched, the job still stopped, nothing more deleted.
    assert!(job.stopped(), "the held job stays stopped");
    assert_eq!(count_files(&setup.s.path().join("victim")), left);
    setup.agent.cli_ok(&["deny", &id.to_string()]);
}

/// The old agent let any user confirm (releasing the logind inhibitor for everyone and filling
/// the kernel's pass table) and refused approve/deny only with "only root may ...". Now all
/// three need root or the guardrail group; the refusal is logged with the caller's uid and
/// session, and the hold stays exactly as it was.
#[test]
fn approve_deny_and_confirm_from_nobody_are_refused_and_the_hold_stays() {
    let _k = kernel_lock();
    admin_group();
    let setup = setup();
    fill(&setup.s.path().join("victim"), 1000);
    let (job, id, left) = held(&setup, "victim", "rm -rf victim");
    let ids = id.to_string();
    // Confirm from a real login session of nobody's (the old agent granted this one).
    let mut confirm = nobody_command(None, &guardrail_bin(), &[]);
    confirm.args([
        "--socket",
        setup.agent.socket.to_str().expect("utf-8"),
        "confirm",
        &hostname(),
    ]);
    let out = in_new_session(NOBODY, &confirm);
    let (o, e) = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "confirm as nobody: {o}{e}");
    assert_eq!(
        e.trim(),
        "guardrail: confirm needs root or membership of the guardrail group; nothing changed"
    );

    for args in [
        vec!["approve", ids.as_str()],
        vec!["approve", ids.as_str(), "--for-job"],
        vec!["deny", ids.as_str()],
    ] {
        let out = nobody_cli(&setup.agent, None, &args);
        let (_, e) = output_text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?} as nobody: {e}");
        assert_eq!(
            e.trim(),
            format!(
                "guardrail: {} needs root or membership of the guardrail group; nothing changed",
                args[0]
            ),
            "{args:?}"
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(job.stopped(), "the held job stays stopped");
    assert_eq!(
        count_files(&setup.s.path().join("victim")),
        left,
        "nothing more was deleted"
    );
    let holds = setup.agent.holds();
    assert_eq!(holds.len(), 1, "the hold is still open: {holds:?}");
    assert_eq!(holds[0]["id"].as_u64(), Some(id));
    let refused: Vec<String> = setup
        .agent
        .events()
        .iter()
        .filter(|e| e["agent"]["kind"] == "request_refused")
        .filter_map(|e| e["agent"]["message"].as_str().map(str::to_string))
        .collect();
    assert_eq!(refused.len(), 4, "{refused:?}");
    assert!(
        refused[0].starts_with("uid 65534 (audit session ")
            && refused[0].ends_with(
                "asked to confirm a shutdown: refused, not root nor in the guardrail group"
            ),
        "{refused:?}"
    );
    assert_eq!(
        refused[1],
        format!(
            "uid 65534 (no audit session) asked to approve incident {id}: refused, not root nor in the guardrail group"
        ),
    );
    assert!(
        !setup
            .agent
            .events()
            .iter()
            .any(|e| e["incident"]["kind"] == "shutdown_confirmation"),
        "no confirmation was granted"
    );
    setup.agent.cli_ok(&["deny", &ids]);
}

/// The old agent refused approve from anyone but root. A member of the guardrail group (here
/// nobody with it as a supplementary group) approves like root, and the event log says who.
#[test]
fn a_member_of_the_guardrail_group_may_approve() {
    let _k = kernel_lock();
    let gid = admin_group();
    let setup = setup();
    fill(&setup.s.path().join("victim"), 1000);
    let (mut job, id, _) = held(&setup, "victim", "rm -rf victim");
    let out = nobody_cli(
        &setup.agent,
        Some(gid),
        &["approve", &id.to_string(), "--for-job"],
    );
    let (o, e) = output_text(&out);
    assert!(out.status.success(), "approve by a group member: {e}");
    assert!(o.starts_with(&format!("approved incident {id} on ")), "{o}");
    assert!(
        job.wait(Duration::from_secs(60)).is_some(),
        "the approved job finishes"
    );
    assert_eq!(count_files(&setup.s.path().join("victim")), 0);
    let approved = setup
        .agent
        .events()
        .into_iter()
        .find(|e| e["incident"]["outcome"] == "approved")
        .expect("an approved incident");
    assert_eq!(approved["incident"]["id"].as_u64(), Some(id));
    assert_eq!(
        approved["incident"]["decided_by"].as_u64(),
        Some(NOBODY as u64)
    );
}

/// The old agent showed every caller every hold: other users' commands, paths and remote
/// addresses. Now a caller outside root and the group sees their own jobs only, and is told so.
#[test]
fn status_and_holds_show_other_users_only_their_own_jobs() {
    let _k = kernel_lock();
    let setup = setup();
    fill(&setup.s.path().join("rootfiles"), 1000);
    let (_root_job, root_id, _) = held(&setup, "rootfiles", "rm -rf rootfiles");
    // A job of nobody's own, over files nobody owns.
    let mine = setup.s.path().join("nobodyfiles");
    fill(&mine, 1000);
    std::fs::set_permissions(setup.s.path(), std::fs::Permissions::from_mode(0o777))
        .expect("chmod scratch");
    Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(&mine)
        .status()
        .expect("chown");
    let (_nobody_job, nobody_id, _) = held(
        &setup,
        "nobodyfiles",
        "setpriv --reuid=65534 --regid=65534 --clear-groups rm -rf nobodyfiles",
    );
    assert_eq!(setup.agent.holds().len(), 2, "root sees both holds");

    let out = nobody_cli(&setup.agent, None, &["holds", "--json"]);
    let (o, e) = output_text(&out);
    assert!(out.status.success(), "holds as nobody: {e}");
    let holds: Vec<serde_json::Value> = serde_json::from_str(&o).expect("holds JSON");
    let ids: Vec<u64> = holds.iter().filter_map(|h| h["id"].as_u64()).collect();
    assert_eq!(ids, vec![nobody_id], "nobody sees only their own hold");
    assert!(
        e.contains(
            "note: only your own jobs and session are shown (not root, not in the guardrail group)"
        ),
        "{e}"
    );

    let out = nobody_cli(&setup.agent, None, &["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let ids: Vec<u64> = status["holds"]
        .as_array()
        .expect("holds")
        .iter()
        .filter_map(|h| h["id"].as_u64())
        .collect();
    assert_eq!(ids, vec![nobody_id]);
    assert!(
        status["sessions"].as_array().expect("sessions").is_empty(),
        "nobody has no login session, so sees none: {}",
        status["sessions"]
    );
    assert!(status["filtered"].as_str().is_some());
    let text_out =
        String::from_utf8_lossy(&nobody_cli(&setup.agent, None, &["status"]).stdout).into_owned();
    assert!(!text_out.contains("rootfiles"), "{text_out}");
    assert!(
        !text_out.contains(&format!("guardrail approve {root_id}")),
        "{text_out}"
    );
    assert!(text_out.contains("note: only your own jobs"), "{text_out}");
    // Root still sees everything, unfiltered.
    let root: serde_json::Value =
        serde_json::from_slice(&setup.agent.cli_ok(&["status", "--json"]).stdout)
            .expect("status JSON");
    assert_eq!(root["holds"].as_array().map(Vec::len), Some(2));
    assert!(root.get("filtered").is_none());
    setup.agent.cli_ok(&["deny", &root_id.to_string()]);
    setup.agent.cli_ok(&["deny", &nobody_id.to_string()]);
}

/// Confirmation checks the caller's own audit session through its pidfd, refuses a session the
/// caller does not run in (the old agent did too) and refuses more than five a minute per uid
/// (the old agent granted every one: each fills a slot of the kernel's 1024-entry pass table and
/// releases the logind inhibitor again).
#[test]
fn confirm_checks_the_callers_session_and_is_rate_limited() {
    let _k = kernel_lock();
    let setup = setup();
    let status = String::from_utf8_lossy(&setup.agent.cli_ok(&["status"]).stdout).into_owned();
    assert!(
        status.contains("caller check: confirm checks the caller's audit session through its pidfd (SO_PEERPIDFD)"),
        "{status}"
    );
    let h = hostname();
    // A raw request that claims another session than the caller's.
    let line = format!(r#"{{"request":"confirm","host":"{h}","session":123456789}}"#);
    let mut raw = Command::new(testkit_bin());
    raw.args([
        "sock",
        "send",
        setup.agent.socket.to_str().expect("utf-8"),
        &line,
    ]);
    let (o, _) = output_text(&in_new_session(0, &raw));
    assert!(
        o.contains("not 123456789; nothing confirmed"),
        "a claimed session that is not the caller's: {o}"
    );
    let mut confirm = Command::new(guardrail_bin());
    confirm.args([
        "--socket",
        setup.agent.socket.to_str().expect("utf-8"),
        "confirm",
        &h,
    ]);
    for n in 2..=5 {
        let out = in_new_session(0, &confirm);
        let (o, e) = output_text(&out);
        assert!(out.status.success(), "confirm {n}: {e}");
        assert!(
            o.starts_with("confirmed: the next shutdown request from this session"),
            "{o}"
        );
    }
    let out = in_new_session(0, &confirm);
    let (_, e) = output_text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        e.trim(),
        "guardrail: too many confirmations from uid 0: at most 5 a minute; nothing confirmed"
    );
    let granted: Vec<serde_json::Value> = setup
        .agent
        .events()
        .into_iter()
        .filter(|e| e["incident"]["kind"] == "shutdown_confirmation")
        .collect();
    assert_eq!(granted.len(), 4, "four passes granted");
    for g in &granted {
        assert_eq!(g["incident"]["decided_by"].as_u64(), Some(0));
        assert_eq!(
            g["incident"]["decided_by_session"], g["incident"]["audit_session"],
            "the confirming session is recorded: {g}"
        );
        assert!(g["incident"]["decided_by_session"].as_u64().is_some());
    }
}

/// A confirmation whose connecting process exited and whose pid now belongs to a process in
/// another audit session (reproduced with clone3 set_tid). The old agent read
/// /proc/<SO_PEERCRED pid>/sessionid, found the new process's session, and granted a pass for a
/// session the caller never ran in. Through the pidfd the agent sees the caller is gone.
#[test]
fn confirm_from_a_reused_pid_is_refused() {
    let _k = kernel_lock();
    let setup = setup();
    let mut reuse = Command::new(testkit_bin());
    reuse.args([
        "sock",
        "reuse",
        setup.agent.socket.to_str().expect("utf-8"),
        &hostname(),
    ]);
    let out = in_new_session(0, &reuse);
    let (o, e) = output_text(&out);
    assert!(o.contains("sock reuse: claimed session"), "{o}{e}");
    assert!(
        o.contains("\"response\":\"error\"") && o.contains("nothing confirmed"),
        "a reused pid must not speak for its new owner's session: {o}"
    );
    assert!(
        !setup
            .agent
            .events()
            .iter()
            .any(|e| e["incident"]["kind"] == "shutdown_confirmation"),
        "no pass granted"
    );
}

/// Entries of the map named `name` used by the agent's programs (found through the program ids
/// the agent prints at start-up), read with bpftool.
fn map_entries(agent: &Agent, name: &str) -> usize {
    let json = |args: &[&str]| -> serde_json::Value {
        let out = Command::new("bpftool")
            .arg("-j")
            .args(args)
            .output()
            .expect("bpftool");
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    };
    let log = agent.log();
    let progs = program_ids(&log);
    for p in progs {
        let maps = json(&["prog", "show", "id", &p]);
        for m in maps["map_ids"].as_array().into_iter().flatten() {
            let id = m.as_u64().expect("map id").to_string();
            if json(&["map", "show", "id", &id])["name"] == name {
                return json(&["map", "dump", "id", &id])
                    .as_array()
                    .map_or(0, Vec::len);
            }
        }
    }
    panic!("no map {name} among the agent's programs");
}

/// A confirmation pass left unused is deleted when its window ends. The old agent never deleted
/// one: the kernel's table holds 1024, so that many sessions confirming without shutting down
/// made every later `guardrail confirm` fail ("writing the confirmation pass") until a restart.
#[test]
fn unused_confirmation_passes_are_deleted_when_their_window_ends() {
    let _k = kernel_lock();
    require_root();
    let s = scratch();
    let cg = TestCgroup::new();
    let policy = policy_with(
        100,
        &[s.path()],
        &[],
        &cg,
        "[shutdown]\nconfirm_window = \"2s\"\n",
    );
    let agent = Agent::start(&policy).expect("agent starts");
    assert_eq!(map_entries(&agent, "SD_PASSES"), 0);
    let mut confirm = Command::new(guardrail_bin());
    confirm.args([
        "--socket",
        agent.socket.to_str().expect("utf-8"),
        "confirm",
        &hostname(),
    ]);
    let out = in_new_session(0, &confirm);
    assert!(out.status.success(), "confirm: {:?}", output_text(&out));
    assert_eq!(
        map_entries(&agent, "SD_PASSES"),
        1,
        "one pass while the window is open"
    );
    assert!(
        wait_until(Duration::from_secs(6), || map_entries(&agent, "SD_PASSES")
            == 0),
        "the unused pass is still in the kernel's table 6 s after its 2 s window"
    );
}

/// The event log names users, commands, paths and remote addresses. The old agent created it
/// with the default mode (0644 under umask 022): any user could read every incident with
/// `guardrail events`. Now the agent creates it 0600, and other users are told why they cannot.
#[test]
fn other_users_cannot_read_the_event_log() {
    let _k = kernel_lock();
    let setup = setup();
    let mode = std::fs::metadata(&setup.agent.event_log)
        .expect("the agent made its event log")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let log = setup.agent.event_log.to_str().expect("utf-8");
    let out = nobody_cli(&setup.agent, None, &["events", "--log", log]);
    let (o, e) = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "events as nobody: {o}{e}");
    assert!(o.is_empty(), "nothing of the log is shown: {o}");
    assert_eq!(
        e.trim(),
        format!(
            "guardrail: error: opening {log} (the event log is readable by root only, and by group adm where the packages set it up): Permission denied (os error 13)"
        )
    );
}
