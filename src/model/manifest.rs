//! The build manifest: everything later steps (publish, bundle, audits) need to know about a
//! built image, written beside it as `NAME.manifest.json`.
//!
//! The block list is the uploader's source of truth about zeros: a 512 KiB block not listed
//! holds only zeros, so publishing never reads or scans the rest of the image.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ec2::{Delivery, Deprecation, Ec2BootMode, ImdsSupport, VolumeType};
use crate::formats::image as raw_blocks;
use crate::platform::{Arch, BootMode};
use crate::recipe::Os;

/// EBS direct APIs move snapshots in blocks of 512 KiB.
pub const EBS_BLOCK_SIZE: u64 = 524_288;

/// Bumped when a field changes meaning; readers refuse versions they do not know.
pub const MANIFEST_VERSION: u32 = 1;

/// A manifest as the rest of kiln trusts it: every value checked once, when it is loaded (or
/// made by the build), and kept in its checked type. The file's form is the private
/// `RawManifest`; serde goes through it both ways, so a manifest written and read back is the
/// same bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawManifest", into = "RawManifest")]
pub struct Manifest {
    pub manifest_version: u32,
    pub kiln_version: String,
    /// Output name, architecture included (`debian-12-minimal-x86_64`).
    pub name: String,
    pub recipe: RecipeInfo,
    /// None for a tarball base (`"custom"` in the file).
    pub os: Option<Os>,
    pub arch: Arch,
    pub boot: BootMode,
    /// The SOURCE_DATE_EPOCH every timestamp in the image was clamped to.
    pub source_date_epoch: i64,
    /// Installed packages (`dpkg-query`), sorted by name.
    pub packages: Vec<Package>,
    /// The staged OS base this image was built on, when kiln staged it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseInfo>,
    /// The service layer staged on top of the base, when the recipe has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<LayerInfo>,
    pub image: ImageInfo,
    pub disk: DiskInfo,
    pub blocks: BlockMap,
    /// Resolved `[ami]` settings of the recipe, when it has them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ami: Option<AmiSettings>,
    /// Resolved `[bundle]` settings of the recipe, when it has them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<BundleSettings>,
    /// How `kiln test` logs in to this image and what it expects of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<TestSettings>,
    /// What `kiln build --test` found; publishing pipelines can require `passed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_result: Option<TestResult>,
    /// The Secure Boot keys and the signed boot chain, when the recipe has `[secure_boot]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_boot: Option<SecureBootInfo>,
}

/// The manifest file's form: what serde reads and writes. Values that are text in the file
/// (block digests, `os`, the deprecation) are checked into [`Manifest`]'s types by
/// `TryFrom`, which names the field a bad value is in. Field order is the file's.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    manifest_version: u32,
    kiln_version: String,
    name: String,
    recipe: RecipeInfo,
    os: String,
    arch: Arch,
    boot: BootMode,
    source_date_epoch: i64,
    packages: Vec<Package>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base: Option<BaseInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    layer: Option<LayerInfo>,
    image: ImageInfo,
    disk: DiskInfo,
    blocks: raw_blocks::BlockMap,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ami: Option<RawAmiSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bundle: Option<BundleSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    test: Option<TestSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    test_result: Option<TestResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    secure_boot: Option<SecureBootInfo>,
}

/// What `os` says of an image built on a tarball base, which has no [`Os`].
const CUSTOM_OS: &str = "custom";

/// A manifest value that is not what its field holds: `blocks.data_blocks[12].sha256: not 64
/// hex digits`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// The field's path in the manifest (`os`, `ami.deprecate_after`).
    pub field: String,
    pub message: String,
}

impl FieldError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> FieldError {
        FieldError { field: field.into(), message: message.into() }
    }
}

