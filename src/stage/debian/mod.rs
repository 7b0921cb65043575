//! The OS base: Debian's own mmdebstrap (apt and dpkg underneath, qemu-user for foreign
//! architectures) writes a root tarball, which is cached by everything that determines it.
//!
//! Here the base's inputs, its cache key and the one function that stages it; beside it the
//! archive's state ([`archive`]), the cache of staged bases ([`cache`]), what the build host
//! offers ([`host`]), running mmdebstrap ([`mmdebstrap`]) and reading dpkg's database
//! ([`dpkg`]).
//!
//! No mirror host name lives here: the mirror comes from the recipe, a flag, or the build
//! host's own apt sources.

mod archive;
mod cache;
mod dpkg;
mod host;
mod mmdebstrap;
mod native;
mod resolve;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::manifest::{BaseInfo, SuiteState};
use crate::platform::Arch;
use crate::progress::{Progress, Unit};

pub use archive::{probe_archive, suite_state};
pub(crate) use cache::lock_exclusive;
use cache::{alias_cached, find_resolved, load_cached, newest_cached, remove_older};
pub use dpkg::{installed_packages, parse_dpkg_status, sbom_packages};
pub use host::{check_can_execute, host_mirror, host_mirror_in, host_security_mirror};
pub(crate) use mmdebstrap::{run_mmdebstrap, tail};
pub use resolve::{parse_simulation, Resolution};

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
    #[error(
        "asking apt what the base resolves to ({cmd}) failed with {status}; the last lines of its output:\n{tail}"
    )]
    Resolve { cmd: String, status: String, tail: String },
    #[error("{what} {path}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
}

/// Before the remaining packages: update-initramfs diverted to a stub that does nothing.
const INITRAMFS_DEFER: &str = "chroot \"$1\" dpkg-divert --quiet --local --rename --add /usr/sbin/update-initramfs \
     && printf '#!/bin/sh\\nexit 0\\n' > \"$1/usr/sbin/update-initramfs\" && chmod 755 \"$1/usr/sbin/update-initramfs\"";
/// After them: the real update-initramfs back, run once for every installed kernel.
const INITRAMFS_ONCE: &str = "rm \"$1/usr/sbin/update-initramfs\" \
     && chroot \"$1\" dpkg-divert --quiet --local --rename --remove /usr/sbin/update-initramfs \
     && chroot \"$1\" update-initramfs -c -k all";

/// The first 12 characters of a key, for names and messages (a whole short one).
fn short(key: &str) -> &str {
    key.get(..12).unwrap_or(key)
}

/// mmdebstrap's own hook that stages with dpkg under eatmydata and removes it afterwards.
const EATMYDATA_HOOK: &str = "/usr/share/mmdebstrap/hooks/eatmydata";

/// apt's own downloader: the host's apt proxies, https and file: URIs, as mmdebstrap gets them.
pub const APT_HELPER: &str = "/usr/lib/apt/apt-helper";

