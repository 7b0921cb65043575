//! The disk: layout first (partitions, ESP contents, ext4 geometry, BIOS boot code), then one
//! ordered write of the whole image.
//!
//! Layout (512-byte sectors, every partition start aligned to 1 MiB and so to 512 KiB EBS blocks):
//! ```text
//! LBA 0        protective MBR (GRUB's boot code in BIOS and hybrid modes)
//! LBA 1..33    primary GPT
//! 1 MiB        BIOS boot partition, 1 MiB (BIOS and hybrid modes only): GRUB's core.img
//! next MiB     ESP, FAT32: systemd-boot, kernel, initrd, loader entries, grub.cfg (with Secure
//!              Boot: signed systemd-boot and one signed unified kernel image)
//! next MiB     root, ext4 (discoverable root type for the architecture)
//! last MiB     free, with the backup GPT in its last 33 sectors
//! ```

use sha2::{Digest, Sha256};

use crate::formats::authenticode;
use crate::formats::ext4::{self, Ext4Options, Ext4Plan, SizeSpec};
use crate::formats::fat::{self, FatFile};
use crate::formats::gpt::{self, GptPartition, SECTOR};
use crate::formats::grub_pc;
use crate::formats::image::{Sink, SparseMem, Window};
use crate::formats::tree::{Kind, Tree};
use crate::formats::uki;
use crate::manifest::{DiskInfo, PartitionInfo};
use crate::platform::{Arch, BootMode};
use crate::stage::grub::{self, BiosBoot};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Partition alignment: 1 MiB (a multiple of EBS's 512 KiB block and of any SSD page).
const ALIGN_SECTORS: u64 = MIB / SECTOR;
pub use crate::formats::gpt::types::{BIOS_BOOT as BIOS_BOOT_TYPE, ESP as ESP_TYPE};
/// Size of the BIOS boot partition; GRUB's core.img is about 160 KiB.
const BIOS_BOOT_BYTES: u64 = MIB;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("no kernel in /boot of the root tree: add {package} to [packages].include")]
    NoKernel { package: &'static str },
    #[error("no initrd for kernel {version} (/boot/initrd.img-{version}); is initramfs-tools installed?")]
    NoInitrd { version: String },
    #[error("no systemd-boot EFI binary at /{path}; add systemd-boot-efi to [packages].include")]
    NoBootloader { path: &'static str },
    #[error("no systemd EFI stub at /{path}, which a Secure Boot image's unified kernel image is made from; add systemd-boot-efi to [packages].include")]
    NoStub { path: &'static str },
    #[error(
        "kernel {version} is not an EFI image (nor a gzip-compressed one), so it cannot go into a unified kernel image"
    )]
    KernelNotEfi { version: String },
    #[error("{what}")]
    Pe { what: &'static str, source: crate::formats::pe::PeError },
    #[error("Secure Boot images boot UEFI only (boot = \"uefi\")")]
    SecureBootNeedsUefi,
    #[error("reading {path} from the root tree")]
    Read { path: String, source: std::io::Error },
    #[error("the disk is {have_bytes} bytes, but ESP and partition table alone need {need_bytes}; give a larger size")]
    TooSmall { need_bytes: u64, have_bytes: u64 },
    #[error("disk size {0} is not a whole number of MiB")]
    Unaligned(u64),
    #[error("legacy BIOS boot is x86_64 only; arm64 boots UEFI (use boot = \"uefi\")")]
    BiosOnArm,
    #[error(transparent)]
    Ext4(#[from] ext4::Ext4Error),
    #[error(transparent)]
    Fat(#[from] fat::FatError),
    #[error(transparent)]
    Gpt(#[from] gpt::GptError),
    #[error("a BIOS boot needs GRUB's boot code, made while staging; none was given")]
    NoBiosBoot,
    #[error("placing GRUB's boot code")]
    GrubPlace(#[from] grub_pc::GrubError),
    #[error("writing the image")]
    Io(#[from] std::io::Error),
}

/// Every identifier in the disk, derived from one seed so builds repeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskIds {
    pub disk_guid: [u8; 16],
    pub esp_guid: [u8; 16],
    pub root_guid: [u8; 16],
    pub bios_guid: [u8; 16],
    pub esp_volume_id: u32,
    pub root_fs_seed: [u8; 32],
}

fn derive(seed: &[u8], what: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"kiln-disk-ids-v1\0");
    h.update(what.as_bytes());
    h.update([0]);
    h.update(seed);
    h.finalize().into()
}

/// 16 seed bytes as an RFC 4122 version-4 UUID, so tools that check the variant are content.
fn guid_from(bytes: [u8; 32]) -> [u8; 16] {
    let mut g: [u8; 16] = bytes[..16].try_into().expect("16 bytes");
    g[6] = (g[6] & 0x0f) | 0x40;
    g[8] = (g[8] & 0x3f) | 0x80;
    g
}

impl DiskIds {
    pub fn derive(seed: &[u8]) -> DiskIds {
        let vol = derive(seed, "esp-volume-id");
        DiskIds {
            disk_guid: guid_from(derive(seed, "disk")),
            esp_guid: guid_from(derive(seed, "esp")),
            root_guid: guid_from(derive(seed, "root")),
            bios_guid: guid_from(derive(seed, "bios")),
            esp_volume_id: u32::from_le_bytes(vol[..4].try_into().expect("4 bytes")),
            root_fs_seed: derive(seed, "root-fs"),
        }
    }
    /// The root partition's GUID as the kernel's `root=PARTUUID=` wants it (lowercase).
    pub fn root_partuuid(&self) -> String {
        uuid::Uuid::from_bytes(self.root_guid).hyphenated().to_string()
    }
    /// The ESP's volume id as blkid and fstab write it (`ABCD-1234`).
    pub fn esp_fs_uuid(&self) -> String {
        format!("{:04X}-{:04X}", self.esp_volume_id >> 16, self.esp_volume_id & 0xffff)
    }
}

/// A file for the ESP.
pub type EspFile = FatFile;

#[derive(Debug, Clone)]
pub struct BootSetup {
    pub arch: Arch,
    pub mode: BootMode,
    /// Extra kernel arguments from the recipe.
    pub cmdline: Vec<String>,
}

fn read_file(tree: &Tree, path: &str) -> Result<Option<Vec<u8>>, DiskError> {
    tree.file_bytes(path.as_bytes()).map_err(|source| DiskError::Read { path: path.to_string(), source })
}

/// Orders Debian kernel versions like `6.1.0-28-cloud-amd64` numerically, piece by piece.
fn version_key(v: &str) -> Vec<(u64, String)> {
    v.split(['.', '-', '+', '~']).map(|p| (p.parse::<u64>().unwrap_or(0), p.to_string())).collect()
}

/// The kernel command line kiln boots with: root by PARTUUID, serial console (EC2's console is
/// ttyS0), NVMe I/O timeout as EBS on Nitro needs, then the recipe's arguments.
pub fn kernel_cmdline(ids: &DiskIds, boot: &BootSetup) -> String {
    let mut args = vec![format!("root=PARTUUID={}", ids.root_partuuid()), "rw".to_string()];
    if boot.arch == Arch::X86_64 {
        args.push("console=tty0".into());
    }
    args.push("console=ttyS0,115200n8".into());
    args.push("nvme_core.io_timeout=4294967295".into());
    args.extend(boot.cmdline.iter().cloned());
    args.join(" ")
}

/// The newest kernel in the tree's /boot: its version, image and initrd.
fn newest_kernel(tree: &Tree, arch: Arch) -> Result<(String, Vec<u8>, Vec<u8>), DiskError> {
    let no_kernel = || DiskError::NoKernel { package: arch.cloud_kernel_package() };
    let boot_id = tree.resolve(b"/boot").map_err(|_| no_kernel())?;
    let mut versions: Vec<String> = match &tree.inode(boot_id).kind {
        Kind::Dir(d) => d
            .entries
            .keys()
            .filter_map(|n| n.strip_prefix(b"vmlinuz-").map(|v| String::from_utf8_lossy(v).into_owned()))
            .collect(),
        _ => vec![],
    };
    versions.sort_by_key(|v| version_key(v));
    let version = versions.pop().ok_or_else(no_kernel)?;
    let kernel = read_file(tree, &format!("/boot/vmlinuz-{version}"))?.ok_or_else(no_kernel)?;
    let initrd = read_file(tree, &format!("/boot/initrd.img-{version}"))?
        .ok_or(DiskError::NoInitrd { version: version.clone() })?;
    Ok((version, kernel, initrd))
}

/// What the ESP holds, taken from the staged root tree.
pub fn esp_files(tree: &Tree, ids: &DiskIds, boot: &BootSetup) -> Result<Vec<EspFile>, DiskError> {
    if boot.arch != Arch::X86_64 && boot.mode.has_bios() {
        return Err(DiskError::BiosOnArm);
    }
    let (version, kernel, initrd) = newest_kernel(tree, boot.arch)?;
    let options = kernel_cmdline(ids, boot);
    let entry = format!("title Debian GNU/Linux ({version})\nlinux /vmlinuz\ninitrd /initrd.img\noptions {options}\n");
    let mut files = vec![
        FatFile { path: "vmlinuz".into(), bytes: kernel },
        FatFile { path: "initrd.img".into(), bytes: initrd },
        FatFile { path: "loader/entries/kiln.conf".into(), bytes: entry.clone().into_bytes() },
        // No menu: boot the one entry at once; a key press still shows the menu.
        FatFile { path: "loader/loader.conf".into(), bytes: b"timeout 0\ndefault kiln.conf\n".to_vec() },
    ];
    if boot.mode.has_uefi() {
        let sd = boot.arch.systemd_boot_efi();
        let efi = read_file(tree, &format!("/{sd}"))?.ok_or(DiskError::NoBootloader { path: sd })?;
        files.push(FatFile { path: boot.arch.efi_boot_path().into(), bytes: efi });
    }
    if boot.mode.has_bios() {
        files.push(FatFile { path: "grub/grub.cfg".into(), bytes: grub::grub_cfg_from_entry(&entry).into_bytes() });
    }
    Ok(files)
}

/// The boot chain of a Secure Boot image, as signed: what firmware loads and measures.
#[derive(Debug, Clone)]
pub struct SignedBoot {
    /// systemd-boot's path on the ESP (the removable-media path).
    pub loader_path: String,
    /// The unified kernel image's path on the ESP (`EFI/Linux/…`).
    pub uki_path: String,
    /// The kernel command line inside it.
    pub cmdline: String,
    pub kernel_version: String,
    /// Authenticode SHA-256 digests of systemd-boot and of the UKI: what the firmware
    /// verifies against db and measures into PCR 4.
    pub loader_digest: [u8; 32],
    pub uki_digest: [u8; 32],
}

/// What a Secure Boot image's ESP holds: systemd-boot at the removable-media path and one
/// unified kernel image (systemd's stub with the kernel, initrd, command line and os-release),
/// both signed by `signer`; no loader entry, kernel or initrd outside the signed image, so
/// nothing the firmware or systemd-boot reads is unsigned but loader.conf.
pub fn signed_esp_files(
    tree: &Tree,
    ids: &DiskIds,
    boot: &BootSetup,
    signer: &authenticode::Signer,
) -> Result<(Vec<EspFile>, SignedBoot), DiskError> {
    if boot.mode != BootMode::Uefi {
        return Err(DiskError::SecureBootNeedsUefi);
    }
    let (version, kernel, initrd) = newest_kernel(tree, boot.arch)?;
    let cmdline = kernel_cmdline(ids, boot);
    let stub_path = boot.arch.systemd_stub();
    let stub = read_file(tree, &format!("/{stub_path}"))?.ok_or(DiskError::NoStub { path: stub_path })?;
    let os_release = match read_file(tree, "/usr/lib/os-release")? {
        Some(b) => b,
        None => read_file(tree, "/etc/os-release")?.unwrap_or_default(),
    };
    let kernel = efi_kernel(kernel, &version)?;
    let parts =
        uki::UkiParts { os_release: &os_release, cmdline: &cmdline, uname: &version, initrd: &initrd, kernel: &kernel };
    let pe_err = |what: &'static str| move |source| DiskError::Pe { what, source };
    let uki = uki::build(&stub, &parts).map_err(pe_err("the unified kernel image"))?;
    let uki = authenticode::sign(&uki, signer).map_err(pe_err("signing the unified kernel image"))?;
    let sd = boot.arch.systemd_boot_efi();
    let loader = read_file(tree, &format!("/{sd}"))?.ok_or(DiskError::NoBootloader { path: sd })?;
    let loader = authenticode::sign(&loader, signer).map_err(pe_err("signing systemd-boot"))?;

    let uki_name = format!("kiln-{version}.efi");
    let signed = SignedBoot {
        loader_path: boot.arch.efi_boot_path().into(),
        uki_path: format!("EFI/Linux/{uki_name}"),
        cmdline,
        kernel_version: version,
        loader_digest: authenticode::image_digest(&loader).map_err(pe_err("systemd-boot"))?,
        uki_digest: authenticode::image_digest(&uki).map_err(pe_err("the unified kernel image"))?,
    };
    let files = vec![
        FatFile { path: boot.arch.efi_boot_path().into(), bytes: loader },
        FatFile { path: signed.uki_path.clone(), bytes: uki },
        // No menu: boot the image at once; a key press still shows the menu.
        FatFile { path: "loader/loader.conf".into(), bytes: format!("timeout 0\ndefault {uki_name}\n").into_bytes() },
    ];
    Ok((files, signed))
}

/// The kernel as an EFI image: Debian's arm64 `vmlinuz` is a gzip-compressed `Image`, which the
/// stub cannot start; its decompressed form is a PE image.
fn efi_kernel(kernel: Vec<u8>, version: &str) -> Result<Vec<u8>, DiskError> {
    let kernel = if kernel.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&kernel[..]), &mut out)
            .map_err(|source| DiskError::Read { path: format!("/boot/vmlinuz-{version} (gzip)"), source })?;
        out
    } else {
        kernel
    };
    if !kernel.starts_with(b"MZ") {
        return Err(DiskError::KernelNotEfi { version: version.to_string() });
    }
    Ok(kernel)
}

#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// Whole-disk size; None: the smallest whole number of GiB that fits (EBS sizes are GiB).
    pub size: Option<u64>,
    pub esp_size_bytes: u64,
    pub boot: BootSetup,
    pub timestamp: i64,
    /// GRUB's MBR code and core image for a BIOS boot, made while staging from the image's
    /// own GRUB (`stage::grub::build_bios_boot`): planning places bytes, it runs nothing.
    pub bios_boot: Option<BiosBoot>,
}

