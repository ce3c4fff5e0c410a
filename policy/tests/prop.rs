//! Property tests: nothing panics, and `explain` agrees with (1) a re-implementation of the
//! kernel's walk over the compiled tables and (2) a direct reading of the policy.

use std::path::{Path, PathBuf};

use guardrail_common::{ACTION_EXEMPT, DIR_PROTECTED_ROOT, MAX_ANCESTORS, Scope, scope_step};
use guardrail_policy::*;
use proptest::prelude::*;

fn universe() -> Vec<String> {
    let mut v = Vec::new();
    for a in ["a", "b", "c"] {
        v.push(format!("/{a}"));
        for b in ["a", "b", "c"] {
            v.push(format!("/{a}/{b}"));
            for c in ["a", "b"] {
                v.push(format!("/{a}/{b}/{c}"));
            }
        }
    }
    v
}

const USERS: usize = 5;

#[derive(Clone, Debug)]
struct Gen {
    /// Per universe dir: 0 none, 1 protected, 2 data dir, 3 target.
    role: Vec<u8>,
    /// For targets: bit 0 global, bit r rule r.
    target_mask: Vec<u8>,
    /// For data dirs: owner users bitmask.
    owners: Vec<u8>,
    /// Number of per-job rules (user r-1 each).
    nrules: usize,
    budgets: Vec<u64>,
    /// Users (of 3 and 4) in the exemption.
    exempt: u8,
    mounts: Vec<bool>,
    protect_mounts: bool,
    audit: bool,
}

fn policies() -> impl Strategy<Value = Gen> {
    let n = universe().len();
    (
        proptest::collection::vec(
            prop_oneof![4 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8), 2 => Just(3u8)],
            n,
        ),
        proptest::collection::vec(1u8..16, n),
        proptest::collection::vec(0u8..32, n),
        0usize..=3,
        proptest::collection::vec(prop_oneof![Just(0u64), 1u64..1000], 4),
        0u8..4,
        proptest::collection::vec(prop_oneof![9 => Just(false), 1 => Just(true)], n),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(
                role,
                target_mask,
                owners,
                nrules,
                budgets,
                exempt,
                mounts,
                protect_mounts,
                audit,
            )| Gen {
                role: without_too_wide_targets(role),
                target_mask,
                owners,
                nrules,
                budgets,
                exempt,
                mounts,
                protect_mounts,
                audit,
            },
        )
}

/// A target may not hold a protected root or a data directory (E0018): such a target is
/// dropped from the generated policy.
fn without_too_wide_targets(mut role: Vec<u8>) -> Vec<u8> {
    let u = universe();
    for i in 0..u.len() {
        let holds_kept = u
            .iter()
            .enumerate()
            .any(|(j, q)| j != i && matches!(role[j], 1 | 2) && Path::new(q).starts_with(&u[i]));
        if role[i] == 3 && holds_kept {
            role[i] = 0;
        }
    }
    role
}

fn user(i: usize) -> String {
    format!("u{i}")
}

fn to_toml(g: &Gen) -> String {
    let u = universe();
    let pick = |role: u8, mask_bit: Option<usize>| -> Vec<String> {
        u.iter()
            .enumerate()
            .filter(|(i, _)| {
                g.role[*i] == role && mask_bit.is_none_or(|b| g.target_mask[*i] & (1 << b) != 0)
            })
            .map(|(_, p)| format!("{p:?}"))
            .collect()
    };
    let mut s = String::new();
    s.push_str(&format!(
        "mode = \"{}\"\n[deletion]\n",
        if g.audit { "audit" } else { "enforce" }
    ));
    s.push_str(&format!("budget = {}\nwindow = \"1m\"\n", g.budgets[0]));
    s.push_str(&format!("protect_mount_points = {}\n", g.protect_mounts));
    let mut prot = vec!["\"/\"".to_string()];
    prot.extend(pick(1, None));
    s.push_str(&format!("protected_roots = [{}]\n", prot.join(", ")));
    s.push_str(&format!("targets = [{}]\n", pick(3, Some(0)).join(", ")));
    for (i, p) in u.iter().enumerate() {
        if g.role[i] == 2 {
            let owners: Vec<String> = (0..USERS)
                .filter(|k| g.owners[i] & (1 << k) != 0)
                .map(|k| format!("{:?}", user(k)))
                .collect();
            s.push_str(&format!(
                "[[deletion.data_dir]]\npath = {p:?}\nowners = {{ users = [{}] }}\n",
                owners.join(", ")
            ));
        }
    }
    for r in 1..=g.nrules {
        s.push_str(&format!(
            "[[deletion.rule]]\nname = \"r{r}\"\nmatch = {{ user = {:?} }}\ntargets = [{}]\nbudget = {}\n",
            user(r - 1),
            pick(3, Some(r)).join(", "),
            g.budgets[r]
        ));
    }
    let ex: Vec<String> = (3..USERS)
        .filter(|k| g.exempt & (1 << (k - 3)) != 0)
        .map(|k| format!("{:?}", user(k)))
        .collect();
    if !ex.is_empty() {
        s.push_str(&format!(
            "[[deletion.exempt]]\nname = \"ex\"\nusers = [{}]\n",
            ex.join(", ")
        ));
    }
    s
}