impl DebianBase {
    /// Hex SHA-256 over every input of the base but the archive's state: bases staged from the
    /// same inputs at different times share it (it starts their cache file names).
    pub fn inputs_key(&self) -> String {
        let mut h = Sha256::new();
        // Bump the version when staging itself changes what a given input produces.
        h.update(b"kiln-debian-base-v4\0");
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
        if self.source_date_epoch.is_none() {
            // Without an epoch, staging takes the archive's date (see `staging_epoch`); a base
            // staged before that rule (at its own wall-clock time) is not one of these.
            h.update(b"\0epoch-from-archive-date");
        }
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

    pub(crate) fn file_prefix(&self) -> String {
        format!("{}-{}-{}-", self.suite, self.arch.debian(), &self.inputs_key()[..16])
    }
}

/// The staged base as a tarball in the cache.
#[derive(Debug, Clone)]
pub struct StagedBase {
    pub tar: PathBuf,
    /// True when the tarball came from a cache (local or shared) and mmdebstrap did not run.
    pub cached: bool,
    /// When it was staged and from which state of the archive.
    pub info: BaseInfo,
    /// How long ago it was staged, in seconds (for --offline's note).
    pub age_secs: u64,
    /// Where it came from and why: the rule that reused or re-staged it, for people and for
    /// `kiln build --json`.
    pub origin: Origin,
}

/// Where a staged base came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "from", content = "why")]
pub enum Origin {
    /// The local cache held a base staged from this state of the archive.
    Cache(String),
    /// Another runner staged it: downloaded from the shared cache and verified.
    Shared(String),
    /// mmdebstrap staged it here.
    Staged(String),
}

impl Origin {
    pub fn why(&self) -> &str {
        match self {
            Origin::Cache(w) | Origin::Shared(w) | Origin::Staged(w) => w,
        }
    }
}

/// Staged bases shared between build hosts (a CI fleet's S3 prefix, see `crate::share`),
/// behind the local cache. Failures are the caller's to report: a base can always be staged.
pub trait SharedBases {
    /// Where the bases are shared, for messages (`s3://ci-kiln/fleet`).
    fn location(&self) -> String;
    /// Downloads the base shared as `stem` to `dest`, verified against its record.
    fn fetch(&self, stem: &str, dest: &Path, progress: &dyn Progress) -> Result<Fetched, String>;
    /// What the record of the base shared as `stem` says of it; None when none is shared.
    fn record(&self, stem: &str) -> Result<Option<BaseInfo>, String>;
    /// Shares the base at `tar` as `stem`, unless another runner shared one first; replaces a
    /// record `fetch` found corrupt.
    fn share(&self, stem: &str, tar: &Path, info: &BaseInfo, progress: &dyn Progress) -> Result<(), String>;
}

/// What [`SharedBases::fetch`] found.
#[derive(Debug)]
pub enum Fetched {
    /// No base is shared under the name.
    Absent,
    /// The base is at `dest`; its SHA-256 and size are those recorded with it.
    Found(BaseInfo),
    /// The shared base is not what its record says (a flipped byte, a truncated object): not
    /// used. The reason, for the note.
    Corrupt(String),
}

/// How [`stage`] may find a base.
#[derive(Clone, Copy)]
pub struct StageOptions<'a> {
    pub freshness: Freshness,
    pub cache_dir: &'a Path,
    /// Bases staged by other runners (`--cache-url`).
    pub shared: Option<&'a dyn SharedBases>,
    /// Whether a base staged at another state of the archive may be reused when apt resolves
    /// its packages to the same versions. Not when a service layer will resolve its own
    /// packages' Debian dependencies against the base's package lists: those are the older
    /// state's.
    pub reuse_resolved: bool,
}

/// Returns the base for these inputs and the archive as it is now, running mmdebstrap only when
/// no base was staged from this state of the archive, here or (with `shared`) by another
/// runner, and (with `reuse_resolved`) none staged at another state resolves to the same
/// package versions. A new base replaces the older ones staged from the same inputs and is
/// shared. Offline, the newest cached base for these inputs is used.
pub fn stage(base: &DebianBase, opts: StageOptions, progress: &dyn Progress) -> Result<StagedBase, StageError> {
    let dir = opts.cache_dir.join("bases");
    if opts.freshness == Freshness::Offline {
        let mut found = newest_cached(base, &dir).ok_or_else(|| StageError::NothingCached {
            dir: dir.clone(),
            suite: base.suite.clone(),
            arch: base.arch,
        })?;
        found.origin = Origin::Cache("--offline: the newest base cached for these inputs, the archive unread".into());
        return Ok(found);
    }
    let archive = probe_archive(base)?;
    let key = base.cache_key(&archive);
    let stem = format!("{}{}", base.file_prefix(), short(&key));
    // Whatever this runner has, the fleet gets: under the archive state's name and the
    // resolution's, where missing (a base found corrupt there is replaced by `share` itself).
    let share = |found: StagedBase| {
        if let Some(s) = opts.shared {
            let by_resolution = found.info.resolved.as_deref().map(|r| resolved_stem(base, r));
            for name in std::iter::once(stem.clone()).chain(by_resolution) {
                let staged_here = matches!(found.origin, Origin::Staged(_));
                let shared = s.record(&name).and_then(|r| match r {
                    Some(_) if !staged_here => Ok(()),
                    _ => s.share(&name, &found.tar, &found.info, progress),
                });
                if let Err(e) = shared {
                    progress.note(&format!("the base was not shared to {}: {e}", s.location()));
                }
            }
        }
        Ok(found)
    };
    if let Some(found) = load_cached(&dir, &stem) {
        return share(found);
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
        return share(found);
    }
    let mut why = format!("no base staged from this state of the archive (key {}) is cached", short(&key));
    if let Some(s) = opts.shared {
        match fetch_shared(s, &dir, &stem, progress) {
            Ok(Ok(found)) => {
                remove_older(base, &dir, &stem);
                return share(found);
            }
            Ok(Err(reason)) | Err(reason) => {
                if !reason.is_empty() {
                    progress.note(&reason);
                }
                why = if reason.is_empty() { format!("{why} here or in {}", s.location()) } else { reason };
            }
        }
    }
    check_can_execute(base.arch)?;
    let mmdebstrap = crate::host::find_program("mmdebstrap").ok_or(StageError::NoMmdebstrap)?;
    let failed = |e: StageError| {
        // Only a shortcut is lost: staging itself says what is wrong, if anything is.
        progress.note(&format!("apt's resolution of the base failed; it is not recorded: {e}"));
        None
    };
    if opts.shared.is_none() && newest_cached(base, &dir).is_none() {
        // No base from these inputs here to reuse, and no fleet's: the resolution is only
        // recorded with the new base, so apt works it out beside the staging, not before it
        // (~5 s of an amd64 cold build's 36, 2026-12-07).
        why = format!("{why}; no base for these inputs is cached");
        let staged = std::thread::scope(|s| {
            let resolving = s.spawn(|| resolve::resolve(&mmdebstrap, base, &archive));
            let resolution = || resolving.join().unwrap_or(Ok(None)).unwrap_or_else(failed);
            run_staging(&mmdebstrap, base, &archive, key, resolution, &dir, &stem, why, progress)
        })?;
        return share(staged);
    }
    // The archive's signature changed; did anything the base holds?
    progress.begin(&format!("resolving {} {} with apt", base.suite, base.arch), None, Unit::Items);
    let resolution = resolve::resolve(&mmdebstrap, base, &archive).unwrap_or_else(failed);
    progress.end(&resolution.as_ref().map_or("not understood".into(), |r| format!("{} packages", r.len())));
    if let Some(r) = &resolution {
        let rkey = r.key(&base.inputs_key());
        if opts.reuse_resolved {
            if let Some(found) = reuse_resolved(base, r, &dir, &stem, opts.shared, progress)? {
                return share(found);
            }
        }
        why = format!("{why}; {}", resolution_miss(base, &dir, &rkey, opts.reuse_resolved));
    }
    let staged = run_staging(&mmdebstrap, base, &archive, key, || resolution, &dir, &stem, why, progress)?;
    share(staged)
}

