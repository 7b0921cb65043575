//! Facts that follow from the target architecture and boot mode, in one place.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    #[serde(rename = "x86_64")]
    X86_64,
    #[serde(rename = "arm64")]
    Arm64,
}

impl Arch {
    pub const ALL: [Arch; 2] = [Arch::X86_64, Arch::Arm64];

    /// The name recipes, manifests and EC2 use (`x86_64`, `arm64`).
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Arm64 => "arm64",
        }
    }
    pub fn parse(s: &str) -> Option<Arch> {
        match s {
            "x86_64" | "amd64" => Some(Arch::X86_64),
            "arm64" | "aarch64" => Some(Arch::Arm64),
            _ => None,
        }
    }
    /// Debian's architecture name (`dpkg --print-architecture`).
    pub fn debian(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }
    /// The UEFI removable-media fallback path on the ESP.
    pub fn efi_boot_path(self) -> &'static str {
        match self {
            Arch::X86_64 => "EFI/BOOT/BOOTX64.EFI",
            Arch::Arm64 => "EFI/BOOT/BOOTAA64.EFI",
        }
    }
    /// systemd-boot's binary inside the target root (package `systemd-boot-efi`).
    pub fn systemd_boot_efi(self) -> &'static str {
        match self {
            Arch::X86_64 => "usr/lib/systemd/boot/efi/systemd-bootx64.efi",
            Arch::Arm64 => "usr/lib/systemd/boot/efi/systemd-bootaa64.efi",
        }
    }
    /// systemd's EFI stub inside the target root (`systemd-boot-efi`): the front of a unified
    /// kernel image.
    pub fn systemd_stub(self) -> &'static str {
        match self {
            Arch::X86_64 => "usr/lib/systemd/boot/efi/linuxx64.efi.stub",
            Arch::Arm64 => "usr/lib/systemd/boot/efi/linuxaa64.efi.stub",
        }
    }
    /// Discoverable Partitions Specification root type for this architecture.
    pub fn root_partition_type(self) -> &'static str {
        match self {
            Arch::X86_64 => crate::formats::gpt::types::LINUX_ROOT_X86_64,
            Arch::Arm64 => crate::formats::gpt::types::LINUX_ROOT_ARM64,
        }
    }
    /// Debian's cloud kernel flavour (NVMe and ENA drivers built in or as modules).
    pub fn cloud_kernel_package(self) -> &'static str {
        match self {
            Arch::X86_64 => "linux-image-cloud-amd64",
            Arch::Arm64 => "linux-image-cloud-arm64",
        }
    }
    /// Packages every bootable image needs, whatever the recipe lists: the cloud kernel (NVMe and
    /// ENA drivers), an initramfs builder, systemd as init with udev, and systemd-boot's EFI binary.
    pub fn required_packages(self) -> Vec<&'static str> {
        vec![
            self.cloud_kernel_package(),
            "initramfs-tools",
            "systemd-sysv",
            "udev",
            "systemd-boot-efi",
            "dbus",
            "e2fsprogs",
        ]
    }
    /// The architecture this process runs on.
    pub fn host() -> Option<Arch> {
        Arch::parse(std::env::consts::ARCH)
    }
}

/// An architecture name kiln does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an architecture kiln builds; use x86_64 (or amd64) or arm64 (or aarch64)")]
pub struct UnknownArch(pub String);

impl std::str::FromStr for Arch {
    type Err = UnknownArch;
    fn from_str(s: &str) -> Result<Arch, UnknownArch> {
        Arch::parse(s).ok_or_else(|| UnknownArch(s.to_string()))
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the image boots. EC2's RegisterImage `BootMode` follows from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BootMode {
    /// UEFI only (systemd-boot on the ESP).
    Uefi,
    /// Legacy BIOS only (GRUB in a BIOS boot partition).
    Bios,
    /// Both from one disk; registered as `uefi-preferred`.
    Hybrid,
}

impl BootMode {
    pub fn as_str(self) -> &'static str {
        match self {
            BootMode::Uefi => "uefi",
            BootMode::Bios => "bios",
            BootMode::Hybrid => "hybrid",
        }
    }
    pub fn has_uefi(self) -> bool {
        matches!(self, BootMode::Uefi | BootMode::Hybrid)
    }
    pub fn has_bios(self) -> bool {
        matches!(self, BootMode::Bios | BootMode::Hybrid)
    }
}

impl fmt::Display for BootMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