fn host(g: &Gen) -> MemResolver {
    let u = universe();
    let refs: Vec<&str> = u.iter().map(String::as_str).collect();
    let mut h = MemResolver::new().with_tree(0x801, &refs);
    for k in 0..USERS {
        h = h.with_user(&user(k), 1000 + k as u32);
    }
    // Shallowest first so inner mounts keep their own device.
    for (i, p) in u.iter().enumerate() {
        if g.mounts[i] {
            h = h.with_mount(p, 0x900 + i as u64, 2);
        }
    }
    h
}

/// The kernel's walk, re-implemented over the compiled tables.
fn kernel_walk(c: &Compiled, path: &Path, rule: u32, h: &MemResolver) -> (bool, Scope) {
    if let Some(id) = kernel_identity(h, path)
        && c.dirs
            .get(&id)
            .is_some_and(|d| d.kind & DIR_PROTECTED_ROOT != 0)
    {
        return (true, Scope::Undecided);
    }
    let mounts = h.mount_points();
    let mut dir = path.parent();
    let mut n = 0;
    while let Some(d) = dir {
        if n == MAX_ANCESTORS {
            break;
        }
        n += 1;
        if let Some(e) = kernel_identity(h, d).and_then(|id| c.dirs.get(&id)) {
            let s = scope_step(e, rule);
            if s != Scope::Undecided {
                return (false, s);
            }
        }
        if mounts.iter().any(|m| m == d) {
            break;
        }
        dir = d.parent();
    }
    (false, Scope::Undecided)
}

#[derive(Debug, PartialEq)]
enum Coarse {
    Refused,
    Free,
    Counted,
    Exempt,
}

/// What the policy says, read directly (no tables, no identities).
fn oracle(g: &Gen, path: &Path, job_user: Option<usize>) -> Coarse {
    let u = universe();
    let idx = |p: &Path| u.iter().position(|x| Path::new(x) == p);
    let is_mount = |p: &Path| idx(p).is_some_and(|i| g.mounts[i]);
    if path == Path::new("/")
        || idx(path).is_some_and(|i| g.role[i] == 1)
        || (g.protect_mounts && is_mount(path))
    {
        return Coarse::Refused;
    }
    let rule = job_user.filter(|k| *k < g.nrules).map(|k| k + 1);
    let exempt =
        rule.is_none() && job_user.is_some_and(|k| k >= 3 && g.exempt & (1 << (k - 3)) != 0);
    for a in path.ancestors().skip(1) {
        let Some(i) = idx(a) else { continue };
        match g.role[i] {
            2 => {
                let owner = job_user.is_some_and(|k| g.owners[i] & (1 << k) != 0);
                return if owner { Coarse::Free } else { Coarse::Refused };
            }
            3 => {
                let bit = rule.unwrap_or(0);
                if !exempt && g.target_mask[i] & (1 << bit) != 0 {
                    return Coarse::Free;
                }
            }
            _ => {}
        }
    }
    if exempt {
        Coarse::Exempt
    } else {
        Coarse::Counted
    }
}

/// Every diagnostic names one of `files` and a line and column inside that file's text (column
/// in characters, at most one past the line's end: an error at the end of a line or the file).
fn positions_inside(
    diagnostics: &[Diagnostic],
    files: &[(&str, &str)],
) -> Result<(), TestCaseError> {
    for d in diagnostics {
        let Some((_, text)) = files.iter().find(|(n, _)| *n == d.file) else {
            return Err(TestCaseError::fail(format!("{d}: names no file given")));
        };
        let lines: Vec<&str> = text.split('\n').collect();
        prop_assert!(
            d.line >= 1 && d.line <= lines.len(),
            "{}: line outside the input",
            d
        );
        let width = lines[d.line - 1].chars().count();
        prop_assert!(
            d.column >= 1 && d.column <= width + 1,
            "{}: column outside line {:?}",
            d,
            lines[d.line - 1]
        );
        let _ = d.to_string();
    }
    Ok(())
}

