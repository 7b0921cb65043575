//! `kiln test`: launch an image on this machine the way EC2 launches it, log in, and judge it.
//!
//! The instance's world, all on this machine:
//! - the image's firmware and disk: OVMF or AAVMF (SeaBIOS for BIOS images), the root volume as
//!   NVMe through a qcow2 overlay enlarged to the AMI's root volume size (the image file is
//!   never written), extra volumes as empty NVMe disks;
//! - SMBIOS as on Nitro (vendor "Amazon EC2", a system UUID and serial starting with `ec2`), so
//!   cloud-init identifies EC2 the way it does on AWS;
//! - an instance metadata service ([`crate::imds`]) at 169.254.169.254, reached through QEMU's
//!   `guestfwd`, serving a launch key made for this run and user data;
//! - QEMU user networking with `restrict=on`: the guest reaches the metadata service and its
//!   forwarded SSH port, nothing else.
//!
//! Then: wait for SSH, log in with the launch key, wait for cloud-init and systemd to settle,
//! gather facts with one script ([`checks::FACTS_SCRIPT`]), judge them, run the recipe's own
//! checks. With several launches, identities must differ between them.

pub mod checks;
pub mod request;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::boot::{BootError, BootOptions, Drive, Firmware, Machine, Vm};
use crate::imds::{InstanceMetadata, LogEntry, Server};
use crate::platform::Arch;
use crate::progress::{Progress, Unit};
use checks::{Check, Expect, Facts, Status};

/// The guest's side of the user network: EC2's metadata address is link-local, and QEMU only
/// forwards to addresses inside its own network, so the whole network is 169.254.0.0/16.
const GUEST_NET: &str = "169.254.0.0/16";
/// The address QEMU's DHCP server hands the first (only) guest.
const GUEST_IPV4: &str = "169.254.0.15";
const IMDS_ADDR: &str = "169.254.169.254";
/// How long sshd may refuse the launch key after it first answers: cloud-init installs the key
/// early in first boot, so minutes of refusals mean it never will.
const KEY_GRACE: Duration = Duration::from_secs(240);

