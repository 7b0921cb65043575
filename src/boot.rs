//! Booting an image under QEMU the way EC2 sees it: x86_64 on q35 with OVMF (UEFI) or SeaBIOS
//! (legacy BIOS), arm64 on `virt` with AAVMF; the disk as NVMe (Nitro) or as a plain IDE disk
//! (Xen HVM); the serial console read until a login prompt appears. TCG only: no KVM needed.
//! The image is opened with `snapshot=on`, so booting never changes it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::platform::Arch;
use crate::progress::{Progress, Unit};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    Uefi,
    Bios,
}

/// The recipe's words for them (`uefi`, `bios`).
impl std::fmt::Display for Firmware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Firmware::Uefi => "uefi",
            Firmware::Bios => "bios",
        })
    }
}

#[derive(Debug, Clone)]
pub struct BootOptions {
    pub arch: Arch,
    pub firmware: Firmware,
    pub timeout: Duration,
    /// Text on the serial console that means success.
    pub expect: String,
    pub memory_mib: u32,
    /// Copy the console to stderr as it arrives.
    pub echo: bool,
    /// Secure Boot keys and a TPM, as the AMI would have them.
    pub trust: Trust,
}

/// What the platform brings besides the firmware: the AMI's Secure Boot keys, enforced, and a
/// TPM 2.0 as NitroTPM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trust {
    /// EC2's `UefiData`: PK, KEK, db (and dbx). The firmware's variable store gets exactly these,
    /// converted by virt-fw-vars, and x86_64 boots OVMF's Secure Boot build; with a PK in place
    /// the firmware enforces signatures, as EC2's does.
    pub uefi_data: Option<String>,
    /// A software TPM 2.0 (swtpm), attached as a CRB device on x86_64 and a TIS one on arm64.
    pub tpm: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("{binary} is not installed; install {package} (or run .ci/setup-host)")]
    NoQemu { binary: &'static str, package: &'static str },
    #[error("no {what} firmware at {path}; install {package}")]
    NoFirmware { what: &'static str, path: String, package: &'static str },
    #[error("legacy BIOS boot exists only for x86_64")]
    BiosOnArm,
    #[error("{what}")]
    Io { what: String, source: std::io::Error },
    #[error("{tool} is not installed; {why} (apt-get install {package}, or run .ci/setup-host)")]
    NoTool { tool: &'static str, package: &'static str, why: &'static str },
    #[error("{tool} failed with {status}: {tail}")]
    ToolFailed { tool: String, status: String, tail: String },
    #[error("no {expect:?} on the console after {secs} s; the last lines were:\n{tail}")]
    Timeout { expect: String, secs: u64, tail: String },
    #[error("QEMU exited ({status}) before {expect:?} appeared; the last lines were:\n{tail}")]
    Exited { expect: String, status: String, tail: String },
}

/// What a successful boot reports.
#[derive(Debug, Clone)]
pub struct BootReport {
    pub seconds: f64,
    pub console: String,
}

