//! The service layer: a recipe's own repositories, `.deb` files, users, files and steps, staged
//! on top of the cached Debian base rather than with it, so a new build of the team's package
//! re-runs only this layer and never Debian's staging.
//!
//! How it is staged: mmdebstrap (`--variant=custom`, the same namespaces, qemu-user and mounts
//! as for the base) unpacks the base tarball into a scratch root and runs one customize hook
//! that kiln writes: repositories' keys and sources, `apt-get install` of the local packages and
//! the repository packages (dependencies from the base's own package lists and the
//! repositories), users, files (when steps follow), then the steps. The hook then collects
//! what changed against the unpacked base, by inode change time (which neither dpkg nor tar can
//! set), plus the paths that went away, and mmdebstrap hands both out. The layer is that delta:
//! small, cached by every input, and laid over the base's tree with
//! [`crate::formats::tar::overlay_tar`].
//!
//! Before anything runs, each repository is read with the build host's apt into a private
//! directory: its `InRelease` must verify with the recipe's key (apt's own verification), and its
//! state and package names are what the cache key and the base/layer split are made of.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::formats::tree::Tree;
use crate::manifest::{Package, RepositoryState};
use crate::platform::Arch;
use crate::progress::{Progress, Unit};
use crate::recipe::{FileContent, FileDigests, FileEntry, FileKind, LocalPackage, Repository, StepAction, User};
use crate::stage::debian::tail;

/// Bump when the hook changes what the same inputs produce.
const LAYER_VERSION: &str = "kiln-layer-v1";

/// Where steps find the recipe's directory, read-only.
pub const RECIPE_DIR_IN_IMAGE: &str = "/run/kiln/recipe";

