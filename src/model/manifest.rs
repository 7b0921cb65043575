//! The build manifest: everything later steps (publish, bundle, audits) need to know about a
//! built image, written beside it as `NAME.manifest.json`.
//!
//! The block list is the uploader's source of truth about zeros: a 512 KiB block not listed
//! holds only zeros, so publishing never reads or scans the rest of the image.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ec2::{Delivery, Ec2BootMode, ImdsSupport, VolumeType};
pub use crate::formats::image::{BlockDigest, BlockMap};
use crate::platform::{Arch, BootMode};

/// EBS direct APIs move snapshots in blocks of 512 KiB.
pub const EBS_BLOCK_SIZE: u64 = 524_288;

/// Bumped when a field changes meaning; readers refuse versions they do not know.
pub const MANIFEST_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub manifest_version: u32,
    pub kiln_version: String,
    /// Output name, architecture included (`debian-12-minimal-x86_64`).
    pub name: String,
    pub recipe: RecipeInfo,
    pub os: String,
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
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct AmiSettings {
    /// May contain `{date}` (UTC YYYYMMDD of SOURCE_DATE_EPOCH), `{arch}`, `{name}`, `{sha}`
    /// (first 12 hex digits of the image SHA-256).
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The first region is where the snapshot is uploaded; the others receive CopyImage, or
    /// an upload of their own ([`AmiSettings::region`]).
    pub regions: Vec<String>,
    /// Settings of regions after the first that differ from the default (a copy, encrypted
    /// with the region's default key when `encrypted`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub region_settings: BTreeMap<String, RegionSettings>,
    pub root_volume: RootVolume,
    pub ena: bool,
    pub sriov: bool,
    pub tpm: bool,
    /// `v2.0` to require IMDSv2, or none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imds: Option<ImdsSupport>,
    pub boot_mode: Ec2BootMode,
    pub launch_permissions: LaunchPermissions,
    pub tags: BTreeMap<String, String>,
    pub volumes: Vec<ExtraVolume>,
    /// Encrypt the snapshot (and so the root volume); with a KMS key ARN, or the account default.
    pub encrypted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key_arn: Option<String>,
    /// Retention: after each publish, keep this many of the newest AMIs of the image (per
    /// region) and deregister the older ones with their snapshots (`kiln prune`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<u32>,
    /// SSM parameter names (`/golden/{name}/{arch}/latest`) set to the AMI's id in each
    /// region, with the `aws:ec2:image` data type; may hold `{name}`, `{arch}`, `{region}`,
    /// `{date}` and `{sha}`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssm_parameters: Vec<String>,
    /// `180d` (days after publishing) or an RFC 3339 time: EnableImageDeprecation on the AMI
    /// and every copy ([`crate::ec2::Deprecation`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deprecate_after: Option<String>,
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
    pub size_gib: u32,
    pub volume_type: VolumeType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throughput: Option<u32>,
    pub delete_on_termination: bool,
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
                    (format!("ami.volumes[{i}]"), v.volume_type, v.size_gib, v.iops, v.throughput, false)
                }));
        for (prefix, volume_type, size_gib, iops, throughput, root) in volumes {
            let req = VolumeRequest {
                volume_type,
                size_gib: Some(size_gib),
                iops: iops.map(i64::from),
                throughput: throughput.map(i64::from),
                root,
            };
            if let Err(ps) = check_volume(&req) {
                out.extend(ps.into_iter().map(|p| (format!("{prefix}.{}", p.field), p)));
            }
        }
        if let Some(d) = &self.deprecate_after {
            if let Err(message) = crate::ec2::Deprecation::check(d, self.launch_permissions.public) {
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
        if let Some(p) = crate::ec2::root_too_small(r.size_gib, &format!("{} GiB", r.size_gib), image_bytes) {
            out.push(("ami.root_volume.size".into(), p));
        }
        out
    }
}

impl Manifest {
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let text = std::fs::read(path).map_err(|source| ManifestError::Read { path: path.into(), source })?;
        let m: Manifest =
            serde_json::from_slice(&text).map_err(|source| ManifestError::Parse { path: path.into(), source })?;
        if m.manifest_version != MANIFEST_VERSION {
            return Err(ManifestError::Version { path: path.into(), found: m.manifest_version });
        }
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

    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("manifest serializes");
        s.push('\n');
        s
    }
}