/// A base staged from these inputs at another state of the archive that resolves to the same
/// package versions as `resolution` (here, else shared), kept under the archive state's `stem`.
fn reuse_resolved(
    base: &DebianBase,
    resolution: &Resolution,
    dir: &Path,
    stem: &str,
    shared: Option<&dyn SharedBases>,
    progress: &dyn Progress,
) -> Result<Option<StagedBase>, StageError> {
    let r = resolution.key(&base.inputs_key());
    let same = format!(
        "the archive changed since the base was staged (a suite re-signed), but the {} packages the base holds resolve to the same versions (resolution {})",
        resolution.len(),
        short(&r)
    );
    let keep = |from: &str| {
        alias_cached(dir, from, stem).map_err(|source| StageError::Io {
            what: "keeping the base under its new key in",
            path: dir.to_path_buf(),
            source,
        })
    };
    if let Some(old) = find_resolved(base, dir, &r) {
        let found = keep(&old)?;
        remove_older(base, dir, stem);
        return Ok(Some(StagedBase { origin: Origin::Cache(format!("{same}: reused")), ..found }));
    }
    let Some(s) = shared else { return Ok(None) };
    if let Ok(Ok(_)) = fetch_shared(s, dir, &resolved_stem(base, &r), progress) {
        let found = keep(&resolved_stem(base, &r))?;
        remove_older(base, dir, stem);
        let why = format!("{same}: downloaded from {}", s.location());
        return Ok(Some(StagedBase { origin: Origin::Shared(why), ..found }));
    }
    Ok(None)
}

/// Why no base fits when none staged from these inputs resolves to `resolved`: one that did
/// resolves to other versions now, or there is none at all.
fn resolution_miss(base: &DebianBase, dir: &Path, resolved: &str, reuse: bool) -> String {
    match newest_cached(base, dir) {
        Some(b) if !reuse => format!(
            "the archive changed since the cached base was staged ({}); a service layer resolves against the base's package lists, so they must be this state's",
            b.info.staged_at
        ),
        Some(b) if b.info.resolved.is_some() => format!(
            "the archive changed since the cached base was staged ({}), and so did the packages it resolves to (resolution {})",
            b.info.staged_at,
            short(resolved)
        ),
        Some(b) => format!(
            "the archive changed since the cached base was staged ({}), which recorded no resolution to compare",
            b.info.staged_at
        ),
        None => "no base for these inputs is cached".to_string(),
    }
}

