//! Reading back a whole disk, as `kiln inspect` shows it: the partition table (GPT, MBR, or
//! none: a file system on the whole disk), whether the MBR carries boot code, and a summary of
//! each partition's file system. Everything here reads a disk kiln may not have made (an image
//! file, or an EBS snapshot read block by block), so every number is checked, never trusted.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::device::{Device, FileDevice};
use crate::ext4::read::Superblock;
use crate::fat::FatSummary;
use crate::gpt::{types, ReadPartition, SECTOR};

#[derive(Debug, Clone, Serialize)]
pub struct Disk {
    pub size_bytes: u64,
    /// `gpt`, `mbr`, or `none` (one file system on the whole disk, partition 0).
    pub table: &'static str,
    /// The GPT's disk GUID, or the MBR's disk signature (`0x1234abcd`); empty for `none`.
    pub disk_guid: String,
    /// The first 440 bytes of the MBR are not all zero: legacy BIOS boot code.
    pub mbr_boot_code: bool,
    pub partitions: Vec<Partition>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Partition {
    pub number: u32,
    pub name: String,
    /// What the type means, for people.
    #[serde(rename = "type")]
    pub type_name: &'static str,
    /// The GPT type GUID, or the MBR type byte as `0x83`.
    pub type_guid: String,
    pub guid: String,
    pub first_lba: u64,
    pub last_lba: u64,
    pub size_bytes: u64,
    /// Where the partition starts; None for an LBA past what a byte offset holds.
    #[serde(skip)]
    pub offset_bytes: Option<u64>,
    pub filesystem: Option<FileSystem>,
}

/// A file system found in a partition.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type")]
pub enum FileSystem {
    /// ext2, ext3 or ext4 (`version` says which).
    #[serde(rename = "ext4")]
    Ext4(Ext4Summary),
    /// An ext4 superblock that does not hold together: something to show, not a reason to
    /// stop. The error's text comes from the image: escape it before printing.
    #[serde(rename = "ext4")]
    Ext4Unreadable { error: String },
    #[serde(rename = "vfat")]
    Fat(FatSummary),
    /// Recognised by its signature but not read by kiln (XFS, LVM, Btrfs...).
    #[serde(rename = "unsupported")]
    Unsupported { kind: &'static str },
}

#[derive(Debug, Clone, Serialize)]
pub struct Ext4Summary {
    /// `ext2`, `ext3` or `ext4`, by the features set (as blkid tells them apart).
    pub version: &'static str,
    pub label: String,
    pub uuid: String,
    pub block_size: u64,
    pub blocks: u64,
    pub free_blocks: u64,
    pub inodes: u32,
    pub free_inodes: u32,
    pub features: Vec<&'static str>,
}

/// Reads the disk image at `path`; an error only when it has no partition table or file
/// system kiln recognises.
pub fn read(path: &Path) -> std::io::Result<Disk> {
    read_device(FileDevice::open(path)?)
}

/// Reads `dev`: its GPT, else its MBR, else a file system on the whole disk.
pub fn read_device(dev: Arc<dyn Device>) -> std::io::Result<Disk> {
    let size_bytes = dev.size();
    let mut sector0 = [0u8; 512];
    let have0 = dev.read_exact_at(&mut sector0, 0).is_ok();
    let boot = have0 && sector0[..440].iter().any(|&b| b != 0);
    let gpt = crate::gpt::read_table_from(dev.clone());
    if let Ok(table) = gpt {
        let partitions = table.partitions.into_iter().map(|p| partition(&dev, p)).collect();
        return Ok(Disk { size_bytes, table: "gpt", disk_guid: table.disk_guid, mbr_boot_code: boot, partitions });
    }
    let mbr = if have0 { crate::mbr::parse(&sector0, size_bytes / SECTOR) } else { None };
    if let Some(mbr) = mbr.filter(|m| m.partitions.iter().all(|p| p.type_id != 0xee)) {
        let partitions = mbr
            .partitions
            .into_iter()
            .map(|m| {
                let p = ReadPartition {
                    number: m.number,
                    name: if m.bootable { "(active)".into() } else { String::new() },
                    type_guid: format!("0x{:02x}", m.type_id),
                    guid: String::new(),
                    first_lba: m.first_lba,
                    last_lba: m.first_lba + m.sectors - 1,
                };
                let mut part = partition(&dev, p);
                part.type_name = crate::mbr::type_name(m.type_id);
                part
            })
            .collect();
        return Ok(Disk { size_bytes, table: "mbr", disk_guid: mbr.signature, mbr_boot_code: boot, partitions });
    }
    if let Some(fs) = file_system(&dev, 0, size_bytes) {
        let whole = Partition {
            number: 0,
            name: "(whole disk)".into(),
            type_name: "no partition table",
            type_guid: String::new(),
            guid: String::new(),
            first_lba: 0,
            last_lba: (size_bytes / SECTOR).saturating_sub(1),
            size_bytes,
            offset_bytes: Some(0),
            filesystem: Some(fs),
        };
        return Ok(Disk {
            size_bytes,
            table: "none",
            disk_guid: String::new(),
            mbr_boot_code: false,
            partitions: vec![whole],
        });
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!(
            "no GPT ({}), no MBR partition table and no file system kiln knows at the start of the disk",
            gpt.err().map(|e| e.to_string()).unwrap_or_default()
        ),
    ))
}

fn partition(dev: &Arc<dyn Device>, p: ReadPartition) -> Partition {
    let offset_bytes = p.offset_bytes();
    let size_bytes = p.size_bytes();
    let filesystem = offset_bytes.and_then(|offset| file_system(dev, offset, size_bytes));
    Partition {
        number: p.number,
        type_name: types::name(&p.type_guid),
        name: p.name,
        type_guid: p.type_guid,
        guid: p.guid,
        first_lba: p.first_lba,
        last_lba: p.last_lba,
        size_bytes,
        offset_bytes,
        filesystem,
    }
}

/// ext2 and ext3 have no feature outside these; anything else makes it ext4.
const EXT3_INCOMPAT: u32 = crate::ext4::features::FILETYPE | 0x4 /* recover */ | 0x10 /* meta_bg */;
const EXT3_RO_COMPAT: u32 =
    crate::ext4::features::SPARSE_SUPER | crate::ext4::features::LARGE_FILE | 0x4 /* btree_dir */;

fn ext_version(sb: &Superblock) -> &'static str {
    if sb.incompat & !EXT3_INCOMPAT != 0 || sb.ro_compat & !EXT3_RO_COMPAT != 0 {
        "ext4"
    } else if sb.compat & crate::ext4::features::HAS_JOURNAL != 0 {
        "ext3"
    } else {
        "ext2"
    }
}

