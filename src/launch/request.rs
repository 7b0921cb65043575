//! What `kiln test` (and `kiln build --test`) is asked to do, and how an image's manifest turns
//! that into [`TestOptions`]: the defaults EC2 would apply (root volume size, region) and
//! kiln's own (time per launch, guest memory) are decided here, once, and the report and logs
//! are written where [`Outputs`] says.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::boot::Firmware;
use crate::manifest::{Manifest, ManifestError, TestResult};
use crate::outputs::Outputs;
use crate::platform::{Arch, BootMode};
use crate::progress::Progress;

use super::{LaunchError, TestOptions, TestReport};

/// Guest memory: what the smallest instance types that run Debian comfortably have.
pub const DEFAULT_MEMORY_MIB: u32 = 1024;
/// The root volume when neither the request nor the manifest's `[ami]` names one: the size
/// EC2's console proposes for a Linux AMI.
pub const DEFAULT_VOLUME_BYTES: u64 = 8 << 30;
/// The region the metadata service reports when the recipe names none: AWS's default region.
pub const DEFAULT_REGION: &str = "us-east-1";

/// How long one launch may take from power-on to its last check. Under QEMU's software
/// emulation an x86_64 Debian reaches its checks in 1–2 minutes; arm64 on an x86_64 host is
/// many times slower (cloud-init's Python above all), so it gets three times as long.
pub fn launch_timeout(arch: Arch) -> Duration {
    match arch {
        Arch::X86_64 => Duration::from_secs(600),
        _ => Duration::from_secs(1800),
    }
}

/// The launch key the caller brings instead of a key made for the run.
#[derive(Debug, Clone)]
pub struct LaunchKey {
    pub public: PathBuf,
    pub identity: PathBuf,
}

/// What the caller asks of a test; everything left out comes from the manifest or the
/// defaults above.
#[derive(Debug, Clone)]
pub struct TestRequest {
    pub launches: u32,
    /// The root volume's size; None: the manifest's `[ami]` root volume, else 8 GiB.
    pub volume_bytes: Option<u64>,
    /// Who logs in; None: the recipe's `[test].user`, cloud-init's default user, or root.
    pub user: Option<String>,
    pub key: Option<LaunchKey>,
    /// A file served as user data; None: a script that writes a marker kiln checks for.
    pub user_data: Option<PathBuf>,
    /// Commands run after the recipe's own `[test].commands`.
    pub run: Vec<String>,
    /// Per launch; None: [`launch_timeout`] for the architecture.
    pub timeout: Option<Duration>,
    pub memory_mib: u32,
    pub echo_console: bool,
    /// Keep the console and metadata logs even when every check passes.
    pub keep_logs: bool,
}

