//! The fmodret tier on the host kernel, which refuses fmod_ret programs: the probe tries it after
//! BPF LSM, says why it is not usable, and falls back to the tracepoint tier; forcing it fails the
//! start with an error that names the program and the kernel function, and leaves no program
//! attached. (The tier itself is proven in the VM: `cargo xtask vm --ubuntu-lsm`.)
use std::process::Command;

use guardrail_integration::*;

/// A policy whose only effect is to be valid: nothing here deletes.
fn quiet_policy(cg: &TestCgroup) -> (tempfile::TempDir, String) {
    let s = scratch();
    let target = s.path().join("target");
    std::fs::create_dir_all(&target).expect("mkdir target");
    let text = policy(100, &[&target], &[], cg);
    (s, text)
}

/// Start-up, status and selftest all report the order lsm → fmodret → tracepoint: on this kernel
/// the tracepoint tier is in force, and the reason names why fmod_ret is not usable.
#[test]
fn the_probe_tries_fmodret_before_falling_back_to_tracepoint() {
    let _k = kernel_lock();
    require_root();
    let cg = TestCgroup::new();
    let (_s, text) = quiet_policy(&cg);
    let agent = Agent::start(&text).expect("agent starts");
    // A kernel that refuses BPF LSM and fmod_ret: the scenario of this file.
    agent.require_tier(Tier::Tracepoint);
    let status = agent.cli_ok(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status is JSON");
    assert_eq!(v["tier"], "tracepoint", "status: {v}");
    let why = v["why"].as_str().expect("why is a string");
    assert!(
        why.contains("; fmod_ret is not usable (") && why.contains("tracepoint programs load"),
        "the reason names the fmod_ret probe's failure: {why}"
    );
    assert!(agent.stop().expect("stops").success());

    let out = Command::new(guardrail_bin())
        .args(["selftest", "--json"])
        .output()
        .expect("running selftest");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("selftest JSON");
    assert_eq!(v["tier"], "tracepoint");
    let fmodret = v["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == "fmod_ret")
        .unwrap_or_else(|| panic!("selftest has an fmod_ret check: {v}"));
    assert_eq!(fmodret["ok"], false, "{fmodret}");
    assert!(
        v["stronger"]
            .as_str()
            .is_some_and(|s| s.contains("fmodret tier")),
        "selftest says how to get a stronger tier: {v}"
    );
}

/// `--tier fmodret` on a kernel without fmod_ret: the agent exits non-zero before it is ready,
/// the error names the program and the function it could not attach, no panic, and no program
/// stays pinned in the agent's pin directory.
#[test]
fn forcing_fmodret_where_the_kernel_refuses_it_fails_cleanly() {
    let _k = kernel_lock();
    require_root();
    let cg = TestCgroup::new();
    let (_s, text) = quiet_policy(&cg);
    let pins = unique_pin_dir();
    let pins_arg = pins.to_str().expect("utf-8 pin dir");
    let err = match Agent::start_with(&text, &["--tier", "fmodret", "--pin-dir", pins_arg]) {
        Ok(_) => panic!("the agent started in the fmodret tier on a kernel that refuses fmod_ret"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("fmod_ret program fm_unlink") && err.contains("security_inode_unlink"),
        "the error names the program and the function:\n{err}"
    );
    assert!(!err.contains("panicked"), "no panic:\n{err}");
    let links = pins.join("links");
    let left: Vec<_> = std::fs::read_dir(&links)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "nothing pinned in {}: {left:?}",
        links.display()
    );
    let _ = std::fs::remove_dir_all(&pins);
}
