//! Reading back a whole disk image, as `kiln inspect` shows it: the GPT, whether the MBR
//! carries boot code, and a summary of each partition's file system. Everything here reads an
//! image kiln may not have made, so every number is checked, never trusted.

use std::io::Read;
use std::path::Path;

use serde::Serialize;

use crate::ext4::read::Superblock;
use crate::fat::FatSummary;
use crate::gpt::{types, ReadPartition};

#[derive(Debug, Clone, Serialize)]
pub struct Disk {
    pub size_bytes: u64,
    pub disk_guid: String,
    /// The first 440 bytes of the MBR are not all zero: legacy BIOS boot code.
    pub mbr_boot_code: bool,
    pub partitions: Vec<Partition>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Partition {
    pub number: u32,
    pub name: String,
    /// What the type GUID means, for people.
    #[serde(rename = "type")]
    pub type_name: &'static str,
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
    #[serde(rename = "ext4")]
    Ext4(Ext4Summary),
    /// An ext4 superblock that does not hold together: something to show, not a reason to
    /// stop. The error's text comes from the image: escape it before printing.
    #[serde(rename = "ext4")]
    Ext4Unreadable { error: String },
    #[serde(rename = "vfat")]
    Fat(FatSummary),
}

#[derive(Debug, Clone, Serialize)]
pub struct Ext4Summary {
    pub label: String,
    pub uuid: String,
    pub block_size: u64,
    pub blocks: u64,
    pub free_blocks: u64,
    pub inodes: u32,
    pub free_inodes: u32,
    pub features: Vec<&'static str>,
}

/// Reads the disk image at `path`; an error only when it has no readable GPT.
pub fn read(path: &Path) -> std::io::Result<Disk> {
    let table = crate::gpt::read_table(path)?;
    let mut f = std::fs::File::open(path)?;
    let size_bytes = f.metadata()?.len();
    let mut mbr = [0u8; 440];
    let boot = f.read_exact(&mut mbr).is_ok() && mbr.iter().any(|&b| b != 0);
    let partitions = table.partitions.into_iter().map(|p| partition(path, p)).collect();
    Ok(Disk { size_bytes, disk_guid: table.disk_guid, mbr_boot_code: boot, partitions })
}

fn partition(path: &Path, p: ReadPartition) -> Partition {
    let offset_bytes = p.offset_bytes();
    let size_bytes = p.size_bytes();
    let filesystem = offset_bytes.and_then(|offset| file_system(path, offset, size_bytes));
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

fn file_system(path: &Path, offset: u64, len: u64) -> Option<FileSystem> {
    match Superblock::read_at(path, offset) {
        Ok(Some(sb)) => Some(FileSystem::Ext4(Ext4Summary {
            label: sb.label.clone(),
            uuid: crate::ext4::uuid_string(&sb.uuid),
            block_size: sb.block_size,
            blocks: sb.blocks,
            free_blocks: sb.free_blocks,
            inodes: sb.inodes,
            free_inodes: sb.free_inodes,
            features: sb.feature_names(),
        })),
        Err(e) => Some(FileSystem::Ext4Unreadable { error: e.to_string() }),
        Ok(None) => crate::fat::summary(path, offset, len).map(FileSystem::Fat),
    }
}
