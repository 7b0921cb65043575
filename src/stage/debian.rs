//! The OS base: Debian's own mmdebstrap (apt and dpkg underneath, qemu-user for foreign
//! architectures) writes a root tarball, which is cached by everything that determines it.
//!
//! No mirror host name lives here: the mirror comes from the recipe, a flag, or the build
//! host's own apt sources.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::manifest::{BaseInfo, SuiteState};
use crate::platform::Arch;
use crate::progress::{Progress, Unit};

/// Everything that determines a staged Debian base, but for the state of the archive.
#[derive(Debug, Clone)]
pub struct DebianBase {
    /// Debian suite (`bookworm`, `trixie`).
    pub suite: String,
    pub arch: Arch,
    /// Archive URI (`http://…/debian`), already resolved.
    pub mirror: String,
    /// The security archive (`http://…/debian-security`) for `SUITE-security`; None for a
    /// snapshot mirror (the host's security archive is not pinned) or when none is known.
    pub security_mirror: Option<String>,
    pub components: Vec<String>,
    /// Full package list (required plus recipe), sorted and de-duplicated.
    pub packages: Vec<String>,
    /// Passed to mmdebstrap so file times inside the base are clamped too.
    pub source_date_epoch: Option<i64>,
    /// The mirror is a snapshot archive (`[image].snapshot`): its Release files are past their
    /// Valid-Until date by design, so apt must not reject them.
    pub snapshot: bool,
}

/// Whether staging may look at the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Read each suite's InRelease; a base staged from another state of the archive is stale.
    Online,
    /// Use the newest base cached for these inputs, however old, without touching the network.
    Offline,
}

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Interrupted(#[from] crate::interrupt::Interrupted),
    #[error("no Debian mirror given and none found in the build host's apt sources (/etc/apt/sources.list, /etc/apt/sources.list.d/); set `mirror` under [image] in the recipe or pass --mirror URL")]
    NoMirror,
    #[error("mmdebstrap is not installed; install it with `apt-get install mmdebstrap` (or run .ci/setup-host)")]
    NoMmdebstrap,
    #[error("apt-helper (from apt) is not installed at {APT_HELPER}; kiln reads the archive's state with it")]
    NoAptHelper,
    #[error("this {host} host cannot run {target} programs, which staging needs for package maintainer scripts; install qemu-user-static and binfmt-support (`apt-get install qemu-user-static binfmt-support`, or run .ci/setup-host) and make sure binfmt_misc is mounted")]
    CannotExecute { host: String, target: Arch },
    #[error("cannot read {uri}/dists/{suite}/InRelease, which tells whether the cached base is current; check the mirror, or build from what is cached with --offline\n{detail}")]
    ArchiveUnreachable { uri: String, suite: String, detail: String },
    #[error("--offline: no base is cached in {dir} for these inputs ({suite} {arch}, this mirror and package list); build once with network access first")]
    NothingCached { dir: PathBuf, suite: String, arch: Arch },
    #[error("{cmd} failed with {status}; the last lines of its output:\n{tail}\n(full log: {log})")]
    Failed { cmd: String, status: String, tail: String, log: PathBuf },
    #[error("{what} {path}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
}

/// apt's own downloader: the host's apt proxies, https and file: URIs, as mmdebstrap gets them.
pub const APT_HELPER: &str = "/usr/lib/apt/apt-helper";

