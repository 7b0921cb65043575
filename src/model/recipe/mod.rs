//! Recipes: TOML text in, a validated [`Recipe`] out, that the rest of kiln can trust without
//! checking again.
//!
//! Loading goes in three steps:
//! 1. each recipe file (the one given and every recipe it `extends`) is parsed into the raw
//!    serde form (`raw`), with unknown keys refused and every value's position kept;
//! 2. the raw forms are merged, base first (`raw::RawRecipe::merge`);
//! 3. the merged form is validated into [`Recipe`] (`validate`), collecting every problem
//!    with its position rather than stopping at the first.
//!
//! `docs/recipes.md` documents every key.

mod digest;
pub mod error;
mod raw;
pub mod service;
pub mod size;
mod validate;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

pub use digest::{digest_of, FileDigest, FileDigests, ReadEach};
pub use error::{Diagnostic, Position, RecipeError};
pub use service::{LocalPackage, Repository, Service, Step, StepAction, User};
pub use size::DiskSize;

use crate::manifest::{AmiSettings, BundleSettings};
use crate::platform::{Arch, BootMode};
use error::{SourceFile, SourceMap};
use raw::{Loc, RawRecipe};

/// The architecture when a recipe names none.
pub const DEFAULT_ARCH: Arch = Arch::X86_64;

/// How x86_64 images boot when `[image].boot` is not set. One constant, so the BIOS work can
/// switch the default to `Hybrid` once hybrid images prove reliable.
pub const DEFAULT_X86_64_BOOT: BootMode = BootMode::Uefi;

/// The boot mode of a recipe that sets none. arm64 has no legacy BIOS: always UEFI.
pub fn default_boot(arch: Arch) -> BootMode {
    match arch {
        Arch::X86_64 => DEFAULT_X86_64_BOOT,
        Arch::Arm64 => BootMode::Uefi,
    }
}

/// A supported operating system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Os {
    #[serde(rename = "debian-12")]
    Debian12,
    #[serde(rename = "debian-13")]
    Debian13,
}

impl Os {
    pub const ALL: [Os; 2] = [Os::Debian12, Os::Debian13];

    /// The recipe spelling (`debian-12`).
    pub fn as_str(self) -> &'static str {
        match self {
            Os::Debian12 => "debian-12",
            Os::Debian13 => "debian-13",
        }
    }
    /// The TPM2 software stack systemd loads to extend PCRs (`systemd-pcrphase` fails at boot
    /// without it once a unified kernel image has measured itself into a TPM).
    pub fn tpm2_libraries(self) -> &'static [&'static str] {
        match self {
            Os::Debian12 => &["libtss2-esys-3.0.2-0", "libtss2-rc0"],
            Os::Debian13 => &["libtss2-esys-3.0.2-0t64", "libtss2-rc0t64"],
        }
    }
    /// Debian's suite codename, as mmdebstrap and apt want it.
    pub fn suite(self) -> &'static str {
        match self {
            Os::Debian12 => "bookworm",
            Os::Debian13 => "trixie",
        }
    }
    pub fn parse(s: &str) -> Option<Os> {
        Os::ALL.into_iter().find(|o| o.as_str() == s)
    }
}