/// Signatures of what kiln recognises but does not read: (name, offset, magic).
const UNSUPPORTED: [(&str, u64, &[u8]); 8] = [
    ("XFS", 0, b"XFSB"),
    ("LVM physical volume", 512, b"LABELONE"),
    ("LUKS encrypted volume", 0, b"LUKS\xba\xbe"),
    ("Btrfs", 0x10040, b"_BHRfS_M"),
    ("Linux swap", 4086, b"SWAPSPACE2"),
    ("squashfs", 0, b"hsqs"),
    ("NTFS", 3, b"NTFS    "),
    ("ZFS member", 0x20000, b"\x0c\xb1\xba\x00\x00\x00\x00\x00"),
];

fn file_system(dev: &Arc<dyn Device>, offset: u64, len: u64) -> Option<FileSystem> {
    match Superblock::find(&**dev, offset) {
        Ok(Some(sb)) => {
            return Some(FileSystem::Ext4(Ext4Summary {
                version: ext_version(&sb),
                label: sb.label.clone(),
                uuid: crate::ext4::uuid_string(&sb.uuid),
                block_size: sb.block_size,
                blocks: sb.blocks,
                free_blocks: sb.free_blocks,
                inodes: sb.inodes,
                free_inodes: sb.free_inodes,
                features: sb.feature_names(),
            }))
        }
        Err(e) => return Some(FileSystem::Ext4Unreadable { error: e.to_string() }),
        Ok(None) => {}
    }
    for (kind, at, magic) in UNSUPPORTED {
        let mut b = vec![0u8; magic.len()];
        let fits = at + magic.len() as u64 <= len;
        if fits && offset.checked_add(at).is_some_and(|o| dev.read_exact_at(&mut b, o).is_ok()) && b == magic {
            return Some(FileSystem::Unsupported { kind });
        }
    }
    crate::fat::summary(dev.clone(), offset, len).map(FileSystem::Fat)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{BlockDevice, MemoryFetch};

    /// The fuzz target's find: a GPT disk whose FAT directory names cluster 0/1, on which
    /// fatfs 0.3.6 panics. Read as a file and through the snapshot block cache, it gives a
    /// summary, never a panic.
    #[test]
    fn a_fat_directory_naming_cluster_one_is_not_a_panic() {
        let data = include_bytes!("../../fuzz/corpus/inspect/regression-fat-cluster-below-2");
        let dev = Arc::new(BlockDevice::new(MemoryFetch { data: data.to_vec(), block_size: 4096 }, 8192));
        let disk = read_device(dev).expect("the GPT is readable");
        assert_eq!(disk.table, "gpt");
        assert!(!disk.partitions.is_empty());
    }

    /// A partition holding XFS is named, not read and not taken for FAT or nothing.
    #[test]
    fn xfs_lvm_and_btrfs_are_named() {
        for (kind, at, magic) in UNSUPPORTED {
            let mut data = vec![0u8; 0x30000];
            data[at as usize..at as usize + magic.len()].copy_from_slice(magic);
            let dev: Arc<dyn Device> = Arc::new(BlockDevice::new(MemoryFetch { data, block_size: 4096 }, 1 << 20));
            match file_system(&dev, 0, 0x30000) {
                Some(FileSystem::Unsupported { kind: k }) => assert_eq!(k, kind),
                other => panic!("{kind}: {other:?}"),
            }
        }
    }
}
