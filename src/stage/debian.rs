//! The OS base: Debian's own mmdebstrap (apt and dpkg underneath, qemu-user for foreign
//! architectures) writes a root tarball, which is cached by everything that determines it.
//!
//! No mirror host name lives here: the mirror comes from the recipe, a flag, or the build
//! host's own apt sources.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::platform::Arch;
use crate::progress::{Progress, Unit};

/// Packages every bootable image needs, whatever the recipe lists: the cloud kernel (NVMe and
/// ENA drivers), an initramfs builder, systemd as init with udev, and systemd-boot's EFI binary.
pub fn required_packages(arch: Arch) -> Vec<&'static str> {
    vec![
        arch.cloud_kernel_package(),
        "initramfs-tools",
        "systemd-sysv",
        "udev",
        "systemd-boot-efi",
        "dbus",
        "e2fsprogs",
    ]
}

/// Everything that determines a staged Debian base.
#[derive(Debug, Clone)]
pub struct DebianBase {
    /// Debian suite (`bookworm`, `trixie`).
    pub suite: String,
    pub arch: Arch,
    /// Archive URI (`http://…/debian`), already resolved.
    pub mirror: String,
    pub components: Vec<String>,
    /// Full package list (required plus recipe), sorted and de-duplicated.
    pub packages: Vec<String>,
    /// Passed to mmdebstrap so file times inside the base are clamped too.
    pub source_date_epoch: Option<i64>,
    /// The mirror is a snapshot archive (`[image].snapshot`): its Release files are past their
    /// Valid-Until date by design, so apt must not reject them. Not part of the cache key: it
    /// decides whether apt accepts the archive, not what gets installed.
    pub snapshot: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("no Debian mirror given and none found in the build host's apt sources (/etc/apt/sources.list, /etc/apt/sources.list.d/); set `mirror` under [image] in the recipe or pass --mirror URL")]
    NoMirror,
    #[error("mmdebstrap is not installed; install it with `apt-get install mmdebstrap` (or run .ci/setup-host)")]
    NoMmdebstrap,
    #[error("this {host} host cannot run {target} programs, which staging needs for package maintainer scripts; install qemu-user-static and binfmt-support (`apt-get install qemu-user-static binfmt-support`, or run .ci/setup-host) and make sure binfmt_misc is mounted")]
    CannotExecute { host: String, target: Arch },
    #[error("{cmd} failed with {status}; the last lines of its output:\n{tail}\n(full log: {log})")]
    Failed { cmd: String, status: String, tail: String, log: PathBuf },
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
}

impl DebianBase {
    /// Hex SHA-256 over every input of the base: the cache key.
    pub fn cache_key(&self) -> String {
        let mut h = Sha256::new();
        // Bump the version when staging itself changes what a given input produces.
        h.update(b"kiln-debian-base-v1\0");
        for part in [&self.suite, self.arch.debian(), &self.mirror] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        for c in &self.components {
            h.update(c.as_bytes());
            h.update([1]);
        }
        for p in &self.packages {
            h.update(p.as_bytes());
            h.update([2]);
        }
        h.update(format!("{:?} {}", self.source_date_epoch, self.snapshot).as_bytes());
        hex::encode(h.finalize())
    }
}

/// The staged base as a tarball in the cache.
#[derive(Debug, Clone)]
pub struct StagedBase {
    pub tar: PathBuf,
    pub cache_key: String,
    /// True when the tarball came from the cache and mmdebstrap did not run.
    pub cached: bool,
}

