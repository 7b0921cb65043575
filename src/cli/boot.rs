//! `kiln boot`: boot an image under QEMU and wait for the login prompt.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use kiln::boot::{self, BootOptions, Firmware};
use kiln::platform::Arch;

/// Boot an image the way EC2 sees it and wait for the login prompt.
///
/// x86_64: QEMU q35 with OVMF (UEFI) and the disk as NVMe, like Nitro; with --firmware bios,
/// SeaBIOS and the disk as IDE, like Xen HVM. arm64: QEMU virt with AAVMF, NVMe. Software
/// emulation (TCG), no KVM. The image is opened copy-on-write and never changes. Succeeds when
/// the serial console shows the expected text and reports how long it took.
///
/// With its manifest beside it, the image boots as its AMI would: a [secure_boot] image with
/// the AMI's Secure Boot keys in the firmware (OVMF's Secure Boot build, enforcing; needs
/// virt-fw-vars from python3-virt-firmware), and with [ami].tpm a software TPM (swtpm).
///
/// Examples:
///   kiln boot out/debian-12-minimal-x86_64.raw
///   kiln boot out/web-arm64.raw --timeout 1200 --console
///   kiln boot out/legacy-x86_64.raw --firmware bios
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The raw disk image.
    pub image: PathBuf,
    /// Architecture [default: from the image's root partition type].
    #[arg(long)]
    pub arch: Option<Arch>,
    /// Firmware: uefi or bios.
    #[arg(long, default_value = "uefi", value_parser = ["uefi", "bios"])]
    pub firmware: String,
    /// Seconds to wait for the prompt [default: 600 x86_64, 1800 arm64: emulation is slow].
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Text on the serial console that means success.
    #[arg(long, default_value = boot::LOGIN_PROMPT)]
    pub expect: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = kiln::launch::request::DEFAULT_MEMORY_MIB)]
    pub memory: u32,
    /// Show the serial console while booting.
    #[arg(long)]
    pub console: bool,
}

pub fn run(args: Args) -> Result<()> {
    let arch = match args.arch {
        Some(a) => a,
        None => boot::detect_arch(&args.image).with_context(|| {
            format!("{} has no kiln root partition to tell its architecture by; pass --arch", args.image.display())
        })?,
    };
    let firmware = if args.firmware == "bios" { Firmware::Bios } else { Firmware::Uefi };
    // The manifest beside the image, if any, says what the AMI's firmware holds.
    let target = kiln::launch::request::TestTarget::locate(&args.image).ok();
    let trust = kiln::launch::request::trust(target.as_ref().and_then(|t| t.manifest.as_ref()).map(|(_, m)| m));
    let opts = BootOptions {
        arch,
        firmware,
        timeout: args.timeout.map(Duration::from_secs).unwrap_or_else(|| kiln::launch::request::launch_timeout(arch)),
        expect: args.expect.clone(),
        memory_mib: args.memory,
        echo: args.console,
        trust,
    };
    if !args.image.is_file() {
        anyhow::bail!("{} does not exist", args.image.display());
    }
    let progress = super::progress::TermProgress::new(false);
    boot::boot_with_progress(&args.image, &opts, &progress)
        .with_context(|| format!("booting {}", args.image.display()))?;
    Ok(())
}