impl TryFrom<RawManifest> for Manifest {
    type Error = FieldError;
    fn try_from(r: RawManifest) -> Result<Manifest, FieldError> {
        let os = match r.os.as_str() {
            CUSTOM_OS => None,
            name => Some(Os::parse(name).ok_or_else(|| {
                let known: Vec<&str> = Os::ALL.iter().map(|o| o.as_str()).chain([CUSTOM_OS]).collect();
                FieldError::new("os", format!("`{name}` is not an os kiln knows ({})", known.join(", ")))
            })?),
        };
        Ok(Manifest {
            manifest_version: r.manifest_version,
            kiln_version: r.kiln_version,
            name: r.name,
            recipe: r.recipe,
            os,
            arch: r.arch,
            boot: r.boot,
            source_date_epoch: r.source_date_epoch,
            packages: r.packages,
            base: r.base,
            layer: r.layer,
            image: r.image,
            disk: r.disk,
            blocks: BlockMap::try_from(r.blocks)?,
            ami: r.ami.map(AmiSettings::try_from).transpose()?,
            bundle: r.bundle,
            test: r.test,
            test_result: r.test_result,
            secure_boot: r.secure_boot.map(SecureBootInfo::checked).transpose()?,
        })
    }
}

impl From<Manifest> for RawManifest {
    fn from(m: Manifest) -> RawManifest {
        let os = m.os_name().to_string();
        RawManifest {
            manifest_version: m.manifest_version,
            kiln_version: m.kiln_version,
            name: m.name,
            recipe: m.recipe,
            os,
            arch: m.arch,
            boot: m.boot,
            source_date_epoch: m.source_date_epoch,
            packages: m.packages,
            base: m.base,
            layer: m.layer,
            image: m.image,
            disk: m.disk,
            blocks: m.blocks.into(),
            ami: m.ami.map(RawAmiSettings::from),
            bundle: m.bundle,
            test: m.test,
            test_result: m.test_result,
            secure_boot: m.secure_boot,
        }
    }
}

/// A SHA-256 digest; 64 lowercase hex digits in files.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Digest(pub [u8; 32]);

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256Digest({self})")
    }
}

impl std::str::FromStr for Sha256Digest {
    type Err = String;
    fn from_str(s: &str) -> Result<Sha256Digest, String> {
        let mut d = [0u8; 32];
        match hex::decode_to_slice(s, &mut d) {
            Ok(()) => Ok(Sha256Digest(d)),
            Err(_) => Err(format!("`{s}` is not 64 hex digits")),
        }
    }
}

impl From<[u8; 32]> for Sha256Digest {
    fn from(d: [u8; 32]) -> Sha256Digest {
        Sha256Digest(d)
    }
}

/// The image's blocks that hold data, each by its digest: the uploader's source of truth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockMap {
    pub block_size: u64,
    /// Blocks that hold data, ascending by index; every other block is all zeros.
    pub data_blocks: Vec<BlockDigest>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDigest {
    pub index: u64,
    /// SHA-256 of the block's `block_size` bytes.
    pub sha256: Sha256Digest,
}

/// The block list in the file's form, as the image writer's block sink makes it.
impl TryFrom<raw_blocks::BlockMap> for BlockMap {
    type Error = FieldError;
    fn try_from(r: raw_blocks::BlockMap) -> Result<BlockMap, FieldError> {
        let data_blocks = r
            .data_blocks
            .into_iter()
            .enumerate()
            .map(|(i, b)| {
                let sha256 =
                    b.sha256.parse().map_err(|m| FieldError::new(format!("blocks.data_blocks[{i}].sha256"), m))?;
                Ok(BlockDigest { index: b.index, sha256 })
            })
            .collect::<Result<_, FieldError>>()?;
        Ok(BlockMap { block_size: r.block_size, data_blocks })
    }
}