#[derive(Debug, Clone)]
pub struct TestOptions {
    pub arch: Arch,
    pub firmware: Firmware,
    /// The root volume's size; at least the image's.
    pub volume_bytes: u64,
    /// Sizes of further volumes to attach, as `[[ami.volumes]]` says.
    pub extra_volume_bytes: Vec<u64>,
    /// IMDSv2 only: requests without a token get 401.
    pub tokens_required: bool,
    /// Who logs in with the launch key.
    pub user: String,
    /// Also hand the launch key to root as a systemd credential (SMBIOS type 11), for images
    /// without cloud-init; EC2 has no such channel, and the report says so.
    pub root_key_credential: bool,
    /// `(private key file, public key line)`; None: a key pair is made for each run.
    pub key: Option<(PathBuf, String)>,
    /// None: kiln's own user data, a script that writes a per-launch marker.
    pub user_data: Option<Vec<u8>>,
    /// Commands run over SSH after the built-in checks; each must exit 0.
    pub commands: Vec<String>,
    pub esp_mount: Option<String>,
    pub launches: u32,
    /// Per launch, from power-on to the last check.
    pub timeout: Duration,
    pub memory_mib: u32,
    pub echo_console: bool,
    /// AMI id and region the metadata service reports.
    pub ami_id: String,
    pub region: String,
    /// This program, which QEMU runs per metadata connection as `kiln imds-relay ADDR`.
    pub relay_exe: PathBuf,
    /// Secure Boot keys (enforced) and a TPM, as the AMI gives them.
    pub trust: crate::boot::Trust,
    /// The PCR values the build predicts (SHA-256 bank), checked when the instance has a TPM.
    pub pcrs: std::collections::BTreeMap<u32, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{tool} is not installed; install {package} (or run .ci/setup-host)")]
    MissingTool { tool: &'static str, package: &'static str },
    #[error("the root volume ({volume_bytes} bytes) is smaller than the image ({image_bytes} bytes)")]
    VolumeTooSmall { volume_bytes: u64, image_bytes: u64 },
    #[error("{cmd} failed: {detail}")]
    Command { cmd: String, detail: String },
    #[error("{what}")]
    Io { what: String, source: std::io::Error },
    #[error(transparent)]
    Imds(#[from] crate::imds::ServeError),
    #[error(transparent)]
    Boot(#[from] BootError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LaunchError {
    let what = what.into();
    move |source| LaunchError::Io { what, source }
}

/// Seconds from power-on; None when the moment never came.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub login_prompt_secs: Option<f64>,
    pub ssh_secs: Option<f64>,
    pub cloud_init_done_secs: Option<f64>,
    pub checks_done_secs: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LaunchReport {
    pub launch: u32,
    pub instance_id: String,
    pub timings: Timings,
    pub checks: Vec<Check>,
    /// Every request the guest made to the metadata service.
    pub imds_requests: Vec<LogEntry>,
    #[serde(skip)]
    pub facts: Facts,
    #[serde(skip)]
    pub console: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct TestReport {
    pub image: PathBuf,
    pub passed: bool,
    pub launches: Vec<LaunchReport>,
    /// Checks across launches (identity unique per launch).
    pub across_launches: Vec<Check>,
}

impl TestReport {
    /// Checks that failed, by launch (`launch 1: growth`).
    pub fn failures(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .launches
            .iter()
            .flat_map(|l| {
                l.checks
                    .iter()
                    .filter(|c| c.status == Status::Fail)
                    .map(move |c| format!("launch {}: {}", l.launch, c.id))
            })
            .collect();
        v.extend(self.across_launches.iter().filter(|c| c.status == Status::Fail).map(|c| c.id.clone()));
        v
    }
}

fn need(tool: &'static str, package: &'static str) -> Result<PathBuf, LaunchError> {
    crate::host::find_program(tool).ok_or(LaunchError::MissingTool { tool, package })
}

/// Runs `cmd` with `input` on stdin, killing it after `timeout`.
fn run_with_timeout(cmd: &mut Command, input: Option<&str>, timeout: Duration) -> Result<Output, LaunchError> {
    let shown = format!("{cmd:?}");
    cmd.stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(io(format!("starting {shown}")))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        let text = text.to_string();
        std::thread::spawn(move || {
            let _ = std::io::Write::write_all(&mut stdin, text.as_bytes());
        });
    }
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let o = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut b);
        b
    });
    let e = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut b);
        b
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().map_err(io(format!("waiting for {shown}")))? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            break child.wait().map_err(io(format!("waiting for {shown}")))?;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Ok(Output { status, stdout: o.join().unwrap_or_default(), stderr: e.join().unwrap_or_default() })
}

/// A free loopback TCP port (bound, read, released: QEMU binds it next).
fn free_port() -> Result<u16, LaunchError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
    Ok(l.local_addr().map_err(io("finding a free port"))?.port())
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::fill(&mut b[..]);
    hex::encode(b)
}

/// SSH to the instance through the forwarded port, with the launch key only.
struct Ssh {
    port: u16,
    user: String,
    identity: PathBuf,
    known_hosts: PathBuf,
}

impl Ssh {
    fn command(&self, remote: &str) -> Command {
        let mut c = Command::new("ssh");
        c.args(["-F", "/dev/null", "-p", &self.port.to_string(), "-i"])
            .arg(&self.identity)
            .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"])
            .args(["-o", "StrictHostKeyChecking=accept-new", "-o", "LogLevel=ERROR"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
            .arg(format!("{}@127.0.0.1", self.user))
            .arg("--")
            .arg(remote);
        c
    }

    fn run(&self, remote: &str, input: Option<&str>, timeout: Duration) -> Result<Output, LaunchError> {
        run_with_timeout(&mut self.command(remote), input, timeout)
    }

    /// `sh -s` as root: directly, or through sudo for a non-root login.
    fn root_shell(&self) -> &'static str {
        if self.user == "root" {
            "sh -s"
        } else {
            "sudo -n sh -s"
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim().to_string()
}

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" / ")
}

/// The nameservers in this (the build) host's resolv.conf.
pub fn host_nameservers() -> Vec<String> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver").map(|s| s.trim().to_string()))
        .collect()
}