fn first_existing(paths: &[&str]) -> Option<PathBuf> {
    paths.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// A disk attached to the guest as NVMe, as Nitro attaches EBS volumes (IDE under BIOS).
#[derive(Debug, Clone)]
pub struct Drive {
    pub path: PathBuf,
    /// `raw` or `qcow2`.
    pub format: &'static str,
    /// Writes go to a throw-away temp file: the file never changes.
    pub snapshot: bool,
    /// The NVMe serial number the guest sees.
    pub serial: String,
}

impl Drive {
    /// The image itself, opened copy-on-write so booting never changes it.
    pub fn image(path: &Path) -> Drive {
        Drive { path: path.to_path_buf(), format: "raw", snapshot: true, serial: "kiln".into() }
    }
}

/// Everything around the firmware: disks, network and SMBIOS identity.
#[derive(Debug, Clone)]
pub struct Machine {
    pub root: Drive,
    pub extra: Vec<Drive>,
    /// `-netdev`/`-device` arguments; none means no network card at all.
    pub net_args: Vec<String>,
    /// `-smbios` values (`type=1,manufacturer=…`).
    pub smbios: Vec<String>,
}

impl Machine {
    pub fn plain(image: &Path) -> Machine {
        Machine { root: Drive::image(image), extra: vec![], net_args: vec![], smbios: vec![] }
    }
}

fn drive_arg(id: &str, d: &Drive) -> String {
    // A comma inside a -drive value must be doubled.
    let path = d.path.display().to_string().replace(',', ",,");
    let snap = if d.snapshot { ",snapshot=on" } else { "" };
    format!("file={path},if=none,id={id},format={}{snap},readonly=off", d.format)
}

/// OVMF built with Secure Boot and SMM (Debian's `ovmf`).
const OVMF_SECURE_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd";

/// The QEMU command line for `machine`; `vars` is a writable copy of the UEFI variable store,
/// `tpm_socket` swtpm's control socket.
pub fn qemu_command(
    machine: &Machine,
    opts: &BootOptions,
    vars: Option<&Path>,
    tpm_socket: Option<&Path>,
) -> Result<Command, BootError> {
    let (binary, package) = match opts.arch {
        Arch::X86_64 => ("qemu-system-x86_64", "qemu-system-x86"),
        Arch::Arm64 => ("qemu-system-aarch64", "qemu-system-arm"),
    };
    let mut cmd = Command::new(binary);
    cmd.args(["-accel", "tcg", "-m", &opts.memory_mib.to_string(), "-smp", "2", "-nographic"]);
    if machine.net_args.is_empty() {
        cmd.args(["-nic", "none"]);
    } else {
        cmd.args(&machine.net_args);
    }
    cmd.args(["-serial", "stdio", "-monitor", "none"]);
    for s in &machine.smbios {
        cmd.arg("-smbios").arg(s);
    }
    let pflash = |cmd: &mut Command, code: &Path| {
        cmd.arg("-drive").arg(format!("if=pflash,format=raw,readonly=on,file={}", code.display()));
        if let Some(v) = vars {
            cmd.arg("-drive").arg(format!("if=pflash,format=raw,file={}", v.display()));
        }
    };
    let nvme = |cmd: &mut Command| {
        for (i, d) in std::iter::once(&machine.root).chain(&machine.extra).enumerate() {
            let id = format!("d{i}");
            cmd.arg("-drive").arg(drive_arg(&id, d));
            // The root volume is the first boot option, as on EC2: the firmware tries no network
            // boot first (which would also add a failed boot attempt to PCR 4).
            let first = if i == 0 { ",bootindex=0" } else { "" };
            cmd.arg("-device").arg(format!("nvme,drive={id},serial={}{first}", d.serial));
        }
    };
    match (opts.arch, opts.firmware) {
        (Arch::X86_64, Firmware::Uefi) if opts.trust.uefi_data.is_some() => {
            // OVMF's Secure Boot build keeps its variables behind SMM, so nothing the guest runs
            // can change the keys.
            let code = first_existing(&[OVMF_SECURE_CODE]).ok_or(BootError::NoFirmware {
                what: "OVMF Secure Boot",
                path: OVMF_SECURE_CODE.into(),
                package: "ovmf",
            })?;
            cmd.args(["-machine", "q35,smm=on", "-global", "driver=cfi.pflash01,property=secure,value=on"]);
            pflash(&mut cmd, &code);
            nvme(&mut cmd);
        }
        (Arch::X86_64, Firmware::Uefi) => {
            let code = first_existing(&["/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_CODE.fd"])
                .ok_or(BootError::NoFirmware { what: "OVMF", path: "/usr/share/OVMF".into(), package: "ovmf" })?;
            cmd.args(["-machine", "q35"]);
            pflash(&mut cmd, &code);
            nvme(&mut cmd);
        }
        (Arch::X86_64, Firmware::Bios) => {
            // SeaBIOS is QEMU's default firmware; the disk as IDE, the way Xen HVM shows it.
            cmd.args(["-machine", "pc"]);
            cmd.arg("-drive").arg(drive_arg("d0", &machine.root)).args(["-device", "ide-hd,drive=d0,bootindex=0"]);
            for (i, d) in machine.extra.iter().enumerate() {
                let id = format!("d{}", i + 1);
                cmd.arg("-drive").arg(drive_arg(&id, d)).arg("-device").arg(format!("ide-hd,drive={id}"));
            }
        }
        (Arch::Arm64, Firmware::Uefi) => {
            let code = first_existing(&["/usr/share/AAVMF/AAVMF_CODE.fd"]).ok_or(BootError::NoFirmware {
                what: "AAVMF",
                path: "/usr/share/AAVMF".into(),
                package: "qemu-efi-aarch64",
            })?;
            cmd.args(["-machine", "virt", "-cpu", "max"]);
            pflash(&mut cmd, &code);
            nvme(&mut cmd);
        }
        (Arch::Arm64, Firmware::Bios) => return Err(BootError::BiosOnArm),
    }
    if let Some(socket) = tpm_socket {
        let device = match opts.arch {
            Arch::X86_64 => "tpm-crb,tpmdev=tpm0",
            Arch::Arm64 => "tpm-tis-device,tpmdev=tpm0",
        };
        cmd.arg("-chardev").arg(format!("socket,id=chrtpm,path={}", socket.display()));
        cmd.args(["-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", device]);
    }
    if crate::host::find_program(binary).is_none() {
        return Err(BootError::NoQemu { binary, package });
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    Ok(cmd)
}

fn tail(console: &str, n: usize) -> String {
    let lines: Vec<&str> = console.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A writable copy of the firmware's variable store in `dir`, when the firmware has one.
fn uefi_vars(opts: &BootOptions, dir: &Path) -> Result<Option<PathBuf>, BootError> {
    let src = match (opts.arch, opts.firmware) {
        (_, Firmware::Bios) => return Ok(None),
        (Arch::X86_64, _) => first_existing(&["/usr/share/OVMF/OVMF_VARS_4M.fd", "/usr/share/OVMF/OVMF_VARS.fd"])
            .ok_or(BootError::NoFirmware { what: "OVMF variable", path: "/usr/share/OVMF".into(), package: "ovmf" })?,
        (Arch::Arm64, _) => first_existing(&["/usr/share/AAVMF/AAVMF_VARS.fd"]).ok_or(BootError::NoFirmware {
            what: "AAVMF variable",
            path: "/usr/share/AAVMF".into(),
            package: "qemu-efi-aarch64",
        })?,
    };
    let dst = dir.join("vars.fd");
    match &opts.trust.uefi_data {
        None => {
            std::fs::copy(&src, &dst)
                .map_err(|source| BootError::Io { what: "copying the UEFI variable store".into(), source })?;
        }
        Some(uefi_data) => {
            // Debian's AAVMF_VARS.fd is blank flash the firmware formats on first boot, which
            // virt-fw-vars cannot edit; its .ms variant is a formatted store, emptied first.
            let template = match opts.arch {
                Arch::X86_64 => src,
                Arch::Arm64 => first_existing(&[AAVMF_FORMATTED_VARS]).ok_or(BootError::NoFirmware {
                    what: "AAVMF formatted variable",
                    path: AAVMF_FORMATTED_VARS.into(),
                    package: "qemu-efi-aarch64",
                })?,
            };
            enrol(uefi_data, &template, &dst, dir)?
        }
    }
    Ok(Some(dst))
}

const AAVMF_FORMATTED_VARS: &str = "/usr/share/AAVMF/AAVMF_VARS.ms.fd";

/// `template` (a formatted edk2 variable store) with every variable it holds deleted and the
/// variables of EC2's `uefi_data` set, as `dst`: the firmware starts with the AMI's store and
/// nothing else. virt-fw-vars reads the AWS store and writes the edk2 one.
fn enrol(uefi_data: &str, template: &Path, dst: &Path, dir: &Path) -> Result<(), BootError> {
    const TOOL: &str = "virt-fw-vars";
    if crate::host::find_program(TOOL).is_none() {
        return Err(BootError::NoTool {
            tool: TOOL,
            package: "-t bookworm-backports python3-virt-firmware",
            why: "it puts the AMI's Secure Boot keys into the firmware's variable store",
        });
    }
    let (aws, json) = (dir.join("uefi-data.aws"), dir.join("uefi-data.json"));
    std::fs::write(&aws, uefi_data)
        .map_err(|source| BootError::Io { what: "writing the AMI's UEFI variable store".into(), source })?;
    let run = |args: &[&std::ffi::OsStr]| -> Result<(), BootError> {
        let out = Command::new(TOOL)
            .args(args)
            .output()
            .map_err(|source| BootError::Io { what: format!("running {TOOL}"), source })?;
        if out.status.success() {
            return Ok(());
        }
        Err(BootError::ToolFailed {
            tool: TOOL.into(),
            status: out.status.to_string(),
            tail: tail(&String::from_utf8_lossy(&out.stderr), 5),
        })
    };
    run(&["-i".as_ref(), aws.as_os_str(), "--output-json".as_ref(), json.as_os_str()])?;
    let held = dir.join("template.json");
    run(&["-i".as_ref(), template.as_os_str(), "--output-json".as_ref(), held.as_os_str()])?;
    let held: serde_json::Value =
        std::fs::read(&held).ok().and_then(|b| serde_json::from_slice(&b).ok()).ok_or_else(|| {
            BootError::ToolFailed { tool: TOOL.into(), status: "unreadable JSON".into(), tail: String::new() }
        })?;
    let names: Vec<&str> =
        held["variables"].as_array().into_iter().flatten().filter_map(|v| v["name"].as_str()).collect();
    let mut args: Vec<&std::ffi::OsStr> = vec!["-i".as_ref(), template.as_os_str()];
    for n in &names {
        args.push("-d".as_ref());
        args.push(std::ffi::OsStr::new(n));
    }
    args.extend_from_slice(&["--set-json".as_ref(), json.as_os_str(), "-o".as_ref(), dst.as_os_str()]);
    run(&args)
}

/// swtpm serving a fresh TPM 2.0 on a socket in `dir`; it ends when QEMU closes the socket.
fn start_swtpm(dir: &Path) -> Result<(Child, PathBuf), BootError> {
    const TOOL: &str = "swtpm";
    if crate::host::find_program(TOOL).is_none() {
        return Err(BootError::NoTool { tool: TOOL, package: "swtpm", why: "it is the instance's TPM, as NitroTPM" });
    }
    let state = dir.join("tpm");
    std::fs::create_dir_all(&state)
        .map_err(|source| BootError::Io { what: "creating the TPM's state".into(), source })?;
    let socket = dir.join("tpm.sock");
    let mut child = Command::new(TOOL)
        .args(["socket", "--tpm2", "--terminate", "--tpmstate"])
        .arg(format!("dir={}", state.display()))
        .arg("--ctrl")
        .arg(format!("type=unixio,path={}", socket.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| BootError::Io { what: "starting swtpm".into(), source })?;
    // QEMU must find the socket when it starts.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            return Err(BootError::ToolFailed { tool: TOOL.into(), status: status.to_string(), tail: tail(&err, 5) });
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(BootError::ToolFailed {
                tool: TOOL.into(),
                status: "no socket after 10 s".into(),
                tail: String::new(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((child, socket))
}

/// A running guest. QEMU is killed when this is dropped, however the caller ends.
pub struct Vm {
    child: Child,
    /// swtpm, when the machine has a TPM.
    tpm: Option<Child>,
    console: Arc<Mutex<String>>,
    started: Instant,
    _vars_dir: tempfile::TempDir,
}

impl Vm {
    /// Powers on `machine`; the serial console is collected (and copied to `console_log` and,
    /// with `opts.echo`, to stderr) as it arrives.
    pub fn start(machine: &Machine, opts: &BootOptions, console_log: Option<&Path>) -> Result<Vm, BootError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |source| BootError::Io { what, source }
        };
        let vars_dir = tempfile::tempdir().map_err(io("creating a temp dir"))?;
        let vars = uefi_vars(opts, vars_dir.path())?;
        let (tpm, socket) = match opts.trust.tpm {
            true => start_swtpm(vars_dir.path()).map(|(c, s)| (Some(c), Some(s)))?,
            false => (None, None),
        };
        let mut cmd = qemu_command(machine, opts, vars.as_deref(), socket.as_deref())?;
        let mut log = match console_log {
            Some(p) => Some(std::fs::File::create(p).map_err(io("creating the console log"))?),
            None => None,
        };
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(io("starting QEMU"))?;
        let console = Arc::new(Mutex::new(String::new()));
        let mut out = child.stdout.take().expect("piped");
        let (sink, echo) = (console.clone(), opts.echo);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]);
                if echo {
                    eprint!("{text}");
                }
                if let Some(f) = log.as_mut() {
                    let _ = std::io::Write::write_all(f, &buf[..n]);
                }
                sink.lock().expect("console lock").push_str(&text);
            }
        });
        Ok(Vm { child, tpm, console, started, _vars_dir: vars_dir })
    }

    /// Seconds since power-on.
    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn console(&self) -> String {
        self.console.lock().expect("console lock").clone()
    }

    /// Whether QEMU is still running; its exit status and error output when it is not.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                Some(format!(
                    "{status}{}",
                    if err.trim().is_empty() { String::new() } else { format!(": {}", err.trim()) }
                ))
            }
            _ => None,
        }
    }

    /// Waits until `expect` shows on the console; returns the seconds since power-on.
    pub fn wait_for(&mut self, expect: &str, timeout: Duration) -> Result<f64, BootError> {
        loop {
            if self.console.lock().expect("console lock").contains(expect) {
                return Ok(self.elapsed());
            }
            if let Some(status) = self.exited() {
                // Let the reader thread drain what QEMU printed last.
                std::thread::sleep(Duration::from_millis(200));
                return Err(BootError::Exited { expect: expect.into(), status, tail: tail(&self.console(), 40) });
            }
            if self.started.elapsed() >= timeout {
                return Err(BootError::Timeout {
                    expect: expect.into(),
                    secs: timeout.as_secs(),
                    tail: tail(&self.console(), 40),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(t) = self.tpm.as_mut() {
            let _ = t.kill();
            let _ = t.wait();
        }
    }
}

/// What a Debian console prints when it is up: getty's prompt.
pub const LOGIN_PROMPT: &str = "login:";

/// [`boot`], shown as one step of `progress`.
pub fn boot_with_progress(image: &Path, opts: &BootOptions, progress: &dyn Progress) -> Result<BootReport, BootError> {
    progress.begin(&format!("booting {} ({}, {})", image.display(), opts.arch, opts.firmware), None, Unit::Items);
    let report = boot(image, opts)?;
    progress.end(&format!("{:?} after {:.1} s", opts.expect, report.seconds));
    Ok(report)
}

/// Boots `image` and waits for `opts.expect` on the serial console.
pub fn boot(image: &Path, opts: &BootOptions) -> Result<BootReport, BootError> {
    let mut vm = Vm::start(&Machine::plain(image), opts, None)?;
    let seconds = vm.wait_for(&opts.expect, opts.timeout)?;
    Ok(BootReport { seconds, console: vm.console() })
}

/// The architecture a disk was built for, from its GPT root partition type.
pub fn detect_arch(image: &Path) -> Option<Arch> {
    let types = crate::formats::gpt::partition_types(image)?;
    Arch::ALL.into_iter().find(|a| types.iter().any(|t| t == a.root_partition_type()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_matches_the_platform() {
        let opts = BootOptions {
            arch: Arch::X86_64,
            firmware: Firmware::Bios,
            timeout: Duration::from_secs(1),
            expect: "login:".into(),
            memory_mib: 512,
            echo: false,
            trust: Trust::default(),
        };
        if let Ok(cmd) = qemu_command(&Machine::plain(Path::new("/x.raw")), &opts, None, None) {
            let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
            assert!(args.iter().any(|a| a.contains("ide-hd")), "{args:?}");
            assert!(args.iter().any(|a| a.contains("snapshot=on")), "{args:?}");
            assert!(args.contains(&"tcg".to_string()));
        }
        let arm = BootOptions { arch: Arch::Arm64, ..opts };
        assert!(matches!(
            qemu_command(&Machine::plain(Path::new("/x.raw")), &arm, None, None),
            Err(BootError::BiosOnArm)
        ));
    }
}
