//! The Debian 12 image the systemd VM boots, built once and cached: debootstrap from the mirror
//! apt uses here, configured in a chroot, packed into ext4 with `mkfs.ext4 -d`; the kernel and
//! initrd are kept beside it for qemu's `-kernel`/`-initrd`. The cache entry is named by the hash
//! of everything it is built from ([`image_inputs`]).
use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, Result, ensure};

use super::USER;
use crate::qemu::remove_dir_if_exists;
use crate::run_cmd;

const SUITE: &str = "bookworm";
/// What the VM runs, and what the checks use (busybox-static: the chroot's shell and rm;
/// bpftool: which programs are attached).
const VM_PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "libpam-systemd",
    "openssh-server",
    "sudo",
    "rsyslog",
    "logrotate",
    "linux-image-amd64",
    "initramfs-tools",
    "e2fsprogs",
    "iproute2",
    "procps",
    "kmod",
    "busybox-static",
    "bpftool",
    // polkit: lets the test user reboot through logind (but not past inhibitors), so that the
    // logind inhibitor check shows a refusal that is the inhibitor's doing.
    "polkitd",
    // rpm: the .rpm's scriptlets run on this systemd too (the only place they run).
    "rpm",
];
/// The image's ext4 size (sparse: only the ~1 GB in use takes space).
const IMAGE_SIZE: &str = "4G";

/// Configuration of the rootfs, run in a chroot after debootstrap. Part of the image hash.
const CONFIGURE_SCRIPT: &str = r#"set -eu
echo guardrail-vm >/etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 guardrail-vm\n' >/etc/hosts
printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' >/etc/fstab
mkdir -p /etc/systemd/network
printf '[Match]\nName=eth*\n\n[Network]\nDHCP=ipv4\n' >/etc/systemd/network/20-eth.network
systemctl enable systemd-networkd.service
# Nothing waits for the network or asks questions on the console (firstboot would prompt for
# a locale on the first boot of every throwaway overlay), and no timer wakes up during a test.
systemctl mask systemd-networkd-wait-online.service systemd-firstboot.service \
    apt-daily.timer apt-daily-upgrade.timer man-db.timer e2scrub_all.timer fstrim.timer
useradd --create-home --shell /bin/bash --groups sudo USER
passwd --lock USER
printf 'USER ALL=(ALL) NOPASSWD: ALL\n' >/etc/sudoers.d/USER
chmod 0440 /etc/sudoers.d/USER
install -d -m 0700 -o USER -g USER /home/USER/.ssh
install -m 0600 -o USER -g USER /tmp/authorized_keys /home/USER/.ssh/authorized_keys
rm -f /tmp/authorized_keys
# sshd: no reverse DNS on every login (there is no resolver in the VM).
printf 'UseDNS no\n' >/etc/ssh/sshd_config.d/guardrail-test.conf
apt-get clean
"#;

/// Bumped when the way the image is built changes in a way the inputs above do not show.
const IMAGE_FORMAT: u32 = 1;

/// A built image in the cache.
#[derive(Debug, Clone)]
pub struct Image {
    pub dir: PathBuf,
    pub disk: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub key: PathBuf,
}

impl Image {
    fn at(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            disk: dir.join("disk.img"),
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.img"),
            key: dir.join("id_ed25519"),
        }
    }

    fn complete(&self) -> bool {
        [&self.disk, &self.kernel, &self.initrd, &self.key]
            .iter()
            .all(|p| p.is_file())
    }
}

/// The mirror apt uses on this machine (only Debian's servers are reachable), from
/// /etc/apt/sources.list.d/*.sources (deb822) or /etc/apt/sources.list.
fn debian_mirror() -> String {
    let mut texts = Vec::new();
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut files: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        for f in files {
            if f.extension().is_some_and(|e| e == "sources" || e == "list")
                && let Ok(t) = fs::read_to_string(&f)
            {
                texts.push(t);
            }
        }
    }
    if let Ok(t) = fs::read_to_string("/etc/apt/sources.list") {
        texts.push(t);
    }
    texts
        .iter()
        .find_map(|t| parse_mirror(t))
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_string())
}