/// How many lines of a failing step's output the error repeats.
const TAIL_LINES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error(transparent)]
    Interrupted(#[from] crate::interrupt::Interrupted),
    #[error("{origin}: repository `{name}` ({uri}): its InRelease does not verify with key {key}\n{detail}\nCheck that `key` is this repository's signing key (the fingerprint the vendor publishes), and that the repository is the one meant")]
    NotVerified { name: String, origin: String, uri: String, key: PathBuf, detail: String },
    #[error("{origin}: repository `{name}` ({uri}) cannot be read\n{detail}\nCheck the URI and suites, and that this host reaches it")]
    Unreachable { name: String, origin: String, uri: String, detail: String },
    #[error("{origin}: packages.local: `{written}` is {package} for {found}, but the image is {arch}\nBuild the package for {arch} (or `Architecture: all`), or build the image with --arch {}", kiln_arch(found))]
    WrongArch { origin: String, written: String, package: String, found: String, arch: &'static str },
    #[error("{origin}: packages.local: `{written}` cannot be read as a Debian package: {detail}")]
    BadDeb { origin: String, written: String, detail: String },
    #[error("{origin}: packages.local: `{written}` and {other} are both package {package}; name each package once")]
    DuplicateLocal { origin: String, written: String, other: String, package: String },
    #[error("installing the service layer's packages failed: {culprits}\napt says:\n{tail}\n(full log: {log})")]
    Packages { culprits: String, tail: String, log: PathBuf },
    #[error("{origin}: user `{name}`: {what}\n(full log: {log})")]
    User { origin: String, name: String, what: String, log: PathBuf },
    #[error("{origin}: [[files]] {path}: {what}\n(full log: {log})")]
    File { origin: String, path: String, what: String, log: PathBuf },
    /// `step` names it as messages do: ``step 2 (`make install`)``.
    #[error("{origin}: {step} failed with exit status {status}; its last lines:\n{tail}\n(full log: {log})\nNo image was written")]
    Step { origin: String, step: String, status: String, tail: String, log: PathBuf },
    #[error("staging the service layer failed ({cmd} exited with {status}); the last lines of its output:\n{tail}\n(full log: {log})")]
    Failed { cmd: String, status: String, tail: String, log: PathBuf },
    #[error("{what} {path}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{0} is not installed; {1}")]
    Missing(&'static str, &'static str),
    #[error("--offline: no service layer is cached in {dir} for these inputs; build once with network access first")]
    NothingCached { dir: PathBuf },
    #[error(transparent)]
    Stage(#[from] crate::stage::debian::StageError),
    #[error("laying the service layer over the base: {0}")]
    Overlay(#[from] crate::formats::tar::TarError),
}

/// kiln's name of a Debian architecture (`amd64` → `x86_64`), for `--arch`.
fn kiln_arch(debian: &str) -> String {
    Arch::parse(debian).map(|a| a.to_string()).unwrap_or_else(|| debian.to_string())
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> LayerError + 'a {
    move |source| LayerError::Io { what, path: path.to_path_buf(), source }
}

/// One recipe repository as the build host's apt read it: verified, with what it offers.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RepoState {
    pub name: String,
    pub suites: Vec<RepositoryState>,
    /// Package name → versions the repository offers for the image's architecture.
    pub packages: BTreeMap<String, BTreeSet<String>>,
}

/// A local `.deb` as `dpkg-deb` reads it.
#[derive(Debug, Clone)]
pub struct LocalDeb {
    pub entry: LocalPackage,
    pub package: String,
    pub version: String,
    pub sha256: String,
}

/// Everything the layer is made of, read and checked, before anything is staged.
#[derive(Debug)]
pub struct LayerPlan {
    pub arch: Arch,
    pub repos: Vec<(Repository, RepoState)>,
    pub local: Vec<LocalDeb>,
    /// `[packages].include` entries a recipe repository offers: installed in the layer, so the
    /// base stays Debian's alone (and shared with recipes that do not have the repository).
    pub packages: Vec<String>,
    pub users: Vec<User>,
    /// The recipe's files, laid in the layer only when steps follow (steps may read them);
    /// otherwise kiln lays them after the layer, and changing one does not stage the layer again.
    pub files: Vec<FileEntry>,
    pub steps: Vec<crate::recipe::Step>,
    /// The recipe's directory, read-only at [`RECIPE_DIR_IN_IMAGE`] while steps run.
    pub recipe_dir: PathBuf,
    /// Name of the recipe's outputs (`NAME-ARCH`): the layer's cache files start with it.
    pub output_name: String,
    /// The recipe's digest cache: the digests of its files, taken when it was loaded.
    pub digests: std::sync::Arc<dyn FileDigests>,
}

/// The apt options that confine the host's apt-get to a private directory and one architecture.
fn private_apt(dir: &Path, arch: Arch, sources: &Path) -> Vec<String> {
    let empty = dir.join("empty");
    let d = |p: &Path| p.display().to_string();
    vec![
        format!("Dir::Etc::SourceList={}", d(sources)),
        format!("Dir::Etc::SourceParts={}", d(&empty)),
        format!("Dir::Etc::Trusted={}", d(&empty.join("none.gpg"))),
        format!("Dir::Etc::TrustedParts={}", d(&empty)),
        format!("Dir::Etc::Preferences={}", d(&empty.join("none"))),
        format!("Dir::Etc::PreferencesParts={}", d(&empty)),
        format!("Dir::State={}", d(&dir.join("state"))),
        format!("Dir::Cache={}", d(&dir.join("cache"))),
        format!("APT::Architecture={}", arch.debian()),
        format!("APT::Architectures={}", arch.debian()),
        "Acquire::Languages=none".into(),
        "Debug::NoLocking=1".into(),
        // Files land in a private directory the `_apt` user cannot write to.
        "APT::Sandbox::User=root".into(),
        "Acquire::Retries=3".into(),
    ]
}

/// Reads each repository with the host's apt in a directory of its own: apt verifies the
/// `InRelease` with the recipe's key (and only with it), and lists what the repository offers.
pub fn probe_repositories(repos: &[Repository], arch: Arch) -> Result<Vec<RepoState>, LayerError> {
    if repos.is_empty() {
        return Ok(Vec::new());
    }
    let apt_get = crate::host::find_program("apt-get")
        .ok_or(LayerError::Missing("apt-get", "kiln reads recipe repositories with the build host's apt"))?;
    let apt_cache = crate::host::find_program("apt-cache")
        .ok_or(LayerError::Missing("apt-cache", "kiln reads recipe repositories with the build host's apt"))?;
    let tmp = tempfile::tempdir().map_err(io("creating a temporary directory in", &std::env::temp_dir()))?;
    let mut out = Vec::new();
    for (i, r) in repos.iter().enumerate() {
        let dir = tmp.path().join(i.to_string());
        for sub in ["empty", "state/lists/partial", "cache/archives/partial"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(io("creating", &dir))?;
        }
        let key = dir.join(if r.key_armored { "key.asc" } else { "key.gpg" });
        std::fs::copy(&r.key, &key).map_err(io("copying", &r.key))?;
        let sources = dir.join("repo.sources");
        std::fs::write(&sources, r.deb822(&key.display().to_string())).map_err(io("writing", &sources))?;
        let opts = private_apt(&dir, arch, &sources);
        let mut cmd = Command::new(&apt_get);
        for o in &opts {
            cmd.arg("-o").arg(o);
        }
        let o = cmd.arg("-q").arg("update").stdin(Stdio::null()).output().map_err(io("running", &apt_get))?;
        let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        let problems: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("E:") || l.starts_with("W:") || l.starts_with("Err:") || l.starts_with("  "))
            .filter(|l| !l.contains("DirectoryExists"))
            .collect();
        let detail = problems.join("\n");
        let signature = ["NO_PUBKEY", "is not signed", "BADSIG", "EXPKEYSIG", "GPG error", "signature", "Signed-By"];
        if !o.status.success() || text.lines().any(|l| l.starts_with("E:") || l.starts_with("Err:")) {
            let unverified = problems.iter().any(|l| signature.iter().any(|s| l.contains(s)));
            return Err(if unverified {
                LayerError::NotVerified {
                    name: r.name.clone(),
                    origin: r.origin.clone(),
                    uri: r.uri.clone(),
                    key: r.key.clone(),
                    detail,
                }
            } else {
                LayerError::Unreachable { name: r.name.clone(), origin: r.origin.clone(), uri: r.uri.clone(), detail }
            });
        }
        let mut suites = Vec::new();
        let lists = dir.join("state/lists");
        let mut names: Vec<PathBuf> = std::fs::read_dir(&lists)
            .map_err(io("reading", &lists))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with("_InRelease") || n.ends_with("_Release"))
            })
            .collect();
        names.sort();
        for path in names {
            let bytes = std::fs::read(&path).map_err(io("reading", &path))?;
            let state = crate::stage::debian::suite_state(r.uri.clone(), String::new(), &bytes);
            let text = String::from_utf8_lossy(&bytes);
            let field = |k: &str| text.lines().find_map(|l| l.strip_prefix(k)).map(|v| v.trim().to_string());
            let suite = field("Suite:").or_else(|| field("Codename:")).unwrap_or_else(|| r.suites.join(" "));
            suites.push(RepositoryState {
                name: r.name.clone(),
                uri: r.uri.clone(),
                suite,
                date: state.date,
                sha256: state.sha256,
            });
        }
        let mut cmd = Command::new(&apt_cache);
        for o in &opts {
            cmd.arg("-o").arg(o);
        }
        let o = cmd.arg("dumpavail").stdin(Stdio::null()).output().map_err(io("running", &apt_cache))?;
        let mut packages: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for para in String::from_utf8_lossy(&o.stdout).split("\n\n") {
            let field = |k: &str| para.lines().find_map(|l| l.strip_prefix(k)).map(|v| v.trim().to_string());
            if let (Some(n), Some(v)) = (field("Package:"), field("Version:")) {
                packages.entry(n).or_default().insert(v);
            }
        }
        out.push(RepoState { name: r.name.clone(), suites, packages });
    }
    Ok(out)
}

