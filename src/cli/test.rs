//! `kiln test`: launch an image the way EC2 launches it and judge what comes up.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kiln::boot::Firmware;
use kiln::launch::checks::{Check, Status};
use kiln::launch::{self, TestOptions, TestReport};
use kiln::manifest::{Manifest, TestResult};
use kiln::outputs::Outputs;
use kiln::platform::{Arch, BootMode};
use kiln::recipe::size::{parse_disk_size, DiskSize};

use super::progress::TermProgress;

/// Launch an image on this machine the way EC2 launches it, log in, and check that it works.
///
/// The instance gets what EC2 gives it: its firmware (OVMF, AAVMF, SeaBIOS for BIOS images),
/// the root volume as NVMe enlarged to the AMI's root volume size (a copy-on-write overlay:
/// the image is never written), the [[ami.volumes]], Nitro's SMBIOS identity, and an instance
/// metadata service at 169.254.169.254 (IMDSv2; requests without a token are refused when the
/// recipe sets imds = "v2.0") with a launch key made for this run and user data. Its network
/// reaches nothing but that service and the forwarded SSH port.
///
/// Checks: SSH login with the launch key; systemd running with no failed units; cloud-init
/// done with the EC2 data source and no errors; user data ran; root partition, backup GPT and
/// file system grown to the volume; machine-id and SSH host keys made at this launch (and
/// different between launches); resolv.conf written by the network stack, the hostname
/// resolves; the kernel command line has EC2's serial console and NVMe timeout; the ESP is
/// mounted where the recipe says; then the recipe's [test].commands. Exits 1 when any fails.
///
/// IMAGE is the raw image or its NAME.manifest.json; the manifest beside the image supplies
/// the AMI settings, the login user and the recipe's checks. The report is written to
/// NAME.test.json beside it; on failure the serial console and metadata request logs are kept
/// in NAME.test/.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
kiln test out/debian-12-ec2-x86_64.raw\n  \
kiln test out/debian-12-ec2-x86_64.manifest.json --launches 2     # identities must differ\n  \
kiln test out/web-server-x86_64.raw --run 'curl -fsS http://localhost/'\n  \
kiln test out/app.raw --user-data cloud-config.yaml --volume-size 20GiB\n  \
kiln test out/app.raw --key ~/.ssh/id_ed25519.pub --identity ~/.ssh/id_ed25519 --user admin\n  \
kiln test out/debian-12-ec2-arm64.raw --timeout 1800 --console      # arm64 emulation is slow\n  \
kiln test out/app.raw --json | jq .passed\n\n\
The loop: kiln build RECIPE && kiln test out/NAME-ARCH.raw && kiln publish out/NAME-ARCH.manifest.json\n\
(or kiln build RECIPE --test, which records the result in the manifest).")]
pub struct Args {
    /// The raw image (OUT/NAME-ARCH.raw) or its manifest (OUT/NAME-ARCH.manifest.json).
    pub image: PathBuf,
    /// Launch this many times; identities (machine-id, host keys) must differ between launches.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub launches: u32,
    /// Root volume size [default: the manifest's [ami] root volume, else 8GiB].
    #[arg(long, value_name = "SIZE")]
    pub volume_size: Option<String>,
    /// Log in as this user [default: the recipe's [test].user, cloud-init's default user, or root].
    #[arg(long)]
    pub user: Option<String>,
    /// Launch key: this public key is served as public-keys/0 (with --identity) [default: a new key per run].
    #[arg(long, value_name = "PUBKEY", requires = "identity")]
    pub key: Option<PathBuf>,
    /// The private key that goes with --key.
    #[arg(long, value_name = "KEY", requires = "key")]
    pub identity: Option<PathBuf>,
    /// Serve this file as user data [default: a script that writes a marker kiln checks for].
    #[arg(long, value_name = "FILE")]
    pub user_data: Option<PathBuf>,
    /// Also run this command over SSH after the checks; it must exit 0 (repeatable).
    #[arg(long = "run", value_name = "COMMAND")]
    pub run: Vec<String>,
    /// Seconds each launch may take from power-on to the last check [default: 600 x86_64, 1800 arm64].
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    pub memory: u32,
    /// Show the serial console while the instance boots.
    #[arg(long)]
    pub console: bool,
    /// Keep the console and metadata logs in NAME.test/ even when every check passes.
    #[arg(long)]
    pub keep_logs: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// The image, its manifest (when there is one) and the manifest's path.
fn locate(arg: &Path) -> Result<(PathBuf, Option<(PathBuf, Manifest)>)> {
    let name = arg.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if Outputs::is_manifest(arg) {
        let m = Manifest::load(arg)?;
        let image = m.image_path(arg);
        if !image.is_file() {
            bail!("{} names the image {}, which does not exist", arg.display(), image.display());
        }
        return Ok((image, Some((arg.to_path_buf(), m))));
    }
    if !arg.is_file() {
        bail!("{} does not exist (give the raw image or its .manifest.json)", arg.display());
    }
    let manifest_path = Outputs::of(arg).manifest();
    let manifest = if manifest_path.is_file() {
        let m = Manifest::load(&manifest_path)?;
        if m.image.file != name {
            bail!("{} describes {}, not {}", manifest_path.display(), m.image.file, name);
        }
        Some((manifest_path, m))
    } else {
        None
    };
    Ok((arg.to_path_buf(), manifest))
}

/// Where the report goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    /// Lines on stderr.
    Human,
    /// The JSON report on stdout.
    Json,
    /// Nothing but the report file (`kiln build --test --json`, whose stdout is the build's).
    Quiet,
}