/// One edit of a policy text, at a position given as a fraction of its length (so the same
/// edits apply to any text).
#[derive(Clone, Debug)]
enum Edit {
    /// Removes up to `len` bytes.
    Delete { at: u16, len: u8 },
    /// Inserts TOML-ish text.
    Insert { at: u16, text: String },
    /// Repeats the line there (duplicate keys, tables).
    DuplicateLine { at: u16 },
    /// Replaces the line there.
    ReplaceLine { at: u16, text: String },
    /// Cuts the text there.
    Truncate { at: u16 },
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let snippet = prop_oneof![
        "[\\[\\]{}=\"',.#\n a-z0-9_*/-]{0,16}",
        Just("\"".to_string()),
        Just("[[deletion.rule]]\n".to_string()),
        Just("budget = -1\n".to_string()),
        Just("budget = 99999999999999999999999\n".to_string()),
        Just("window = \"0s\"\n".to_string()),
        Just("targets = [\"relative\", \"/\"]\n".to_string()),
        Just("match = { cgroup = \"\", user = 7 }\n".to_string()),
        Just("\u{feff}é\u{0}\r\n".to_string()),
    ];
    let edit = prop_oneof![
        (any::<u16>(), any::<u8>()).prop_map(|(at, len)| Edit::Delete { at, len }),
        (any::<u16>(), snippet.clone()).prop_map(|(at, text)| Edit::Insert { at, text }),
        any::<u16>().prop_map(|at| Edit::DuplicateLine { at }),
        (any::<u16>(), snippet).prop_map(|(at, text)| Edit::ReplaceLine { at, text }),
        any::<u16>().prop_map(|at| Edit::Truncate { at }),
    ];
    proptest::collection::vec(edit, 1..6)
}