/// Returns the cached base for these inputs, running mmdebstrap only when it is missing.
pub fn stage(base: &DebianBase, cache_dir: &Path, progress: &dyn Progress) -> Result<StagedBase, StageError> {
    let key = base.cache_key();
    let dir = cache_dir.join("bases");
    let tar = dir.join(format!("{}-{}-{}.tar", base.suite, base.arch.debian(), &key[..16]));
    if tar.is_file() {
        return Ok(StagedBase { tar, cache_key: key, cached: true });
    }
    std::fs::create_dir_all(&dir).map_err(|source| StageError::Io {
        what: "creating cache dir",
        path: dir.clone(),
        source,
    })?;
    check_can_execute(base.arch)?;
    let mmdebstrap = crate::platform::find_program("mmdebstrap").ok_or(StageError::NoMmdebstrap)?;

    // mmdebstrap writes next to the final name and the rename publishes it: an interrupted run
    // leaves no tarball that a later build would trust.
    let partial = tar.with_extension("tar.partial");
    let log = tar.with_extension("log");
    let mut cmd = Command::new(mmdebstrap);
    cmd.arg("--variant=minbase")
        .arg(format!("--arch={}", base.arch.debian()))
        .arg(format!("--components={}", base.components.join(",")))
        .arg(format!("--include={}", base.packages.join(",")))
        .arg("--format=tar")
        .arg("--aptopt=Acquire::Retries \"3\"")
        .args(base.snapshot.then_some("--aptopt=Acquire::Check-Valid-Until \"false\""))
        // The image gets a fresh identity on first boot.
        .arg("--customize-hook=rm -f \"$1/etc/machine-id\" \"$1/var/lib/dbus/machine-id\"; : > \"$1/etc/machine-id\"")
        .arg(&base.suite)
        .arg(&partial)
        .arg(format!("deb {} {} {}", base.mirror, base.suite, base.components.join(" ")))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(e) = base.source_date_epoch {
        cmd.env("SOURCE_DATE_EPOCH", e.to_string());
    }
    let cmdline = format!("{cmd:?}");
    progress.begin(&format!("staging {} {} with mmdebstrap", base.suite, base.arch), None, Unit::Items);
    fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StageError + 'a {
        move |source| StageError::Io { what, path: path.to_path_buf(), source }
    }
    let mut child = cmd.spawn().map_err(io("starting mmdebstrap", &partial))?;
    let mut log_text = String::new();
    if let Some(err) = child.stderr.take() {
        for line in BufReader::new(err).lines() {
            let line = line.unwrap_or_default();
            if line.starts_with("I: ") || line.starts_with("W: ") || line.starts_with("E: ") {
                progress.advance(1);
            }
            log_text.push_str(&line);
            log_text.push('\n');
        }
    }
    let status = child.wait().map_err(io("waiting for mmdebstrap", &partial))?;
    std::fs::write(&log, &log_text).map_err(io("writing log", &log))?;
    if !status.success() {
        let _ = std::fs::remove_file(&partial);
        let tail: Vec<&str> = log_text.lines().rev().take(25).collect();
        let tail = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
        return Err(StageError::Failed { cmd: cmdline, status: status.to_string(), tail, log });
    }
    std::fs::rename(&partial, &tar).map_err(io("publishing staged base", &tar))?;
    progress.end(&format!("{} packages requested", base.packages.len()));
    Ok(StagedBase { tar, cache_key: key, cached: false })
}

/// Fails early, with what to install, when the host cannot run the target's binaries.
pub fn check_can_execute(target: Arch) -> Result<(), StageError> {
    let host = Arch::host();
    if host == Some(target) {
        return Ok(());
    }
    let entry = match target {
        Arch::Arm64 => "/proc/sys/fs/binfmt_misc/qemu-aarch64",
        Arch::X86_64 => "/proc/sys/fs/binfmt_misc/qemu-x86_64",
    };
    let enabled = std::fs::read_to_string(entry).map(|s| s.lines().next() == Some("enabled")).unwrap_or(false);
    if enabled {
        Ok(())
    } else {
        Err(StageError::CannotExecute { host: std::env::consts::ARCH.to_string(), target })
    }
}

/// The first Debian archive URI in the build host's apt sources (deb822 `.sources` files or
/// one-line `sources.list`), skipping the security archive.
pub fn host_mirror() -> Option<String> {
    host_mirror_in(Path::new("/etc/apt"))
}

/// The Debian security archive URI in the build host's apt sources, if it has one.
pub fn host_security_mirror() -> Option<String> {
    host_uri_in(Path::new("/etc/apt"), |u| u.ends_with("/debian-security"))
}

pub fn host_mirror_in(apt_dir: &Path) -> Option<String> {
    host_uri_in(apt_dir, |u| !u.contains("security") && u.ends_with("/debian"))
}

/// The first archive URI in the apt sources under `apt_dir` that `want` accepts.
fn host_uri_in(apt_dir: &Path, want: impl Fn(&str) -> bool) -> Option<String> {
    let mut files = vec![apt_dir.join("sources.list")];
    if let Ok(rd) = std::fs::read_dir(apt_dir.join("sources.list.d")) {
        let mut v: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("list" | "sources")))
            .collect();
        v.sort();
        files.extend(v);
    }
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else { continue };
        for line in text.lines() {
            let line = line.trim();
            let uris: Vec<&str> = if let Some(rest) = line.strip_prefix("URIs:") {
                rest.split_whitespace().collect()
            } else if let Some(rest) = line.strip_prefix("deb ") {
                // `deb [options] URI suite components`
                let mut words = rest.split_whitespace().skip_while(|w| w.starts_with('['));
                let first = words.next();
                // An option list may span words: `[arch=amd64 signed-by=...]`.
                match first {
                    Some(w) if w.ends_with(']') => words.next().into_iter().collect(),
                    Some(w) => vec![w],
                    None => vec![],
                }
            } else {
                vec![]
            };
            for u in uris {
                let u = u.trim_end_matches('/');
                if want(u) {
                    return Some(u.to_string());
                }
            }
        }
    }
    None
}