/// One partition of the plan.
#[derive(Debug, Clone)]
struct PlannedPart {
    gpt: GptPartition,
    filesystem: &'static str,
    fs_uuid: Option<String>,
    fs_label: Option<String>,
}

/// Everything needed to write the disk, computed before any byte is written.
pub struct DiskPlan {
    size_bytes: u64,
    disk_guid: uuid::Uuid,
    parts: Vec<PlannedPart>,
    table: SparseMem,
    esp: SparseMem,
    esp_offset: u64,
    root: Ext4Plan,
    root_offset: u64,
    bios_core: Option<(u64, Vec<u8>)>,
}

impl DiskPlan {
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub fn partitions(&self) -> Vec<PartitionInfo> {
        self.parts
            .iter()
            .enumerate()
            .map(|(i, p)| PartitionInfo {
                number: i as u32 + 1,
                name: p.gpt.name.clone(),
                type_guid: p.gpt.type_guid.clone(),
                guid: p.gpt.guid.hyphenated().to_string().to_uppercase(),
                first_lba: p.gpt.first_lba,
                last_lba: p.gpt.last_lba,
                offset_bytes: p.gpt.first_lba * SECTOR,
                size_bytes: (p.gpt.last_lba - p.gpt.first_lba + 1) * SECTOR,
                filesystem: p.filesystem.to_string(),
                fs_uuid: p.fs_uuid.clone(),
                fs_label: p.fs_label.clone(),
            })
            .collect()
    }