/// Reads each local `.deb`'s control fields with `dpkg-deb`, refusing one for another
/// architecture, one that is no package, and two files of one package.
pub fn inspect_local(
    local: &[LocalPackage],
    arch: Arch,
    digests: &dyn FileDigests,
) -> Result<Vec<LocalDeb>, LayerError> {
    if local.is_empty() {
        return Ok(Vec::new());
    }
    let dpkg_deb = crate::host::find_program("dpkg-deb")
        .ok_or(LayerError::Missing("dpkg-deb", "install dpkg (every Debian host has it)"))?;
    let mut out: Vec<LocalDeb> = Vec::new();
    for l in local {
        let o = Command::new(&dpkg_deb)
            .arg("--field")
            .arg(&l.path)
            .args(["Package", "Version", "Architecture"])
            .stdin(Stdio::null())
            .output()
            .map_err(io("running", &dpkg_deb))?;
        let bad = |detail: String| LayerError::BadDeb { origin: l.origin.clone(), written: l.written.clone(), detail };
        if !o.status.success() {
            return Err(bad(String::from_utf8_lossy(&o.stderr).trim().replace("dpkg-deb: error: ", "")));
        }
        let text = String::from_utf8_lossy(&o.stdout);
        let field = |k: &str| text.lines().find_map(|line| line.strip_prefix(k)).map(|v| v.trim().to_string());
        let (Some(package), Some(version), Some(found)) =
            (field("Package:"), field("Version:"), field("Architecture:"))
        else {
            return Err(bad("its control file lacks Package, Version or Architecture".into()));
        };
        if found != "all" && found != arch.debian() {
            return Err(LayerError::WrongArch {
                origin: l.origin.clone(),
                written: l.written.clone(),
                package: format!("{package} {version}"),
                found,
                arch: arch.debian(),
            });
        }
        if let Some(other) = out.iter().find(|d| d.package == package) {
            return Err(LayerError::DuplicateLocal {
                origin: l.origin.clone(),
                written: l.written.clone(),
                other: format!("`{}` ({})", other.entry.written, other.entry.origin),
                package,
            });
        }
        let sha256 = sha256_hex(digests, &l.path)?;
        out.push(LocalDeb { entry: l.clone(), package, version, sha256 });
    }
    Ok(out)
}

/// Hex SHA-256 of a file the recipe names, from the recipe's digest cache: the recipe hash
/// read it already, so an unchanged file is not read again.
fn sha256_hex(digests: &dyn FileDigests, path: &Path) -> Result<String, LayerError> {
    digests.digest(path).map(|d| hex::encode(d.sha256)).map_err(io("reading", path))
}

/// `[packages].include` split: what Debian's staging installs, and what only a recipe
/// repository offers (installed in the layer). A name written with `=VERSION` keeps it.
pub fn split_include(include: &[String], repos: &[RepoState]) -> (Vec<String>, Vec<String>) {
    include.iter().cloned().partition(|p| {
        let name = p.split('=').next().unwrap_or(p);
        !repos.iter().any(|r| r.packages.contains_key(name))
    })
}

impl LayerPlan {
    /// Builds the plan of a recipe's service layer from what was read of it; None when the
    /// recipe has none.
    pub fn new(
        recipe: &crate::recipe::Recipe,
        repos: Vec<RepoState>,
        local: Vec<LocalDeb>,
        packages: Vec<String>,
        recipe_dir: PathBuf,
    ) -> Option<LayerPlan> {
        let service = &recipe.service;
        if service.is_empty() && packages.is_empty() {
            return None;
        }
        Some(LayerPlan {
            arch: recipe.arch,
            repos: service.repositories.iter().cloned().zip(repos).collect(),
            local,
            packages,
            users: service.users.clone(),
            files: if service.steps.is_empty() { Vec::new() } else { recipe.files.clone() },
            steps: service.steps.clone(),
            recipe_dir,
            output_name: recipe.output_name(),
            digests: recipe.digests().clone(),
        })
    }

    /// True when the recipe's `[[files]]` are laid in the layer (steps follow them).
    pub fn holds_files(&self) -> bool {
        !self.steps.is_empty()
    }

    /// The cache key: the base's key (its inputs and Debian's state), the epoch, and every
    /// input of the layer by content: repositories (with their state and key), packages, local
    /// files by digest, users, files and steps (scripts by digest). Not the recipe's directory:
    /// what a step reads from it beyond its own script is the step's to name (docs/recipes.md).
    pub fn cache_key(&self, base_key: &str, epoch: i64) -> Result<String, LayerError> {
        let mut h = Sha256::new();
        let mut part = |b: &[u8]| {
            h.update((b.len() as u64).to_le_bytes());
            h.update(b);
        };
        part(LAYER_VERSION.as_bytes());
        part(base_key.as_bytes());
        part(self.arch.debian().as_bytes());
        part(epoch.to_string().as_bytes());
        for (r, state) in &self.repos {
            part(r.deb822("").as_bytes());
            part(r.name.as_bytes());
            part(sha256_hex(&self.digests, &r.key)?.as_bytes());
            for s in &state.suites {
                part(s.sha256.as_bytes());
            }
        }
        for p in &self.packages {
            part(p.as_bytes());
        }
        for d in &self.local {
            part(d.sha256.as_bytes());
        }
        for u in &self.users {
            let json = serde_json::to_string(&(&u.name, u.uid, &u.groups, &u.shell, &u.home, &u.authorized_keys))
                .expect("serializes");
            part(json.as_bytes());
        }
        for f in &self.files {
            let json = serde_json::to_string(&(&f.path, &f.kind, f.mode, f.uid, f.gid, &f.user, &f.group))
                .expect("serializes");
            part(json.as_bytes());
            if let FileKind::File { content: FileContent::Source(p) } = &f.kind {
                part(sha256_hex(&self.digests, p)?.as_bytes());
            }
        }
        for s in &self.steps {
            match &s.action {
                StepAction::Run(cmd) => part(format!("run {cmd}").as_bytes()),
                StepAction::Script(p) => part(format!("script {}", sha256_hex(&self.digests, p)?).as_bytes()),
            }
        }
        Ok(hex::encode(h.finalize()))
    }

