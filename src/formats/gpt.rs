//! GPT partition tables through the `gpt` crate, written into a sparse in-memory device so the
//! result can join the ordered image stream: protective MBR and primary table at the start,
//! backup table at the end. 512-byte logical sectors, 128 entries (what sgdisk expects).

use std::collections::BTreeMap;

use gpt::disk::LogicalBlockSize;
use gpt::mbr::ProtectiveMBR;
use gpt::partition::Partition;
use gpt::partition_types::Type;

use super::image::{Sink, SparseMem};

/// Partition type GUIDs kiln writes and names (UEFI spec; the Discoverable Partitions
/// Specification for the roots), upper-case as `sgdisk` and the manifest print them.
pub mod types {
    pub const ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
    pub const BIOS_BOOT: &str = "21686148-6449-6E6F-744E-656564454649";
    pub const LINUX_ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
    pub const LINUX_ROOT_ARM64: &str = "B921B045-1DF0-41C3-AF44-4C6F280D3FAE";
    pub const LINUX_FILESYSTEM: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
    pub const LINUX_LVM: &str = "E6D6D379-F507-44C2-A23C-238F2A3DF928";
    pub const LINUX_SWAP: &str = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F";
    pub const XBOOTLDR: &str = "BC13C2FF-59E6-4262-A352-B275FD6F7172";
    pub const MICROSOFT_BASIC_DATA: &str = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7";

    /// What a partition type is, for people.
    pub fn name(guid: &str) -> &'static str {
        match guid.to_ascii_uppercase().as_str() {
            ESP => "EFI System",
            BIOS_BOOT => "BIOS boot",
            LINUX_ROOT_X86_64 => "Linux root (x86-64)",
            LINUX_ROOT_ARM64 => "Linux root (ARM64)",
            LINUX_FILESYSTEM => "Linux filesystem",
            LINUX_LVM => "Linux LVM",
            LINUX_SWAP => "Linux swap",
            XBOOTLDR => "Linux extended boot",
            MICROSOFT_BASIC_DATA => "Microsoft basic data",
            _ => "unknown",
        }
    }
}

/// Every partition's type GUID in the GPT of the disk image at `path` (upper-case), read with
/// the gpt crate; None when it has no readable GPT.
pub fn partition_types(path: &std::path::Path) -> Option<Vec<String>> {
    Some(read_table(path).ok()?.partitions.into_iter().map(|p| p.type_guid).collect())
}

/// A partition as read back from a disk image's GPT.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReadPartition {
    /// The entry's number, from 1.
    pub number: u32,
    pub name: String,
    /// Upper-case hyphenated type GUID.
    pub type_guid: String,
    /// Upper-case hyphenated unique GUID.
    pub guid: String,
    pub first_lba: u64,
    pub last_lba: u64,
}

impl ReadPartition {
    /// Where the partition starts in the image, in bytes; None when the table's LBA is past
    /// what a byte offset can hold (a hostile table).
    pub fn offset_bytes(&self) -> Option<u64> {
        self.first_lba.checked_mul(SECTOR)
    }
    /// The partition's length in bytes, 0 for an entry that ends before it starts.
    pub fn size_bytes(&self) -> u64 {
        self.last_lba.checked_sub(self.first_lba).and_then(|n| n.checked_add(1)).map_or(0, |n| n.saturating_mul(SECTOR))
    }
}

/// A disk image's GPT, read with the gpt crate: the disk GUID and every used entry in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadTable {
    pub disk_guid: String,
    pub partitions: Vec<ReadPartition>,
}

/// Reads the GPT of the disk image at `path`.
pub fn read_table(path: &std::path::Path) -> std::io::Result<ReadTable> {
    read_table_from(crate::device::FileDevice::open(path)?)
}

/// Reads the GPT of `dev`.
pub fn read_table_from(dev: std::sync::Arc<dyn crate::device::Device>) -> std::io::Result<ReadTable> {
    let disk = gpt::GptConfig::new()
        .writable(false)
        .open_from_device(crate::device::Window::whole(dev))
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let upper = |u: &uuid::Uuid| u.hyphenated().to_string().to_uppercase();
    Ok(ReadTable {
        disk_guid: upper(disk.guid()),
        partitions: disk
            .partitions()
            .iter()
            .map(|(n, p)| ReadPartition {
                number: *n,
                name: p.name.clone(),
                type_guid: upper(&p.part_type_guid.guid),
                guid: upper(&p.part_guid),
                first_lba: p.first_lba,
                last_lba: p.last_lba,
            })
            .collect(),
    })
}