    pub fn disk_info(&self) -> DiskInfo {
        DiskInfo {
            label: "gpt".into(),
            guid: self.disk_guid.hyphenated().to_string().to_uppercase(),
            sector_size: SECTOR,
            partitions: self.partitions(),
        }
    }
}

fn align_up(sectors: u64) -> u64 {
    sectors.div_ceil(ALIGN_SECTORS) * ALIGN_SECTORS
}

/// Plans the disk. `root_opts.size` is replaced: the root fills its partition.
pub fn plan(
    spec: &DiskSpec,
    ids: &DiskIds,
    esp: &[EspFile],
    root: &Tree,
    mut root_opts: Ext4Options,
) -> Result<DiskPlan, DiskError> {
    let bios = spec.boot.mode.has_bios();
    if bios && spec.boot.arch != Arch::X86_64 {
        return Err(DiskError::BiosOnArm);
    }
    let mut next = ALIGN_SECTORS;
    let bios_range = bios.then(|| {
        let r = (next, next + BIOS_BOOT_BYTES / SECTOR - 1);
        next = align_up(r.1 + 1);
        r
    });
    let esp_sectors = spec.esp_size_bytes / SECTOR;
    let esp_range = (next, next + esp_sectors - 1);
    let root_first = align_up(esp_range.1 + 1);
    // Keep the last MiB free: the backup GPT lives there and the root stays aligned.
    let tail = ALIGN_SECTORS;

    let size_bytes = match spec.size {
        Some(s) => {
            if s % MIB != 0 {
                return Err(DiskError::Unaligned(s));
            }
            let need = (root_first + tail) * SECTOR + MIB;
            if s < need {
                return Err(DiskError::TooSmall { need_bytes: need, have_bytes: s });
            }
            s
        }
        None => {
            let auto = ext4::plan(root, &root_opts)?;
            let root_sectors = align_up(auto.size_bytes().div_ceil(SECTOR));
            ((root_first + root_sectors + tail) * SECTOR).div_ceil(GIB) * GIB
        }
    };
    let total = size_bytes / SECTOR;
    let root_last = total - tail - 1;
    root_opts.size = SizeSpec::Bytes((root_last - root_first + 1) * SECTOR);
    let root_plan = ext4::plan(root, &root_opts)?;

    let esp_mem = fat::build(spec.esp_size_bytes, ids.esp_volume_id, "ESP", esp, spec.timestamp)?;

    let mut parts = Vec::new();
    if let Some((first, last)) = bios_range {
        parts.push(PlannedPart {
            gpt: GptPartition {
                name: "BIOS boot".into(),
                type_guid: BIOS_BOOT_TYPE.into(),
                guid: uuid::Uuid::from_bytes(ids.bios_guid),
                first_lba: first,
                last_lba: last,
                flags: 0,
            },
            filesystem: "none",
            fs_uuid: None,
            fs_label: None,
        });
    }
    parts.push(PlannedPart {
        gpt: GptPartition {
            name: "ESP".into(),
            type_guid: ESP_TYPE.into(),
            guid: uuid::Uuid::from_bytes(ids.esp_guid),
            first_lba: esp_range.0,
            last_lba: esp_range.1,
            flags: 0,
        },
        filesystem: "vfat",
        fs_uuid: Some(ids.esp_fs_uuid()),
        fs_label: Some("ESP".into()),
    });
    parts.push(PlannedPart {
        gpt: GptPartition {
            name: "root".into(),
            type_guid: spec.boot.arch.root_partition_type().into(),
            guid: uuid::Uuid::from_bytes(ids.root_guid),
            first_lba: root_first,
            last_lba: root_last,
            flags: 0,
        },
        filesystem: "ext4",
        fs_uuid: Some(ext4::uuid_string(&root_plan.uuid())),
        fs_label: Some(root_opts.label.clone()),
    });

    let (mbr_code, bios_core) = match bios_range {
        Some((first, last)) => {
            let BiosBoot { boot_img, core_img } = spec.bios_boot.as_ref().ok_or(DiskError::NoBiosBoot)?;
            let mut core_img = core_img.clone();
            let mut mbr = [0u8; 512];
            grub_pc::install_boot_code(&mut mbr, boot_img, first)?;
            grub_pc::place_core(&mut core_img, first, last - first + 1)?;
            let code: [u8; 440] = mbr[..440].try_into().expect("440 bytes");
            (Some(code), Some((first * SECTOR, core_img)))
        }
        None => (None, None),
    };
    let gpts: Vec<GptPartition> = parts.iter().map(|p| p.gpt.clone()).collect();
    let table = gpt::build(size_bytes, uuid::Uuid::from_bytes(ids.disk_guid), &gpts, mbr_code.as_ref())?;

    Ok(DiskPlan {
        size_bytes,
        disk_guid: uuid::Uuid::from_bytes(ids.disk_guid),
        parts,
        table,
        esp: esp_mem,
        esp_offset: esp_range.0 * SECTOR,
        root: root_plan,
        root_offset: root_first * SECTOR,
        bios_core,
    })
}