/// Launches `image` `opts.launches` times and judges every launch.
pub fn test(image: &Path, opts: &TestOptions, work: &Path, progress: &dyn Progress) -> Result<TestReport, LaunchError> {
    let qemu_img = need("qemu-img", "qemu-utils")?;
    need("ssh", "openssh-client")?;
    let image = std::fs::canonicalize(image).map_err(io(format!("opening {}", image.display())))?;
    let image_bytes = std::fs::metadata(&image).map_err(io(format!("reading {}", image.display())))?.len();
    if opts.volume_bytes < image_bytes {
        return Err(LaunchError::VolumeTooSmall { volume_bytes: opts.volume_bytes, image_bytes });
    }
    let (identity, public_key) = match &opts.key {
        Some(k) => k.clone(),
        None => {
            need("ssh-keygen", "openssh-client")?;
            let key = work.join("launch-key");
            let o = run_with_timeout(
                Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", "kiln-test", "-f"]).arg(&key),
                None,
                Duration::from_secs(30),
            )?;
            if !o.status.success() {
                return Err(LaunchError::Command { cmd: "ssh-keygen".into(), detail: text(&o.stderr) });
            }
            let public = std::fs::read_to_string(key.with_extension("pub")).map_err(io("reading the launch key"))?;
            (key, public.trim().to_string())
        }
    };
    let mut launches = Vec::new();
    for n in 1..=opts.launches.max(1) {
        let dir = work.join(format!("launch-{n}"));
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let r = launch_once(n, &image, opts, &qemu_img, &identity, &public_key, &dir, progress)?;
        launches.push(r);
    }
    let mut across = Vec::new();
    if launches.len() > 1 {
        let facts: Vec<Facts> = launches.iter().map(|l| l.facts.clone()).collect();
        if facts.iter().all(Facts::complete) {
            across.push(checks::compare_launches(&facts));
        } else {
            across.push(Check::new(
                "unique-identity",
                false,
                "not every launch answered, so identities could not be compared",
            ));
        }
    }
    let passed = launches.iter().all(|l| l.checks.iter().all(|c| c.status != Status::Fail))
        && across.iter().all(|c| c.status != Status::Fail);
    Ok(TestReport { image, passed, launches, across_launches: across })
}