/// `at` (of 65536) of the way into `s`, on a character boundary.
fn point(s: &str, at: u16) -> usize {
    let mut i = s.len() * at as usize / 65536;
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The line of `s` around byte `i`: its start and end (without the newline).
fn line_at(s: &str, i: usize) -> (usize, usize) {
    let start = s[..i].rfind('\n').map(|j| j + 1).unwrap_or(0);
    let end = s[i..].find('\n').map(|j| i + j).unwrap_or(s.len());
    (start, end)
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut s = text.to_string();
    for e in edits {
        match e {
            Edit::Delete { at, len } => {
                let a = point(&s, *at);
                let mut b = (a + *len as usize).min(s.len());
                while !s.is_char_boundary(b) {
                    b -= 1;
                }
                s.replace_range(a..b, "");
            }
            Edit::Insert { at, text } => {
                let a = point(&s, *at);
                s.insert_str(a, text);
            }
            Edit::DuplicateLine { at } => {
                let (a, b) = line_at(&s, point(&s, *at));
                let line = format!("{}\n", &s[a..b]);
                s.insert_str(a, &line);
            }
            Edit::ReplaceLine { at, text } => {
                let (a, b) = line_at(&s, point(&s, *at));
                s.replace_range(a..b, text);
            }
            Edit::Truncate { at } => {
                let a = point(&s, *at);
                s.truncate(a);
            }
        }
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn check_never_panics_on_arbitrary_text(s in any::<String>()) {
        let c = check_str("p.toml", &s, &MemResolver::new());
        positions_inside(&c.diagnostics, &[("p.toml", &s)])?;
        if let Some(p) = c.policy { let _ = compile(&p, &MemResolver::new()); }
    }

    /// Arbitrary bytes in a policy file on disk (the agent's path): no panic; text that is not
    /// UTF-8 is one read error naming the file; any other error points inside the text.
    #[test]
    fn check_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, &bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let c = check_files(&path, None, &MemResolver::new());
        let name = path.display().to_string();
        match std::str::from_utf8(&bytes) {
            Ok(text) => positions_inside(&c.diagnostics, &[(&name, text)])?,
            Err(_) => {
                prop_assert!(c.policy.is_none());
                prop_assert!(c.diagnostics.iter().any(|d| d.is_error() && d.file == name && d.message.contains("not UTF-8")), "{:?}", c.diagnostics);
            }
        }
    }

    /// The shipped policy (the embedded default), edited at random, as the main file or as a
    /// drop-in after the untouched default: no panic, and every diagnostic points inside the
    /// file it names.
    #[test]
    fn edits_of_the_shipped_policy_never_panic_and_point_inside(e in edits(), dropin in any::<bool>()) {
        let text = apply(DEFAULT_POLICY, &e);
        let h = MemResolver::new().with_tree(1, &["/var/lib", "/srv", "/home"]);
        let c = if dropin {
            let files = [("policy.toml".to_string(), DEFAULT_POLICY.to_string()), ("50-edit.toml".to_string(), text.clone())];
            let c = check_sources(&files, &h);
            positions_inside(&c.diagnostics, &[("policy.toml", DEFAULT_POLICY), ("50-edit.toml", &text)])?;
            c
        } else {
            let c = check_str("policy.toml", &text, &h);
            positions_inside(&c.diagnostics, &[("policy.toml", &text)])?;
            c
        };
        if let Some(p) = c.policy { let _ = compile(&p, &h); }
    }

    #[test]
    fn check_never_panics_on_toml_like_text(s in "([a-z_]{1,12} = (\"[/a-z*. ]{0,12}\"|-?[0-9]{1,12}|true|\\[\\]|\\{\\}|\\[\"/[a-z]{0,4}\"\\])\n|\\[\\[?(deletion|shutdown|alerts)(\\.[a-z_]{1,10})?\\]\\]?\n|#.*\n){0,24}") {
        let c = check_str("p.toml", &s, &MemResolver::new().with_tree(1, &["/tmp"]));
        positions_inside(&c.diagnostics, &[("p.toml", &s)])?;
        if let Some(p) = c.policy {
            let _ = compile(&p, &MemResolver::new().with_tree(1, &["/tmp"]));
        }
    }

    #[test]
    fn explain_matches_the_kernel_walk_and_the_policy(g in policies(), pick in 0usize..100, leaf in any::<bool>(), job in proptest::option::of(0usize..USERS)) {
        let text = to_toml(&g);
        let h = host(&g);
        let c = check_str("gen.toml", &text, &h);
        prop_assert!(c.errors().count() == 0, "{text}\n{:#?}", c.diagnostics);
        let policy = c.policy.expect("no errors");
        let compiled = compile(&policy, &h);
        prop_assert!(compiled.warnings.is_empty(), "{:?}", compiled.warnings);

        let u = universe();
        let mut path = PathBuf::from(&u[pick % u.len()]);
        if leaf { path.push("file"); }
        let spec = JobSpec { user: job.map(user), ..JobSpec::default() };
        let ex = explain(&compiled, &path, &spec, &h);

        // (1) The kernel's walk over the same tables, with the same decision function.
        let (protected, scope) = kernel_walk(&compiled, &path, ex.rule, &h);
        let params = compiled.rules[ex.rule as usize];
        let want = if protected {
            Verdict::ProtectedRoot
        } else {
            match scope {
                Scope::InTarget => Verdict::InTarget,
                Scope::DataOwner => match ex.verdict { Verdict::DataOwner { .. } => ex.verdict.clone(), _ => Verdict::DataOwner { data_dir_id: u32::MAX } },
                Scope::DataForeign { data_dir_id } => Verdict::DataForeign { data_dir_id },
                Scope::Undecided if params.action == ACTION_EXEMPT => Verdict::Exempt,
                Scope::Undecided => Verdict::Counted { budget: params.budget, window: "1m".into(), action: Action::Hold },
            }
        };
        prop_assert_eq!(&ex.verdict, &want, "{}\n{}", text, ex);

        // (2) The policy read directly (mount-root folding may turn InTarget into DataOwner,
        // so compare free / refused / counted / exempt).
        let coarse = match ex.verdict {
            Verdict::ProtectedRoot | Verdict::DataForeign { .. } => Coarse::Refused,
            Verdict::InTarget | Verdict::DataOwner { .. } => Coarse::Free,
            Verdict::Counted { .. } => Coarse::Counted,
            Verdict::Exempt => Coarse::Exempt,
        };
        prop_assert_eq!(coarse, oracle(&g, &path, job), "{}\n{}\nmounts {:?}", text, ex, h.mounts);
        prop_assert_eq!(ex.audit, g.audit);
    }
}
