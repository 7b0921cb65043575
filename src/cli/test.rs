//! `kiln test`: launch an image the way EC2 launches it and judge what comes up.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kiln::boot::Firmware;
use kiln::launch::checks::{Check, Status};
use kiln::launch::request::{self, LaunchKey, TestOutcome, TestRequest, TestTarget};
use kiln::launch::TestOptions;
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
    #[arg(long, value_name = "SIZE", value_parser = parse_volume_size)]
    pub volume_size: Option<u64>,
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
    #[arg(long, default_value_t = request::DEFAULT_MEMORY_MIB)]
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

fn parse_volume_size(s: &str) -> Result<u64, String> {
    match parse_disk_size(s).map_err(|e| e.to_string())? {
        DiskSize::Bytes(b) => Ok(b),
        DiskSize::Auto => Err("needs a size, like 8GiB".into()),
    }
}

impl Args {
    fn request(&self) -> TestRequest {
        TestRequest {
            launches: self.launches,
            volume_bytes: self.volume_size,
            user: self.user.clone(),
            key: match (&self.key, &self.identity) {
                (Some(public), Some(identity)) => {
                    Some(LaunchKey { public: public.clone(), identity: identity.clone() })
                }
                _ => None,
            },
            user_data: self.user_data.clone(),
            run: self.run.clone(),
            timeout: self.timeout.map(Duration::from_secs),
            memory_mib: self.memory,
            echo_console: self.console,
            keep_logs: self.keep_logs,
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    let target = TestTarget::locate(&args.image)?;
    let opts = request::options(&target, &args.request())?;
    if !args.json {
        print_banner(&target.image, &opts);
    }
    let progress = TermProgress::new(args.json);
    let outcome = request::run(&target, &opts, args.keep_logs, &progress)?;
    if args.json {
        println!("{}", outcome.json);
    } else {
        print_report(&outcome);
    }
    let report = &outcome.report;
    if !report.passed {
        bail!(
            "{}: {} check(s) failed: {}",
            target.image.display(),
            report.failures().len(),
            report.failures().join(", ")
        );
    }
    Ok(())
}

/// What is about to be launched, and how.
pub fn print_banner(image: &Path, opts: &TestOptions) {
    eprintln!(
        "kiln test: {} ({}, {}), {} launch{} on a {} GiB root volume, {}",
        image.display(),
        opts.arch,
        if opts.firmware == Firmware::Bios { "legacy BIOS" } else { "UEFI" },
        opts.launches,
        if opts.launches == 1 { "" } else { "es" },
        opts.volume_bytes >> 30,
        if opts.tokens_required { "IMDSv2 only" } else { "IMDSv1 and v2" },
    );
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

pub fn print_report(outcome: &TestOutcome) {
    let (r, report_path, logs) = (&outcome.report, &outcome.report_path, outcome.logs.as_deref());
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