#[allow(clippy::too_many_arguments)]
fn launch_once(
    n: u32,
    image: &Path,
    opts: &TestOptions,
    qemu_img: &Path,
    identity: &Path,
    public_key: &str,
    dir: &Path,
    progress: &dyn Progress,
) -> Result<LaunchReport, LaunchError> {
    let (root, extra) = create_volumes(qemu_img, image, opts, dir)?;
    let instance = Instance::new(opts);
    let server = Server::start(instance.metadata(opts, public_key))?;
    let smbios = nitro_smbios(instance.instance_type, opts.root_key_credential.then_some(public_key));
    let ssh_port = free_port()?;
    let relay = opts.relay_exe.display().to_string().replace(',', ",,");
    let netdev = format!(
        "user,id=n0,restrict=on,ipv6=off,net={GUEST_NET},dhcpstart={GUEST_IPV4},\
         hostfwd=tcp:127.0.0.1:{ssh_port}-:22,\
         guestfwd=tcp:{IMDS_ADDR}:80-cmd:{relay} imds-relay {}",
        server.addr()
    );
    let machine = Machine {
        root,
        extra,
        net_args: vec![
            "-netdev".into(),
            netdev,
            "-device".into(),
            format!("virtio-net-pci,netdev=n0,mac={}", instance.mac),
        ],
        smbios,
    };
    let boot = BootOptions {
        arch: opts.arch,
        firmware: opts.firmware,
        timeout: opts.timeout,
        expect: crate::boot::LOGIN_PROMPT.into(),
        memory_mib: opts.memory_mib,
        echo: opts.echo_console,
        trust: opts.trust.clone(),
    };
    let Instance { instance_id, marker, user_data, .. } = instance;
    let console_log = dir.join("console.log");
    progress.begin(&format!("launch {n}: booting {instance_id}"), None, Unit::Items);
    let mut vm = Vm::start(&machine, &boot, Some(&console_log))?;
    let ssh = Ssh {
        port: ssh_port,
        user: opts.user.clone(),
        identity: identity.to_path_buf(),
        known_hosts: dir.join("known_hosts"),
    };
    let mut timings = Timings::default();
    let mut checks = Vec::new();
    let facts = run_checks(&mut vm, &ssh, opts, &mut timings, &mut checks, &marker, &user_data, progress);
    timings.checks_done_secs = vm.elapsed();
    let console = vm.console();
    drop(vm);
    progress.end(&format!(
        "{} of {} checks passed in {:.0} s",
        checks.iter().filter(|c| c.status == Status::Pass).count(),
        checks.len(),
        timings.checks_done_secs
    ));
    let imds_requests = server.imds().log();
    Ok(LaunchReport { launch: n, instance_id, timings, checks, imds_requests, facts, console })
}

/// The root volume, a copy-on-write overlay of the image as large as the AMI's volume, and
/// the `[[ami.volumes]]` as empty disks, each with an EBS-style NVMe serial.
fn create_volumes(
    qemu_img: &Path,
    image: &Path,
    opts: &TestOptions,
    dir: &Path,
) -> Result<(Drive, Vec<Drive>), LaunchError> {
    let create = |args: Vec<String>| -> Result<(), LaunchError> {
        let o = run_with_timeout(Command::new(qemu_img).args(&args), None, Duration::from_secs(60))?;
        if o.status.success() {
            Ok(())
        } else {
            Err(LaunchError::Command { cmd: format!("qemu-img {}", args.join(" ")), detail: text(&o.stderr) })
        }
    };
    let serial = |i: usize| format!("vol0kiln{i:012}");
    let overlay = dir.join("root.qcow2");
    let (backing, path) = (image.display().to_string(), overlay.display().to_string());
    create(
        ["create", "-q", "-f", "qcow2", "-F", "raw", "-b", &backing, &path, &opts.volume_bytes.to_string()]
            .map(String::from)
            .to_vec(),
    )?;
    let mut extra = Vec::new();
    for (i, bytes) in opts.extra_volume_bytes.iter().enumerate() {
        let p = dir.join(format!("volume-{}.qcow2", i + 1));
        create(
            ["create", "-q", "-f", "qcow2", &p.display().to_string(), &bytes.to_string()].map(String::from).to_vec(),
        )?;
        extra.push(Drive { path: p, format: "qcow2", snapshot: false, serial: serial(i + 1) });
    }
    Ok((Drive { path: overlay, format: "qcow2", snapshot: false, serial: serial(0) }, extra))
}

/// Who one launch's instance is: new ids for every launch, as EC2 gives them.
struct Instance {
    instance_id: String,
    mac: String,
    /// What kiln's own user data writes, so a check can tell it ran at this launch.
    marker: String,
    user_data: Vec<u8>,
    instance_type: &'static str,
}

impl Instance {
    fn new(opts: &TestOptions) -> Instance {
        let mac_bytes = random_hex(5);
        let marker = format!("kiln-{}", random_hex(8));
        Instance {
            instance_id: format!("i-0{}", &random_hex(9)[..16]),
            mac: format!("02:{}", (0..5).map(|i| &mac_bytes[2 * i..2 * i + 2]).collect::<Vec<_>>().join(":")),
            user_data: opts
                .user_data
                .clone()
                .unwrap_or_else(|| format!("#!/bin/sh\necho {marker} > /var/tmp/kiln-user-data\n").into_bytes()),
            marker,
            // The smallest current-generation Nitro types of each architecture.
            instance_type: match opts.arch {
                Arch::X86_64 => "t3.micro",
                Arch::Arm64 => "t4g.micro",
            },
        }
    }