    /// Every repository suite's state, for the manifest.
    pub fn repository_states(&self) -> Vec<RepositoryState> {
        self.repos.iter().flat_map(|(_, s)| s.suites.iter().cloned()).collect()
    }

    /// Where each installed package came from, when not from Debian: a local file (matched by
    /// name and version) or a recipe repository that offers that version.
    pub fn mark_origins(&self, packages: &mut [Package]) {
        for p in packages.iter_mut() {
            if let Some(d) = self.local.iter().find(|d| d.package == p.name && d.version == p.version) {
                p.origin = Some(format!("local:{}", d.entry.written));
            } else if let Some((r, _)) =
                self.repos.iter().find(|(_, s)| s.packages.get(&p.name).is_some_and(|v| v.contains(&p.version)))
            {
                p.origin = Some(format!("repository:{}", r.name));
            }
        }
    }
}

/// Single-quotes `s` for the shell.
fn sh(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The hook mmdebstrap runs in the unpacked base (`$1`): every action of the layer in recipe
/// order, each announcing itself on a `kiln-phase` line and failing with a `kiln-failed` line
/// that [`failure`] turns into an error naming the recipe entry. `inputs` is the host
/// directory holding copies of every input file (readable by the namespace's root).
fn hook_script(plan: &LayerPlan, inputs: &Path, epoch: i64) -> String {
    let k = |rel: &str| sh(&inputs.join(rel).display().to_string());
    let mut s = String::new();
    s.push_str(&format!(
        r#"#!/bin/bash
# Written by kiln: the service layer of {name}, run by mmdebstrap as a customize hook.
set -euo pipefail
exec 1>&2
R=$1
export SOURCE_DATE_EPOCH={epoch} LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive
fail() {{ echo "kiln-failed $*"; exit 1; }}
# Every path of the root but mounts, the layer's own work and what generalization empties.
walk() {{
  (cd "$R" && find . -xdev \( -path ./proc -o -path ./sys -o -path ./dev -o -path ./.kiln-layer \
      -o -path ./var/lib/apt/lists -o -path ./var/cache/apt -o -path ./tmp/kiln -o -path ./run/kiln \) -prune \
      -o "$@" -print0) | LC_ALL=C sort -z
}}
mkdir -p "$R/.kiln-layer" "$R/tmp/kiln"
walk > "$R/.kiln-layer/before"
: > "$R/.kiln-layer/marker"
# Inode change times are kept at clock-tick granularity: what changes from here on is later.
sleep 0.05
# Name resolution for apt and steps: the base's resolv.conf may point at a resolver that does
# not run here (systemd-resolved); the host's is used meanwhile and the base's put back.
if [ -e "$R/etc/resolv.conf" ] || [ -L "$R/etc/resolv.conf" ]; then mv "$R/etc/resolv.conf" "$R/.kiln-layer/resolv.conf"; fi
cp -L /etc/resolv.conf "$R/etc/resolv.conf" 2>/dev/null || : > "$R/etc/resolv.conf"
restore() {{
  rm -f "$R/etc/resolv.conf"
  if [ -e "$R/.kiln-layer/resolv.conf" ] || [ -L "$R/.kiln-layer/resolv.conf" ]; then mv "$R/.kiln-layer/resolv.conf" "$R/etc/resolv.conf"; fi
}}
trap restore EXIT
"#,
        name = plan.output_name
    ));
    if !plan.repos.is_empty() {
        s.push_str("echo kiln-phase repositories\n");
        for (i, (r, _)) in plan.repos.iter().enumerate() {
            s.push_str(&format!(
                "install -D -m 0644 {} \"$R\"{}\ninstall -D -m 0644 {} \"$R\"{}\n",
                k(&format!("keys/{i}")),
                sh(&r.key_path_in_image()),
                k(&format!("sources/{i}")),
                sh(&r.sources_path_in_image()),
            ));
        }
    }
    if !plan.local.is_empty() || !plan.packages.is_empty() {
        s.push_str("echo kiln-phase packages\n");
        if !plan.repos.is_empty() {
            // Only the recipe's repositories: Debian's lists came with the base, as of its state.
            s.push_str("chroot \"$R\" apt-get -q -o APT::Get::List-Cleanup=false -o Dir::Etc::SourceList=/dev/null update || fail packages\n");
        }
        let mut names = Vec::new();
        for (i, _) in plan.local.iter().enumerate() {
            s.push_str(&format!("cp {} \"$R/tmp/kiln/local-{i}.deb\"\n", k(&format!("debs/{i}.deb"))));
            names.push(format!("/tmp/kiln/local-{i}.deb"));
        }
        names.extend(plan.packages.iter().cloned());
        s.push_str(&format!(
            "chroot \"$R\" apt-get -q -y --no-install-recommends -o Dpkg::Options::=--force-unsafe-io install {} || fail packages\n",
            names.iter().map(|n| sh(n)).collect::<Vec<_>>().join(" ")
        ));
    }
    for (i, u) in plan.users.iter().enumerate() {
        s.push_str(&format!("echo kiln-phase user {i}\n"));
        let name = sh(&u.name);
        for g in &u.groups {
            s.push_str(&format!(
                "chroot \"$R\" getent group {g} >/dev/null || fail user {i} group {gq}\n",
                g = sh(g),
                gq = sh(g)
            ));
        }
        if let Some(uid) = u.uid {
            s.push_str(&format!("! chroot \"$R\" getent passwd {uid} >/dev/null || fail user {i} uid {uid}\n"));
        }
        let mut args = vec!["-m".to_string(), "-d".into(), sh(&u.home_dir())];
        if let Some(uid) = u.uid {
            args.extend(["-u".into(), uid.to_string()]);
        }
        if let Some(shell) = &u.shell {
            args.extend(["-s".into(), sh(shell)]);
        }
        if !u.groups.is_empty() {
            args.extend(["-G".into(), sh(&u.groups.join(","))]);
        }
        // A group of the user's name that a package already made becomes its primary group;
        // otherwise one is made (with the uid's number when free, as useradd does).
        s.push_str(&format!(
            "if chroot \"$R\" getent group {name} >/dev/null; then g=(-g {name}); else g=(-U); fi\nchroot \"$R\" useradd \"${{g[@]}}\" {} {name} || fail user {i} useradd\n",
            args.join(" ")
        ));
        if !u.authorized_keys.is_empty() {
            let home = u.home_dir();
            s.push_str(&format!(
                "cp {keys} \"$R/tmp/kiln/user-{i}.keys\"\nchroot \"$R\" install -d -m 0700 -o {name} -g \"$(chroot \"$R\" id -gn {name})\" {ssh} || fail user {i} ssh\nchroot \"$R\" install -m 0600 -o {name} -g \"$(chroot \"$R\" id -gn {name})\" /tmp/kiln/user-{i}.keys {ak} || fail user {i} ssh\n",
                keys = k(&format!("users/{i}.keys")),
                ssh = sh(&format!("{home}/.ssh")),
                ak = sh(&format!("{home}/.ssh/authorized_keys")),
            ));
        }
    }
    for (i, f) in plan.files.iter().enumerate() {
        s.push_str(&format!("echo kiln-phase file {i}\n"));
        let path = sh(&f.path);
        let owner = |name: &Option<String>, id: u32| name.clone().unwrap_or_else(|| id.to_string());
        let (user, group) = (owner(&f.user, f.uid), owner(&f.group, f.gid));
        if let Some(n) = &f.user {
            s.push_str(&format!("chroot \"$R\" getent passwd {} >/dev/null || fail file {i} user {}\n", sh(n), sh(n)));
        }
        if let Some(n) = &f.group {
            s.push_str(&format!("chroot \"$R\" getent group {} >/dev/null || fail file {i} group {}\n", sh(n), sh(n)));
        }
        let parent = Path::new(&f.path).parent().map(|p| p.display().to_string()).unwrap_or("/".into());
        s.push_str(&format!("chroot \"$R\" mkdir -p {} || fail file {i} parent\n", sh(&parent)));
        let mode = format!("{:04o}", f.mode);
        let (u, g) = (sh(&user), sh(&group));
        match &f.kind {
            FileKind::Dir => s.push_str(&format!(
                "chroot \"$R\" install -d -m {mode} -o {u} -g {g} {path} || fail file {i} install\n"
            )),
            FileKind::Symlink { target } => s.push_str(&format!(
                "chroot \"$R\" ln -sfn {} {path} || fail file {i} install\nchroot \"$R\" chown -h {u}:{g} {path} || fail file {i} install\n",
                sh(target)
            )),
            FileKind::File { .. } => s.push_str(&format!(
                "cp {} \"$R/tmp/kiln/file-{i}\"\nchroot \"$R\" install -m {mode} -o {u} -g {g} /tmp/kiln/file-{i} {path} || fail file {i} install\n",
                k(&format!("files/{i}"))
            )),
        }
    }
    if !plan.steps.is_empty() {
        s.push_str(&format!(
            "mkdir -p \"$R{RECIPE_DIR_IN_IMAGE}\"\nRECIPE={}\n",
            sh(&plan.recipe_dir.display().to_string())
        ));
        for (i, step) in plan.steps.iter().enumerate() {
            let n = i + 1;
            let cmd = match &step.action {
                StepAction::Run(c) => c.clone(),
                StepAction::Script(_) => {
                    s.push_str(&format!("install -m 0755 {} \"$R/run/kiln/step-{n}\"\n", k(&format!("steps/{n}"))));
                    format!("/run/kiln/step-{n}")
                }
            };
            // A mount namespace of its own: the read-only view of the recipe's directory is gone
            // when the step ends, however it ends, and nothing below it can be written.
            s.push_str(&format!(
                r#"echo kiln-phase step {n}
set +e
unshare --mount --propagation private -- /bin/bash -c 'mount --bind -o ro "$1" "$2{RECIPE_DIR_IN_IMAGE}" && exec chroot "$2" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 SOURCE_DATE_EPOCH="$3" KILN_RECIPE_DIR={RECIPE_DIR_IN_IMAGE} DEBIAN_FRONTEND=noninteractive /bin/sh -c "cd {RECIPE_DIR_IN_IMAGE} && exec /bin/sh -c \"\$0\"" "$4"' _ "$RECIPE" "$R" "$SOURCE_DATE_EPOCH" {cmd} 2>&1 </dev/null | sed -u 's/^/kiln-step {n}: /'
status=${{PIPESTATUS[0]}}
set -e
[ "$status" = 0 ] || fail step {n} "$status"
"#,
                cmd = sh(&cmd)
            ));
        }
        s.push_str(&format!("rm -f \"$R\"/run/kiln/step-*\nrmdir \"$R{RECIPE_DIR_IN_IMAGE}\" \"$R/run/kiln\"\n"));
    }
    s.push_str(
        r#"echo kiln-phase collect
restore
trap - EXIT
rm -rf "$R/tmp/kiln"
# Caches that record inode numbers and times, not contents (mmdebstrap's own reproducibility
# cleanup removes the same).
rm -f "$R/var/cache/ldconfig/aux-cache"
walk > "$R/.kiln-layer/after"
LC_ALL=C comm -z -23 "$R/.kiln-layer/before" "$R/.kiln-layer/after" > "$R/.kiln-layer/deleted"
walk -cnewer "$R/.kiln-layer/marker" > "$R/.kiln-layer/changed"
tar -C "$R" --null --no-recursion -T "$R/.kiln-layer/changed" --numeric-owner --format=pax \
    --xattrs --xattrs-include='*' -cf "$R/.kiln-layer/delta.tar"
"#,
    );
    s
}

/// A staged layer in the cache: the delta tarball and the paths it removes.
#[derive(Debug, Clone)]
pub struct StagedLayer {
    pub tar: PathBuf,
    pub deleted: Vec<Vec<u8>>,
    pub cache_key: String,
    pub cached: bool,
}

impl StagedLayer {
    /// Lays the layer over `tree` (read from the base it was staged on): removals first, then
    /// the delta as an overlay.
    pub fn apply(&self, tree: &mut Tree, opts: &crate::formats::tar::TarOptions) -> Result<(), LayerError> {
        for p in &self.deleted {
            // What the layer removed may be what mmdebstrap itself put in the scratch root.
            let _ = tree.remove(p);
        }
        crate::formats::tar::overlay_tar(tree, &self.tar, opts)?;
        Ok(())
    }
}

fn layer_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("layers")
}

