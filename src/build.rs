//! `kiln build` as one flat list of steps ([`build`]): staged base → root tree → service
//! layer → files and generated system files → audit → disk plan → one ordered write that
//! sparse-writes, hashes and digests blocks at once → checksum, SBOM and manifest. Each step
//! fails with its own [`BuildError`] variant; outputs appear at their final paths only when
//! complete. What may follow a build (boot, test, publish) is [`crate::pipeline`]'s.

// A build fails at most once, at the end of seconds of work: the size of its error (the
// service layer's carries apt's words and the tail of a step's output) costs nothing worth
// boxing each step's cause for.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::disk::{self, BootSetup, DiskIds, DiskSpec};
use crate::formats::ext4::{self, Ext4Options, SizeSpec};
use crate::formats::image::{BlockDigests, Offload, Sha256Sink, Sink, SparseFile, Tee};
use crate::formats::spdx::SbomPackage;
use crate::formats::tar::{read_tar, TarOptions};
use crate::formats::tpm;
use crate::formats::tree::{Content, Dir, Kind, Meta, OnExisting, Timestamp, Tree, TreeError};
use crate::manifest::{self, Manifest, EBS_BLOCK_SIZE, MANIFEST_VERSION};
use crate::progress::{Progress, Unit};
use crate::recipe::{Base, DiskSize, FileContent, FileEntry, FileKind, Network, Recipe};
use crate::stage::audit::Finding;
use crate::stage::debian::{self, DebianBase};
use crate::stage::layer::{LayerError, LayerPlan};
use crate::stage::system::{self, SystemConfig};

/// Size of the EFI system partition: room for two kernels and initrds plus systemd-boot.
pub const ESP_SIZE_BYTES: u64 = 256 << 20;

#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub out_dir: PathBuf,
    pub cache_dir: PathBuf,
    /// `--mirror`; the recipe's own mirror wins, the host's apt sources come last.
    pub mirror: Option<String>,
    /// `--apt-mirror`: the archive the image's own apt reads; the recipe's wins, the build
    /// mirror comes last.
    pub apt_mirror: Option<String>,
    /// SOURCE_DATE_EPOCH from the environment; wins over the recipe's.
    pub source_date_epoch: Option<i64>,
    /// `--offline`: the newest cached base, without reading the archive's state.
    pub offline: bool,
    /// `--cache-url`: staged bases shared with other runners, behind the local cache.
    pub cache_url: Option<crate::share::ShareUrl>,
    /// `--sign-key`: signs the provenance statement (PKCS#8 PEM, Ed25519 or ECDSA P-256).
    pub sign_key: Option<PathBuf>,
}

#[derive(Debug)]
pub struct BuildOutput {
    pub manifest_path: PathBuf,
    pub image_path: PathBuf,
    pub manifest: Manifest,
    pub base_cached: bool,
    /// Seconds since the base was staged (0 when this build staged it).
    pub base_age_secs: u64,
    /// Where the base came from and why it was reused or re-staged (None for a tarball base).
    pub base_origin: Option<debian::Origin>,
    pub seconds: f64,
}

/// Where staged bases and other reusable work live: `--cache-dir`, `KILN_CACHE_DIR`,
/// `$XDG_CACHE_HOME/kiln`, `~/.cache/kiln`.
pub fn default_cache_dir() -> PathBuf {
    crate::dirs::kiln_dir("KILN_CACHE_DIR", "XDG_CACHE_HOME", ".cache/kiln", "/var/cache/kiln")
}

/// Digests of recipe source files (a tarball base above all), kept in the cache so a rebuild
/// reads an unchanged tarball once, to assemble it, and not a second time to hash it.
pub fn digest_cache(cache_dir: &Path) -> crate::digest_cache::DigestCache {
    crate::digest_cache::DigestCache::at(cache_dir.join("digests"))
}

/// Seed for every identifier in the image (disk and partition GUIDs, filesystem UUIDs, hash
/// seeds). It depends on the recipe's name, OS and architecture only, so editing a file in
/// the recipe changes the blocks that hold that file and not every checksummed metadata block
/// (ext4's metadata_csum is seeded by the filesystem UUID): incremental uploads stay small.
pub fn image_seed(recipe: &Recipe) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"kiln-image-seed-v1\0");
    h.update(recipe.name.as_bytes());
    h.update([0]);
    h.update(recipe.arch.as_str().as_bytes());
    h.update([0]);
    if let Some(os) = &recipe.os {
        h.update(os.as_str().as_bytes());
    }
    h.finalize().into()
}

