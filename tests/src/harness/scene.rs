//! The scene most host tests start from: a scratch directory under /var/tmp, a cgroup of the
//! test's own (the policy's small budgets match only it), and an agent on a test policy.
use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use crate::{Agent, TestCgroup, policy, require_root, scratch};

/// A running scene. Field order is drop order: the agent stops before its cgroup and scratch
/// tree go.
pub struct Setup {
    pub agent: Agent,
    pub cg: TestCgroup,
    pub s: tempfile::TempDir,
}

/// A scene before its agent starts: the scratch directory and the test cgroup exist.
pub struct Scene {
    pub s: tempfile::TempDir,
    pub cg: TestCgroup,
}

impl Scene {
    /// Needs root (cgroups, and the agent to come).
    pub fn new() -> Scene {
        require_root();
        let s = scratch();
        let cg = TestCgroup::new();
        Scene { s, cg }
    }

    /// `rel` below the scratch directory, created with its parents.
    pub fn dir(&self, rel: &str) -> PathBuf {
        let p = self.s.path().join(rel);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        p
    }

    pub fn path(&self) -> &Path {
        self.s.path()
    }

    /// Lets other users (nobody) through the scratch directory (mode 0755; tempfile makes 0700).
    pub fn open_to_others(self) -> Scene {
        std::fs::set_permissions(self.s.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod the scratch directory");
        self
    }

    /// Starts the agent on `policy_text`.
    pub fn start(self, policy_text: &str) -> Setup {
        self.start_with(policy_text, &[])
    }

    /// Starts the agent on `policy_text` with `args` for `guardrail agent`.
    pub fn start_with(self, policy_text: &str, args: &[&str]) -> Setup {
        let agent = Agent::start_with(policy_text, args).expect("agent starts");
        Setup {
            agent,
            cg: self.cg,
            s: self.s,
        }
    }
}

impl Default for Scene {
    fn default() -> Self {
        Self::new()
    }
}

impl Setup {
    /// The plainest scene: one target directory `target`, and [`policy`] giving the test's jobs
    /// `budget` deletions outside it.
    pub fn with_budget(budget: u64) -> Setup {
        let scene = Scene::new();
        let target = scene.dir("target");
        let text = policy(budget, &[&target], &[], &scene.cg);
        scene.start(&text)
    }
}

/// A stand-in for a shutdown command: a copy of /bin/echo named `name` in `dir` (created). With
/// the stand-in in the policy's `[shutdown] commands`, the guard judges it like `reboot`, and
/// when it is let through it only prints its arguments: no test ever shuts the host down.
pub fn standin(dir: &Path, name: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    let p = dir.join(name);
    std::fs::copy("/bin/echo", &p).expect("copying /bin/echo as a shutdown stand-in");
    p
}

/// A `[shutdown]` table with the action for each session class (remote, local, none, unknown),
/// a 2-minute confirmation window and `commands` as the policy's own shutdown commands.
pub fn shutdown_toml(classes: [&str; 4], commands: &[&Path]) -> String {
    let [remote, local, none, unknown] = classes;
    let commands = commands
        .iter()
        .map(|c| format!("{:?}", c.display().to_string()))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "\n[shutdown]\nremote = \"{remote}\"\nlocal = \"{local}\"\nnone = \"{none}\"\n\
         unknown = \"{unknown}\"\nconfirm_window = \"2m\"\ncommands = [{commands}]\n"
    )
}