impl std::fmt::Display for Os {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the root tree starts from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Base {
    /// A Debian suite staged with mmdebstrap.
    Debian {
        /// `bookworm`, `trixie`.
        suite: String,
        /// Archive URI from the recipe, with any `{snapshot}` already substituted. None: the
        /// build host's apt sources (or a command-line flag) decide.
        mirror: Option<String>,
        /// Pinned snapshot timestamp (`20240601T000000Z`) when the mirror is a snapshot
        /// archive. Snapshot archives serve old Release files, so apt must be told not to
        /// check `Valid-Until` (`Acquire::Check-Valid-Until "false"`).
        snapshot: Option<String>,
        /// Archive components, `main` by default.
        components: Vec<String>,
        /// The archive the image's own apt reads (`/etc/apt/sources.list.d/debian.sources`),
        /// when it differs from the one kiln builds from. None: the build mirror.
        apt_mirror: Option<String>,
        /// The security archive the image's apt reads. None: the build host's.
        apt_security_mirror: Option<String>,
    },
    /// A root tarball the user brings (absolute path), used as it is.
    Tarball(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileContent {
    Inline(Vec<u8>),
    /// Absolute path of a file on the build host, read when the image is written.
    Source(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File { content: FileContent },
    Dir,
    Symlink { target: String },
}

/// One `[[files]]` entry.
///
/// Owners: numeric ids and `root` resolve here. Any other name (`www-data`) is kept in
/// `user`/`group`, because only the image's own `/etc/passwd` and `/etc/group` can say what
/// it means (package maintainer scripts allocate system users dynamically); the stage must
/// call [`FileEntry::resolve_owner`] against the staged tree. Until it does, `uid`/`gid` hold
/// 0 for a named owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileEntry {
    /// Absolute, normalised path in the image (`/etc/motd`).
    pub path: String,
    pub kind: FileKind,
    /// Permission bits (`0o644`), setuid/setgid/sticky included.
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    /// User name to look up in the image, when the owner was given by a name other than root.
    pub user: Option<String>,
    /// Group name to look up in the image, when given by a name other than root.
    pub group: Option<String>,
    /// Where the entry is written (`recipes/web.toml:14:1`), for messages from later stages.
    pub origin: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: owner of {path}: {what} `{name}` is not in the image's {db}; is the package that creates it in [packages].include, or the user in [[users]]?")]
pub struct OwnerError {
    pub origin: String,
    pub path: String,
    pub what: &'static str,
    pub name: String,
    pub db: &'static str,
}

impl FileEntry {
    /// The numeric owner, looking names up in the text of the image's `/etc/passwd` and
    /// `/etc/group`. Numeric and `root` owners need neither file.
    pub fn resolve_owner(&self, passwd: &str, group: &str) -> Result<(u32, u32), OwnerError> {
        let lookup = |db_text: &str, name: &str| {
            db_text.lines().find_map(|l| {
                let mut f = l.split(':');
                (f.next() == Some(name)).then(|| f.nth(1).and_then(|id| id.parse::<u32>().ok())).flatten()
            })
        };
        let uid = match &self.user {
            None => self.uid,
            Some(n) => lookup(passwd, n).ok_or_else(|| OwnerError {
                origin: self.origin.clone(),
                path: self.path.clone(),
                what: "user",
                name: n.clone(),
                db: "/etc/passwd",
            })?,
        };
        let gid = match &self.group {
            None => self.gid,
            Some(n) => lookup(group, n).ok_or_else(|| OwnerError {
                origin: self.origin.clone(),
                path: self.path.clone(),
                what: "group",
                name: n.clone(),
                db: "/etc/group",
            })?,
        };
        Ok((uid, gid))
    }
}

/// How the image configures its network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    /// DHCP (IPv4, and IPv6 router advertisements) on the first NIC with systemd-networkd.
    #[default]
    Dhcp,
    /// kiln writes no network configuration; the recipe's files bring their own.
    None,
}

/// `[system]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct System {
    pub hostname: Option<String>,
    /// Unit names as written (`ssh` or `ssh.service`), in recipe order, de-duplicated.
    pub services_enable: Vec<String>,
    pub services_disable: Vec<String>,
    /// Extra kernel arguments, after the ones kiln needs (root, console, NVMe timeout).
    pub kernel_cmdline: Vec<String>,
    /// `Etc/UTC`, `Europe/Paris`: the stage links `/etc/localtime` into `/usr/share/zoneinfo`.
    pub timezone: Option<String>,
    /// `C.UTF-8`, `en_US.UTF-8`: written to `/etc/default/locale`.
    pub locale: Option<String>,
    pub network: Network,
    /// Where the ESP is mounted in the running system (`/boot/efi`), if at all.
    pub mount_esp: Option<String>,
}

/// `[secure_boot]`, checked: every certificate read and parsed, the signing key the key of one
/// of db's certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecureBoot {
    pub keys: KeySource,
    /// dbx's signature lists as given, when the recipe has them.
    pub dbx: Option<Vec<u8>>,
}

/// Where the key hierarchy comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The recipe's certificates (DER); `key` (PEM, read only when signing, never copied) is
    /// the private key of `db[signer]`.
    Files { pk: Vec<u8>, kek: Vec<Vec<u8>>, db: Vec<Vec<u8>>, key: PathBuf, signer: usize },
    /// `generate = true`: PK, KEK and a db key made by the first build, kept beside the image
    /// (`Outputs::secure_boot_keys`) and used again by every later build there; `db` holds
    /// the recipe's further db certificates, trusted after the generated one.
    Generate { db: Vec<Vec<u8>> },
}