/// The first archive URI serving `bookworm` (not -security/-updates) in deb822 or one-line form.
fn parse_mirror(text: &str) -> Option<String> {
    let is_archive = |u: &str| {
        (u.starts_with("http://") || u.starts_with("https://")) && !u.contains("security")
    };
    // deb822: stanzas separated by blank lines.
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|r| r.strip_prefix(':'))
                    .map(|v| v.trim().to_string())
            })
        };
        if let (Some(uris), Some(suites)) = (field("URIs"), field("Suites"))
            && suites.split_whitespace().any(|s| s == SUITE)
            && let Some(u) = uris.split_whitespace().find(|u| is_archive(u))
        {
            return Some(u.trim_end_matches('/').to_string());
        }
    }
    text.lines().find_map(|l| {
        let mut w = l.split_whitespace().filter(|w| !w.starts_with('['));
        (w.next()? == "deb").then_some(())?;
        let uri = w.next()?;
        (w.next()? == SUITE && is_archive(uri)).then(|| uri.trim_end_matches('/').to_string())
    })
}

/// Everything the image is built from, as text: its hash names the cache entry.
fn image_inputs(mirror: &str) -> String {
    format!(
        "format {IMAGE_FORMAT}\nsuite {SUITE}\nmirror {mirror}\nsize {IMAGE_SIZE}\nuser {USER}\n\
         packages {}\n---\n{CONFIGURE_SCRIPT}",
        VM_PACKAGES.join(",")
    )
}