    /// What the metadata service tells this instance.
    fn metadata(&self, opts: &TestOptions, public_key: &str) -> InstanceMetadata {
        InstanceMetadata {
            instance_id: self.instance_id.clone(),
            ami_id: opts.ami_id.clone(),
            instance_type: self.instance_type.into(),
            region: opts.region.clone(),
            availability_zone: format!("{}a", opts.region),
            // AWS's documentation account id: obviously not a real account.
            account_id: "123456789012".into(),
            architecture: opts.arch.as_str().into(),
            local_hostname: format!("ip-{}.ec2.internal", GUEST_IPV4.replace('.', "-")),
            local_ipv4: GUEST_IPV4.into(),
            subnet_cidr: GUEST_NET.into(),
            mac: self.mac.clone(),
            public_keys: vec![("kiln-test".into(), public_key.to_string())],
            user_data: Some(self.user_data.clone()),
            tokens_required: opts.tokens_required,
        }
    }
}

/// Nitro's identity in SMBIOS, which cloud-init's ds-identify reads from DMI; with
/// `root_key`, the launch key as a systemd credential for root.
fn nitro_smbios(instance_type: &str, root_key: Option<&str>) -> Vec<String> {
    let uuid = format!("ec2{}", &random_hex(16)[3..]);
    let uuid = format!("{}-{}-{}-{}-{}", &uuid[..8], &uuid[8..12], &uuid[12..16], &uuid[16..20], &uuid[20..32]);
    let mut smbios = vec![
        format!("type=1,manufacturer=Amazon EC2,product={instance_type},serial={uuid},uuid={uuid}"),
        "type=3,manufacturer=Amazon EC2,asset=Amazon EC2".to_string(),
    ];
    if let Some(key) = root_key {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{key}\n"));
        smbios.push(format!("type=11,value=io.systemd.credential.binary:ssh.authorized_keys.root={b64}"));
    }
    smbios
}

/// Everything after power-on. Failures become failed checks, not errors: the report says
/// how far the launch got.
#[allow(clippy::too_many_arguments)]
fn run_checks(
    vm: &mut Vm,
    ssh: &Ssh,
    opts: &TestOptions,
    timings: &mut Timings,
    checks: &mut Vec<Check>,
    marker: &str,
    user_data: &[u8],
    progress: &dyn Progress,
) -> Facts {
    let deadline = Instant::now() + opts.timeout;
    let left = || deadline.saturating_duration_since(Instant::now());

    if let Err(failed) = wait_for_ssh(vm, ssh, opts, timings, deadline, progress) {
        checks.push(failed);
        return Facts::default();
    }
    timings.ssh_secs = Some(vm.elapsed());
    let how = if opts.root_key_credential && ssh.user == "root" {
        " (key handed to root as a systemd credential: the image has no cloud-init, so on EC2 nothing would install the launch key)"
    } else {
        " with the launch key from the metadata service"
    };
    checks.push(Check::new("ssh-login", true, format!("{}@instance after {:.1} s{how}", ssh.user, vm.elapsed())));

    // Let first boot finish: cloud-init's stages, then every unit.
    const NO_CLOUD_INIT: i32 = 100;
    let o = ssh.run(
        &format!("command -v cloud-init >/dev/null || exit {NO_CLOUD_INIT}; cloud-init status --wait >/dev/null"),
        None,
        left(),
    );
    if matches!(&o, Ok(o) if o.status.code().is_some_and(|c| c != NO_CLOUD_INIT)) {
        timings.cloud_init_done_secs = Some(vm.elapsed());
    }
    let _ = ssh.run("systemctl is-system-running --wait >/dev/null", None, left().min(Duration::from_secs(300)));

    let facts = match ssh.run(ssh.root_shell(), Some(checks::FACTS_SCRIPT), left()) {
        Ok(o) => Facts::parse(&String::from_utf8_lossy(&o.stdout)),
        Err(_) => Facts::default(),
    };
    if !facts.complete() {
        checks.push(Check::new(
            "facts",
            false,
            format!("the facts script did not finish as root (is sudo without a password set up for {}?)", ssh.user),
        ));
        return facts;
    }
    let expect = Expect {
        volume_bytes: opts.volume_bytes,
        esp_mount: opts.esp_mount.clone(),
        user_data_marker: opts.user_data.is_none().then(|| marker.to_string()),
        user_data_sha256: Some(hex::encode(Sha256::digest(user_data))),
        host_nameservers: host_nameservers(),
        secure_boot: opts.trust.uefi_data.is_some(),
        pcrs: if opts.trust.tpm { opts.pcrs.clone() } else { Default::default() },
    };
    checks.extend(checks::evaluate(&facts, &expect));

    checks.extend(opts.commands.iter().map(|cmd| recipe_check(ssh, cmd, left())));
    facts
}