impl Default for TestRequest {
    fn default() -> Self {
        TestRequest {
            launches: 1,
            volume_bytes: None,
            user: None,
            key: None,
            user_data: None,
            run: Vec::new(),
            timeout: None,
            memory_mib: DEFAULT_MEMORY_MIB,
            echo_console: false,
            keep_logs: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TestError {
    #[error("{} names the image {}, which does not exist", manifest.display(), image.display())]
    ManifestWithoutImage { manifest: PathBuf, image: PathBuf },
    #[error("{} does not exist (give the raw image or its .manifest.json)", .0.display())]
    NoImage(PathBuf),
    #[error("{} describes {described}, not {image}", manifest.display())]
    OtherImage { manifest: PathBuf, described: String, image: String },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{} has no kiln root partition to tell its architecture by, and no manifest beside it", .0.display())]
    NoArch(PathBuf),
    #[error("{what} {}", path.display())]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("finding kiln's own path for the metadata relay")]
    OwnPath(#[source] std::io::Error),
    #[error(transparent)]
    Launch(#[from] LaunchError),
}

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TestError + 'a {
    move |source| TestError::Io { what, path: path.to_path_buf(), source }
}

/// The image under test and, when it has one, its manifest and the manifest's path.
#[derive(Debug, Clone)]
pub struct TestTarget {
    pub image: PathBuf,
    pub manifest: Option<(PathBuf, Manifest)>,
}

impl TestTarget {
    /// From the raw image (its manifest beside it, if any) or from the manifest.
    pub fn locate(arg: &Path) -> Result<TestTarget, TestError> {
        if Outputs::is_manifest(arg) {
            let m = Manifest::load(arg)?;
            let image = m.image_path(arg);
            if !image.is_file() {
                return Err(TestError::ManifestWithoutImage { manifest: arg.to_path_buf(), image });
            }
            return Ok(TestTarget { image, manifest: Some((arg.to_path_buf(), m)) });
        }
        if !arg.is_file() {
            return Err(TestError::NoImage(arg.to_path_buf()));
        }
        let manifest_path = Outputs::of(arg).manifest();
        let manifest = if manifest_path.is_file() {
            let m = Manifest::load(&manifest_path)?;
            let name = arg.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if m.image.file != name {
                return Err(TestError::OtherImage {
                    manifest: manifest_path,
                    described: m.image.file.clone(),
                    image: name,
                });
            }
            Some((manifest_path, m))
        } else {
            None
        };
        Ok(TestTarget { image: arg.to_path_buf(), manifest })
    }

    fn manifest(&self) -> Option<&Manifest> {
        self.manifest.as_ref().map(|(_, m)| m)
    }
}

/// The Secure Boot keys and TPM an instance of this image gets on EC2: the manifest's
/// UefiData and `[ami].tpm`.
pub fn trust(manifest: Option<&Manifest>) -> crate::boot::Trust {
    crate::boot::Trust {
        uefi_data: manifest.and_then(|m| m.secure_boot.as_ref()).map(|s| s.uefi_data.clone()),
        tpm: manifest.and_then(|m| m.ami.as_ref()).is_some_and(|a| a.tpm),
    }
}

/// The launch options for `target`: the request where it says, else the manifest (the AMI's
/// root volume, volumes, IMDS setting, first region; the login user and checks the build
/// recorded), else the defaults.
pub fn options(target: &TestTarget, req: &TestRequest) -> Result<TestOptions, TestError> {
    let manifest = target.manifest();
    let arch = match manifest {
        Some(m) => m.arch,
        None => crate::boot::detect_arch(&target.image).ok_or_else(|| TestError::NoArch(target.image.clone()))?,
    };
    let firmware = match manifest.map(|m| m.boot) {
        // EC2 registers BIOS images as legacy-bios; hybrid ones as uefi-preferred, which Nitro
        // boots with UEFI.
        Some(BootMode::Bios) => Firmware::Bios,
        _ => Firmware::Uefi,
    };
    let ami = manifest.and_then(|m| m.ami.as_ref());
    let settings = manifest.and_then(|m| m.test.as_ref());
    let cloud_init = settings.map(|s| s.cloud_init).unwrap_or(true);
    let user = req.user.clone().or_else(|| settings.map(|s| s.user.clone())).unwrap_or_else(|| "root".into());
    let key = match &req.key {
        Some(k) => {
            let public = std::fs::read_to_string(&k.public).map_err(io_error("reading --key", &k.public))?;
            Some((k.identity.clone(), public.trim().to_string()))
        }
        None => None,
    };
    let user_data = match &req.user_data {
        Some(p) => Some(std::fs::read(p).map_err(io_error("reading --user-data", p))?),
        None => None,
    };
    let mut commands = settings.map(|s| s.commands.clone()).unwrap_or_default();
    commands.extend(req.run.iter().cloned());
    Ok(TestOptions {
        arch,
        firmware,
        volume_bytes: req
            .volume_bytes
            .or_else(|| ami.and_then(|a| a.root_volume.size_gib).map(|g| u64::from(g) << 30))
            .unwrap_or(DEFAULT_VOLUME_BYTES),
        extra_volume_bytes: ami
            .map(|a| a.volumes.iter().map(|v| u64::from(v.size_gib) << 30).collect())
            .unwrap_or_default(),
        tokens_required: ami.and_then(|a| a.imds) == Some(crate::ec2::ImdsSupport::V2),
        root_key_credential: !cloud_init && user == "root",
        user,
        key,
        user_data,
        commands,
        esp_mount: settings.and_then(|s| s.esp_mount.clone()),
        launches: req.launches,
        timeout: req.timeout.unwrap_or_else(|| launch_timeout(arch)),
        memory_mib: req.memory_mib,
        echo_console: req.echo_console,
        ami_id: stand_in_ami_id(manifest),
        region: ami.and_then(|a| a.regions.first().cloned()).unwrap_or_else(|| DEFAULT_REGION.into()),
        relay_exe: std::env::current_exe().map_err(TestError::OwnPath)?,
        trust: trust(manifest),
        pcrs: manifest.and_then(|m| m.secure_boot.as_ref()).map(|s| s.pcrs.clone()).unwrap_or_default(),
    })
}

/// The AMI id the metadata service reports before there is an AMI: EC2's shape, derived from
/// the image's digest so two builds of different bytes never share one.
fn stand_in_ami_id(manifest: Option<&Manifest>) -> String {
    format!("ami-0{}", manifest.map(|m| m.image.sha256[..16].to_string()).unwrap_or_else(|| "0".repeat(16)))
}

/// A finished test: the report, where it was written, and the kept logs' folder.
#[derive(Debug)]
pub struct TestOutcome {
    pub report: TestReport,
    /// The report as JSON, as written to `report_path`.
    pub json: String,
    pub report_path: PathBuf,
    /// Set when the test failed or the request asked to keep the logs.
    pub logs: Option<PathBuf>,
}

/// Launches `target` with `opts`, then writes the report beside the image and, on failure or
/// when asked, keeps each launch's console and metadata logs.
pub fn run(
    target: &TestTarget,
    opts: &TestOptions,
    keep_logs: bool,
    progress: &dyn Progress,
) -> Result<TestOutcome, TestError> {
    let work = tempfile::Builder::new()
        .prefix("kiln-test-")
        .tempdir()
        .map_err(io_error("creating a work directory in", &std::env::temp_dir()))?;
    let report = super::test(&target.image, opts, work.path(), progress)?;
    let json = serde_json::to_string_pretty(&report).expect("report serializes");
    let outputs = Outputs::of(&target.image);
    let report_path = outputs.test_report();
    crate::formats::atomic::write(&report_path, format!("{json}\n").as_bytes())
        .map_err(io_error("writing", &report_path))?;
    let logs = if !report.passed || keep_logs { Some(keep_launch_logs(&outputs, work.path(), &report)?) } else { None };
    Ok(TestOutcome { report, json, report_path, logs })
}

/// Copies each launch's console log, metadata request log and the facts the instance reported
/// (the TPM's event log among them) to NAME.test/ beside the image.
fn keep_launch_logs(outputs: &Outputs, work: &Path, report: &TestReport) -> Result<PathBuf, TestError> {
    let dir = outputs.test_logs();
    std::fs::create_dir_all(&dir).map_err(io_error("creating", &dir))?;
    for l in &report.launches {
        let n = l.launch;
        let console = work.join(format!("launch-{n}/console.log"));
        if console.is_file() {
            std::fs::copy(&console, dir.join(format!("launch-{n}.console.log")))
                .map_err(io_error("keeping the console log in", &dir))?;
        }
        let imds = serde_json::to_string_pretty(&l.imds_requests).expect("log serializes");
        std::fs::write(dir.join(format!("launch-{n}.imds.json")), imds)
            .map_err(io_error("keeping the metadata log in", &dir))?;
        let facts = serde_json::to_string_pretty(&l.facts).expect("facts serialize");
        std::fs::write(dir.join(format!("launch-{n}.facts.json")), facts)
            .map_err(io_error("keeping the instance's facts in", &dir))?;
    }
    Ok(dir)
}

/// Records a test's verdict in the manifest it tested (`kiln build --test`), so `kiln publish`
/// can refuse an image that failed.
pub fn record_result(manifest_path: &Path, manifest: &mut Manifest, outcome: &TestOutcome) -> Result<(), TestError> {
    manifest.test_result = Some(TestResult {
        passed: outcome.report.passed,
        launches: u32::try_from(outcome.report.launches.len()).unwrap_or(u32::MAX),
        failures: outcome.report.failures(),
        report: outcome.report_path.file_name().unwrap_or_default().to_string_lossy().into_owned(),
    });
    crate::formats::atomic::write(manifest_path, manifest.to_json().as_bytes())
        .map_err(io_error("writing", manifest_path))
}