/// The name a base is shared under by its resolution, beside its archive-state name: a runner
/// at a re-signed state of the archive finds it by what it holds.
fn resolved_stem(base: &DebianBase, resolved: &str) -> String {
    format!("{}r{}", base.file_prefix(), short(resolved))
}

/// Where a build would find the base for these inputs and the archive as it is now, found
/// the way [`stage`] finds it (apt's resolution included) but with nothing staged or
/// downloaded: for `kiln plan`.
#[derive(Debug, Clone)]
pub struct Lookup {
    /// The archive-state cache key.
    pub key: String,
    /// The base's record and where it is; None when a build would stage it, with the reason.
    pub found: Result<(BaseInfo, Origin), String>,
}

pub fn lookup(base: &DebianBase, opts: StageOptions) -> Result<Lookup, StageError> {
    let (dir, shared) = (opts.cache_dir.join("bases"), opts.shared);
    let archive = probe_archive(base)?;
    let key = base.cache_key(&archive);
    let stem = format!("{}{}", base.file_prefix(), short(&key));
    let in_shared = |name: &str, why: &str| -> Option<(BaseInfo, Origin)> {
        let s = shared?;
        let info = s.record(name).ok()??;
        Some((info, Origin::Shared(format!("{why}; in {}", s.location()))))
    };
    if let Some(b) = load_cached(&dir, &stem) {
        return Ok(Lookup { key, found: Ok((b.info, b.origin)) });
    }
    if let Some(found) = in_shared(&stem, "staged by another runner from this state of the archive") {
        return Ok(Lookup { key, found: Ok(found) });
    }
    let Some(mmdebstrap) = crate::host::find_program("mmdebstrap") else {
        return Ok(Lookup { key, found: Err("no base for this state of the archive is cached".into()) });
    };
    if !opts.reuse_resolved {
        let why = resolution_miss(base, &dir, "", false);
        return Ok(Lookup { key, found: Err(why) });
    }
    let found = match resolve::resolve(&mmdebstrap, base, &archive)? {
        None => Err("no base for this state of the archive is cached, and apt's resolution was not understood".into()),
        Some(r) => {
            let rkey = r.key(&base.inputs_key());
            let same = "the archive changed, but the packages the base holds resolve to the same versions";
            match find_resolved(base, &dir, &rkey).and_then(|old| load_cached(&dir, &old)) {
                Some(b) => Ok((b.info, Origin::Cache(same.into()))),
                None => {
                    in_shared(&resolved_stem(base, &rkey), same).ok_or_else(|| resolution_miss(base, &dir, &rkey, true))
                }
            }
        }
    };
    Ok(Lookup { key, found })
}

/// The shared base `stem`, moved into the local cache once verified. Ok(Err("")) when none
/// is shared; Ok(Err(why)) or Err(why) when one could not be used, with the reason.
fn fetch_shared(
    s: &dyn SharedBases,
    dir: &Path,
    stem: &str,
    progress: &dyn Progress,
) -> Result<Result<StagedBase, String>, String> {
    let (tar, record) = (dir.join(format!("{stem}.tar")), dir.join(format!("{stem}.json")));
    let partial = tar.with_extension("tar.partial");
    let fetched = s.fetch(stem, &partial, progress);
    let found = match fetched {
        Ok(Fetched::Found(info)) => info,
        Ok(Fetched::Absent) => return Ok(Err(String::new())),
        Ok(Fetched::Corrupt(reason)) => {
            let _ = std::fs::remove_file(&partial);
            return Ok(Err(format!(
                "the shared base in {} is corrupt ({reason}): not used; staging afresh",
                s.location()
            )));
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(format!("the shared cache {} cannot be read ({e}); staging here", s.location()));
        }
    };
    let io = |e: std::io::Error| format!("keeping the shared base in {}: {e}", dir.display());
    let json = serde_json::to_vec_pretty(&found).unwrap_or_default();
    crate::formats::atomic::write(&record, &json).map_err(io)?;
    std::fs::rename(&partial, &tar).map_err(io)?;
    crate::formats::atomic::sync_dir(dir).map_err(io)?;
    let why = format!(
        "staged by another runner from this state of the archive (key {}); downloaded from {} and its SHA-256 verified",
        short(&found.cache_key),
        s.location()
    );
    Ok(Ok(StagedBase { tar, cached: true, info: found, age_secs: 0, origin: Origin::Shared(why) }))
}

