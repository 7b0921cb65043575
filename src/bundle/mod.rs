//! Packaging a built image as an EC2 instance-store bundle, and optionally uploading it to S3
//! and registering it ([`upload`]).
//!
//! The inputs come from flags first, then from the build manifest beside the image (its
//! `[bundle]` settings, architecture, boot mode and SOURCE_DATE_EPOCH). A bare raw image with
//! no manifest works too: then the flags carry everything and the MBR is read to tell whether
//! the image can boot in BIOS mode. The format itself lives in `formats::bundle`.

pub mod upload;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::formats::bundle::{self as fmt, BundleError, BundleSpec, Credentials, Secrets};
use crate::manifest::{Manifest, ManifestError};
use crate::platform::Arch;
use crate::progress::Progress;

#[derive(Debug, Clone, Default)]
pub struct BundleOptions {
    /// `out/NAME.raw` or `out/NAME.manifest.json`.
    pub input: PathBuf,
    pub account: Option<String>,
    pub user_cert: Option<PathBuf>,
    pub user_key: Option<PathBuf>,
    pub ec2_cert: Option<PathBuf>,
    /// Output directory; default `NAME.bundle/` beside the image.
    pub out_dir: Option<PathBuf>,
    /// Bundle name; default the build's name, or the image's file name without `.raw`.
    pub name: Option<String>,
    /// Architecture when there is no manifest (default x86_64).
    pub arch: Option<Arch>,
    /// gzip level 1–9.
    pub level: u32,
    /// Compression threads; 0 is one per core.
    pub threads: usize,
    /// `s3://bucket/prefix`: upload after bundling (default: the recipe's `[bundle].upload`
    /// when `register` is set).
    pub upload: Option<String>,
    pub register: bool,
    /// AMI name for RegisterImage; default the bundle name.
    pub ami_name: Option<String>,
    pub description: Option<String>,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    /// Parts uploaded at once.
    pub concurrency: usize,
}

/// Everything resolved and checked before any work starts.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub image: PathBuf,
    pub manifest: Option<Manifest>,
    pub spec: BundleSpec,
    pub user_cert: PathBuf,
    pub user_key: PathBuf,
    pub ec2_cert: PathBuf,
    pub out_dir: PathBuf,
    pub upload: Option<upload::S3Location>,
    /// Things the user should know but that do not stop the bundle.
    pub warnings: Vec<String>,
}