/// `[test]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct TestSpec {
    /// Who logs in with the launch key; None: the image's cloud-init default user, or root.
    pub user: Option<String>,
    /// Shell commands run over SSH as that user after the built-in checks; each must exit 0.
    pub commands: Vec<String>,
}

/// A validated recipe. Every value here is one the later stages can use as it is.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// The recipe file as given.
    pub path: PathBuf,
    /// Hex SHA-256 over the recipe text, every extended recipe and every referenced source
    /// file's bytes; `docs/recipes.md` gives the exact order. Paths are not hashed,
    /// so the same recipe checked out elsewhere hashes the same. The `--arch` override is not
    /// part of it either: seeds derived from it must mix in the architecture.
    pub sha256: String,
    pub name: String,
    /// None when the base is a tarball.
    pub os: Option<Os>,
    pub arch: Arch,
    pub boot: BootMode,
    pub size: DiskSize,
    pub base: Base,
    /// Packages to install on top of Debian's minbase and kiln's own required ones: the
    /// recipe's `include` minus its `exclude`, sorted and de-duplicated.
    pub packages: Vec<String>,
    /// Packages the recipe wants kept out, sorted and de-duplicated.
    pub exclude_packages: Vec<String>,
    /// In recipe order (base recipes' entries first); a later entry for the same path
    /// replaces an earlier one when applied in order.
    pub files: Vec<FileEntry>,
    /// `[[repositories]]`, `[packages].local`, `[[users]]`, `[[steps]]`: applied on top of the
    /// cached Debian base (see [`Service`]).
    pub service: Service,
    pub system: System,
    /// From the recipe; the SOURCE_DATE_EPOCH environment variable wins at the CLI edge.
    pub source_date_epoch: Option<i64>,
    /// `root_volume.size_gib` is None when `[image].size` is `auto` and the recipe sets no root
    /// volume size: [`with_root_size`] fills it in once the image's size is known.
    pub ami: Option<AmiSettings>,
    pub bundle: Option<BundleSettings>,
    /// `[secure_boot]`: the image is signed and its AMI carries these keys.
    pub secure_boot: Option<SecureBoot>,
    /// `[test]`: how `kiln test` logs in and what else it runs.
    pub test: TestSpec,
    /// `[audit].allow`: absolute paths the image ships on purpose although the audit would
    /// refuse them (a deliberately shipped key).
    pub audit_allow: Vec<String>,
    /// Things worth saying that do not stop a build (`kiln check` prints them).
    pub warnings: Vec<String>,
    loaded: Arc<Loaded>,
}

/// What a recipe was validated from, kept so `with_arch` can validate again.
#[derive(Debug)]
struct Loaded {
    sources: SourceMap,
    merged: RawRecipe,
    digests: Arc<dyn FileDigests>,
}

/// `[ami]` settings with the root volume sized for an image of `image_bytes`, when the recipe
/// left the size to the image (no `root_volume.size_gib`, with `[image].size = "auto"`):
/// the image's size rounded up to whole GiB, since EBS volumes are whole GiB.
pub fn with_root_size(mut ami: AmiSettings, image_bytes: u64) -> AmiSettings {
    let image_gib = u32::try_from(image_bytes.div_ceil(size::GIB)).unwrap_or(u32::MAX);
    ami.root_volume.size_gib.get_or_insert(image_gib);
    ami
}