impl DebianBase {
    /// Hex SHA-256 over every input of the base but the archive's state: bases staged from the
    /// same inputs at different times share it (it starts their cache file names).
    pub fn inputs_key(&self) -> String {
        let mut h = Sha256::new();
        // Bump the version when staging itself changes what a given input produces.
        h.update(b"kiln-debian-base-v3\0");
        for part in [&self.suite, self.arch.debian(), &self.mirror, self.security_mirror.as_deref().unwrap_or("")] {
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

    /// Hex SHA-256 over every input and the archive's state: the cache key. A new upload to
    /// any suite (a security fix) changes it, so the next build stages afresh.
    pub fn cache_key(&self, archive: &[SuiteState]) -> String {
        let mut h = Sha256::new();
        h.update(self.inputs_key().as_bytes());
        for s in archive {
            for part in [&s.uri, &s.suite, &s.sha256] {
                h.update(part.as_bytes());
                h.update([0]);
            }
        }
        hex::encode(h.finalize())
    }

    /// The suites a base may be installed from: the suite and its `-updates` from the mirror,
    /// and `-security` from the security archive. Only those the archive has are used.
    pub fn candidate_suites(&self) -> Vec<(String, String)> {
        let mut v =
            vec![(self.mirror.clone(), self.suite.clone()), (self.mirror.clone(), format!("{}-updates", self.suite))];
        if let Some(sec) = &self.security_mirror {
            v.push((sec.clone(), format!("{}-security", self.suite)));
        }
        v
    }

    fn file_prefix(&self) -> String {
        format!("{}-{}-{}-", self.suite, self.arch.debian(), &self.inputs_key()[..16])
    }
}

/// The state of each candidate suite, read from its InRelease with apt's downloader. Nothing is
/// verified here (mmdebstrap verifies what it installs): the digest only tells whether the
/// archive moved. The suite itself must answer; `-updates` and `-security` may be absent (a
/// local or snapshot archive), and are then left out of the sources.
pub fn probe_archive(base: &DebianBase) -> Result<Vec<SuiteState>, StageError> {
    if !Path::new(APT_HELPER).is_file() {
        return Err(StageError::NoAptHelper);
    }
    let dir = tempfile::tempdir().map_err(|source| StageError::Io {
        what: "creating a temporary directory in",
        path: std::env::temp_dir(),
        source,
    })?;
    let candidates = base.candidate_suites();
    let mut cmd = Command::new(APT_HELPER);
    // Files land in a private temporary directory the `_apt` user cannot write to.
    cmd.arg("-o").arg("APT::Sandbox::User=root").arg("download-file");
    for (i, (uri, suite)) in candidates.iter().enumerate() {
        cmd.arg(format!("{uri}/dists/{suite}/InRelease")).arg(dir.path().join(i.to_string()));
    }
    // Exit status is not the verdict: a missing `-updates` is fine, the files present are.
    let out = cmd.stdin(Stdio::null()).output().map_err(|source| StageError::Io {
        what: "running",
        path: APT_HELPER.into(),
        source,
    })?;
    let mut states = Vec::new();
    for (i, (uri, suite)) in candidates.into_iter().enumerate() {
        match std::fs::read(dir.path().join(i.to_string())) {
            Ok(bytes) => states.push(suite_state(uri, suite, &bytes)),
            Err(_) if i > 0 => {}
            Err(_) => {
                let detail = String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .filter(|l| l.starts_with("E:") || l.starts_with("Err:") || l.starts_with("  "))
                    .collect::<Vec<_>>()
                    .join("\n");
                return Err(StageError::ArchiveUnreachable { uri, suite, detail });
            }
        }
    }
    Ok(states)
}

/// A suite's state from its InRelease (or Release) text.
pub fn suite_state(uri: String, suite: String, in_release: &[u8]) -> SuiteState {
    let text = String::from_utf8_lossy(in_release);
    let date = text.lines().find_map(|l| l.strip_prefix("Date:")).map(|d| d.trim().to_string()).unwrap_or_default();
    SuiteState { uri, suite, date, sha256: hex::encode(Sha256::digest(in_release)) }
}

/// The staged base as a tarball in the cache.
#[derive(Debug, Clone)]
pub struct StagedBase {
    pub tar: PathBuf,
    /// True when the tarball came from the cache and mmdebstrap did not run.
    pub cached: bool,
    /// When it was staged and from which state of the archive.
    pub info: BaseInfo,
    /// How long ago it was staged, in seconds (for --offline's note).
    pub age_secs: u64,
}

/// Returns the base for these inputs and the archive as it is now, running mmdebstrap only when
/// no base was staged from this state of the archive. A new base replaces the older ones staged
/// from the same inputs. Offline, the newest cached base for these inputs is used.
pub fn stage(
    base: &DebianBase,
    freshness: Freshness,
    cache_dir: &Path,
    progress: &dyn Progress,
) -> Result<StagedBase, StageError> {
    let dir = cache_dir.join("bases");
    if freshness == Freshness::Offline {
        return newest_cached(base, &dir).ok_or_else(|| StageError::NothingCached {
            dir: dir.clone(),
            suite: base.suite.clone(),
            arch: base.arch,
        });
    }
    let archive = probe_archive(base)?;
    let key = base.cache_key(&archive);
    let stem = format!("{}{}", base.file_prefix(), &key[..12]);
    if let Some(found) = load_cached(&dir, &stem) {
        return Ok(found);
    }
    std::fs::create_dir_all(&dir).map_err(|source| StageError::Io {
        what: "creating cache dir",
        path: dir.clone(),
        source,
    })?;
    // Builds of the same base wait for one staging instead of racing on the same files.
    let lock_path = dir.join(format!("{stem}.lock"));
    let _lock = lock_exclusive(&lock_path, progress)?;
    if let Some(found) = load_cached(&dir, &stem) {
        return Ok(found);
    }
    let (tar, record) = (dir.join(format!("{stem}.tar")), dir.join(format!("{stem}.json")));
    check_can_execute(base.arch)?;
    let mmdebstrap = crate::host::find_program("mmdebstrap").ok_or(StageError::NoMmdebstrap)?;

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
        // The package lists stay in the tarball (generalization empties them in the image): a
        // service layer staged on this base resolves its dependencies against exactly the
        // archive state the base came from, without downloading Debian's indices again.
        .arg("--skip=cleanup/apt/lists")
        .arg("--aptopt=Acquire::Retries \"3\"")
        .args(base.snapshot.then_some("--aptopt=Acquire::Check-Valid-Until \"false\""))
        // The image gets a fresh identity on first boot.
        .arg("--customize-hook=rm -f \"$1/etc/machine-id\" \"$1/var/lib/dbus/machine-id\"; : > \"$1/etc/machine-id\"")
        .arg(&base.suite)
        .arg(&partial)
        .args(archive.iter().map(|s| format!("deb {} {} {}", s.uri, s.suite, base.components.join(" "))))
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
    let (status, log_text) = run_mmdebstrap(&mut cmd, |line| {
        if line.starts_with("I: ") || line.starts_with("W: ") || line.starts_with("E: ") {
            progress.advance(1);
        }
    })
    .map_err(io("running mmdebstrap for", &partial))?;
    if let Err(stop) = crate::interrupt::check() {
        let _ = std::fs::remove_file(&partial);
        return Err(stop.into());
    }
    crate::formats::atomic::write(&log, log_text.as_bytes()).map_err(io("writing log", &log))?;
    if !status.success() {
        let _ = std::fs::remove_file(&partial);
        let tail = tail(log_text.lines(), 25);
        return Err(StageError::Failed { cmd: cmdline, status: status.to_string(), tail, log });
    }
    let staged_at = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default();
    let info = BaseInfo { cache_key: key, staged_at, archive };
    // The record first: a tarball without one is not trusted (see load_cached).
    let json = serde_json::to_vec_pretty(&info).unwrap_or_default();
    crate::formats::atomic::write(&record, &json).map_err(io("writing", &record))?;
    std::fs::File::open(&partial).and_then(|f| f.sync_all()).map_err(io("writing", &partial))?;
    std::fs::rename(&partial, &tar).map_err(io("publishing staged base", &tar))?;
    crate::formats::atomic::sync_dir(&dir).map_err(io("publishing staged base", &tar))?;
    remove_older(base, &dir, &stem);
    progress.end(&format!("{} packages requested", base.packages.len()));
    Ok(StagedBase { tar, cached: false, info, age_secs: 0 })
}

/// Runs mmdebstrap (`cmd`, its stderr piped) to the end, handing each line of its output to
/// `on_line` as it comes; returns its exit status and the whole output for the log. A stop
/// request (Ctrl-C, SIGTERM) stops it too, and so does kiln's death without a chance to stop it
/// (SIGKILL): an orphan would go on writing a partial tarball that the next build, its lock
/// gone with this process, writes afresh.
pub(crate) fn run_mmdebstrap(
    cmd: &mut Command,
    mut on_line: impl FnMut(&str),
) -> std::io::Result<(std::process::ExitStatus, String)> {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let stop_with_us = crate::interrupt::Child::register(child.id());
    let mut log_text = String::new();
    if let Some(err) = child.stderr.take() {
        for line in BufReader::new(err).lines() {
            let line = line.unwrap_or_default();
            on_line(&line);
            log_text.push_str(&line);
            log_text.push('\n');
        }
    }
    let status = child.wait();
    drop(stop_with_us);
    Ok((status?, log_text))
}

/// The last `n` of `lines`, joined: what an error repeats of a tool's output.
pub(crate) fn tail<'a>(lines: impl DoubleEndedIterator<Item = &'a str>, n: usize) -> String {
    let mut v: Vec<&str> = lines.rev().take(n).collect();
    v.reverse();
    v.join("\n")
}

/// Holds an exclusive flock on `path` until dropped, saying so when it has to wait.
pub(crate) fn lock_exclusive(path: &Path, progress: &dyn Progress) -> Result<std::fs::File, StageError> {
    use std::os::fd::AsRawFd;
    let io = |source| StageError::Io { what: "locking", path: path.to_path_buf(), source };
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path).map_err(io)?;
    // SAFETY: flock on a descriptor this function owns; no memory is involved.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        progress.note(&format!("waiting for another build staging the same base ({})", path.display()));
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io(std::io::Error::last_os_error()));
        }
    }
    Ok(f)
}

