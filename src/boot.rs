//! Booting an image under QEMU the way EC2 sees it: x86_64 on q35 with OVMF (UEFI) or SeaBIOS
//! (legacy BIOS), arm64 on `virt` with AAVMF; the disk as NVMe (Nitro) or as a plain IDE disk
//! (Xen HVM); the serial console read until a login prompt appears. TCG only: no KVM needed.
//! The image is opened with `snapshot=on`, so booting never changes it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::platform::Arch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    Uefi,
    Bios,
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
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("{binary} is not installed; install {package} (or run .ci/setup-host)")]
    NoQemu { binary: &'static str, package: &'static str },
    #[error("no {what} firmware at {path}; install {package}")]
    NoFirmware { what: &'static str, path: String, package: &'static str },
    #[error("legacy BIOS boot exists only for x86_64")]
    BiosOnArm,
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
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

/// The QEMU command line for `image`; `vars` is a writable copy of the UEFI variable store.
pub fn qemu_command(image: &Path, opts: &BootOptions, vars: Option<&Path>) -> Result<Command, BootError> {
    let (binary, package) = match opts.arch {
        Arch::X86_64 => ("qemu-system-x86_64", "qemu-system-x86"),
        Arch::Arm64 => ("qemu-system-aarch64", "qemu-system-arm"),
    };
    let mut cmd = Command::new(binary);
    cmd.args(["-accel", "tcg", "-m", &opts.memory_mib.to_string(), "-smp", "2", "-nographic", "-nic", "none"]);
    cmd.args(["-serial", "stdio", "-monitor", "none"]);
    let drive = format!("file={},if=none,id=d0,format=raw,snapshot=on,readonly=off", image.display());
    match (opts.arch, opts.firmware) {
        (Arch::X86_64, Firmware::Uefi) => {
            let code = first_existing(&["/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_CODE.fd"])
                .ok_or(BootError::NoFirmware { what: "OVMF", path: "/usr/share/OVMF".into(), package: "ovmf" })?;
            cmd.args(["-machine", "q35"]);
            cmd.arg("-drive").arg(format!("if=pflash,format=raw,readonly=on,file={}", code.display()));
            if let Some(v) = vars {
                cmd.arg("-drive").arg(format!("if=pflash,format=raw,file={}", v.display()));
            }
            cmd.arg("-drive").arg(drive).args(["-device", "nvme,drive=d0,serial=kiln"]);
        }
        (Arch::X86_64, Firmware::Bios) => {
            // SeaBIOS is QEMU's default firmware; the disk as IDE, the way Xen HVM shows it.
            cmd.args(["-machine", "pc"]);
            cmd.arg("-drive").arg(drive).args(["-device", "ide-hd,drive=d0,bootindex=0"]);
        }
        (Arch::Arm64, Firmware::Uefi) => {
            let code = first_existing(&["/usr/share/AAVMF/AAVMF_CODE.fd"]).ok_or(BootError::NoFirmware {
                what: "AAVMF",
                path: "/usr/share/AAVMF".into(),
                package: "qemu-efi-aarch64",
            })?;
            cmd.args(["-machine", "virt", "-cpu", "max"]);
            cmd.arg("-drive").arg(format!("if=pflash,format=raw,readonly=on,file={}", code.display()));
            if let Some(v) = vars {
                cmd.arg("-drive").arg(format!("if=pflash,format=raw,file={}", v.display()));
            }
            cmd.arg("-drive").arg(drive).args(["-device", "nvme,drive=d0,serial=kiln"]);
        }
        (Arch::Arm64, Firmware::Bios) => return Err(BootError::BiosOnArm),
    }
    if crate::platform::find_program(binary).is_none() {
        return Err(BootError::NoQemu { binary, package });
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    Ok(cmd)
}

/// Kills QEMU however the boot ends.
struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tail(console: &str, n: usize) -> String {
    let lines: Vec<&str> = console.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Boots `image` and waits for `opts.expect` on the serial console.
pub fn boot(image: &Path, opts: &BootOptions) -> Result<BootReport, BootError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| BootError::Io { what, source }
    };
    let tmp = tempfile::tempdir().map_err(io("creating a temp dir"))?;
    let vars = match (opts.arch, opts.firmware) {
        (_, Firmware::Bios) => None,
        (Arch::X86_64, _) => {
            let src = first_existing(&["/usr/share/OVMF/OVMF_VARS_4M.fd", "/usr/share/OVMF/OVMF_VARS.fd"]).ok_or(
                BootError::NoFirmware { what: "OVMF variable", path: "/usr/share/OVMF".into(), package: "ovmf" },
            )?;
            Some(src)
        }
        (Arch::Arm64, _) => Some(first_existing(&["/usr/share/AAVMF/AAVMF_VARS.fd"]).ok_or(BootError::NoFirmware {
            what: "AAVMF variable",
            path: "/usr/share/AAVMF".into(),
            package: "qemu-efi-aarch64",
        })?),
    };
    let vars_copy = match vars {
        Some(src) => {
            let dst = tmp.path().join("vars.fd");
            std::fs::copy(&src, &dst).map_err(io("copying the UEFI variable store"))?;
            Some(dst)
        }
        None => None,
    };
    let mut cmd = qemu_command(image, opts, vars_copy.as_deref())?;
    let started = Instant::now();
    let mut child = Guard(cmd.spawn().map_err(io("starting QEMU"))?);
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let mut out = child.0.stdout.take().expect("piped");
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut console = String::new();
    loop {
        let left = opts.timeout.checked_sub(started.elapsed());
        let Some(left) = left else {
            return Err(BootError::Timeout {
                expect: opts.expect.clone(),
                secs: opts.timeout.as_secs(),
                tail: tail(&console, 40),
            });
        };
        match rx.recv_timeout(left.min(Duration::from_millis(500))) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                if opts.echo {
                    eprint!("{text}");
                }
                console.push_str(&text);
                if console.contains(&opts.expect) {
                    return Ok(BootReport { seconds: started.elapsed().as_secs_f64(), console });
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Ok(Some(status)) = child.0.try_wait() {
                    let mut err = String::new();
                    if let Some(mut e) = child.0.stderr.take() {
                        let _ = e.read_to_string(&mut err);
                    }
                    console.push_str(&err);
                    return Err(BootError::Exited {
                        expect: opts.expect.clone(),
                        status: status.to_string(),
                        tail: tail(&console, 40),
                    });
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.0.wait().map(|s| s.to_string()).unwrap_or_default();
                let mut err = String::new();
                if let Some(mut e) = child.0.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                console.push_str(&err);
                return Err(BootError::Exited { expect: opts.expect.clone(), status, tail: tail(&console, 40) });
            }
        }
    }
}

/// The architecture a disk was built for, from its GPT root partition type.
pub fn detect_arch(image: &Path) -> Option<Arch> {
    let mut f = std::fs::File::open(image).ok()?;
    let mut head = vec![0u8; 512 * 34];
    f.read_exact(&mut head).ok()?;
    if &head[512..520] != b"EFI PART" {
        return None;
    }
    for e in head[1024..].chunks(128) {
        let t = uuid::Uuid::from_bytes_le(e[..16].try_into().ok()?).hyphenated().to_string().to_uppercase();
        for a in Arch::ALL {
            if t == a.root_partition_type() {
                return Some(a);
            }
        }
    }
    None
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
        };
        if let Ok(cmd) = qemu_command(Path::new("/x.raw"), &opts, None) {
            let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
            assert!(args.iter().any(|a| a.contains("ide-hd")), "{args:?}");
            assert!(args.iter().any(|a| a.contains("snapshot=on")), "{args:?}");
            assert!(args.contains(&"tcg".to_string()));
        }
        let arm = BootOptions { arch: Arch::Arm64, ..opts };
        assert!(matches!(qemu_command(Path::new("/x.raw"), &arm, None), Err(BootError::BiosOnArm)));
    }
}