/// The newest cached layer of this recipe's outputs (for `--offline`, which cannot read the
/// repositories): its record holds the repositories' state it was staged from.
pub fn offline_repos(cache_dir: &Path, output_name: &str) -> Result<Vec<RepoState>, LayerError> {
    let dir = layer_dir(cache_dir);
    let prefix = format!("{output_name}-");
    let newest = std::fs::read_dir(&dir)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name().to_string_lossy().starts_with(&prefix) && e.file_name().to_string_lossy().ends_with(".json")
        })
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok());
    let Some(e) = newest else { return Err(LayerError::NothingCached { dir }) };
    let bytes = std::fs::read(e.path()).map_err(io("reading", &e.path()))?;
    let record: Record = serde_json::from_slice(&bytes).map_err(|e| LayerError::Io {
        what: "parsing",
        path: dir.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?;
    Ok(record.repos)
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    cache_key: String,
    repos: Vec<RepoState>,
}

/// Returns the layer for these inputs, staging it with mmdebstrap on `base_tar` unless one was
/// staged from the same inputs (the base's key included). Older layers of the same outputs are
/// removed once a new one is in place.
pub fn stage(
    plan: &LayerPlan,
    base_tar: &Path,
    base_key: &str,
    epoch: i64,
    cache_dir: &Path,
    progress: &dyn Progress,
) -> Result<StagedLayer, LayerError> {
    let key = plan.cache_key(base_key, epoch)?;
    let dir = layer_dir(cache_dir);
    let stem = format!("{}-{}", plan.output_name, &key[..16]);
    let (tar, deleted_path, record_path) =
        (dir.join(format!("{stem}.tar")), dir.join(format!("{stem}.deleted")), dir.join(format!("{stem}.json")));
    let load = || -> Option<StagedLayer> {
        let deleted = std::fs::read(&deleted_path).ok()?;
        tar.is_file().then(|| StagedLayer {
            tar: tar.clone(),
            deleted: split_paths(&deleted),
            cache_key: key.clone(),
            cached: true,
        })
    };
    if let Some(found) = load() {
        return Ok(found);
    }
    std::fs::create_dir_all(&dir).map_err(io("creating cache dir", &dir))?;
    let _lock = crate::stage::debian::lock_exclusive(&dir.join(format!("{stem}.lock")), progress)?;
    if let Some(found) = load() {
        return Ok(found);
    }
    crate::stage::debian::check_can_execute(plan.arch)?;
    let mmdebstrap = crate::host::find_program("mmdebstrap").ok_or(LayerError::Missing(
        "mmdebstrap",
        "install it with `apt-get install mmdebstrap` (or run .ci/setup-host)",
    ))?;

    // Copies of every input, world-readable: in unshare mode the hook runs as the namespace's
    // root, which is not the user who owns the recipe's files.
    let inputs =
        tempfile::Builder::new().prefix("kiln-layer-").tempdir_in(&dir).map_err(io("creating a directory in", &dir))?;
    write_inputs(plan, inputs.path())?;
    let script = inputs.path().join("layer.sh");
    std::fs::write(&script, hook_script(plan, inputs.path(), epoch)).map_err(io("writing", &script))?;
    set_mode(&script, 0o755)?;
    let partial = dir.join(format!("{stem}.tar.partial"));
    let deleted_partial = dir.join(format!("{stem}.deleted.partial"));
    let log = dir.join(format!("{stem}.log"));
    let mut cmd = Command::new(mmdebstrap);
    cmd.arg("--variant=custom")
        .arg(format!("--arch={}", plan.arch.debian()))
        .arg("--skip=update")
        .arg("--format=null")
        // A plain tar is many times faster than the `tar-in` special hook; device nodes are
        // mmdebstrap's own to make in the scratch root.
        .arg(format!(
            "--setup-hook=tar -C \"$1\" --exclude='./dev/*' --xattrs --xattrs-include='*' -xpf {}",
            sh(&base_tar.display().to_string())
        ))
        .arg(format!("--customize-hook={} \"$1\"", sh(&script.display().to_string())))
        .arg(format!("--customize-hook=download /.kiln-layer/delta.tar {}", partial.display()))
        .arg(format!("--customize-hook=download /.kiln-layer/deleted {}", deleted_partial.display()))
        .arg("")
        .arg("/dev/null")
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // The scratch root in memory when there is room: it is unpacked, changed a little and
    // thrown away, and a disk would only write it back.
    if let Some(shm) = scratch_in_memory(base_tar) {
        cmd.env("TMPDIR", shm);
    }
    let cmdline = format!("{cmd:?}");
    progress.begin(&format!("staging the service layer of {} with mmdebstrap", plan.output_name), None, Unit::Items);
    let (status, log_text) = crate::stage::debian::run_mmdebstrap(&mut cmd, |line| {
        if let Some(rest) = line.strip_prefix("kiln-phase ") {
            progress.advance(1);
            if rest != "collect" {
                progress.note(&format!("layer: {}", describe_phase(plan, rest)));
            }
        } else if line.starts_with("kiln-step ") {
            progress.note(line);
        }
    })
    .map_err(io("running mmdebstrap for", &partial))?;
    let cleanup = || {
        let _ = std::fs::remove_file(&partial);
        let _ = std::fs::remove_file(&deleted_partial);
    };
    if let Err(stop) = crate::interrupt::check() {
        cleanup();
        return Err(stop.into());
    }
    crate::formats::atomic::write(&log, log_text.as_bytes()).map_err(io("writing log", &log))?;
    if !status.success() {
        cleanup();
        return Err(failure(plan, &log_text, &log).unwrap_or_else(|| LayerError::Failed {
            cmd: cmdline,
            status: status.to_string(),
            tail: tail(log_text.lines(), 25),
            log: log.clone(),
        }));
    }
    let deleted = std::fs::read(&deleted_partial).map_err(io("reading", &deleted_partial))?;
    let record = Record { cache_key: key.clone(), repos: plan.repos.iter().map(|(_, s)| s.clone()).collect() };
    crate::formats::atomic::write(&record_path, &serde_json::to_vec_pretty(&record).expect("serializes"))
        .map_err(io("writing", &record_path))?;
    std::fs::rename(&deleted_partial, &deleted_path).map_err(io("publishing", &deleted_path))?;
    // The tarball last: a layer is in the cache only once all of it is.
    std::fs::File::open(&partial).and_then(|f| f.sync_all()).map_err(io("writing", &partial))?;
    std::fs::rename(&partial, &tar).map_err(io("publishing staged layer", &tar))?;
    crate::formats::atomic::sync_dir(&dir).map_err(io("publishing staged layer", &tar))?;
    remove_older(&dir, &plan.output_name, &stem);
    progress.end(&format!(
        "{} packages, {} users, {} steps",
        plan.local.len() + plan.packages.len(),
        plan.users.len(),
        plan.steps.len()
    ));
    Ok(StagedLayer { tar, deleted: split_paths(&deleted), cache_key: key, cached: false })
}

/// `./usr/bin/x\0./etc\0` → `/usr/bin/x`, `/etc`.
fn split_paths(nul_separated: &[u8]) -> Vec<Vec<u8>> {
    nul_separated
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty() && *p != b".")
        .map(|p| p.strip_prefix(b".").unwrap_or(p).to_vec())
        .collect()
}