/// Runs mmdebstrap for `base` into the cache entry `stem`, holding its lock: `key` is the
/// archive-state key, and `resolution` gives apt's resolution once the staging is done (it
/// may still be being worked out beside it).
#[allow(clippy::too_many_arguments)]
fn run_staging(
    mmdebstrap: &Path,
    base: &DebianBase,
    archive: &[SuiteState],
    key: String,
    resolution: impl FnOnce() -> Option<Resolution>,
    dir: &Path,
    stem: &str,
    why: String,
    progress: &dyn Progress,
) -> Result<StagedBase, StageError> {
    let (tar, record) = (dir.join(format!("{stem}.tar")), dir.join(format!("{stem}.json")));
    // mmdebstrap writes next to the final name and the rename publishes it: an interrupted run
    // leaves no tarball that a later build would trust.
    let partial = tar.with_extension("tar.partial");
    let log = tar.with_extension("log");
    fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StageError + 'a {
        move |source| StageError::Io { what, path: path.to_path_buf(), source }
    }
    progress.begin(&format!("staging {} {} with mmdebstrap", base.suite, base.arch), None, Unit::Items);
    let eatmydata = eatmydata_usable();
    let native = native::plan(base.arch, eatmydata).and_then(|n| match n.prepare(dir) {
        Ok(p) => Some(p),
        Err(e) => {
            progress.note(&format!("the host's tools were not prepared for the chroot ({e}); staging fully emulated"));
            None
        }
    });
    let run = |native: Option<&native::Prepared>| -> Result<(), StageError> {
        let mut cmd = mmdebstrap_command(mmdebstrap, base, archive, Some(&partial), Speed { eatmydata, native });
        if let Some(e) = base.source_date_epoch.or_else(|| staging_epoch(archive)) {
            cmd.env("SOURCE_DATE_EPOCH", e.to_string());
        }
        let cmdline = format!("{cmd:?}");
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
            return Err(StageError::Failed { cmd: cmdline, status: status.to_string(), tail, log: log.clone() });
        }
        Ok(())
    };
    run(native.as_ref())?;
    if let Some(n) = &native {
        // A host binary in the base would not run on the image's machine.
        if let Some(leak) = n.find_leak(&partial).map_err(io("checking the staged base", &partial))? {
            progress.note(&format!("{leak}; staging again, fully emulated (set {}=0 to always)", native::SWITCH));
            let _ = std::fs::remove_file(&partial);
            run(None)?;
        }
    }
    let staged_at = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default();
    // The resolution names this base only if the base holds what it named: a mirror behind a
    // CDN may have served the staging another state than the simulation.
    let resolved = match resolution().map(|r| {
        let holds = r.holds_all_installed(&partial);
        (r, holds)
    }) {
        Some((r, Ok(true))) => Some(r.key(&base.inputs_key())),
        Some((_, Ok(false))) => {
            progress.note(
                "the staged packages are not those apt's simulation named; this base is not reused by its resolution",
            );
            None
        }
        Some((_, Err(e))) => {
            let _ = std::fs::remove_file(&partial);
            return Err(io("reading the dpkg status of", &partial)(e));
        }
        None => None,
    };
    let info = BaseInfo { cache_key: key, staged_at, archive: archive.to_vec(), resolved };
    // The record first: a tarball without one is not trusted (see load_cached).
    let json = serde_json::to_vec_pretty(&info).unwrap_or_default();
    crate::formats::atomic::write(&record, &json).map_err(io("writing", &record))?;
    std::fs::File::open(&partial).and_then(|f| f.sync_all()).map_err(io("writing", &partial))?;
    std::fs::rename(&partial, &tar).map_err(io("publishing staged base", &tar))?;
    crate::formats::atomic::sync_dir(dir).map_err(io("publishing staged base", &tar))?;
    remove_older(base, dir, stem);
    progress.end(&format!("{} packages requested", base.packages.len()));
    Ok(StagedBase { tar, cached: false, info, age_secs: 0, origin: Origin::Staged(why) })
}

/// The hooks that make a staging faster without changing what it stages.
#[derive(Clone, Copy, Default)]
struct Speed<'a> {
    /// dpkg under eatmydata (mmdebstrap's hook directory).
    eatmydata: bool,
    /// The host's tools stand in for the chroot's (a foreign architecture).
    native: Option<&'a native::Prepared>,
}