impl From<BlockMap> for raw_blocks::BlockMap {
    fn from(m: BlockMap) -> raw_blocks::BlockMap {
        let data_blocks = m
            .data_blocks
            .into_iter()
            .map(|b| raw_blocks::BlockDigest { index: b.index, sha256: b.sha256.to_string() })
            .collect();
        raw_blocks::BlockMap { block_size: m.block_size, data_blocks }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestSettings {
    /// Who logs in with the launch key: the recipe's `[test].user`, else cloud-init's default
    /// user as the image configures it, else root.
    pub user: String,
    /// The recipe's `[test].commands`.
    pub commands: Vec<String>,
    /// Where the image mounts its ESP, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub esp_mount: Option<String>,
    /// cloud-init is installed (it installs the launch key and runs user data).
    pub cloud_init: bool,
}

/// A Secure Boot image: the keys its AMI's firmware trusts, and the boot chain they verify.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecureBootInfo {
    /// EC2's `UefiData` for RegisterImage: PK, KEK, db (and dbx) as python-uefivars' `aws`
    /// format, base64. `kiln test` boots with the same store, converted for OVMF.
    pub uefi_data: String,
    /// SHA-256 (hex) of each certificate's DER: what `openssl x509 -outform der | sha256sum`
    /// prints for it.
    pub pk: String,
    pub kek: Vec<String>,
    pub db: Vec<String>,
    /// SHA-256 of dbx's signature lists, when the recipe gives them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dbx: Option<String>,
    /// The db certificate whose key signed the boot chain (its SHA-256, one of `db`).
    pub signed_by: String,
    /// systemd-boot, at the ESP's removable-media path.
    pub loader: SignedFile,
    /// The unified kernel image: kernel, initrd, command line and os-release under one signature.
    pub uki: SignedFile,
    /// The kernel command line inside the UKI.
    pub cmdline: String,
    /// Predicted values of TPM PCRs (SHA-256 bank, hex) at login, by PCR index.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pcrs: BTreeMap<u32, String>,
}

/// A signed EFI binary on the ESP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedFile {
    /// Its path on the ESP (`EFI/BOOT/BOOTX64.EFI`).
    pub path: String,
    /// Its Authenticode SHA-256 (hex): what the firmware checks the signature against and
    /// measures into PCR 4.
    pub authenticode_sha256: String,
}

impl SecureBootInfo {
    /// The store must be one kiln can read: RegisterImage would carry it as it is.
    fn checked(self) -> Result<SecureBootInfo, FieldError> {
        kiln_formats::efi_vars::decode_aws(&self.uefi_data)
            .map_err(|e| FieldError::new("secure_boot.uefi_data", e.to_string()))?;
        Ok(self)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestResult {
    pub passed: bool,
    pub launches: u32,
    /// Failed checks (`launch 1: growth`); empty when passed.
    pub failures: Vec<String>,
    /// The full report's file name, beside the manifest.
    pub report: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeInfo {
    pub path: String,
    /// SHA-256 (hex) over the recipe and everything it pulls in (extended recipes, source files).
    pub sha256: String,
}

/// A staged base: when mmdebstrap ran, and the archive as it was then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseInfo {
    /// The cache entry (SHA-256 over every input, the archive state included).
    pub cache_key: String,
    /// When the base was staged (RFC 3339, UTC): older than the build when it came from the cache.
    pub staged_at: String,
    /// Every suite the base was installed from, as the archive published it then.
    pub archive: Vec<SuiteState>,
    /// SHA-256 over the base's inputs and the package versions apt resolved them to: a later
    /// state of the archive that resolves the same (a suite re-signed, nothing in the base
    /// changed) reuses the base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved: Option<String>,
}

/// The service layer (`[[repositories]]`, `[packages].local`, `[[users]]`, `[[steps]]`) as it
/// was staged on the base.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerInfo {
    /// The cache entry: SHA-256 over the base's key, every layer input and the repositories'
    /// state.
    pub cache_key: String,
    /// Each suite of each recipe repository, as it was published when the layer was staged.
    pub repositories: Vec<RepositoryState>,
}

/// One suite of a recipe repository as kiln saw it, verified with the recipe's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryState {
    pub name: String,
    pub uri: String,
    pub suite: String,
    pub date: String,
    /// SHA-256 of the suite's `InRelease` (or `Release`).
    pub sha256: String,
}