/// Extends chains longer than this are surely a mistake (and would be slow to read).
const MAX_EXTENDS_DEPTH: usize = 16;

/// Reads, merges and validates the recipe at `path` and every recipe it extends, reading
/// every source file it names to hash it.
pub fn load(path: &Path) -> Result<Recipe, RecipeError> {
    load_with(path, ReadEach)
}

/// [`load`], taking the digests of the source files from `digests` (kiln's build passes a
/// cache that remembers them between runs).
pub fn load_with(path: &Path, digests: impl FileDigests + 'static) -> Result<Recipe, RecipeError> {
    let digests: Arc<dyn FileDigests> = Arc::new(digests);
    let text = read_text(path).map_err(|source| RecipeError::Read { path: path.to_path_buf(), source })?;
    let canonical =
        std::fs::canonicalize(path).map_err(|source| RecipeError::Read { path: path.to_path_buf(), source })?;
    let mut sources = SourceMap::default();
    sources.files.push(SourceFile { display: path.to_path_buf(), canonical, text, extended_by: None });

    // Parse the chain leaf first; merge base first.
    let mut raws: Vec<RawRecipe> = Vec::new();
    let mut parse_problems: Vec<Diagnostic> = Vec::new();
    let mut current = 0;
    loop {
        let (raw, problems) = parse_file(&sources, current)?;
        parse_problems.extend(problems);
        let Some(ext) = raw.extends.clone() else {
            raws.push(raw);
            break;
        };
        raws.push(raw);
        current = open_extended(&mut sources, current, &ext)?;
    }
    let merged = raws.into_iter().rev().reduce(RawRecipe::merge).unwrap_or_default();
    let loaded = Arc::new(Loaded { sources, merged, digests });
    let validated = validate::validate(path, loaded, None);
    if parse_problems.is_empty() {
        return validated;
    }
    // The rest of the recipe is still checked, so every problem shows in one run; what the
    // validator says of a key that was blanked for a parse problem is that problem again.
    let blanked: Vec<String> = parse_problems.iter().filter_map(|d| d.key.clone()).collect();
    if let Err(RecipeError::Invalid { diagnostics }) = validated {
        parse_problems.extend(diagnostics.into_iter().filter(|d| {
            !d.key.as_ref().is_some_and(|k| blanked.iter().any(|b| k == b || k.starts_with(&format!("{b}."))))
        }));
    }
    Err(RecipeError::Invalid { diagnostics: parse_problems })
}

impl Recipe {
    /// The recipe built for `arch` instead (`--arch`), with the architecture-dependent rules
    /// checked again (boot mode, `[ami]`, `[bundle]`).
    pub fn with_arch(self, arch: Arch) -> Result<Recipe, RecipeError> {
        if arch == self.arch {
            return Ok(self);
        }
        validate::validate(&self.path, self.loaded.clone(), Some(arch))
    }

    /// `{name}-{arch}`: outputs of one recipe built for both architectures do not collide.
    pub fn output_name(&self) -> String {
        format!("{}-{}", self.name, self.arch)
    }

    /// Where the digests of the files this recipe names were taken: later stages that need a
    /// file's digest again ask here, and a cache the caller passed answers without reading.
    pub fn digests(&self) -> &Arc<dyn FileDigests> {
        &self.loaded.digests
    }

    /// The recipe files read, the given one first, then each one it extends.
    pub fn recipe_files(&self) -> Vec<PathBuf> {
        self.loaded.sources.files.iter().map(|f| f.display.clone()).collect()
    }
}

fn read_text(path: &Path) -> std::io::Result<String> {
    let bytes = std::fs::read(path)?;
    String::from_utf8(bytes).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not UTF-8 text (invalid byte at offset {})", e.utf8_error().valid_up_to()),
        )
    })
}

/// A recipe with more problems than this is reported this far.
const MAX_PARSE_DIAGNOSTICS: usize = 32;