/// The cached tarball `STEM.tar` with its record `STEM.json`, or None when either is missing
/// or unreadable.
fn load_cached(dir: &Path, stem: &str) -> Option<StagedBase> {
    let tar = dir.join(format!("{stem}.tar"));
    let info: BaseInfo = serde_json::from_slice(&std::fs::read(dir.join(format!("{stem}.json"))).ok()?).ok()?;
    let age_secs = std::fs::metadata(&tar).ok()?.modified().ok()?.elapsed().map(|d| d.as_secs()).unwrap_or(0);
    Some(StagedBase { tar, cached: true, info, age_secs })
}

/// Cached bases for these inputs, whatever archive state they came from.
fn cached_stems(base: &DebianBase, dir: &Path) -> Vec<String> {
    let prefix = base.file_prefix();
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".tar").filter(|s| s.starts_with(&prefix)).map(String::from))
        .collect();
    v.sort();
    v
}

fn newest_cached(base: &DebianBase, dir: &Path) -> Option<StagedBase> {
    cached_stems(base, dir).into_iter().filter_map(|stem| load_cached(dir, &stem)).min_by_key(|b| b.age_secs)
}

/// Removes bases staged from older states of the archive: nothing would choose them again but
/// --offline, which prefers the newest. A build already reading one holds it open.
fn remove_older(base: &DebianBase, dir: &Path, keep: &str) {
    for stem in cached_stems(base, dir) {
        if stem != keep {
            for ext in ["tar", "json", "log", "lock"] {
                let _ = std::fs::remove_file(dir.join(format!("{stem}.{ext}")));
            }
        }
    }
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
            out.push(crate::manifest::Package { name: n.into(), version: v.into(), arch: a.into(), origin: None });
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
                origin: None,
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
            security_mirror: Some("http://m/debian-security".into()),
            components: vec!["main".into()],
            packages: vec!["a".into()],
            source_date_epoch: None,
            snapshot: false,
        };
        let k = b.inputs_key();
        let mut c = b.clone();
        c.packages.push("b".into());
        assert_ne!(c.inputs_key(), k);
        let mut c = b.clone();
        c.arch = Arch::Arm64;
        assert_ne!(c.inputs_key(), k);
        let mut c = b.clone();
        c.source_date_epoch = Some(1);
        assert_ne!(c.inputs_key(), k);
        let mut c = b.clone();
        c.security_mirror = None;
        assert_ne!(c.inputs_key(), k);
        assert_eq!(b.clone().inputs_key(), k);
        // The archive's state: a new InRelease in any suite is a new key, the same one is not.
        let state = |text: &str| vec![suite_state("http://m/debian".into(), "bookworm".into(), text.as_bytes())];
        let old = state("Origin: Debian\nDate: Sat, 01 Jun 2024 00:00:00 UTC\n");
        let new = state("Origin: Debian\nDate: Sun, 02 Jun 2024 00:00:00 UTC\n");
        assert_eq!(old[0].date, "Sat, 01 Jun 2024 00:00:00 UTC");
        assert_eq!(b.cache_key(&old), b.cache_key(&old.clone()));
        assert_ne!(b.cache_key(&old), b.cache_key(&new));
        assert_ne!(b.cache_key(&old), b.cache_key(&[]));
    }
}