/// One apt suite as kiln saw it: its `InRelease`'s `Date` and SHA-256. A new upload to the
/// suite (a security fix) changes both; a pinned snapshot never does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuiteState {
    pub uri: String,
    pub suite: String,
    pub date: String,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub arch: String,
    /// Where the package came from when not Debian's archive: `repository:NAME` for a recipe
    /// repository, `local:PATH` (as the recipe writes it) for a `.deb` from the build host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageInfo {
    /// File name of the raw image, relative to the manifest's directory.
    pub file: String,
    pub size_bytes: u64,
    /// SHA-256 (hex) of the whole raw image, zeros included.
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskInfo {
    pub label: String,
    /// Disk GUID, upper-case hyphenated.
    pub guid: String,
    pub sector_size: u64,
    pub partitions: Vec<PartitionInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionInfo {
    /// 1-based GPT entry number.
    pub number: u32,
    pub name: String,
    pub type_guid: String,
    pub guid: String,
    pub first_lba: u64,
    pub last_lba: u64,
    pub offset_bytes: u64,
    pub size_bytes: u64,
    /// `vfat`, `ext4`, or `none` (BIOS boot partition).
    pub filesystem: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs_uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs_label: Option<String>,
}

/// `[ami]` after validation: every value is one EC2 accepts, sizes in whole GiB.
///
/// Whether a value is one EC2 accepts depends on the image (architecture, boot mode, size), so
/// these settings are validated where they meet it: [`crate::recipe::load`] and
/// [`Manifest::load`]. Outside this crate they cannot be built field by field
/// (`non_exhaustive`), only read from those two, or deserialized on purpose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawAmiSettings", into = "RawAmiSettings")]
#[non_exhaustive]
pub struct AmiSettings {
    /// May contain `{date}` (UTC YYYYMMDD of SOURCE_DATE_EPOCH), `{arch}`, `{name}`, `{sha}`
    /// (first 12 hex digits of the image SHA-256).
    pub name: String,
    pub description: Option<String>,
    /// The first region is where the snapshot is uploaded; the others receive CopyImage, or
    /// an upload of their own ([`AmiSettings::region`]).
    pub regions: Vec<String>,
    /// Settings of regions after the first that differ from the default (a copy, encrypted
    /// with the region's default key when `encrypted`).
    pub region_settings: BTreeMap<String, RegionSettings>,
    pub root_volume: RootVolume,
    pub ena: bool,
    pub sriov: bool,
    pub tpm: bool,
    /// `v2.0` to require IMDSv2, or none.
    pub imds: Option<ImdsSupport>,
    pub boot_mode: Ec2BootMode,
    pub launch_permissions: LaunchPermissions,
    pub tags: BTreeMap<String, String>,
    pub volumes: Vec<ExtraVolume>,
    /// Encrypt the snapshot (and so the root volume); with a KMS key ARN, or the account default.
    pub encrypted: bool,
    pub kms_key_arn: Option<String>,
    /// Retention: after each publish, keep this many of the newest AMIs of the image (per
    /// region) and deregister the older ones with their snapshots (`kiln prune`).
    pub keep: Option<u32>,
    /// SSM parameter names (`/golden/{name}/{arch}/latest`) set to the AMI's id in each
    /// region, with the `aws:ec2:image` data type; may hold `{name}`, `{arch}`, `{region}`,
    /// `{date}` and `{sha}`.
    pub ssm_parameters: Vec<String>,
    /// SSM pointers (`/golden/{name}/{arch}/latest`) that `kiln promote` moves to this build's
    /// AMI once it is available in every region, and `kiln rollback` moves back; a publish
    /// never writes them.
    pub ssm_promote: Vec<String>,
    /// `180d` (days after publishing) or an RFC 3339 time: EnableImageDeprecation on the AMI
    /// and every copy ([`crate::ec2::Deprecation`]).
    pub deprecate_after: Option<DeprecateAfter>,
    /// Deregistration protection on the AMI and every copy; `kiln prune` never deregisters a
    /// protected AMI.
    pub protect: Option<crate::ec2::Protection>,
    /// `kiln prune` keeps an AMI launched within this many days.
    pub keep_if_launched_within_days: Option<u32>,
    /// `kiln prune` disables an AMI first and deregisters it only this many days later.
    pub disable_before_delete_days: Option<u32>,
    /// CopyImage's time-based copy: the snapshot copy completes within this many minutes.
    pub copy_within_minutes: Option<u32>,
}

/// [`AmiSettings`] in the file's form: the deprecation as written.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAmiSettings {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    regions: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    region_settings: BTreeMap<String, RegionSettings>,
    root_volume: RootVolume,
    ena: bool,
    sriov: bool,
    tpm: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    imds: Option<ImdsSupport>,
    boot_mode: Ec2BootMode,
    launch_permissions: LaunchPermissions,
    tags: BTreeMap<String, String>,
    volumes: Vec<ExtraVolume>,
    encrypted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kms_key_arn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    keep: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ssm_parameters: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ssm_promote: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    deprecate_after: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    protect: Option<crate::ec2::Protection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    keep_if_launched_within_days: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    disable_before_delete_days: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    copy_within_minutes: Option<u32>,
}