pub fn run(args: Args) -> Result<()> {
    let (image, manifest) = locate(&args.image)?;
    let output = if args.json { Output::Json } else { Output::Human };
    let report = test_image(&image, manifest.as_ref().map(|(_, m)| m), &args, output)?;
    let passed = report.passed;
    if !passed {
        bail!("{}: {} check(s) failed: {}", image.display(), report.failures().len(), report.failures().join(", "));
    }
    Ok(())
}

/// Tests a freshly built image (`kiln build --test`) and records the result in its manifest.
pub fn test_built(manifest_path: &Path, quiet: bool) -> Result<()> {
    let args = Args {
        image: manifest_path.to_path_buf(),
        launches: 1,
        volume_size: None,
        user: None,
        key: None,
        identity: None,
        user_data: None,
        run: vec![],
        timeout: None,
        memory: 1024,
        console: false,
        keep_logs: false,
        json: false,
    };
    let (image, manifest) = locate(manifest_path)?;
    let (_, mut m) = manifest.expect("a build writes its manifest");
    let report = test_image(&image, Some(&m), &args, if quiet { Output::Quiet } else { Output::Human })?;
    m.test_result = Some(TestResult {
        passed: report.passed,
        launches: report.launches.len() as u32,
        failures: report.failures(),
        report: Outputs::of(&image).test_report().file_name().unwrap_or_default().to_string_lossy().into_owned(),
    });
    kiln::build::write_atomic(manifest_path, m.to_json().as_bytes())?;
    if !report.passed {
        bail!("{}: {} check(s) failed: {}", image.display(), report.failures().len(), report.failures().join(", "));
    }
    Ok(())
}

fn test_image(image: &Path, manifest: Option<&Manifest>, args: &Args, output: Output) -> Result<TestReport> {
    let arch = match manifest {
        Some(m) => m.arch,
        None => kiln::boot::detect_arch(image).with_context(|| {
            format!(
                "{} has no kiln root partition to tell its architecture by, and no manifest beside it",
                image.display()
            )
        })?,
    };
    let firmware = match manifest.map(|m| m.boot) {
        // EC2 registers BIOS images as legacy-bios; hybrid ones as uefi-preferred, which
        // Nitro boots with UEFI.
        Some(BootMode::Bios) => Firmware::Bios,
        _ => Firmware::Uefi,
    };
    let ami = manifest.and_then(|m| m.ami.as_ref());
    let volume_bytes = match &args.volume_size {
        Some(s) => match parse_disk_size(s).map_err(|e| anyhow::anyhow!("--volume-size {s:?}: {e}"))? {
            DiskSize::Bytes(b) => b,
            DiskSize::Auto => bail!("--volume-size needs a size, like 8GiB"),
        },
        None => ami.and_then(|a| a.root_volume.size_gib).map(|g| u64::from(g) << 30).unwrap_or(8 << 30),
    };
    let settings = manifest.and_then(|m| m.test.clone());
    let cloud_init = settings.as_ref().map(|s| s.cloud_init).unwrap_or(true);
    let user = args.user.clone().or_else(|| settings.as_ref().map(|s| s.user.clone())).unwrap_or_else(|| "root".into());
    let key = match (&args.key, &args.identity) {
        (Some(k), Some(i)) => {
            let public = std::fs::read_to_string(k).with_context(|| format!("reading --key {}", k.display()))?;
            Some((i.clone(), public.trim().to_string()))
        }
        _ => None,
    };
    let user_data = match &args.user_data {
        Some(p) => Some(std::fs::read(p).with_context(|| format!("reading --user-data {}", p.display()))?),
        None => None,
    };
    let mut commands = settings.as_ref().map(|s| s.commands.clone()).unwrap_or_default();
    commands.extend(args.run.iter().cloned());
    let opts = TestOptions {
        arch,
        firmware,
        volume_bytes,
        extra_volume_bytes: ami
            .map(|a| a.volumes.iter().map(|v| u64::from(v.size_gib) << 30).collect())
            .unwrap_or_default(),
        tokens_required: ami.and_then(|a| a.imds) == Some(kiln::ec2::ImdsSupport::V2),
        user: user.clone(),
        root_key_credential: !cloud_init && user == "root",
        key,
        user_data,
        commands,
        esp_mount: settings.as_ref().and_then(|s| s.esp_mount.clone()),
        launches: args.launches,
        timeout: Duration::from_secs(args.timeout.unwrap_or(if arch == Arch::X86_64 { 600 } else { 1800 })),
        memory_mib: args.memory,
        echo_console: args.console,
        ami_id: format!(
            "ami-0{}",
            manifest.map(|m| m.image.sha256[..16].to_string()).unwrap_or_else(|| "0".repeat(16))
        ),
        region: ami.and_then(|a| a.regions.first().cloned()).unwrap_or_else(|| "us-east-1".into()),
        relay_exe: std::env::current_exe().context("finding kiln's own path for the metadata relay")?,
    };
    let progress = TermProgress::new(output != Output::Human);
    if output == Output::Human {
        eprintln!(
            "kiln test: {} ({}, {}), {} launch{} on a {} GiB root volume, {}",
            image.display(),
            arch,
            if firmware == Firmware::Bios { "legacy BIOS" } else { "UEFI" },
            opts.launches,
            if opts.launches == 1 { "" } else { "es" },
            volume_bytes >> 30,
            if opts.tokens_required { "IMDSv2 only" } else { "IMDSv1 and v2" },
        );
    }
    let work = tempfile::Builder::new().prefix("kiln-test-").tempdir().context("creating a work directory")?;
    let report = launch::test(image, &opts, work.path(), &progress)?;

    let json = serde_json::to_string_pretty(&report).expect("report serializes");
    let rpath = Outputs::of(image).test_report();
    kiln::build::write_atomic(&rpath, format!("{json}\n").as_bytes())?;
    let logs = if !report.passed || args.keep_logs { Some(keep_logs(image, work.path(), &report)?) } else { None };
    match output {
        Output::Json => println!("{json}"),
        Output::Human => print_report(&report, &rpath, logs.as_deref()),
        Output::Quiet => {}
    }
    Ok(report)
}