/// Why a build stopped, by the step that stopped it. Each step's message is the context the
/// user reads before the cause (`staging the Debian base: …`).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("base tarball {} does not exist", .0.display())]
    NoTarball(PathBuf),
    /// No mirror from the recipe, `--mirror` or the host's apt sources.
    #[error(transparent)]
    NoMirror(debian::StageError),
    #[error("staging the Debian base")]
    Stage(#[source] debian::StageError),
    #[error("the shared cache")]
    Share(#[source] Box<crate::share::ShareError>),
    #[error("reading the recipe's [[repositories]]")]
    Repositories(#[source] LayerError),
    #[error("--offline: the recipe repositories' state")]
    OfflineRepositories(#[source] LayerError),
    #[error("reading [packages].local")]
    LocalPackages(#[source] LayerError),
    #[error("staging the service layer")]
    Layer(#[source] LayerError),
    #[error("laying the service layer over the base")]
    LayerOverlay(#[source] LayerError),
    #[error("reading the root tree from {}", path.display())]
    ReadTree { path: PathBuf, source: crate::formats::tar::TarError },
    #[error("adding the recipe's [[files]]")]
    Files(#[source] FilesError),
    #[error("generating system files")]
    System(#[source] system::SystemError),
    #[error(
        "the image would carry what a golden image must not ({} finding{}):\n{}\nRemove it from the recipe; if the image must ship it on purpose, list the path under [audit] allow = [\"…\"] in the recipe",
        .0.len(),
        if .0.len() == 1 { "" } else { "s" },
        .0.iter().map(|f| format!("  {}: {}", f.path, f.what)).collect::<Vec<_>>().join("\n")
    )]
    Audit(Vec<Finding>),
    #[error("the Secure Boot keys")]
    Keys(#[source] crate::secure_boot::KeysError),
    #[error("the provenance signing key")]
    Provenance(#[source] crate::provenance::ProvenanceError),
    #[error("collecting the boot files for the ESP")]
    Esp(#[source] disk::DiskError),
    #[error("building GRUB's BIOS boot code")]
    Grub(#[source] crate::stage::grub::GrubStageError),
    #[error("planning the disk layout")]
    Plan(#[source] disk::DiskError),
    #[error("writing the image")]
    Write(#[source] disk::DiskError),
    /// The writer's block digests are not the manifest's checked kind: a bug, said as one.
    #[error("the image's block digests")]
    Digests(#[source] manifest::FieldError),
    #[error("{what} {}", path.display())]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Interrupted(#[from] crate::interrupt::Interrupted),
}

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BuildError + 'a {
    move |source| BuildError::Io { what, path: path.to_path_buf(), source }
}

/// `kiln build`, as its steps: stage the base (and read the service layer's inputs), read the
/// root tree, lay the service layer over it, add the recipe's files and the generated system
/// files, audit, plan the disk, write it in one ordered pass, then the records beside it.
pub fn build(recipe: &Recipe, opts: &BuildOptions, progress: &dyn Progress) -> Result<BuildOutput, BuildError> {
    let started = Instant::now();
    // A key that cannot sign stops the build before any work, not after it.
    let sign_key = opts
        .sign_key
        .as_deref()
        .map(crate::provenance::SigningKey::load)
        .transpose()
        .map_err(BuildError::Provenance)?;
    let base = stage_base(recipe, opts, progress)?;
    let mut tree = read_root(&base.tar, opts, progress)?;
    let epoch = build_epoch(recipe, opts, &tree);
    let layer = lay_service_layer(&base, epoch, opts, &mut tree, progress)?;
    let ids = DiskIds::derive(&image_seed(recipe));
    assemble_root(recipe, &base, &ids, epoch, &mut tree, progress)?;
    audit_root(recipe, &tree)?;
    let (packages, sbom_packages) = packages_of(&tree, base.layer_plan.as_ref());
    let outputs = crate::outputs::Outputs::new(&opts.out_dir, &recipe.output_name());
    let keys = match &recipe.secure_boot {
        Some(sb) => {
            let keys = crate::secure_boot::resolve(sb, &outputs.secure_boot_keys(), &recipe.output_name(), epoch.secs)
                .map_err(BuildError::Keys)?;
            if let Some(dir) = &keys.generated_in {
                progress
                    .note(&format!("Secure Boot keys (generated; keep them, the AMI trusts them): {}", dir.display()));
            }
            Some(keys)
        }
        None => None,
    };
    let (plan, secure_boot) = plan_disk(recipe, &ids, epoch, &tree, keys.as_ref())?;
    let image = write_image(&plan, &tree, &outputs, progress)?;
    let manifest = Manifest {
        manifest_version: MANIFEST_VERSION,
        kiln_version: env!("CARGO_PKG_VERSION").to_string(),
        name: recipe.output_name(),
        recipe: manifest::RecipeInfo { path: recipe.path.display().to_string(), sha256: recipe.sha256.clone() },
        os: recipe.os,
        arch: recipe.arch,
        boot: recipe.boot,
        source_date_epoch: epoch.secs,
        packages,
        base: base.info,
        layer,
        image: manifest::ImageInfo {
            file: outputs.image_file_name(),
            size_bytes: plan.size_bytes(),
            sha256: image.sha256,
        },
        disk: plan.disk_info(),
        blocks: image.blocks,
        ami: recipe.ami.clone().map(|a| crate::recipe::with_root_size(a, plan.size_bytes())),
        bundle: recipe.bundle.clone(),
        test: Some(test_settings(recipe, &tree)),
        test_result: None,
        secure_boot,
    };
    write_records(&outputs, &manifest, &sbom_packages, sign_key.as_ref())?;
    Ok(BuildOutput {
        manifest_path: outputs.manifest(),
        image_path: outputs.image(),
        manifest,
        base_cached: base.cached,
        base_age_secs: base.age_secs,
        base_origin: base.origin.clone(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The OS base as a root tarball, and what the later steps need to know of it.
struct StagedRoot {
    tar: PathBuf,
    cached: bool,
    /// None for a tarball base.
    info: Option<manifest::BaseInfo>,
    age_secs: u64,
    /// None for a tarball base.
    origin: Option<debian::Origin>,
    /// The image's own apt sources (a Debian base only).
    apt: Option<system::AptSources>,
    /// The service layer to stage on the base, read before it (a Debian base only).
    layer_plan: Option<LayerPlan>,
}

/// What step 1 stages, decided before anything is: the base and the service layer on it.
// Made once per build and moved whole into staging: boxing the large variant buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum BasePlan {
    /// The recipe's own root tarball.
    Tarball(PathBuf),
    Debian {
        base: DebianBase,
        /// The image's own apt sources.
        apt: system::AptSources,
        /// The service layer to stage on the base, read before it.
        layer: Option<LayerPlan>,
    },
}

/// Decides what the recipe's base is (mirrors, package list, service layer), reading the
/// recipe's repositories but staging nothing: what `kiln build` stages and `kiln plan` looks up.
pub fn plan_base(recipe: &Recipe, opts: &BuildOptions, progress: &dyn Progress) -> Result<BasePlan, BuildError> {
    let (suite, mirror, snapshot, components, apt_mirror, apt_security_mirror) = match &recipe.base {
        Base::Tarball(path) => {
            if !path.is_file() {
                return Err(BuildError::NoTarball(path.clone()));
            }
            return Ok(BasePlan::Tarball(path.clone()));
        }
        Base::Debian { suite, mirror, snapshot, components, apt_mirror, apt_security_mirror } => {
            (suite, mirror, snapshot, components, apt_mirror, apt_security_mirror)
        }
    };
    let mirror = mirror
        .clone()
        .or_else(|| opts.mirror.clone())
        .or_else(debian::host_mirror)
        .ok_or(BuildError::NoMirror(debian::StageError::NoMirror))?;
    // The service layer is read first (cheap): a repository that does not verify stops the
    // build before anything is staged, and what the repositories offer is kept out of
    // Debian's base.
    let (include, layer) = plan_layer(recipe, opts, progress)?;
    let host_security = debian::host_security_mirror();
    let apt = system::AptSources {
        suite: suite.clone(),
        mirror: apt_mirror.clone().or_else(|| opts.apt_mirror.clone()).unwrap_or_else(|| mirror.clone()),
        security_mirror: apt_security_mirror.clone().or_else(|| host_security.clone()),
        components: components.clone(),
    };
    let base = DebianBase {
        suite: suite.clone(),
        arch: recipe.arch,
        mirror,
        // A snapshot pins the whole base; the host's security archive is not pinned.
        security_mirror: if snapshot.is_some() { None } else { host_security },
        components: components.clone(),
        packages: base_packages(recipe, include),
        source_date_epoch: opts.source_date_epoch.or(recipe.source_date_epoch),
        snapshot: snapshot.is_some(),
    };
    Ok(BasePlan::Debian { base, apt, layer })
}

/// The shared cache of staged bases `--cache-url` names, when there is one to use.
pub fn shared_bases(opts: &BuildOptions) -> Result<Option<crate::share::bases::SharedCache>, BuildError> {
    match &opts.cache_url {
        Some(url) if !opts.offline => Ok(Some(
            crate::share::bases::SharedCache::connect(url.clone()).map_err(|e| BuildError::Share(Box::new(e)))?,
        )),
        _ => Ok(None),
    }
}

/// Step 1: the OS base, as a tarball (cached when kiln staged it), and the plan of the service
/// layer staged on top of it.
fn stage_base(recipe: &Recipe, opts: &BuildOptions, progress: &dyn Progress) -> Result<StagedRoot, BuildError> {
    let (base, apt, layer_plan) = match plan_base(recipe, opts, progress)? {
        BasePlan::Tarball(tar) => {
            return Ok(StagedRoot {
                tar,
                cached: true,
                info: None,
                age_secs: 0,
                origin: None,
                apt: None,
                layer_plan: None,
            })
        }
        BasePlan::Debian { base, apt, layer } => (base, apt, layer),
    };
    let freshness = if opts.offline { debian::Freshness::Offline } else { debian::Freshness::Online };
    let shared = shared_bases(opts)?;
    let shared = shared.as_ref().map(|s| s as &dyn debian::SharedBases);
    let stage_opts = debian::StageOptions {
        freshness,
        cache_dir: &opts.cache_dir,
        shared,
        // A layer's packages resolve against the base's package lists (see StageOptions).
        reuse_resolved: layer_plan.is_none(),
    };
    let staged = debian::stage(&base, stage_opts, progress).map_err(BuildError::Stage)?;
    if opts.offline {
        progress.note(&format!(
            "offline: the base was staged {} ({} ago) from the archive as of {}; newer packages may exist",
            staged.info.staged_at,
            human_age(staged.age_secs),
            staged.info.archive.iter().map(|s| format!("{} {}", s.suite, s.date)).collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(StagedRoot {
        tar: staged.tar,
        cached: staged.cached,
        info: Some(staged.info),
        age_secs: staged.age_secs,
        origin: Some(staged.origin),
        apt: Some(apt),
        layer_plan,
    })
}

/// What mmdebstrap installs in the base: the architecture's boot essentials, the recipe's
/// packages that Debian offers, and what kiln's generated files rely on.
fn base_packages(recipe: &Recipe, include: Vec<String>) -> Vec<String> {
    let mut packages: Vec<String> = recipe.arch.required_packages().into_iter().map(String::from).collect();
    packages.extend(include);
    // growpart, for kiln-growroot.service: the root fills whatever volume it gets.
    packages.push("cloud-guest-utils".into());
    if recipe.system.network == Network::Dhcp {
        // The resolver the network hands out (Debian 12 split it from systemd).
        packages.push("systemd-resolved".into());
    }
    if recipe.boot.has_bios() {
        // GRUB's BIOS modules, from which kiln builds core.img (no grub-install runs).
        packages.push("grub-pc-bin".into());
    }
    if let (Some(_), Some(os)) = (&recipe.secure_boot, recipe.os) {
        // The unified kernel image measures itself into the TPM (NitroTPM), and systemd then
        // measures the boot phases too, through these libraries.
        packages.extend(os.tpm2_libraries().iter().map(|p| p.to_string()));
    }
    packages.sort();
    packages.dedup();
    packages
}

/// Step 2: the root tree, straight from the tarball (contents stay in it, by reference).
fn read_root(tar: &Path, opts: &BuildOptions, progress: &dyn Progress) -> Result<Tree, BuildError> {
    progress.begin("reading root tree", None, Unit::Items);
    let spool = spool_dir(opts);
    std::fs::create_dir_all(&spool).map_err(io_error("creating", &spool))?;
    let tree = read_tar(tar, &TarOptions { spool_dir: Some(spool) })
        .map_err(|source| BuildError::ReadTree { path: tar.to_path_buf(), source })?;
    progress.end(&format!("{} inodes", tree.live_inodes().count()));
    Ok(tree)
}

fn spool_dir(opts: &BuildOptions) -> PathBuf {
    opts.cache_dir.join("spool")
}

/// Every timestamp is clamped to one epoch: the caller's SOURCE_DATE_EPOCH, the recipe's, or
/// else the newest time the installed packages carry (see [`packaged_epoch`]), so two runners
/// that stage the same packages a minute apart build the same bytes; a tree with no package
/// documentation (a foreign tarball) falls back to the newest time in it.
fn build_epoch(recipe: &Recipe, opts: &BuildOptions, tree: &Tree) -> Timestamp {
    let secs = opts
        .source_date_epoch
        .or(recipe.source_date_epoch)
        .or_else(|| packaged_epoch(tree))
        .unwrap_or_else(|| tree.live_inodes().map(|(_, i)| i.meta.mtime.secs).max().unwrap_or(0));
    Timestamp::new(secs, 0)
}

/// The newest modification time of the files under /usr/share/doc. dpkg unpacks every file
/// with the time its package's archive gives it (the package's own build date, its changelog's
/// under reproducible builds), and Debian policy has every package ship its changelog there,
/// so this is the date of the newest package installed: the same package set gives the same
/// epoch. Files made while staging (dpkg's database, maintainer scripts' output, caches)
/// carry the staging time and are left out by looking only here.
fn packaged_epoch(tree: &Tree) -> Option<i64> {
    let doc = tree.resolve(b"/usr/share/doc").ok()?;
    let mut newest = None;
    let mut todo = vec![doc];
    while let Some(id) = todo.pop() {
        match &tree.inode(id).kind {
            Kind::Dir(d) => todo.extend(d.entries.values().copied()),
            Kind::File(_) => newest = newest.max(Some(tree.inode(id).meta.mtime.secs)),
            _ => {}
        }
    }
    newest
}

/// Step 3: the service layer, staged on the base (cached by every input, the base's key
/// included) and laid over its tree.
fn lay_service_layer(
    base: &StagedRoot,
    epoch: Timestamp,
    opts: &BuildOptions,
    tree: &mut Tree,
    progress: &dyn Progress,
) -> Result<Option<manifest::LayerInfo>, BuildError> {
    let (Some(plan), Some(info)) = (&base.layer_plan, &base.info) else { return Ok(None) };
    let staged = crate::stage::layer::stage(plan, &base.tar, &info.cache_key, epoch.secs, &opts.cache_dir, progress)
        .map_err(BuildError::Layer)?;
    if staged.cached {
        progress.note("service layer: unchanged inputs, reused from the cache");
    }
    staged.apply(tree, &TarOptions { spool_dir: Some(spool_dir(opts)) }).map_err(BuildError::LayerOverlay)?;
    Ok(Some(manifest::LayerInfo { cache_key: staged.cache_key.clone(), repositories: plan.repository_states() }))
}

/// The root file system's options: identifiers from the image's seed, times from the epoch.
fn root_fs_options(ids: &DiskIds, epoch: Timestamp) -> Ext4Options {
    let mut root_opts = Ext4Options::with_seed(&ids.root_fs_seed);
    root_opts.label = "root".into();
    root_opts.timestamp = epoch.secs;
    root_opts
}

/// Step 4: the build host's traces out, the recipe's files and the generated system files in,
/// every time clamped to the epoch.
fn assemble_root(
    recipe: &Recipe,
    base: &StagedRoot,
    ids: &DiskIds,
    epoch: Timestamp,
    tree: &mut Tree,
    progress: &dyn Progress,
) -> Result<(), BuildError> {
    let generalized = crate::stage::generalize::generalize(tree);
    progress.note(&format!("generalized: removed {} build-host and per-machine files", generalized.len()));
    // With steps, the files were laid in the layer, before the steps that may read them.
    if !base.layer_plan.as_ref().is_some_and(|p| p.holds_files()) {
        apply_files(tree, &recipe.files, epoch).map_err(BuildError::Files)?;
    }
    let sys = SystemConfig {
        hostname: recipe.system.hostname.clone(),
        services_enable: recipe.system.services_enable.clone(),
        services_disable: recipe.system.services_disable.clone(),
        root_fs_uuid: ext4::uuid_string(&root_fs_options(ids, epoch).uuid),
        esp_mount: recipe.system.mount_esp.clone().map(|m| (ids.esp_fs_uuid(), m)),
        time: epoch,
        timezone: recipe.system.timezone.clone(),
        locale: recipe.system.locale.clone(),
        dhcp: recipe.system.network == Network::Dhcp,
        apt: base.apt.clone(),
    };
    for note in system::configure(tree, &sys).map_err(BuildError::System)? {
        progress.note(&note);
    }
    tree.clamp_times(epoch);
    Ok(())
}

/// Step 5: nothing a golden image must not carry, unless the recipe allows it by path.
fn audit_root(recipe: &Recipe, tree: &Tree) -> Result<(), BuildError> {
    let allow: std::collections::BTreeSet<String> = recipe.audit_allow.iter().cloned().collect();
    let findings = crate::stage::audit::audit(tree, &allow);
    if findings.is_empty() {
        Ok(())
    } else {
        Err(BuildError::Audit(findings))
    }
}

/// The packages in the image (dpkg's status), each with its origin when not Debian, for the
/// manifest and for the SBOM.
fn packages_of(tree: &Tree, layer: Option<&LayerPlan>) -> (Vec<manifest::Package>, Vec<SbomPackage>) {
    let mut packages = debian::installed_packages(tree);
    let mut sbom_packages = debian::sbom_packages(tree);
    if let Some(plan) = layer {
        plan.mark_origins(&mut packages);
        for s in &mut sbom_packages {
            s.origin = packages.iter().find(|p| p.name == s.name).and_then(|p| p.origin.clone());
        }
    }
    (packages, sbom_packages)
}

/// Step 6: the ESP's contents (signed, with `[secure_boot]`) and the whole disk's layout;
/// nothing is written before the layout is known.
fn plan_disk(
    recipe: &Recipe,
    ids: &DiskIds,
    epoch: Timestamp,
    tree: &Tree,
    keys: Option<&crate::secure_boot::Keys>,
) -> Result<(disk::DiskPlan, Option<manifest::SecureBootInfo>), BuildError> {
    let boot = BootSetup { arch: recipe.arch, mode: recipe.boot, cmdline: recipe.system.kernel_cmdline.clone() };
    let (esp, secure_boot) = match keys {
        None => (disk::esp_files(tree, ids, &boot).map_err(BuildError::Esp)?, None),
        Some(k) => {
            let (files, signed) = disk::signed_esp_files(tree, ids, &boot, &k.signer).map_err(BuildError::Esp)?;
            (files, Some(secure_boot_info(k, signed)))
        }
    };
    let mut root_opts = root_fs_options(ids, epoch);
    root_opts.size = match recipe.size {
        DiskSize::Bytes(_) => SizeSpec::Auto { headroom_percent: 0, min_free_bytes: 0 },
        DiskSize::Auto => SizeSpec::Auto { headroom_percent: 20, min_free_bytes: 256 << 20 },
    };
    // GRUB's BIOS half, from the image's own grub-pc-bin modules.
    let bios_boot = if boot.mode.has_bios() && boot.arch == crate::platform::Arch::X86_64 {
        Some(crate::stage::grub::build_bios_boot(tree, &ids.esp_fs_uuid()).map_err(BuildError::Grub)?)
    } else {
        None
    };
    let spec = DiskSpec {
        size: match recipe.size {
            DiskSize::Bytes(b) => Some(b),
            DiskSize::Auto => None,
        },
        esp_size_bytes: ESP_SIZE_BYTES,
        timestamp: epoch.secs,
        bios_boot,
        boot,
    };
    let plan = disk::plan(&spec, ids, &esp, tree, root_opts).map_err(BuildError::Plan)?;
    Ok((plan, secure_boot))
}

/// What the manifest records of a Secure Boot image: the AMI's variable store, the keys by
/// digest, and the signed boot chain.
fn secure_boot_info(keys: &crate::secure_boot::Keys, signed: disk::SignedBoot) -> manifest::SecureBootInfo {
    let digest = |der: &[u8]| hex::encode(Sha256::digest(der));
    let k = &keys.keys;
    manifest::SecureBootInfo {
        uefi_data: crate::formats::efi_vars::encode_aws(&k.variables()),
        pk: digest(&k.pk),
        kek: k.kek.iter().map(|c| digest(c)).collect(),
        db: k.db.iter().map(|c| digest(c)).collect(),
        dbx: k.dbx.as_deref().map(digest),
        signed_by: digest(&k.db[keys.signer_index]),
        // What EDK2 firmware (EC2's, OVMF) measures booting this chain from the root volume.
        pcrs: [
            (4, hex::encode(tpm::pcr4(&[signed.loader_digest, signed.uki_digest]))),
            (7, hex::encode(tpm::pcr7(k, &k.db[keys.signer_index]))),
        ]
        .into(),
        loader: manifest::SignedFile {
            path: signed.loader_path,
            authenticode_sha256: hex::encode(signed.loader_digest),
        },
        uki: manifest::SignedFile { path: signed.uki_path, authenticode_sha256: hex::encode(signed.uki_digest) },
        cmdline: signed.cmdline,
    }
}

/// What the one ordered write learnt of the image.
struct WrittenImage {
    sha256: String,
    blocks: manifest::BlockMap,
}

/// Step 7: one ordered pass that sparse-writes the image, hashes it and digests its EBS blocks.
/// The image takes its final name only when complete, after the old checksum and manifest are
/// gone, so no manifest ever describes another image.
fn write_image(
    plan: &disk::DiskPlan,
    tree: &Tree,
    outputs: &crate::outputs::Outputs,
    progress: &dyn Progress,
) -> Result<WrittenImage, BuildError> {
    let out_dir = outputs.dir();
    std::fs::create_dir_all(out_dir).map_err(io_error("creating", out_dir))?;
    let image_path = outputs.image();
    let size = plan.size_bytes();
    progress.begin("writing image", Some(size), Unit::Bytes);
    // Temporary files a killed build left here (SIGKILL gives no chance to clean up).
    for p in outputs.build_files() {
        crate::formats::atomic::remove_stale(&p).map_err(io_error("cleaning up beside", &p))?;
    }
    let mut file = SparseFile::create(&image_path).map_err(io_error("creating", &image_path))?;
    // The whole-image SHA-256 is the longest single job (it hashes the zeros too, about 1.5 s
    // per 2 GiB with SHA instructions), so it gets the second core to itself; this one plans,
    // writes and digests the 512 KiB blocks that hold data. Both see the same ordered stream.
    let mut whole =
        Offload::spawn(Sha256Sink::new()).map_err(io_error("starting the digest thread for", &image_path))?;
    let mut blocks = BlockDigests::new(EBS_BLOCK_SIZE);
    {
        let sinks = Tee(vec![&mut whole as &mut dyn Sink, &mut file, &mut blocks]);
        let mut counted = Counted { inner: sinks, progress, at: 0 };
        disk::write(plan, tree, &mut counted).map_err(BuildError::Write)?;
    }
    // Writeback runs while the second core finishes the SHA-256.
    file.start_writeback().map_err(io_error("writing", &image_path))?;
    let sha256 = whole.join().map_err(io_error("hashing", &image_path))?.hex();
    let blocks: manifest::BlockMap = blocks.into_block_map().try_into().map_err(BuildError::Digests)?;
    // The last moment to stop with nothing published; from here the outputs are written out.
    crate::interrupt::check()?;
    // A manifest or checksum must never describe another image: the old ones go before the
    // new image takes the name, and the new manifest comes last. A reader that finds a
    // manifest finds its image; a crash in between leaves an image without a manifest.
    for old in [outputs.manifest(), outputs.checksum(), outputs.provenance()] {
        match std::fs::remove_file(&old) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_error("replacing", &old)(e)),
            _ => {}
        }
    }
    file.persist().map_err(io_error("finishing", &image_path))?;
    progress.end(&format!("{} ({} data blocks of 512 KiB)", human_bytes(size), blocks.data_blocks.len()));
    Ok(WrittenImage { sha256, blocks })
}

/// Step 8: the checksum file, the SBOM, the provenance statement and the manifest, each written
/// whole then renamed into place; the manifest last, so a reader that finds it finds everything
/// it names.
fn write_records(
    outputs: &crate::outputs::Outputs,
    manifest: &Manifest,
    sbom_packages: &[SbomPackage],
    sign_key: Option<&crate::provenance::SigningKey>,
) -> Result<(), BuildError> {
    let sha256 = &manifest.image.sha256;
    write_output(&outputs.checksum(), format!("{sha256}  {}\n", outputs.image_file_name()).as_bytes())?;
    // The SBOM, beside the manifest: the image by SHA-256 and every package in it.
    let sbom = crate::formats::spdx::document(
        &crate::formats::spdx::SbomImage {
            name: manifest.name.clone(),
            sha256: sha256.clone(),
            distro: manifest.os_name().to_string(),
            created_unix: manifest.source_date_epoch,
            tool: format!("kiln-{}", env!("CARGO_PKG_VERSION")),
        },
        sbom_packages,
    );
    write_output(&outputs.sbom(), sbom.as_bytes())?;
    // Who built the image from what: an in-toto statement, signed when there is a key.
    write_output(&outputs.provenance(), crate::provenance::envelope_line(manifest, sign_key).as_bytes())?;
    write_output(&outputs.manifest(), manifest.to_json().as_bytes())
}

fn write_output(path: &Path, bytes: &[u8]) -> Result<(), BuildError> {
    crate::formats::atomic::write(path, bytes).map_err(io_error("writing", path))
}

/// The service layer's plan, read before the base is staged: repositories verified and listed
/// (or, `--offline`, as the newest cached layer saw them), local packages read, and the
/// recipe's `include` split into what Debian's base installs and what only a recipe repository
/// offers. Returns the base's part of `include` and the plan (None without a service layer).
fn plan_layer(
    recipe: &Recipe,
    opts: &BuildOptions,
    progress: &dyn Progress,
) -> Result<(Vec<String>, Option<LayerPlan>), BuildError> {
    use crate::stage::layer;
    if recipe.service.is_empty() {
        return Ok((recipe.packages.clone(), None));
    }
    let repos = if recipe.service.repositories.is_empty() {
        Vec::new()
    } else if opts.offline {
        layer::offline_repos(&opts.cache_dir, &recipe.output_name()).map_err(BuildError::OfflineRepositories)?
    } else {
        progress.note(&format!("reading the recipe's repositories ({})", recipe.service.repositories.len()));
        layer::probe_repositories(&recipe.service.repositories, recipe.arch).map_err(BuildError::Repositories)?
    };
    let local = layer::inspect_local(&recipe.service.local, recipe.arch, recipe.digests())
        .map_err(BuildError::LocalPackages)?;
    let (base_include, layer_include) = layer::split_include(&recipe.packages, &repos);
    let recipe_dir = std::fs::canonicalize(&recipe.path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    let plan = LayerPlan::new(recipe, repos, local, layer_include, recipe_dir);
    Ok((base_include, plan))
}

/// How `kiln test` will log in: the recipe's user, else cloud-init's default user as the
/// image configures it, else root.
fn test_settings(recipe: &Recipe, tree: &Tree) -> manifest::TestSettings {
    let cloud_init = tree.resolve(b"/usr/bin/cloud-init").is_ok();
    let user = recipe
        .test
        .user
        .clone()
        .or_else(|| cloud_init.then(|| system::cloud_init_default_user(tree)).flatten())
        .unwrap_or_else(|| "root".into());
    manifest::TestSettings {
        user,
        commands: recipe.test.commands.clone(),
        esp_mount: recipe.system.mount_esp.clone(),
        cloud_init,
    }
}

/// Why a recipe's `[[files]]` entry could not be laid in the tree.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("{origin}: creating the parents of {path}")]
    Parents { origin: String, path: String, source: TreeError },
    #[error(transparent)]
    Owner(#[from] crate::recipe::OwnerError),
    #[error("{what} {} for {path}", source_path.display())]
    Source { what: &'static str, source_path: PathBuf, path: String, source: std::io::Error },
    #[error("{origin}: adding {path}")]
    Insert { origin: String, path: String, source: TreeError },
}

/// Lays the recipe's `[[files]]` over the tree, in recipe order (a later entry wins). Owners
/// given by name are looked up in the image's own /etc/passwd and /etc/group.
pub fn apply_files(tree: &mut Tree, files: &[FileEntry], time: Timestamp) -> Result<(), FilesError> {
    let parent_meta = Meta::new(0o755, 0, 0, time);
    // Owners given by name (not root, not a number) mean what the image's own user database
    // says: package maintainer scripts allocate system users dynamically.
    let (passwd, group) = system::user_db(tree);
    for f in files {
        let path = f.path.as_bytes();
        tree.create_parents(path, &parent_meta).map_err(|source| FilesError::Parents {
            origin: f.origin.clone(),
            path: f.path.clone(),
            source,
        })?;
        let (uid, gid) = f.resolve_owner(&passwd, &group)?;
        let meta = Meta::new(f.mode, uid, gid, time);
        let kind = match &f.kind {
            FileKind::Dir => Kind::Dir(Dir::default()),
            FileKind::Symlink { target } => Kind::Symlink(target.as_bytes().to_vec()),
            FileKind::File { content: FileContent::Inline(bytes) } => {
                Kind::File(Content::inline(Arc::<[u8]>::from(bytes.as_slice())))
            }
            FileKind::File { content: FileContent::Source(src) } => {
                let failed = |what| {
                    let path = f.path.clone();
                    move |source| FilesError::Source { what, source_path: src.clone(), path, source }
                };
                let len = std::fs::metadata(src).map_err(failed("reading"))?.len();
                let id = tree.add_source(src).map_err(failed("opening"))?;
                Kind::File(Content::from_source(id, 0, len))
            }
        };
        tree.insert(path, kind, meta, OnExisting::Replace).map_err(|source| FilesError::Insert {
            origin: f.origin.clone(),
            path: f.path.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Passes the stream on and reports progress by offset reached.
struct Counted<'a, S> {
    inner: S,
    progress: &'a dyn Progress,
    at: u64,
}

impl<S: Sink> Sink for Counted<'_, S> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        // A stop request ends the write; the temporary image is removed as it is dropped.
        crate::interrupt::check().map_err(|stop| std::io::Error::new(std::io::ErrorKind::Interrupted, stop))?;
        self.inner.write_at(offset, data)?;
        let end = offset + data.len() as u64;
        if end > self.at {
            self.progress.advance(end - self.at);
            self.at = end;
        }
        Ok(())
    }
    fn finish(&mut self, len: u64) -> std::io::Result<()> {
        self.inner.finish(len)?;
        if len > self.at {
            self.progress.advance(len - self.at);
            self.at = len;
        }
        Ok(())
    }
}

/// `3 days`, `5 hours`, `12 minutes`: how old a cached base is.
pub fn human_age(secs: u64) -> String {
    let (n, unit) = match secs {
        s if s >= 2 * 86_400 => (s / 86_400, "days"),
        s if s >= 2 * 3_600 => (s / 3_600, "hours"),
        s if s >= 120 => (s / 60, "minutes"),
        s => (s, "seconds"),
    };
    format!("{n} {unit}")
}

pub fn human_bytes(n: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let f = n as f64;
    if f >= GIB {
        format!("{:.2} GiB", f / GIB)
    } else {
        format!("{:.1} MiB", f / MIB)
    }
}