fn set_mode(path: &Path, mode: u32) -> Result<(), LayerError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io("setting the mode of", path))
}

/// Copies every input file the hook reads into `dir`, world-readable.
fn write_inputs(plan: &LayerPlan, dir: &Path) -> Result<(), LayerError> {
    set_mode(dir, 0o755)?;
    for sub in ["keys", "sources", "debs", "users", "files", "steps"] {
        let d = dir.join(sub);
        std::fs::create_dir(&d).map_err(io("creating", &d))?;
        set_mode(&d, 0o755)?;
    }
    let copy = |from: &Path, to: PathBuf| -> Result<(), LayerError> {
        std::fs::copy(from, &to).map_err(io("copying", from))?;
        set_mode(&to, 0o644)
    };
    let write = |to: PathBuf, bytes: &[u8]| -> Result<(), LayerError> {
        std::fs::write(&to, bytes).map_err(io("writing", &to))?;
        set_mode(&to, 0o644)
    };
    for (i, (r, _)) in plan.repos.iter().enumerate() {
        copy(&r.key, dir.join(format!("keys/{i}")))?;
        write(dir.join(format!("sources/{i}")), r.deb822(&r.key_path_in_image()).as_bytes())?;
    }
    for (i, d) in plan.local.iter().enumerate() {
        copy(&d.entry.path, dir.join(format!("debs/{i}.deb")))?;
    }
    for (i, u) in plan.users.iter().enumerate() {
        if !u.authorized_keys.is_empty() {
            let text: String = u.authorized_keys.iter().map(|k| format!("{k}\n")).collect();
            write(dir.join(format!("users/{i}.keys")), text.as_bytes())?;
        }
    }
    for (i, f) in plan.files.iter().enumerate() {
        match &f.kind {
            FileKind::File { content: FileContent::Inline(bytes) } => write(dir.join(format!("files/{i}")), bytes)?,
            FileKind::File { content: FileContent::Source(p) } => copy(p, dir.join(format!("files/{i}")))?,
            _ => {}
        }
    }
    for (i, s) in plan.steps.iter().enumerate() {
        if let StepAction::Script(p) = &s.action {
            copy(p, dir.join(format!("steps/{}", i + 1)))?;
        }
    }
    Ok(())
}