pub const SECTOR: u64 = 512;
/// First usable LBA with 128 entries of 128 bytes: MBR, header, 32 sectors of entries.
pub const FIRST_USABLE_LBA: u64 = 34;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptPartition {
    pub name: String,
    /// Upper-case hyphenated type GUID.
    pub type_guid: String,
    pub guid: uuid::Uuid,
    pub first_lba: u64,
    pub last_lba: u64,
    /// GPT attribute bits (bit 2: legacy BIOS bootable).
    pub flags: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum GptError {
    #[error("partition {name:?} ({first}..={last}) lies outside the usable sectors {first_usable}..={last_usable}")]
    OutOfRange { name: String, first: u64, last: u64, first_usable: u64, last_usable: u64 },
    #[error("partitions {a:?} and {b:?} overlap")]
    Overlap { a: String, b: String },
    #[error("bad partition type GUID {0:?}")]
    BadType(String),
    #[error("writing the partition table: {0}")]
    Gpt(String),
}

/// The last usable LBA for a disk of `total_sectors`: backup entries (32) and header (1) at the end.
pub fn last_usable_lba(total_sectors: u64) -> u64 {
    total_sectors - 34
}

/// Builds the protective MBR and both GPTs for a disk of `disk_bytes`. `mbr_boot_code`, when
/// given, fills the MBR's 440 code bytes (legacy BIOS boot).
pub fn build(
    disk_bytes: u64,
    disk_guid: uuid::Uuid,
    parts: &[GptPartition],
    mbr_boot_code: Option<&[u8; 440]>,
) -> Result<SparseMem, GptError> {
    let total = disk_bytes / SECTOR;
    let (first_usable, last_usable) = (FIRST_USABLE_LBA, last_usable_lba(total));
    let mut sorted: Vec<&GptPartition> = parts.iter().collect();
    sorted.sort_by_key(|p| p.first_lba);
    for p in &sorted {
        if p.first_lba < first_usable || p.last_lba > last_usable || p.last_lba < p.first_lba {
            return Err(GptError::OutOfRange {
                name: p.name.clone(),
                first: p.first_lba,
                last: p.last_lba,
                first_usable,
                last_usable,
            });
        }
    }
    for w in sorted.windows(2) {
        if w[1].first_lba <= w[0].last_lba {
            return Err(GptError::Overlap { a: w[0].name.clone(), b: w[1].name.clone() });
        }
    }

    let mut dev = SparseMem::new(disk_bytes);
    let mbr = ProtectiveMBR::with_lb_size(u32::try_from(total - 1).unwrap_or(u32::MAX));
    let mut mbr_bytes = mbr.to_bytes();
    if let Some(code) = mbr_boot_code {
        mbr_bytes[..440].copy_from_slice(code);
    }
    {
        use std::io::{Seek, SeekFrom, Write};
        dev.seek(SeekFrom::Start(0)).map_err(|e| GptError::Gpt(e.to_string()))?;
        dev.write_all(&mbr_bytes).map_err(|e| GptError::Gpt(e.to_string()))?;
    }
    let gpt_err = |e: gpt::GptError| GptError::Gpt(e.to_string());
    let mut disk = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(LogicalBlockSize::Lb512)
        .change_partition_count(true)
        .create_from_device(dev, Some(disk_guid))
        .map_err(gpt_err)?;
    // Entries by number, with GUIDs we choose (the crate would draw random ones).
    let mut table = BTreeMap::new();
    for (i, p) in parts.iter().enumerate() {
        let type_guid: uuid::Uuid = p.type_guid.parse().map_err(|_| GptError::BadType(p.type_guid.clone()))?;
        table.insert(
            i as u32 + 1,
            Partition {
                part_type_guid: Type { guid: type_guid, os: gpt::partition_types::OperatingSystem::None },
                part_guid: p.guid,
                first_lba: p.first_lba,
                last_lba: p.last_lba,
                flags: p.flags,
                name: p.name.clone(),
            },
        );
    }
    disk.update_partitions(table).map_err(gpt_err)?;
    let dev = disk.write().map_err(gpt_err)?;
    Ok(dev)
}

/// Emits the table's head (everything before `first_partition_byte`) and tail (from
/// `tail_from_byte`) as separate ordered pieces: the caller interleaves the partitions.
pub fn emit_head(mem: &SparseMem, first_partition_byte: u64, sink: &mut dyn Sink) -> std::io::Result<()> {
    mem.emit_range(0..first_partition_byte, 0, sink)
}

pub fn emit_tail(mem: &SparseMem, tail_from_byte: u64, sink: &mut dyn Sink) -> std::io::Result<()> {
    mem.emit_range(tail_from_byte..mem.len(), 0, sink)
}
