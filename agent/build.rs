//! Builds the kernel programs (ebpf/guardrail-ebpf) for bpfel-unknown-none and embeds the object.
//!
//! The BPF targets are tier 3: rustup ships no `core` for them. Debian's rustc-web ships one
//! (libstd-rust-web-dev-bpf), so the object is built with /usr/bin/rustc, RUSTC_BOOTSTRAP=1 and
//! bpf-linker, without -Z build-std (see ../shared/docs/toolchain.md and `cargo xtask setup`).
//!
//! Without that toolchain the build script still succeeds, so `cargo check` and `cargo clippy`
//! work; it leaves a marker that makes the final link of the binary fail with a symbol that names
//! the set-up command, after a one-line warning saying the same.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const SETUP: &str = "cargo xtask setup";

fn find_in_path(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect())
        .unwrap_or_default();
    // Where `cargo install` put bpf-linker: $CARGO_HOME/bin, else ~/.cargo/bin.
    if let Some(cargo_home) = env::var_os("CARGO_HOME") {
        dirs.push(Path::new(&cargo_home).join("bin"));
    }
    if let Some(home) = env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

fn main() {
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let ebpf_dir = manifest.join("../ebpf/guardrail-ebpf");
    let common_dir = manifest.join("../ebpf/guardrail-common");
    for p in [
        ebpf_dir.join("src"),
        ebpf_dir.join("Cargo.toml"),
        ebpf_dir.join("Cargo.lock"),
        common_dir.join("src"),
    ] {
        println!("cargo::rerun-if-changed={}", p.display());
    }
    println!("cargo::rustc-check-cfg=cfg(guardrail_ebpf_missing)");
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(&manifest)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| env::var("GUARDRAIL_COMMIT").ok())
        .unwrap_or_else(|| "unknown commit".to_string());
    println!("cargo::rustc-env=GUARDRAIL_COMMIT={commit}");
    println!(
        "cargo::rerun-if-changed={}",
        manifest.join("../.git/HEAD").display()
    );
    println!("cargo::rerun-if-env-changed=GUARDRAIL_COMMIT");
    println!("cargo::rerun-if-env-changed=GUARDRAIL_BPF_RUSTC");
    let object = out.join("guardrail.bpf.o");

    let bpf_rustc = env::var_os("GUARDRAIL_BPF_RUSTC")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/rustc"));
    let core_dir = Path::new("/usr/lib/rustlib/bpfel-unknown-none/lib");
    let linker = find_in_path("bpf-linker");
    let missing = if !bpf_rustc.is_file() {
        Some(format!("{} (Debian's rustc-web)", bpf_rustc.display()))
    } else if !core_dir.is_dir() {
        Some(format!("{} (libstd-rust-web-dev-bpf)", core_dir.display()))
    } else if linker.is_none() {
        Some("bpf-linker".to_string())
    } else {
        None
    };
    if let Some(what) = missing {
        println!(
            "cargo::warning=guardrail: the eBPF toolchain is missing ({what}); run `{SETUP}` to install it"
        );
        println!("cargo::rustc-cfg=guardrail_ebpf_missing");
        std::fs::write(&object, b"").expect("write placeholder object");
        return;
    }
    let linker = linker.expect("checked above");

    let target_dir = out.join("ebpf-target");
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(&ebpf_dir)
        .args([
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "--target-dir",
        ])
        .arg(&target_dir);
    // Nothing of the outer build (clippy's wrapper, host rustflags, the rustup toolchain's rustc)
    // may leak into the BPF build.
    for (k, _) in env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("CARGO_") && k != "CARGO_HOME"
            || k.starts_with("RUSTC")
            || k == "RUSTFLAGS"
            || k == "RUSTUP_TOOLCHAIN"
        {
            cmd.env_remove(&k);
        }
    }
    cmd.env("RUSTC", &bpf_rustc)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            ["-C", "link-arg=--btf", "-C", "target-cpu=v3"].join("\x1f"),
        );
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running cargo for {}: {e}", ebpf_dir.display()));
    if !status.success() {
        panic!(
            "building the eBPF programs in {} failed ({status})",
            ebpf_dir.display()
        );
    }
    let built = target_dir.join("bpfel-unknown-none/release/guardrail");
    std::fs::copy(&built, &object)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", built.display(), object.display()));
}
