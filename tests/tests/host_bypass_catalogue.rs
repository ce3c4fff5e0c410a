//! The bypass catalogue (tests/catalogue/bypass.toml) on the host kernel: every deletion row in
//! the `tracepoint` tier and in the `userspace` tier, each asserted against the outcome the row
//! writes for that tier (files of its directory destroyed, a hold or not, the incident's outcome).
//! Every row runs in a scratch directory under /var/tmp, as user nobody unless the row says root,
//! in an audit session of its own; every failing row is reported, not just the first.
//! GUARDRAIL_CATALOGUE_ROW=ID runs only the rows whose id contains ID.
use guardrail_integration::{catalogue, catalogue::run::Fixture, *};

fn run_tier(tier: Tier) {
    let _k = kernel_lock();
    let scene = Scene::new().open_to_others();
    let fx = Fixture::new(scene.path(), testkit_bin(), "find".to_string());
    let text = fx.policy(&scene.cg);
    let setup = match tier {
        Tier::Userspace => scene.start_with(&text, &["--tier", "userspace"]),
        _ => scene.start(&text),
    };
    setup.agent.require_tier(tier);
    let filter = std::env::var("GUARDRAIL_CATALOGUE_ROW").ok();
    let rows = catalogue::rows();
    let (ok, failed) =
        catalogue::run::run_all(&setup.agent, &fx, &setup.cg, &rows, tier, filter.as_deref());
    assert!(
        failed.is_empty(),
        "{} of {} catalogue rows differ from bypass.toml in the {tier} tier:\n{}\nagent log:\n{}",
        failed.len(),
        failed.len() + ok.len(),
        failed.join("\n"),
        setup.agent.log()
    );
}

#[test]
fn catalogue_rows_hold_in_the_tracepoint_tier() {
    run_tier(Tier::Tracepoint);
}

#[test]
fn catalogue_rows_hold_in_the_userspace_tier() {
    run_tier(Tier::Userspace);
}