/// What `kiln bundle` did; printed with `--json` and written as `NAME.bundle.json`.
#[derive(Debug, Clone, Serialize)]
pub struct BundleRecord {
    pub name: String,
    pub manifest: PathBuf,
    pub parts: Vec<PathBuf>,
    pub image_bytes: u64,
    pub bundled_bytes: u64,
    pub tar_sha1: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uploaded: Option<upload::UploadRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleStageError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Format(#[from] BundleError),
    #[error("{0} does not exist; pass the raw image (out/NAME.raw) or its build manifest (out/NAME.manifest.json)")]
    NoInput(PathBuf),
    #[error("instance-store bundles cannot be made for arm64: instance-store roots exist only on older x86_64 instance families (C1, C3, D2, I2, M1, M2, M3, R3, X1), which boot legacy BIOS; publish arm64 images as EBS-backed AMIs with `kiln publish`")]
    Arm64,
    #[error("no {what}: pass {flag} or set {key} in the recipe's [bundle] section")]
    Missing { what: &'static str, flag: &'static str, key: &'static str },
    #[error("--register needs an S3 location: pass --upload s3://BUCKET/PREFIX or set [bundle].upload in the recipe")]
    RegisterWithoutUpload,
    #[error("`{0}` is not an AMI name EC2 accepts ({rule}); pass --ami-name", rule = crate::ec2::AMI_NAME_RULE)]
    AmiName(String),
    #[error(transparent)]
    Upload(#[from] upload::UploadError),
    #[error("writing {path}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// Resolves flags, the manifest's settings and defaults, and applies the guardrails.
pub fn resolve(o: &BundleOptions) -> Result<Resolved, BundleStageError> {
    if !o.input.exists() {
        return Err(BundleStageError::NoInput(o.input.clone()));
    }
    let (image, manifest) = if o.input.to_string_lossy().ends_with(".json") {
        let m = Manifest::load(&o.input)?;
        (m.image_path(&o.input), Some(m))
    } else {
        let beside = crate::outputs::Outputs::of(&o.input).manifest();
        let m = if beside.is_file() { Some(Manifest::load(&beside)?) } else { None };
        (o.input.clone(), m)
    };
    let member_name = image.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let name = o
        .name
        .clone()
        .or_else(|| manifest.as_ref().map(|m| m.name.clone()))
        .unwrap_or_else(|| member_name.strip_suffix(".raw").unwrap_or(&member_name).to_string());

    let arch = o.arch.or(manifest.as_ref().map(|m| m.arch)).unwrap_or(Arch::X86_64);
    if arch == Arch::Arm64 {
        return Err(BundleStageError::Arm64);
    }
    let mut warnings = Vec::new();
    match manifest.as_ref().map(|m| m.boot) {
        Some(b) if !b.has_bios() => warnings.push(format!(
            "the image was built with boot = \"{b}\", but instance-store families boot legacy BIOS only: it will not boot there; build it with [image].boot = \"hybrid\" (or \"bios\")"
        )),
        Some(_) => {}
        None => {
            if !mbr_has_boot_code(&image).map_err(|source| BundleStageError::Write { path: image.clone(), source })? {
                warnings.push(format!(
                    "{} has no boot code in its MBR, so it cannot boot in BIOS mode, which is all instance-store families offer",
                    image.display()
                ));
            }
        }
    }
    let settings = manifest.as_ref().and_then(|m| m.bundle.clone()).unwrap_or_default();
    let account = o.account.clone().or(settings.account).ok_or(BundleStageError::Missing {
        what: "AWS account id",
        flag: "--account 123456789012",
        key: "account",
    })?;
    let user_cert = o.user_cert.clone().or(settings.user_cert).ok_or(BundleStageError::Missing {
        what: "user certificate",
        flag: "--user-cert cert.pem",
        key: "user_cert",
    })?;
    let user_key = o.user_key.clone().or(settings.user_key).ok_or(BundleStageError::Missing {
        what: "user private key",
        flag: "--user-key pk.pem",
        key: "user_key",
    })?;
    let ec2_cert = o.ec2_cert.clone().or(settings.ec2_cert).ok_or(BundleStageError::Missing {
        what: "EC2 certificate",
        flag: "--ec2-cert cert-ec2.pem",
        key: "ec2_cert",
    })?;
    let upload_url = o.upload.clone().or_else(|| if o.register { settings.upload.clone() } else { None });
    if o.register && upload_url.is_none() {
        return Err(BundleStageError::RegisterWithoutUpload);
    }
    let upload = upload_url.as_deref().map(upload::S3Location::parse).transpose().map_err(upload::UploadError::from)?;
    let mtime = manifest
        .as_ref()
        .map(|m| m.source_date_epoch)
        .or_else(|| std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
        .max(0) as u64;
    let out_dir =
        o.out_dir.clone().unwrap_or_else(|| image.parent().unwrap_or(Path::new(".")).join(format!("{name}.bundle")));
    let spec = BundleSpec {
        name,
        member_name,
        arch: arch.as_str().to_string(),
        account,
        mtime,
        mappings: BundleSpec::default_mappings(),
        level: o.level,
        threads: o.threads,
    };
    if o.register {
        let name = o.ami_name.as_deref().unwrap_or(&spec.name);
        if !crate::ec2::valid_ami_name(name) {
            return Err(BundleStageError::AmiName(name.to_string()));
        }
    }
    Ok(Resolved { image, manifest, spec, user_cert, user_key, ec2_cert, out_dir, upload, warnings })
}

/// GRUB (and every BIOS boot loader) puts code in the first 440 bytes of sector 0; a GPT
/// disk made only for UEFI has zeros there.
fn mbr_has_boot_code(image: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let mut sector = [0u8; 440];
    let mut f = std::fs::File::open(image)?;
    let n = f.read(&mut sector)?;
    Ok(sector[..n].iter().any(|&b| b != 0))
}

/// Writes the bundle, then uploads and registers it if asked. Key and IV come from the
/// operating system's random source: they protect the image, so they are never derived from
/// the recipe (which makes bundles, unlike images, differ from run to run).
pub fn run(r: &Resolved, o: &BundleOptions, progress: &dyn Progress) -> Result<BundleRecord, BundleStageError> {
    for w in &r.warnings {
        progress.note(&format!("warning: {w}"));
    }
    let creds = Credentials::load(&r.user_cert, &r.user_key, &r.ec2_cert)?;
    let mut rng = rand::rng();
    let secrets = Secrets::random(&mut rng);
    let s = fmt::bundle(&r.image, &r.out_dir, &r.spec, &creds, secrets, &mut rng, progress)?;
    let mut record = BundleRecord {
        name: r.spec.name.clone(),
        manifest: s.manifest_path.clone(),
        parts: s.part_paths.clone(),
        image_bytes: s.manifest.size,
        bundled_bytes: s.manifest.bundled_size,
        tar_sha1: s.manifest.tar_sha1.clone(),
        uploaded: None,
    };
    if let Some(loc) = &r.upload {
        let region = o.region.clone().or_else(|| r.manifest.as_ref().and_then(|m| m.bundle.as_ref()?.region.clone()));
        let up = upload::UploadOptions {
            location: loc.clone(),
            region,
            endpoint_url: o.endpoint_url.clone(),
            concurrency: o.concurrency.max(1),
            register: o.register.then(|| upload::Register {
                name: o.ami_name.clone().unwrap_or_else(|| r.spec.name.clone()),
                description: o.description.clone(),
                arch: r.spec.arch.clone(),
            }),
        };
        record.uploaded = Some(upload::upload(&s, &up, progress)?);
    }
    let path = crate::outputs::Outputs::new(&r.out_dir, &r.spec.name).bundle_record();
    let json = serde_json::to_vec_pretty(&record).expect("the record serialises");
    crate::formats::atomic::write(&path, &json)
        .map_err(|source| BundleStageError::Write { path: path.clone(), source })?;
    Ok(record)
}
