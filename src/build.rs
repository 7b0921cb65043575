//! `kiln build` as one flat list of steps: recipe → staged base → root tree → generated files
//! → ESP → disk plan → one ordered write that sparse-writes, hashes and digests blocks at once
//! → manifest. Each step adds its own context to errors; outputs appear at their final paths
//! only when complete.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::disk::{self, BootSetup, DiskIds, DiskSpec};
use crate::formats::ext4::{self, Ext4Options, SizeSpec};
use crate::formats::image::{BlockDigests, Offload, Sha256Sink, Sink, SparseFile, Tee};
use crate::formats::tar::{read_tar, TarOptions};
use crate::formats::tree::{Content, Dir, Kind, Meta, OnExisting, Timestamp, Tree};
use crate::manifest::{self, Manifest, EBS_BLOCK_SIZE, MANIFEST_VERSION};
use crate::progress::{Progress, Unit};
use crate::recipe::{Base, DiskSize, FileContent, FileEntry, FileKind, Network, Recipe};
use crate::stage::debian::{self, DebianBase};
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
}

#[derive(Debug)]
pub struct BuildOutput {
    pub manifest_path: PathBuf,
    pub image_path: PathBuf,
    pub manifest: Manifest,
    pub base_cached: bool,
    /// Seconds since the base was staged (0 when this build staged it).
    pub base_age_secs: u64,
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

pub fn build(recipe: &Recipe, opts: &BuildOptions, progress: &dyn Progress) -> Result<BuildOutput> {
    let started = Instant::now();
    let name = recipe.output_name();

    // 1. The OS base, as a tarball (cached when kiln staged it), and the plan of the service
    //    layer staged on top of it.
    let mut apt = None;
    let mut base_info = None;
    let mut base_age_secs = 0;
    let mut layer_plan = None;
    let (base_tar, base_cached) = match &recipe.base {
        Base::Tarball(path) => {
            if !path.is_file() {
                bail!("base tarball {} does not exist", path.display());
            }
            (path.clone(), true)
        }
        Base::Debian { suite, mirror, snapshot, components, apt_mirror, apt_security_mirror } => {
            let mirror = mirror
                .clone()
                .or_else(|| opts.mirror.clone())
                .or_else(debian::host_mirror)
                .ok_or(debian::StageError::NoMirror)?;
            // The service layer is read first (cheap): a repository that does not verify stops
            // the build before anything is staged, and what the repositories offer is kept out
            // of Debian's base.
            let (include, plan) = plan_layer(recipe, opts, progress)?;
            layer_plan = plan;
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
            packages.sort();
            packages.dedup();
            let host_security = debian::host_security_mirror();
            apt = Some(system::AptSources {
                suite: suite.clone(),
                mirror: apt_mirror.clone().or_else(|| opts.apt_mirror.clone()).unwrap_or_else(|| mirror.clone()),
                security_mirror: apt_security_mirror.clone().or_else(|| host_security.clone()),
                components: components.clone(),
            });
            let base = DebianBase {
                suite: suite.clone(),
                arch: recipe.arch,
                mirror,
                // A snapshot pins the whole base; the host's security archive is not pinned.
                security_mirror: if snapshot.is_some() { None } else { host_security },
                components: components.clone(),
                packages,
                source_date_epoch: opts.source_date_epoch.or(recipe.source_date_epoch),
                snapshot: snapshot.is_some(),
            };
            let freshness = if opts.offline { debian::Freshness::Offline } else { debian::Freshness::Online };
            let staged =
                debian::stage(&base, freshness, &opts.cache_dir, progress).context("staging the Debian base")?;
            if opts.offline {
                progress.note(&format!(
                    "offline: the base was staged {} ({} ago) from the archive as of {}; newer packages may exist",
                    staged.info.staged_at,
                    human_age(staged.age_secs),
                    staged
                        .info
                        .archive
                        .iter()
                        .map(|s| format!("{} {}", s.suite, s.date))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            base_age_secs = staged.age_secs;
            base_info = Some(staged.info);
            (staged.tar, staged.cached)
        }
    };

    // 2. The root tree, straight from the tarball (contents stay in it, by reference).
    progress.begin("reading root tree", None, Unit::Items);
    let spool = opts.cache_dir.join("spool");
    std::fs::create_dir_all(&spool).with_context(|| format!("creating {}", spool.display()))?;
    let mut tree = read_tar(&base_tar, &TarOptions { spool_dir: Some(spool) })
        .with_context(|| format!("reading the root tree from {}", base_tar.display()))?;
    progress.end(&format!("{} inodes", tree.live_inodes().count()));

    // Every timestamp is clamped to one epoch: the caller's SOURCE_DATE_EPOCH, the recipe's,
    // or else the newest time already in the base (deterministic for a given base).
    let epoch_secs = opts
        .source_date_epoch
        .or(recipe.source_date_epoch)
        .unwrap_or_else(|| tree.live_inodes().map(|(_, i)| i.meta.mtime.secs).max().unwrap_or(0));
    let epoch = Timestamp::new(epoch_secs, 0);

    // The service layer, staged on the base (cached by every input, the base's key included)
    // and laid over its tree.
    let mut layer_info = None;
    if let (Some(plan), Some(info)) = (&layer_plan, &base_info) {
        let staged =
            crate::stage::layer::stage(plan, &base_tar, &info.cache_key, epoch_secs, &opts.cache_dir, progress)
                .context("staging the service layer")?;
        if staged.cached {
            progress.note("service layer: unchanged inputs, reused from the cache");
        }
        staged
            .apply(&mut tree, &TarOptions { spool_dir: Some(opts.cache_dir.join("spool")) })
            .context("laying the service layer over the base")?;
        layer_info =
            Some(manifest::LayerInfo { cache_key: staged.cache_key.clone(), repositories: plan.repository_states() });
    }

    // 3. Identifiers, then the recipe's files and the generated system files.
    let seed = image_seed(recipe);
    let ids = DiskIds::derive(&seed);
    let mut root_opts = Ext4Options::with_seed(&ids.root_fs_seed);
    root_opts.label = "root".into();
    root_opts.timestamp = epoch_secs;
    let generalized = crate::stage::generalize::generalize(&mut tree);
    progress.note(&format!("generalized: removed {} build-host and per-machine files", generalized.len()));
    // With steps, the files were laid in the layer, before the steps that may read them.
    if !layer_plan.as_ref().is_some_and(|p| p.holds_files()) {
        apply_files(&mut tree, &recipe.files, epoch).context("adding the recipe's [[files]]")?;
    }
    let sys = SystemConfig {
        hostname: recipe.system.hostname.clone(),
        services_enable: recipe.system.services_enable.clone(),
        services_disable: recipe.system.services_disable.clone(),
        root_fs_uuid: ext4::uuid_string(&root_opts.uuid),
        esp_mount: recipe.system.mount_esp.clone().map(|m| (ids.esp_fs_uuid(), m)),
        time: epoch,
        timezone: recipe.system.timezone.clone(),
        locale: recipe.system.locale.clone(),
        dhcp: recipe.system.network == Network::Dhcp,
        apt,
    };
    for note in system::configure(&mut tree, &sys).context("generating system files")? {
        progress.note(&note);
    }
    tree.clamp_times(epoch);
    let allow: std::collections::BTreeSet<String> = recipe.audit_allow.iter().cloned().collect();
    let findings = crate::stage::audit::audit(&tree, &allow);
    if !findings.is_empty() {
        let list: Vec<String> = findings.iter().map(|f| format!("  {}: {}", f.path, f.what)).collect();
        bail!(
            "the image would carry what a golden image must not ({} finding{}):\n{}\nRemove it from the recipe; if the image must ship it on purpose, list the path under [audit] allow = [\"…\"] in the recipe",
            findings.len(),
            if findings.len() == 1 { "" } else { "s" },
            list.join("\n")
        );
    }
    let mut packages = debian::installed_packages(&tree);
    let mut sbom_packages = debian::sbom_packages(&tree);
    if let Some(plan) = &layer_plan {
        plan.mark_origins(&mut packages);
        for s in &mut sbom_packages {
            s.origin = packages.iter().find(|p| p.name == s.name).and_then(|p| p.origin.clone());
        }
    }

    // 4. ESP contents and the disk plan; nothing is written before the whole layout is known.
    let boot = BootSetup { arch: recipe.arch, mode: recipe.boot, cmdline: recipe.system.kernel_cmdline.clone() };
    let esp = disk::esp_files(&tree, &ids, &boot).context("collecting the boot files for the ESP")?;
    root_opts.size = match recipe.size {
        DiskSize::Bytes(_) => SizeSpec::Auto { headroom_percent: 0, min_free_bytes: 0 },
        DiskSize::Auto => SizeSpec::Auto { headroom_percent: 20, min_free_bytes: 256 << 20 },
    };
    let spec = DiskSpec {
        size: match recipe.size {
            DiskSize::Bytes(b) => Some(b),
            DiskSize::Auto => None,
        },
        esp_size_bytes: ESP_SIZE_BYTES,
        timestamp: epoch_secs,
        // GRUB's BIOS half, from the image's own grub-pc-bin modules.
        bios_boot: if boot.mode.has_bios() && boot.arch == crate::platform::Arch::X86_64 {
            Some(
                crate::stage::grub::build_bios_boot(&tree, &ids.esp_fs_uuid())
                    .context("building GRUB's BIOS boot code")?,
            )
        } else {
            None
        },
        boot,
    };
    let plan = disk::plan(&spec, &ids, &esp, &tree, root_opts).context("planning the disk layout")?;

    // 5. One ordered pass: sparse file + SHA-256 + per-block digests.
    std::fs::create_dir_all(&opts.out_dir).with_context(|| format!("creating {}", opts.out_dir.display()))?;
    let outputs = crate::outputs::Outputs::new(&opts.out_dir, &name);
    let image_path = outputs.image();
    let size = plan.size_bytes();
    progress.begin("writing image", Some(size), Unit::Bytes);
    // Temporary files a killed build left here (SIGKILL gives no chance to clean up).
    for p in outputs.build_files() {
        crate::formats::atomic::remove_stale(&p).with_context(|| format!("cleaning up beside {}", p.display()))?;
    }
    let mut file = SparseFile::create(&image_path).with_context(|| format!("creating {}", image_path.display()))?;
    // The whole-image SHA-256 is the longest single job (it hashes the zeros too, about 1.5 s
    // per 2 GiB with SHA instructions), so it gets the second core to itself; this one plans,
    // writes and digests the 512 KiB blocks that hold data. Both see the same ordered stream.
    let mut whole = Offload::spawn(Sha256Sink::new()).context("starting the digest thread")?;
    let mut blocks = BlockDigests::new(EBS_BLOCK_SIZE);
    {
        let sinks = Tee(vec![&mut whole as &mut dyn Sink, &mut file, &mut blocks]);
        let mut counted = Counted { inner: sinks, progress, at: 0 };
        disk::write(&plan, &tree, &mut counted).context("writing the image")?;
    }
    // Writeback runs while the second core finishes the SHA-256.
    file.start_writeback().with_context(|| format!("writing {}", image_path.display()))?;
    let sha256 = whole.join().context("hashing the image")?.hex();
    let block_map = blocks.into_block_map();
    // The last moment to stop with nothing published; from here the outputs are written out.
    crate::interrupt::check()?;
    // A manifest or checksum must never describe another image: the old ones go before the
    // new image takes the name, and the new manifest comes last. A reader that finds a
    // manifest finds its image; a crash in between leaves an image without a manifest.
    let (sha_path, manifest_path) = (outputs.checksum(), outputs.manifest());
    for old in [&manifest_path, &sha_path] {
        match std::fs::remove_file(old) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("replacing {}", old.display()))
            }
            _ => {}
        }
    }
    file.persist().with_context(|| format!("finishing {}", image_path.display()))?;
    progress.end(&format!("{} ({} data blocks of 512 KiB)", human_bytes(size), block_map.data_blocks.len()));

    // 6. Checksum file and manifest, each written whole then renamed into place.
    write_atomic(&sha_path, format!("{sha256}  {}\n", outputs.image_file_name()).as_bytes())?;
    let manifest = Manifest {
        manifest_version: MANIFEST_VERSION,
        kiln_version: env!("CARGO_PKG_VERSION").to_string(),
        name: name.clone(),
        recipe: manifest::RecipeInfo { path: recipe.path.display().to_string(), sha256: recipe.sha256.clone() },
        os: recipe.os,
        arch: recipe.arch,
        boot: recipe.boot,
        source_date_epoch: epoch_secs,
        packages,
        base: base_info,
        layer: layer_info,
        image: manifest::ImageInfo { file: outputs.image_file_name(), size_bytes: size, sha256 },
        disk: plan.disk_info(),
        blocks: block_map.try_into().context("the image's block digests")?,
        ami: recipe.ami.clone().map(|a| crate::recipe::with_root_size(a, size)),
        bundle: recipe.bundle.clone(),
        test: Some(test_settings(recipe, &tree)),
        test_result: None,
    };
    // The SBOM, beside the manifest: the image by SHA-256 and every package in it.
    let sbom = crate::formats::spdx::document(
        &crate::formats::spdx::SbomImage {
            name: name.clone(),
            sha256: manifest.image.sha256.clone(),
            distro: manifest.os_name().to_string(),
            created_unix: epoch_secs,
            tool: format!("kiln-{}", env!("CARGO_PKG_VERSION")),
        },
        &sbom_packages,
    );
    write_atomic(&outputs.sbom(), sbom.as_bytes())?;
    write_atomic(&manifest_path, manifest.to_json().as_bytes())?;
    Ok(BuildOutput {
        manifest_path,
        image_path,
        manifest,
        base_cached,
        base_age_secs,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The service layer's plan, read before the base is staged: repositories verified and listed
/// (or, `--offline`, as the newest cached layer saw them), local packages read, and the
/// recipe's `include` split into what Debian's base installs and what only a recipe repository
/// offers. Returns the base's part of `include` and the plan (None without a service layer).
fn plan_layer(
    recipe: &Recipe,
    opts: &BuildOptions,
    progress: &dyn Progress,
) -> Result<(Vec<String>, Option<crate::stage::layer::LayerPlan>)> {
    use crate::stage::layer;
    if recipe.service.is_empty() {
        return Ok((recipe.packages.clone(), None));
    }
    let name = recipe.output_name();
    let repos = if recipe.service.repositories.is_empty() {
        Vec::new()
    } else if opts.offline {
        layer::offline_repos(&opts.cache_dir, &name).context("--offline: the recipe repositories' state")?
    } else {
        progress.note(&format!("reading the recipe's repositories ({})", recipe.service.repositories.len()));
        layer::probe_repositories(&recipe.service.repositories, recipe.arch)
            .context("reading the recipe's [[repositories]]")?
    };
    let local = layer::inspect_local(&recipe.service.local, recipe.arch, recipe.digests())
        .context("reading [packages].local")?;
    let (base_include, layer_include) = layer::split_include(&recipe.packages, &repos);
    let recipe_dir = std::fs::canonicalize(&recipe.path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    let plan = layer::LayerPlan::new(recipe, repos, local, layer_include, recipe_dir);
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

/// Lays the recipe's `[[files]]` over the tree, in recipe order (a later entry wins). Owners
/// given by name are looked up in the image's own /etc/passwd and /etc/group.
pub fn apply_files(tree: &mut Tree, files: &[FileEntry], time: Timestamp) -> Result<()> {
    let parent_meta = Meta::new(0o755, 0, 0, time);
    // Owners given by name (not root, not a number) mean what the image's own user database
    // says: package maintainer scripts allocate system users dynamically.
    let (passwd, group) = system::user_db(tree);
    for f in files {
        let path = f.path.as_bytes();
        tree.create_parents(path, &parent_meta)
            .with_context(|| format!("{}: creating the parents of {}", f.origin, f.path))?;
        let (uid, gid) = f.resolve_owner(&passwd, &group)?;
        let meta = Meta::new(f.mode, uid, gid, time);
        let kind = match &f.kind {
            FileKind::Dir => Kind::Dir(Dir::default()),
            FileKind::Symlink { target } => Kind::Symlink(target.as_bytes().to_vec()),
            FileKind::File { content: FileContent::Inline(bytes) } => {
                Kind::File(Content::inline(Arc::<[u8]>::from(bytes.as_slice())))
            }
            FileKind::File { content: FileContent::Source(src) } => {
                let len =
                    std::fs::metadata(src).with_context(|| format!("reading {} for {}", src.display(), f.path))?.len();
                let id = tree.add_source(src).with_context(|| format!("opening {} for {}", src.display(), f.path))?;
                Kind::File(Content::from_source(id, 0, len))
            }
        };
        tree.insert(path, kind, meta, OnExisting::Replace)
            .with_context(|| format!("{}: adding {}", f.origin, f.path))?;
    }
    Ok(())
}

/// Writes `bytes` to `path` with [`crate::formats::atomic::write`].
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::formats::atomic::write(path, bytes).with_context(|| format!("writing {}", path.display()))
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