/// Polls until SSH logs in with the launch key, noting when the login prompt showed; the
/// failed `ssh-login` check when the instance stops, the time runs out, or sshd keeps refusing
/// the key.
fn wait_for_ssh(
    vm: &mut Vm,
    ssh: &Ssh,
    opts: &TestOptions,
    timings: &mut Timings,
    deadline: Instant,
    progress: &dyn Progress,
) -> Result<(), Check> {
    let left = || deadline.saturating_duration_since(Instant::now());
    // SSH comes up after the login prompt or before it; poll for it and note the prompt.
    let mut last_err = String::from("no answer");
    let mut refused_since: Option<Instant> = None;
    loop {
        if timings.login_prompt_secs.is_none() && vm.console().contains(crate::boot::LOGIN_PROMPT) {
            timings.login_prompt_secs = Some(vm.elapsed());
            progress.note(&format!("login prompt after {:.1} s", vm.elapsed()));
        }
        if let Some(status) = vm.exited() {
            return Err(Check::new("ssh-login", false, format!("the instance stopped before SSH answered ({status})")));
        }
        if left().is_zero() {
            return Err(Check::new(
                "ssh-login",
                false,
                format!("no SSH login as {} within {} s: {last_err}", ssh.user, opts.timeout.as_secs()),
            ));
        }
        match ssh.run("true", None, Duration::from_secs(20).min(left())) {
            Ok(o) if o.status.success() => break,
            Ok(o) => last_err = text(&o.stderr),
            Err(e) => last_err = crate::message::render_error(&e),
        }
        // sshd answers but refuses the key: give first boot time to install it, not forever.
        if last_err.contains("Permission denied") {
            let since = *refused_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= KEY_GRACE {
                return Err(Check::new(
                    "ssh-login",
                    false,
                    format!(
                        "sshd refused the launch key for {} for {} s after it first answered: {last_err}",
                        ssh.user,
                        KEY_GRACE.as_secs()
                    ),
                ));
            }
        } else {
            refused_since = None;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    Ok(())
}

/// One of the recipe's `[test].commands`, run over SSH: passes when it exits 0.
fn recipe_check(ssh: &Ssh, cmd: &str, left: Duration) -> Check {
    match ssh.run(cmd, None, left.min(Duration::from_secs(300))) {
        Ok(o) => {
            let out = format!("{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            let code = o.status.code().map(|c| c.to_string()).unwrap_or_else(|| "killed (timeout)".into());
            let tail = last_lines(&out, 3);
            Check::new(
                &format!("recipe: {cmd}"),
                o.status.success(),
                format!("exit {code}{}", if tail.is_empty() { String::new() } else { format!(": {tail}") }),
            )
        }
        Err(e) => Check::new(&format!("recipe: {cmd}"), false, crate::message::render_error(&e)),
    }
}