/// Parses one recipe file into its raw form; unknown keys and wrong types come out as
/// diagnostics naming the key, all of them: after each one the entry is blanked (positions
/// kept) and the file parsed again. Returns the raw form of what remains with the diagnostics;
/// an error when even that cannot be had (a syntax error).
fn parse_file(sources: &SourceMap, id: usize) -> Result<(RawRecipe, Vec<Diagnostic>), RecipeError> {
    let mut text = sources.files[id].text.clone();
    let mut diagnostics = Vec::new();
    loop {
        let e = match raw::with_file(id, || toml::from_str::<RawRecipe>(&text)) {
            Ok(raw) => return Ok((raw, diagnostics)),
            Err(e) => e,
        };
        diagnostics.push(validate::toml_diagnostic(sources, id, &e));
        let lines = e.span().and_then(|s| validate::entry_lines(&text, s.start));
        match lines {
            Some(r) if diagnostics.len() < MAX_PARSE_DIAGNOSTICS && text[r.clone()].trim() != "" => {
                // A space per byte (newlines kept): every other offset stays where it was.
                let blank: String = text[r.clone()]
                    .chars()
                    .flat_map(|c| std::iter::repeat_n(if c == '\n' { '\n' } else { ' ' }, c.len_utf8()))
                    .collect();
                text.replace_range(r, &blank);
            }
            _ => return Err(RecipeError::Invalid { diagnostics }),
        }
    }
}

/// Reads the recipe that file `from` extends, returning its id.
fn open_extended(sources: &mut SourceMap, from: usize, ext: &Loc<String>) -> Result<usize, RecipeError> {
    let fail = |sources: &SourceMap, message: String, help: Option<String>| RecipeError::Invalid {
        diagnostics: vec![sources.diagnostic(ext.span, Some("extends".into()), message, help)],
    };
    let depth = {
        let mut d = 0;
        let mut by = sources.files[from].extended_by;
        while let Some(id) = by {
            d += 1;
            by = sources.files[id].extended_by;
        }
        d
    };
    if depth + 1 >= MAX_EXTENDS_DEPTH {
        return Err(fail(sources, format!("`extends` chain is deeper than {MAX_EXTENDS_DEPTH} recipes"), None));
    }
    let parent = &sources.files[from];
    let abs = parent.dir().join(&ext.value);
    let display = normalize(&parent.display.parent().unwrap_or(Path::new("")).join(&ext.value));
    let canonical = match std::fs::canonicalize(&abs) {
        Ok(c) => c,
        Err(e) => {
            return Err(fail(
                sources,
                format!("cannot open extended recipe `{}`: {e}", ext.value),
                Some(format!("`extends` is relative to this recipe's directory; it points to {}", abs.display())),
            ))
        }
    };
    // Walk up the chain from `from` to see whether this file is already in it.
    let mut cycle = vec![display.clone()];
    let mut at = Some(from);
    while let Some(id) = at {
        let f = &sources.files[id];
        cycle.push(f.display.clone());
        if f.canonical == canonical {
            cycle.reverse();
            let chain: Vec<String> = cycle.iter().map(|p| p.display().to_string()).collect();
            return Err(fail(
                sources,
                format!("`extends` cycle: {}", chain.join(" → ")),
                Some("a recipe cannot extend itself, directly or through other recipes".into()),
            ));
        }
        at = f.extended_by;
    }
    let text = match read_text(&canonical) {
        Ok(t) => t,
        Err(e) => return Err(fail(sources, format!("cannot read extended recipe `{}`: {e}", ext.value), None)),
    };
    sources.files.push(SourceFile { display, canonical, text, extended_by: Some(from) });
    Ok(sources.files.len() - 1)
}

/// `a/./b/../c` → `a/c`, without touching the file system (for display only).
fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out: Vec<Component> = Vec::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.last(), Some(Component::Normal(_))) => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    if out.is_empty() {
        return PathBuf::from(".");
    }
    out.iter().collect()
}