/// Whether mmdebstrap's eatmydata hook can run here: it asks dpkg-architecture (dpkg-dev)
/// where the chroot's libraries live.
fn eatmydata_usable() -> bool {
    Path::new(EATMYDATA_HOOK).is_dir() && crate::host::find_program("dpkg-architecture").is_some()
}

/// mmdebstrap's command line for `base` from the archive's suites as they are now, writing the
/// tarball to `partial`, or with None simulating the installation (apt's resolution, printed).
fn mmdebstrap_command(
    mmdebstrap: &Path,
    base: &DebianBase,
    archive: &[SuiteState],
    partial: Option<&Path>,
    speed: Speed,
) -> Command {
    let mut cmd = Command::new(mmdebstrap);
    if partial.is_none() {
        cmd.args(["--simulate", "--verbose"]);
    } else {
        // One initramfs instead of two: the kernel's postinst builds one, and the trigger
        // that packages configured after it activate builds it again, over the first. Each
        // took ~170 s of an arm64 staging's 711 s under qemu-user (2026-12-07). So
        // update-initramfs does nothing while packages are installed, and runs once at the
        // end, with every package configured: the state the trigger's run saw.
        cmd.arg(format!("--essential-hook={INITRAMFS_DEFER}"));
        if let Some(n) = speed.native {
            // In once the essential packages are extracted (the shell, coreutils), again after
            // dpkg installed them over it and for what the remaining packages brought (cpio),
            // out once the initramfs is built.
            cmd.arg(format!("--extract-hook={}", n.swap_in()))
                .arg(format!("--essential-hook={}", n.swap_in()))
                .arg(format!("--customize-hook={}", n.swap_in()));
        }
        cmd.arg(format!("--customize-hook={INITRAMFS_ONCE}"));
        if let Some(n) = speed.native {
            cmd.arg(format!("--customize-hook={}", n.swap_out()));
        }
        if speed.eatmydata {
            // dpkg and the maintainer scripts without fsync: a staging that fails is thrown
            // away whole, so durability on the way buys nothing, and each fsync is a host
            // syscall that qemu-user waits for (benches/fleet.sh measures it).
            cmd.arg(format!("--hook-dir={EATMYDATA_HOOK}"));
        }
        if speed.eatmydata || speed.native.is_some() {
            // Their libraries are gone again; the linker's cache must not name them.
            cmd.arg("--customize-hook=chroot \"$1\" ldconfig");
        }
    }
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
        .arg(partial.unwrap_or(Path::new("/dev/null")))
        .args(archive.iter().map(|s| format!("deb {} {} {}", s.uri, s.suite, base.components.join(" "))))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// The epoch staging runs under when none is given: the newest `Date:` of the archive's
/// suites. What staging makes rather than unpacks (the initrd's cpio times above all, which
/// initramfs-tools takes from SOURCE_DATE_EPOCH) then depends on the archive's state, not on
/// the moment a runner staged it, so two runners staging from one state make the same base.
fn staging_epoch(archive: &[SuiteState]) -> Option<i64> {
    archive
        .iter()
        .filter_map(|s| {
            // InRelease writes `Sat, 07 Dec 2026 08:12:34 UTC`; RFC 2822 spells the zone +0000.
            let date = s.date.trim().strip_suffix("UTC").map(|d| format!("{d}+0000")).unwrap_or_else(|| s.date.clone());
            time::OffsetDateTime::parse(&date, &time::format_description::well_known::Rfc2822).ok()
        })
        .map(|t| t.unix_timestamp())
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn staging_takes_the_newest_suite_date_as_its_epoch() {
        let state =
            |date: &str| suite_state("http://m/debian".into(), "s".into(), format!("Date: {date}\n").as_bytes());
        let archive = [state("Sat, 01 Jun 2024 00:00:00 UTC"), state("Sun, 02 Jun 2024 08:30:00 UTC")];
        assert_eq!(staging_epoch(&archive), Some(1_717_317_000));
        assert_eq!(staging_epoch(&[state("not a date")]), None);
        let mut with_epoch = DebianBase {
            suite: "bookworm".into(),
            arch: Arch::X86_64,
            mirror: "http://m/debian".into(),
            security_mirror: None,
            components: vec!["main".into()],
            packages: vec![],
            source_date_epoch: Some(1),
            snapshot: false,
        };
        let keyed = with_epoch.inputs_key();
        with_epoch.source_date_epoch = None;
        assert_ne!(with_epoch.inputs_key(), keyed);
    }
}