/// Packages dpkg records as installed in a staged tree (`/var/lib/dpkg/status`), sorted.
pub fn installed_packages(tree: &crate::formats::tree::Tree) -> Vec<crate::manifest::Package> {
    match tree.file_bytes(b"/var/lib/dpkg/status") {
        Ok(Some(buf)) => parse_dpkg_status(&String::from_utf8_lossy(&buf)),
        _ => Vec::new(),
    }
}

pub fn parse_dpkg_status(text: &str) -> Vec<crate::manifest::Package> {
    let mut out = Vec::new();
    for para in text.split("\n\n") {
        let (mut name, mut version, mut arch, mut installed) = (None, None, None, false);
        for line in para.lines() {
            if let Some(v) = line.strip_prefix("Package: ") {
                name = Some(v.trim());
            } else if let Some(v) = line.strip_prefix("Version: ") {
                version = Some(v.trim());
            } else if let Some(v) = line.strip_prefix("Architecture: ") {
                arch = Some(v.trim());
            } else if let Some(v) = line.strip_prefix("Status: ") {
                installed = v.trim().ends_with(" installed");
            }
        }
        if let (Some(n), Some(v), Some(a), true) = (name, version, arch, installed) {
            out.push(crate::manifest::Package { name: n.into(), version: v.into(), arch: a.into() });
        }
    }
    out.sort();
    out
}

/// Every installed package with its source package and the licenses its copyright file
/// names, for the SBOM; in the manifest's order.
pub fn sbom_packages(tree: &crate::formats::tree::Tree) -> Vec<crate::formats::spdx::SbomPackage> {
    let status = match tree.file_bytes(b"/var/lib/dpkg/status") {
        Ok(Some(buf)) => String::from_utf8_lossy(&buf).into_owned(),
        _ => return Vec::new(),
    };
    let mut sources = std::collections::BTreeMap::new();
    for para in status.split("\n\n") {
        let field = |k: &str| para.lines().find_map(|l| l.strip_prefix(k)).map(str::trim);
        if let Some(name) = field("Package: ") {
            // `Source: name (version)` when the binary's version differs from its source's.
            let source = field("Source: ").and_then(|s| s.split_whitespace().next()).unwrap_or(name);
            sources.insert(name.to_string(), source.to_string());
        }
    }
    parse_dpkg_status(&status)
        .into_iter()
        .map(|p| {
            let copyright = format!("/usr/share/doc/{}/copyright", p.name);
            let licenses = match tree.file_bytes(copyright.as_bytes()) {
                Ok(Some(b)) => crate::formats::spdx::debian_copyright_licenses(&String::from_utf8_lossy(&b)),
                _ => Vec::new(),
            };
            crate::formats::spdx::SbomPackage {
                source: sources.get(&p.name).cloned().unwrap_or_else(|| p.name.clone()),
                name: p.name,
                version: p.version,
                arch: p.arch,
                licenses,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_from_deb822_and_one_line_sources() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sources.list.d")).unwrap();
        std::fs::write(
            d.path().join("sources.list.d/debian.sources"),
            "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\nTypes: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm\n",
        )
        .unwrap();
        assert_eq!(host_mirror_in(d.path()).as_deref(), Some("http://mirror.example/debian"));
        let e = tempfile::tempdir().unwrap();
        std::fs::write(
            e.path().join("sources.list"),
            "# c\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main\n",
        )
        .unwrap();
        assert_eq!(host_mirror_in(e.path()).as_deref(), Some("http://m.example/debian"));
        let f = tempfile::tempdir().unwrap();
        assert_eq!(host_mirror_in(f.path()), None);
    }

    #[test]
    fn dpkg_status_keeps_only_installed() {
        let s = "Package: a\nStatus: install ok installed\nVersion: 1.0\nArchitecture: amd64\n\nPackage: b\nStatus: deinstall ok config-files\nVersion: 2\nArchitecture: all\n";
        let p = parse_dpkg_status(s);
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].name.as_str(), p[0].version.as_str()), ("a", "1.0"));
    }

    #[test]
    fn cache_key_changes_with_every_input() {
        let b = DebianBase {
            suite: "bookworm".into(),
            arch: Arch::X86_64,
            mirror: "http://m/debian".into(),
            components: vec!["main".into()],
            packages: vec!["a".into()],
            source_date_epoch: None,
            snapshot: false,
        };
        let k = b.cache_key();
        let mut c = b.clone();
        c.packages.push("b".into());
        assert_ne!(c.cache_key(), k);
        let mut c = b.clone();
        c.arch = Arch::Arm64;
        assert_ne!(c.cache_key(), k);
        let mut c = b.clone();
        c.source_date_epoch = Some(1);
        assert_ne!(c.cache_key(), k);
        assert_eq!(b.clone().cache_key(), k);
    }
}