impl TryFrom<RawAmiSettings> for AmiSettings {
    type Error = FieldError;
    fn try_from(r: RawAmiSettings) -> Result<AmiSettings, FieldError> {
        let deprecate_after = r
            .deprecate_after
            .map(|d| DeprecateAfter::parse(&d).map_err(|m| FieldError::new("ami.deprecate_after", m)))
            .transpose()?;
        Ok(AmiSettings {
            name: r.name,
            description: r.description,
            regions: r.regions,
            region_settings: r.region_settings,
            root_volume: r.root_volume,
            ena: r.ena,
            sriov: r.sriov,
            tpm: r.tpm,
            imds: r.imds,
            boot_mode: r.boot_mode,
            launch_permissions: r.launch_permissions,
            tags: r.tags,
            volumes: r.volumes,
            encrypted: r.encrypted,
            kms_key_arn: r.kms_key_arn,
            keep: r.keep,
            ssm_parameters: r.ssm_parameters,
            ssm_promote: r.ssm_promote,
            deprecate_after,
            protect: r.protect,
            keep_if_launched_within_days: r.keep_if_launched_within_days,
            disable_before_delete_days: r.disable_before_delete_days,
            copy_within_minutes: r.copy_within_minutes,
        })
    }
}

impl From<AmiSettings> for RawAmiSettings {
    fn from(a: AmiSettings) -> RawAmiSettings {
        RawAmiSettings {
            name: a.name,
            description: a.description,
            regions: a.regions,
            region_settings: a.region_settings,
            root_volume: a.root_volume,
            ena: a.ena,
            sriov: a.sriov,
            tpm: a.tpm,
            imds: a.imds,
            boot_mode: a.boot_mode,
            launch_permissions: a.launch_permissions,
            tags: a.tags,
            volumes: a.volumes,
            encrypted: a.encrypted,
            kms_key_arn: a.kms_key_arn,
            keep: a.keep,
            ssm_parameters: a.ssm_parameters,
            ssm_promote: a.ssm_promote,
            deprecate_after: a.deprecate_after.map(|d| d.to_string()),
            protect: a.protect,
            keep_if_launched_within_days: a.keep_if_launched_within_days,
            disable_before_delete_days: a.disable_before_delete_days,
            copy_within_minutes: a.copy_within_minutes,
        }
    }
}

/// `[ami].deprecate_after`, parsed once: when the AMI is deprecated, and the text as written,
/// which is what the manifest keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeprecateAfter {
    pub when: Deprecation,
    written: String,
}

impl DeprecateAfter {
    /// `"180d"` or an RFC 3339 UTC time; see [`Deprecation::parse`].
    pub fn parse(s: &str) -> Result<DeprecateAfter, String> {
        Ok(DeprecateAfter { when: Deprecation::parse(s)?, written: s.to_string() })
    }
}

impl fmt::Display for DeprecateAfter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.written)
    }
}

/// How one region after the first gets the AMI: `[ami].regions` entries written as tables.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RegionSettings {
    /// The KMS key, in this region, that encrypts the AMI's snapshot there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key_arn: Option<String>,
    pub via: Delivery,
}

/// The first region (by name) that gets its own upload.
pub fn first_upload_region(settings: &BTreeMap<String, RegionSettings>) -> Option<&str> {
    settings.iter().find(|(_, r)| r.via == Delivery::Upload).map(|(name, _)| name.as_str())
}