/// Writes the planned disk as one ordered stream.
pub fn write(plan: &DiskPlan, root: &Tree, sink: &mut dyn Sink) -> Result<(), DiskError> {
    let first_part = plan.parts.iter().map(|p| p.gpt.first_lba).min().unwrap_or(0) * SECTOR;
    gpt::emit_head(&plan.table, first_part, sink)?;
    if let Some((offset, core)) = &plan.bios_core {
        sink.write_at(*offset, core)?;
    }
    plan.esp.emit(plan.esp_offset, sink)?;
    plan.root.write(root, &mut Window { base: plan.root_offset, inner: &mut *sink })?;
    let root_end = plan.parts.last().map(|p| (p.gpt.last_lba + 1) * SECTOR).unwrap_or(0);
    gpt::emit_tail(&plan.table, root_end, sink)?;
    sink.finish(plan.size_bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_repeat_and_differ_by_seed() {
        let a = DiskIds::derive(b"one");
        assert_eq!(a, DiskIds::derive(b"one"));
        assert_ne!(a, DiskIds::derive(b"two"));
        assert_eq!(a.root_partuuid().len(), 36);
        assert_eq!(a.root_partuuid().chars().nth(14), Some('4'));
        assert_eq!(a.esp_fs_uuid().len(), 9);
    }

    #[test]
    fn kernel_versions_sort_numerically() {
        let mut v = ["6.1.0-9-cloud-amd64".to_string(), "6.1.0-28-cloud-amd64".to_string()];
        v.sort_by_key(|x| version_key(x));
        assert_eq!(v.last().unwrap(), "6.1.0-28-cloud-amd64");
    }
}
