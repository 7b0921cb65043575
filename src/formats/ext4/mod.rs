//! kiln's ext4 writer: a whole root tree into a clean ext4 file system, planned completely
//! before any byte is written and then emitted in ascending offset order (holes stay holes).
//!
//! Layout: 4 KiB blocks, 32768 blocks per group, 256-byte inodes, `flex_bg` with 16 groups per
//! flex group (all bitmaps and inode tables of a flex group packed at its start),
//! `sparse_super` backups, extents (with one level of index blocks), `metadata_csum` (crc32c)
//! on every metadata structure, an empty jbd2 journal, nanosecond and post-2038 times in the
//! extra inode fields, extended attributes in the inode or in one attribute block.
//!
//! The authority for every field is the kernel's Documentation/filesystems/ext4/ and
//! e2fsprogs; e2fsck, debugfs and the kernel itself are the oracles in tests/ext4.rs.

mod csum;
mod htree;
mod layout;
mod ondisk;
pub mod read;
mod write;

pub use layout::Ext4Plan;
pub use ondisk::features;
pub use read::{read_tree, ReadError};

use crate::tree::{Tree, TreeError};

pub const BLOCK_SIZE: u64 = 4096;
pub const INODE_SIZE: u64 = 256;
pub const BLOCKS_PER_GROUP: u64 = 32768;

/// How large the file system should be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeSpec {
    /// Exactly this many bytes (rounded down to whole blocks).
    Bytes(u64),
    /// The smallest size that fits the tree, plus `headroom_percent` of the data and at least
    /// `min_free_bytes` free.
    Auto { headroom_percent: u32, min_free_bytes: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ext4Options {
    pub size: SizeSpec,
    /// Volume label, at most 16 bytes.
    pub label: String,
    pub uuid: [u8; 16],
    /// Seed of the directory hash (`s_hash_seed`).
    pub hash_seed: [u8; 16],
    /// Superblock times (mkfs, write, last check): SOURCE_DATE_EPOCH, never the wall clock.
    pub timestamp: i64,
    /// Blocks reserved for root, in percent (mke2fs's default is 5).
    pub reserved_percent: u32,
    /// Bytes of file system per inode (mke2fs's default is 16384).
    pub inode_ratio: u64,
    /// Extra inodes to leave free beyond the ratio, so the booted system can grow.
    pub min_free_inodes: u64,
}

impl Default for Ext4Options {
    fn default() -> Self {
        Ext4Options {
            size: SizeSpec::Auto { headroom_percent: 20, min_free_bytes: 64 << 20 },
            label: String::new(),
            uuid: [0; 16],
            hash_seed: [0; 16],
            timestamp: 0,
            reserved_percent: 5,
            inode_ratio: 16384,
            min_free_inodes: 4096,
        }
    }
}

impl Ext4Options {
    /// Options whose UUID and hash seed derive from `seed` (same seed, same file system).
    pub fn with_seed(seed: &[u8]) -> Self {
        use sha2::{Digest, Sha256};
        let mut uuid: [u8; 16] =
            Sha256::digest([b"kiln-ext4-uuid\0".as_slice(), seed].concat())[..16].try_into().expect("16");
        uuid[6] = (uuid[6] & 0x0f) | 0x40;
        uuid[8] = (uuid[8] & 0x3f) | 0x80;
        let hash_seed: [u8; 16] =
            Sha256::digest([b"kiln-ext4-hash-seed\0".as_slice(), seed].concat())[..16].try_into().expect("16");
        Ext4Options { uuid, hash_seed, ..Ext4Options::default() }
    }
}

/// Lowercase hyphenated, as blkid prints it.
pub fn uuid_string(u: &[u8; 16]) -> String {
    let h = hex::encode(u);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    #[error("root needs at least {}, the image gives {}", gib(*need_bytes), gib(*have_bytes))]
    TooSmall { need_bytes: u64, have_bytes: u64 },
    #[error("the tree has {need} inodes; a file system of this size holds at most {max}")]
    TooManyInodes { need: u64, max: u64 },
    #[error("the file system needs {blocks} blocks; without the 64bit feature it holds at most {max}")]
    TooManyBlocks { blocks: u64, max: u64 },
    #[error("{path}: {size_bytes} bytes; an ext4 file holds at most {max_bytes}")]
    FileTooLarge { path: String, size_bytes: u64, max_bytes: u64 },
    #[error("{path}: {links} hard links; an ext4 inode holds at most {max}")]
    TooManyLinks { path: String, links: u32, max: u32 },
    #[error("{percent}% of the blocks reserved for root; at most 100% can be")]
    ReservedTooLarge { percent: u32 },
    #[error("label {label:?} is {len} bytes; ext4 labels hold at most 16")]
    LabelTooLong { label: String, len: usize },
    #[error("{path}: {what}")]
    Unsupported { path: String, what: String },
    #[error("{path}: extended attributes take {need} bytes; at most {max} fit in the inode and one attribute block")]
    XattrsTooLarge { path: String, need: usize, max: usize },
    #[error("{path}: the file needs {extents} extents, more than one level of extent index blocks holds")]
    TooFragmented { path: String, extents: usize },
    #[error("invalid tree")]
    Tree(#[from] TreeError),
    #[error("writing the file system")]
    Io(#[from] std::io::Error),
}

/// Plans a file system for `tree`.
pub fn plan(tree: &Tree, opts: &Ext4Options) -> Result<Ext4Plan, Ext4Error> {
    layout::plan(tree, opts)
}