impl RegionSettings {
    pub fn new(kms_key_arn: Option<String>, via: Delivery) -> RegionSettings {
        RegionSettings { kms_key_arn, via }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RootVolume {
    /// `/dev/xvda`.
    pub device: String,
    /// None while the recipe leaves it to the image and the image is not built yet
    /// ([`crate::recipe::with_root_size`]); written as 0 then.
    #[serde(with = "zero_is_unset")]
    pub size_gib: Option<u32>,
    pub volume_type: VolumeType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throughput: Option<u32>,
    pub delete_on_termination: bool,
}

/// A size whose 0 in the file means "not set".
mod zero_is_unset {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<u32>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(v.unwrap_or(0))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        Ok(Some(u32::deserialize(d)?).filter(|&n| n != 0))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct LaunchPermissions {
    pub accounts: Vec<String>,
    pub organizations: Vec<String>,
    pub organizational_units: Vec<String>,
    /// Only when the recipe says so explicitly: images are private by default.
    pub public: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ExtraVolume {
    pub device: String,
    pub size_gib: u32,
    pub volume_type: VolumeType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throughput: Option<u32>,
    pub encrypted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key_id: Option<String>,
    pub delete_on_termination: bool,
}

/// `[bundle]` after validation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleSettings {
    /// 12-digit AWS account id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_key: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ec2_cert: Option<PathBuf>,
    /// `s3://bucket/prefix` to upload to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("reading manifest {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("manifest {path} is not a kiln build manifest")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("manifest {path} has version {found}; this kiln reads version {MANIFEST_VERSION} (rebuild the image with this kiln)")]
    Version { path: PathBuf, found: u32 },
    /// A value that is not what its field holds (a digest that is no digest, an unknown `os`).
    #[error("manifest {path}: {field}: {message}")]
    Field { path: PathBuf, field: String, message: String },
    /// AMI settings EC2 would refuse: the manifest was edited or made by another tool. The
    /// words are those `kiln check` gives for the same value in a recipe.
    #[error("manifest {path}: {key}: {message}{}", help.as_deref().map(|h| format!("; {h}")).unwrap_or_default())]
    Ami { path: PathBuf, key: String, message: String, help: Option<String> },
}

impl AmiSettings {
    /// Every EC2 rule these settings break, with the recipe key each is about (`ami.tpm`,
    /// `ami.volumes[1].iops`): the rules `kiln check` applies to the recipe, applied again,
    /// and the root volume's room for an image of `image_bytes`.
    /// How `region` gets the AMI and with which key, when `source` receives the upload (the
    /// first region, unless `--region` named others). Keys belong to regions, whatever the
    /// order: the first recipe region's is `kms_key_arn` (which, with no regions in the recipe,
    /// is the source's), the others' are in `region_settings`.
    pub fn region(&self, region: &str, source: &str) -> (Delivery, Option<&str>) {
        let first = self.regions.first().map_or(source, String::as_str);
        let key = if region == first {
            self.kms_key_arn.as_deref()
        } else {
            self.region_settings.get(region).and_then(|r| r.kms_key_arn.as_deref())
        };
        let via = if region == source {
            Delivery::Upload
        } else {
            self.region_settings.get(region).map_or(Delivery::Copy, |r| r.via)
        };
        (via, key)
    }

    /// Extra volumes' KMS keys are regional like the snapshot's: an AMI registered in a region
    /// of its own upload would name the first region's key there.
    fn volume_key_in_upload_region(&self) -> Option<&str> {
        let upload = first_upload_region(&self.region_settings)?;
        self.volumes.iter().any(|v| v.kms_key_id.is_some()).then_some(upload)
    }

    pub fn problems(&self, arch: Arch, image_boot: BootMode, image_bytes: u64) -> Vec<(String, crate::ec2::Problem)> {
        use crate::ec2::{check_boot, check_volume, VolumeRequest};
        let mut out: Vec<(String, crate::ec2::Problem)> = check_boot(arch, image_boot, self.boot_mode, self.tpm, false)
            .into_iter()
            .map(|p| (format!("ami.{}", p.field), p))
            .collect();
        let r = &self.root_volume;
        let volumes =
            std::iter::once(("ami.root_volume".to_string(), r.volume_type, r.size_gib, r.iops, r.throughput, true))
                .chain(self.volumes.iter().enumerate().map(|(i, v)| {
                    (format!("ami.volumes[{i}]"), v.volume_type, Some(v.size_gib), v.iops, v.throughput, false)
                }));
        for (prefix, volume_type, size_gib, iops, throughput, root) in volumes {
            let req = VolumeRequest {
                volume_type,
                size_gib,
                iops: iops.map(i64::from),
                throughput: throughput.map(i64::from),
                root,
            };
            if let Err(ps) = check_volume(&req) {
                out.extend(ps.into_iter().map(|p| (format!("{prefix}.{}", p.field), p)));
            }
        }
        if let Some(d) = &self.deprecate_after {
            if let Err(message) = d.when.check_days(self.launch_permissions.public) {
                out.push((
                    "ami.deprecate_after".into(),
                    crate::ec2::Problem { field: "deprecate_after", message, help: None },
                ));
            }
        }
        for name in &self.ssm_parameters {
            if let Err(why) = crate::ec2::check_ssm_parameter_name(name) {
                out.push((
                    "ami.ssm.parameters".into(),
                    crate::ec2::Problem { field: "parameters", message: format!("`{name}` {why}"), help: None },
                ));
            }
        }
        let mut keys: Vec<(String, &str, Option<&str>, Delivery)> = Vec::new();
        if let Some(k) = &self.kms_key_arn {
            keys.push(("ami.kms_key_arn".into(), k, self.regions.first().map(String::as_str), Delivery::Upload));
        }
        if let Some(region) = self.volume_key_in_upload_region() {
            out.push(("ami.volumes".into(), crate::ec2::volume_keys_and_uploads(region)));
        }
        for (region, rs) in &self.region_settings {
            if !self.regions.contains(region) || self.regions.first() == Some(region) {
                out.push((
                    format!("ami.regions.{region}"),
                    crate::ec2::Problem {
                        field: "regions",
                        message: format!("settings for `{region}`, which is not a region after the first"),
                        help: None,
                    },
                ));
            }
            if let Some(k) = &rs.kms_key_arn {
                keys.push((format!("ami.regions.{region}.kms_key_arn"), k, Some(region), rs.via));
            }
        }
        for (key, arn, region, via) in keys {
            if let Err(p) = crate::ec2::check_kms_key(arn, region, via, self.encrypted) {
                out.push((key, p));
            }
        }
        // A built image's root volume has a size: the recipe's, or the image's own.
        match r.size_gib {
            None => out.push((
                "ami.root_volume.size".into(),
                crate::ec2::Problem {
                    field: "size",
                    message: "the root volume has no size (0 GiB)".into(),
                    help: None,
                },
            )),
            Some(g) => {
                if let Some(p) = crate::ec2::root_too_small(g, &format!("{g} GiB"), image_bytes) {
                    out.push(("ami.root_volume.size".into(), p));
                }
            }
        }
        out
    }
}

impl Manifest {
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let text = std::fs::read(path).map_err(|source| ManifestError::Read { path: path.into(), source })?;
        let raw: RawManifest =
            serde_json::from_slice(&text).map_err(|source| ManifestError::Parse { path: path.into(), source })?;
        if raw.manifest_version != MANIFEST_VERSION {
            return Err(ManifestError::Version { path: path.into(), found: raw.manifest_version });
        }
        let m = Manifest::try_from(raw).map_err(|FieldError { field, message }| ManifestError::Field {
            path: path.into(),
            field,
            message,
        })?;
        // Every step after the build trusts a loaded manifest's AMI settings as `kiln check`
        // left them: the same rules judge them again here, the one door a manifest comes in by.
        if let Some(ami) = &m.ami {
            if let Some((key, p)) = ami.problems(m.arch, m.boot, m.image.size_bytes).into_iter().next() {
                return Err(ManifestError::Ami { path: path.into(), key, message: p.message, help: p.help });
            }
        }
        Ok(m)
    }

    /// The raw image's path, given the manifest's own path.
    pub fn image_path(&self, manifest_path: &Path) -> PathBuf {
        manifest_path.parent().unwrap_or(Path::new(".")).join(&self.image.file)
    }

    /// `os` as the file writes it: the recipe's spelling, or `custom` for a tarball base.
    pub fn os_name(&self) -> &'static str {
        self.os.map_or(CUSTOM_OS, Os::as_str)
    }

    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("manifest serializes");
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("../../fixtures/manifest/ec2.manifest.json");

    /// Loads `text` as a manifest file, the one door a manifest comes in by.
    fn load(text: &str) -> Result<Manifest, ManifestError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.manifest.json");
        std::fs::write(&path, text).unwrap();
        Manifest::load(&path)
    }