fn sha256_hex(text: &str) -> Result<String> {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting sha256sum")?;
    child
        .stdin
        .take()
        .context("sha256sum stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "sha256sum failed");
    let s = String::from_utf8_lossy(&out.stdout);
    Ok(s.split_whitespace().next().unwrap_or_default().to_string())
}

/// The cached image for the current inputs, built first if missing.
pub fn ensure_image(cache: &Path) -> Result<Image> {
    let mirror = debian_mirror();
    let inputs = image_inputs(&mirror);
    let hash = sha256_hex(&inputs)?;
    let name = format!("image-{}", &hash[..16]);
    let image = Image::at(&cache.join(&name));
    if image.complete() {
        println!("sysvm: cached image {}", image.dir.display());
        return Ok(image);
    }
    fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    let t = Instant::now();
    println!(
        "sysvm: building the Debian {SUITE} image from {mirror} into {} (debootstrap; a few minutes)",
        image.dir.display()
    );
    // Built under a pid-suffixed name and renamed at the end: an interrupted build never
    // leaves a half image under the final name.
    let work = cache.join(format!(".build-{}", std::process::id()));
    remove_dir_if_exists(&work)?;
    fs::create_dir_all(&work)?;
    let built = build_image(&work, &cache.join("debs"), &mirror, &inputs);
    if built.is_err() {
        // The rootfs may still have /proc etc. mounted by debootstrap: unmount before removing.
        unmount_below(&work.join("rootfs"));
    }
    built?;
    remove_dir_if_exists(&image.dir)?;
    fs::rename(&work, &image.dir)
        .with_context(|| format!("renaming {} to {}", work.display(), image.dir.display()))?;
    // Older images (other inputs) are dead weight: a few GB each.
    for entry in fs::read_dir(cache)?.flatten() {
        let n = entry.file_name().to_string_lossy().to_string();
        if n.starts_with("image-") && n != name {
            println!("sysvm: removing the outdated image {n}");
            remove_dir_if_exists(&entry.path())?;
        }
    }
    println!("sysvm: image built in {:.0}s", t.elapsed().as_secs_f64());
    Ok(image)
}

fn build_image(work: &Path, debs: &Path, mirror: &str, inputs: &str) -> Result<()> {
    let rootfs = work.join("rootfs");
    let t = Instant::now();
    fs::create_dir_all(debs).with_context(|| format!("creating {}", debs.display()))?;
    run_cmd(
        Command::new("debootstrap")
            .args(["--variant=minbase", "--merged-usr"])
            // Downloaded packages are kept: a rebuild after a change of the configuration
            // then needs no download (debootstrap checks them against the mirror's index).
            .arg(format!("--cache-dir={}", debs.display()))
            .arg(format!("--include={}", VM_PACKAGES.join(",")))
            .arg(SUITE)
            .arg(&rootfs)
            .arg(mirror)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("debootstrap")?;
    println!("sysvm: debootstrap took {:.0}s", t.elapsed().as_secs_f64());

    let key = work.join("id_ed25519");
    run_cmd(
        Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "guardrail-sysvm",
                "-f",
            ])
            .arg(&key),
    )?;
    fs::copy(
        work.join("id_ed25519.pub"),
        rootfs.join("tmp/authorized_keys"),
    )?;
    let script = CONFIGURE_SCRIPT.replace("USER", USER);
    run_cmd(
        Command::new("chroot")
            .arg(&rootfs)
            .args(["/bin/sh", "-c", &script])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("configuring the rootfs")?;
    unmount_below(&rootfs);

    // The kernel and initrd boot the VM from outside the image (qemu -kernel/-initrd).
    let boot = rootfs.join("boot");
    let mut kernel = None;
    let mut initrd = None;
    for e in fs::read_dir(&boot)?.flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if n.starts_with("vmlinuz-") {
            kernel = Some(e.path());
        } else if n.starts_with("initrd.img-") {
            initrd = Some(e.path());
        }
    }
    let kernel = kernel.context("no /boot/vmlinuz-* in the rootfs")?;
    let initrd = initrd.context("no /boot/initrd.img-* in the rootfs")?;
    fs::copy(&kernel, work.join("vmlinuz"))?;
    fs::copy(&initrd, work.join("initrd.img"))?;

    run_cmd(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "root", "-d"])
            .arg(&rootfs)
            .arg(work.join("disk.img"))
            .arg(IMAGE_SIZE),
    )
    .context("mkfs.ext4 -d")?;
    fs::write(work.join("inputs.txt"), inputs)?;
    // The image holds everything now; the tree would only double the cache's size.
    remove_dir_if_exists(&rootfs)?;
    Ok(())
}

/// Unmounts whatever debootstrap or a chroot left mounted below `dir` (deepest first). Only
/// mount points under `dir` are touched.
fn unmount_below(dir: &Path) {
    let Ok(dir) = dir.canonicalize() else { return };
    let Ok(mounts) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(PathBuf::from))
        .filter(|p| p.starts_with(&dir) && p != &dir)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let _ = Command::new("umount").arg("-l").arg(&p).status();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;

    #[test]
    fn mirror_from_deb822_and_one_line() {
        let deb822 = "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n\
                      Components: main\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\n\
                      Suites: bookworm-security\n";
        assert_eq!(
            parse_mirror(deb822).as_deref(),
            Some("http://deb.debian.org/debian")
        );
        let one = "deb http://security.debian.org/debian-security bookworm-security main\n\
                   deb [arch=amd64] http://ftp.de.debian.org/debian/ bookworm main\n";
        assert_eq!(
            parse_mirror(one).as_deref(),
            Some("http://ftp.de.debian.org/debian")
        );
        assert_eq!(parse_mirror("deb http://x/debian trixie main\n"), None);
    }

    #[test]
    fn image_hash_follows_inputs() {
        let a = image_inputs("http://a/debian");
        let b = image_inputs("http://b/debian");
        assert_ne!(sha256_hex(&a).unwrap(), sha256_hex(&b).unwrap());
        assert_eq!(sha256_hex(&a).unwrap(), sha256_hex(&a).unwrap());
    }
}