/// `/dev/shm` when it has room for the unpacked base twice over.
fn scratch_in_memory(base_tar: &Path) -> Option<&'static str> {
    let need = std::fs::metadata(base_tar).ok()?.len().saturating_mul(2);
    let shm = std::ffi::CString::new("/dev/shm").ok()?;
    // SAFETY: statvfs writes into the struct it is given and reads a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(shm.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let free = (st.f_bavail as u64).saturating_mul(st.f_frsize as u64);
    (free > need).then_some("/dev/shm")
}

fn describe_phase(plan: &LayerPlan, phase: &str) -> String {
    let mut words = phase.split_whitespace();
    let what = words.next().unwrap_or_default();
    let n: usize = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
    match what {
        "repositories" => format!("{} repositories", plan.repos.len()),
        "packages" => format!("installing {} packages", plan.local.len() + plan.packages.len()),
        "user" => format!("user {}", plan.users.get(n).map(|u| u.name.as_str()).unwrap_or("?")),
        "file" => format!("file {}", plan.files.get(n).map(|f| f.path.as_str()).unwrap_or("?")),
        "step" => format!("step {n}: {}", plan.steps.get(n.wrapping_sub(1)).map(|s| s.describe()).unwrap_or_default()),
        other => other.to_string(),
    }
}