    /// The fixture with `edit` applied to its JSON.
    fn edited(edit: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut v: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
        edit(&mut v);
        serde_json::to_string_pretty(&v).unwrap()
    }

    fn field_error(text: &str) -> (String, String) {
        match load(text) {
            Err(ManifestError::Field { field, message, .. }) => (field, message),
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    /// The fixture with `from` (found once) replaced: an edit that keeps the file's field order.
    fn replaced(from: &str, to: &str) -> String {
        assert_eq!(FIXTURE.matches(from).count(), 1, "{from}");
        FIXTURE.replace(from, to)
    }

    #[test]
    fn a_manifest_is_written_back_byte_for_byte() {
        let m = load(FIXTURE).unwrap();
        assert_eq!(m.os, Some(Os::Debian12));
        assert!(m.blocks.data_blocks.iter().all(|b| b.sha256.to_string().len() == 64));
        // The fixture file lacks the final newline kiln writes.
        assert_eq!(m.to_json(), format!("{FIXTURE}\n"));
        // A tarball base has no os: `custom`, both ways.
        let custom = FIXTURE.replacen("\n  \"os\": \"debian-12\",", "\n  \"os\": \"custom\",", 1);
        let m = load(&custom).unwrap();
        assert_eq!((m.os, m.os_name()), (None, "custom"));
        assert_eq!(m.to_json(), format!("{custom}\n"));
    }

    #[test]
    fn a_block_digest_that_is_not_64_hex_digits_is_refused_by_field() {
        let short = edited(|v| {
            let d = &mut v["blocks"]["data_blocks"][1]["sha256"];
            *d = d.as_str().unwrap()[1..].into();
        });
        let (field, message) = field_error(&short);
        assert_eq!(field, "blocks.data_blocks[1].sha256");
        assert!(message.contains("is not 64 hex digits"), "{message}");
        let (field, _) = field_error(&edited(|v| v["blocks"]["data_blocks"][0]["sha256"] = "zz".repeat(32).into()));
        assert_eq!(field, "blocks.data_blocks[0].sha256");
    }

    #[test]
    fn an_unknown_os_is_refused_by_field() {
        let (field, message) = field_error(&edited(|v| v["os"] = "debian-11".into()));
        assert_eq!(field, "os");
        assert!(message.contains("`debian-11` is not an os kiln knows (debian-12, debian-13, custom)"), "{message}");
    }

    #[test]
    fn a_bad_deprecation_is_refused_by_field_and_a_good_one_kept_as_written() {
        let (field, message) = field_error(&edited(|v| v["ami"]["deprecate_after"] = "soon".into()));
        assert_eq!(field, "ami.deprecate_after");
        assert!(message.contains("is neither a number of days"), "{message}");
        let e = load(&edited(|v| v["ami"]["deprecate_after"] = "0d".into())).unwrap_err().to_string();
        assert!(e.ends_with("ami.deprecate_after: `0d` is not a number of days from 1 (like \"180d\")"), "{e}");

        let text = replaced(
            "\"encrypted\": false\n  },",
            "\"encrypted\": false,\n    \"deprecate_after\": \"2027-06-01T00:00:00+00:00\"\n  },",
        );
        let m = load(&text).unwrap();
        let d = m.ami.as_ref().unwrap().deprecate_after.as_ref().unwrap();
        assert_eq!(d.when, Deprecation::At(1_811_808_000));
        assert_eq!(m.to_json(), format!("{text}\n"), "the time is written back as the recipe wrote it");
    }

    #[test]
    fn a_root_volume_size_of_zero_is_unset_and_refused_in_a_built_image() {
        let text = edited(|v| v["ami"]["root_volume"]["size_gib"] = 0.into());
        match load(&text) {
            Err(ManifestError::Ami { key, message, .. }) => {
                assert_eq!(key, "ami.root_volume.size");
                assert!(message.contains("no size"), "{message}");
            }
            other => panic!("expected the root volume to be refused, got {other:?}"),
        }
        // The file's 0 is the type's None, both ways.
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let ami: AmiSettings = serde_json::from_value(v["ami"].clone()).unwrap();
        assert_eq!(ami.root_volume.size_gib, None);
        let back = serde_json::to_value(&ami).unwrap();
        assert_eq!(back["root_volume"]["size_gib"], 0);
    }
}