/// Copies each launch's console log and metadata request log to NAME.test/ beside the image.
fn keep_logs(image: &Path, work: &Path, report: &TestReport) -> Result<PathBuf> {
    let dir = Outputs::of(image).test_logs();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for l in &report.launches {
        let n = l.launch;
        let console = work.join(format!("launch-{n}/console.log"));
        if console.is_file() {
            std::fs::copy(&console, dir.join(format!("launch-{n}.console.log")))
                .with_context(|| format!("keeping the console log in {}", dir.display()))?;
        }
        let imds = serde_json::to_string_pretty(&l.imds_requests).expect("log serializes");
        std::fs::write(dir.join(format!("launch-{n}.imds.json")), imds)
            .with_context(|| format!("keeping the metadata log in {}", dir.display()))?;
    }
    Ok(dir)
}

/// One check as a report line; `width` is the longest check id, so the evidence lines up.
fn line(c: &Check, width: usize) -> String {
    let tag = match c.status {
        Status::Pass => "PASS",
        Status::Fail => "FAIL",
        Status::Skip => "skip",
    };
    format!("  {tag}  {:<width$}  {}", c.id, c.evidence)
}

fn print_report(r: &TestReport, report_path: &Path, logs: Option<&Path>) {
    let secs = |s: Option<f64>| s.map(|s| format!("{s:.1} s")).unwrap_or_else(|| "not seen".into());
    let all = r.launches.iter().flat_map(|l| &l.checks).chain(&r.across_launches);
    let width = all.map(|c| c.id.chars().count()).max().unwrap_or(0);
    for l in &r.launches {
        eprintln!(
            "launch {} ({}): login prompt {}, SSH {}, cloud-init done {}, checks done {:.1} s",
            l.launch,
            l.instance_id,
            secs(l.timings.login_prompt_secs),
            secs(l.timings.ssh_secs),
            secs(l.timings.cloud_init_done_secs),
            l.timings.checks_done_secs
        );
        for c in &l.checks {
            eprintln!("{}", line(c, width));
        }
        let with_token = l.imds_requests.iter().filter(|e| e.with_token).count();
        let refused = l.imds_requests.iter().filter(|e| e.status == 401).count();
        eprintln!(
            "  metadata: {} requests ({} with an IMDSv2 token, {} refused with 401)",
            l.imds_requests.len(),
            with_token,
            refused
        );
    }
    for c in &r.across_launches {
        eprintln!("{}", line(c, width));
    }
    let total: usize = r.launches.iter().map(|l| l.checks.len()).sum::<usize>() + r.across_launches.len();
    let failed = r.failures();
    if failed.is_empty() {
        eprintln!("kiln test: PASS, {total} checks ({})", report_path.display());
    } else {
        eprintln!("kiln test: FAIL, {} of {total} checks failed ({})", failed.len(), report_path.display());
    }
    if let Some(d) = logs {
        eprintln!("kiln test: console and metadata logs in {}", d.display());
    }
}

/// `kiln imds-relay ADDR`: what QEMU runs for each guest connection to 169.254.169.254:80.
#[derive(Debug, clap::Args)]
pub struct RelayArgs {
    /// The metadata service's loopback address (127.0.0.1:PORT).
    pub addr: String,
}

pub fn relay(args: RelayArgs) -> Result<()> {
    kiln::imds::relay_stdio(&args.addr).with_context(|| format!("relaying to {}", args.addr))
}