/// The error a `kiln-failed` line names, with the recipe entry it belongs to.
fn failure(plan: &LayerPlan, log_text: &str, log: &Path) -> Option<LayerError> {
    let line = log_text.lines().rev().find_map(|l| l.strip_prefix("kiln-failed "))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let n: usize = words.get(1).and_then(|n| n.parse().ok()).unwrap_or(0);
    let unquote = |w: Option<&&str>| w.map(|s| s.trim_matches('\'').to_string()).unwrap_or_default();
    let log = log.to_path_buf();
    match words.first().copied()? {
        "packages" => {
            // apt's own lines, and the recipe entries they name.
            let apt: Vec<&str> = log_text
                .lines()
                .filter(|l| {
                    l.starts_with("E:") || l.starts_with(' ') || l.contains(" : Depends:") || l.starts_with("W:")
                })
                .collect();
            let text = apt.join("\n");
            let mut culprits: Vec<String> = Vec::new();
            for d in &plan.local {
                if text.contains(&format!(" {} :", d.package)) || text.contains(&format!("{} :", d.package)) {
                    culprits.push(format!(
                        "{}: packages.local `{}` ({} {}): its dependencies cannot be installed",
                        d.entry.origin, d.entry.written, d.package, d.version
                    ));
                }
            }
            for p in &plan.packages {
                if text.contains(p.as_str()) {
                    culprits.push(format!("packages.include `{p}` (from a recipe repository)"));
                }
            }
            if culprits.is_empty() {
                culprits.push("see apt's words below".into());
            }
            let tail_text = if apt.is_empty() { tail(log_text.lines(), 15) } else { tail(apt.into_iter(), 15) };
            Some(LayerError::Packages { culprits: culprits.join("\n"), tail: tail_text, log })
        }
        "user" => {
            let u = plan.users.get(n)?;
            let what = match words.get(2).copied() {
                Some("group") => format!("group `{}` does not exist in the image; add the package that makes it, or leave it out of `groups`", unquote(words.get(3))),
                Some("uid") => format!("uid {} is already taken in the image: {}", words.get(3).unwrap_or(&"?"), "choose another `uid`, or leave it out for the next free one"),
                _ => format!("useradd failed:\n{}", tail(log_text.lines().filter(|l| !l.starts_with("kiln-")), 5)),
            };
            Some(LayerError::User { origin: u.origin.clone(), name: u.name.clone(), what, log })
        }
        "file" => {
            let f = plan.files.get(n)?;
            let what = match words.get(2).copied() {
                Some(kind @ ("user" | "group")) => format!(
                    "owner {kind} `{}` is not in the image's /etc/{}; is the package that creates it in [packages], or the user in [[users]]?",
                    unquote(words.get(3)),
                    if kind == "user" { "passwd" } else { "group" }
                ),
                _ => format!("could not be laid:\n{}", tail(log_text.lines().filter(|l| !l.starts_with("kiln-")), 5)),
            };
            Some(LayerError::File { origin: f.origin.clone(), path: f.path.clone(), what, log })
        }
        "step" => {
            let step = plan.steps.get(n.checked_sub(1)?)?;
            let prefix = format!("kiln-step {n}: ");
            let out = tail(log_text.lines().filter_map(|l| l.strip_prefix(prefix.as_str())), TAIL_LINES);
            Some(LayerError::Step {
                origin: step.origin.clone(),
                step: format!("step {n} ({})", step.describe()),
                status: words.get(2).unwrap_or(&"?").to_string(),
                tail: if out.is_empty() { "(no output)".into() } else { out },
                log,
            })
        }
        _ => None,
    }
}

/// Removes layers of the same outputs staged from other inputs: only `--offline` would look
/// at them, and it prefers the newest.
fn remove_older(dir: &Path, output_name: &str, keep: &str) {
    let prefix = format!("{output_name}-");
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&prefix) else { continue };
        // Only this recipe's own layers: `NAME-ARCH-` then a 16-digit key.
        let stem = rest.split('.').next().unwrap_or_default();
        if stem.len() == 16 && stem.bytes().all(|b| b.is_ascii_hexdigit()) && !name.starts_with(keep) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_splits_by_what_repositories_offer() {
        let repo = RepoState {
            name: "vendor".into(),
            suites: vec![],
            packages: [("vendor-agent".to_string(), BTreeSet::from(["2.1".to_string()]))].into(),
        };
        let (base, layer) =
            split_include(&["curl".into(), "vendor-agent=2.1".into(), "nginx".into()], std::slice::from_ref(&repo));
        assert_eq!(base, ["curl", "nginx"]);
        assert_eq!(layer, ["vendor-agent=2.1"]);
        let (base, layer) = split_include(&["curl".into()], &[]);
        assert_eq!((base.len(), layer.len()), (1, 0));
    }

    #[test]
    fn deleted_paths_are_absolute() {
        assert_eq!(
            split_paths(b"./usr/sbin/policy-rc.d\0.\0./etc/x\0"),
            vec![b"/usr/sbin/policy-rc.d".to_vec(), b"/etc/x".to_vec()]
        );
    }

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(sh("it's"), r"'it'\''s'");
        let out =
            Command::new("sh").arg("-c").arg(format!("printf %s {}", sh("a'b \"c\" $HOME `x`"))).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a'b \"c\" $HOME `x`");
    }

    #[test]
    fn a_failed_step_is_named_with_its_output() {
        let step = crate::recipe::Step { action: StepAction::Run("false".into()), origin: "r.toml:9:1".into() };
        let plan = LayerPlan {
            arch: Arch::X86_64,
            repos: vec![],
            local: vec![],
            packages: vec![],
            users: vec![],
            files: vec![],
            steps: vec![step],
            recipe_dir: "/r".into(),
            output_name: "x-x86_64".into(),
            digests: std::sync::Arc::new(crate::recipe::ReadEach),
        };
        let log = "kiln-phase step 1\nkiln-step 1: hello\nkiln-step 1: oops\nkiln-failed step 1 3\n";
        let e = failure(&plan, log, Path::new("/l")).unwrap().to_string();
        assert!(e.starts_with("r.toml:9:1: step 1 (`false`) failed with exit status 3"), "{e}");
        assert!(e.contains("hello\noops"), "{e}");
    }
}
