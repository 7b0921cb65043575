//! ext4's on-disk structures, written down once: the byte offset and width of every field the
//! writer sets or the reader looks at, the magic numbers and the flag bits. The writer
//! (`write.rs`, `layout.rs`, `htree.rs`) and the reader (`read.rs`) both go through here, so a
//! field cannot be at one offset when written and at another when read.
//!
//! Names follow the kernel's `fs/ext4/ext4.h`, `fs/ext4/ext4_extents.h`, `fs/ext4/xattr.h`,
//! `fs/ext4/namei.c` and `include/linux/jbd2.h` (with the struct's prefix dropped: `s_magic`
//! is [`sb::MAGIC`]); the layout is the one in Documentation/filesystems/ext4/. Every integer
//! is little-endian except in the jbd2 journal, which is big-endian.
//!
//! A field is read from or written to a slice that starts where its structure starts; a
//! slice too short for the field is a bug of the caller (the reader checks every length it
//! takes from disk before it slices).

/// A byte at a fixed offset.
#[derive(Debug, Clone, Copy)]
pub struct U8(pub usize);
/// A little-endian u16 at a fixed offset.
#[derive(Debug, Clone, Copy)]
pub struct Le16(pub usize);
/// A little-endian u32 at a fixed offset.
#[derive(Debug, Clone, Copy)]
pub struct Le32(pub usize);
/// A big-endian u32 at a fixed offset (jbd2).
#[derive(Debug, Clone, Copy)]
pub struct Be32(pub usize);
/// `N` bytes at a fixed offset.
#[derive(Debug, Clone, Copy)]
pub struct Bytes<const N: usize>(pub usize);

impl U8 {
    pub fn get(self, b: &[u8]) -> u8 {
        b[self.0]
    }
    pub fn put(self, b: &mut [u8], v: u8) {
        b[self.0] = v;
    }
}

impl Le16 {
    pub fn get(self, b: &[u8]) -> u16 {
        u16::from_le_bytes([b[self.0], b[self.0 + 1]])
    }
    pub fn put(self, b: &mut [u8], v: u16) {
        b[self.0..self.0 + 2].copy_from_slice(&v.to_le_bytes());
    }
}

impl Le32 {
    pub fn get(self, b: &[u8]) -> u32 {
        u32::from_le_bytes([b[self.0], b[self.0 + 1], b[self.0 + 2], b[self.0 + 3]])
    }
    pub fn put(self, b: &mut [u8], v: u32) {
        b[self.0..self.0 + 4].copy_from_slice(&v.to_le_bytes());
    }
}

impl Be32 {
    pub fn put(self, b: &mut [u8], v: u32) {
        b[self.0..self.0 + 4].copy_from_slice(&v.to_be_bytes());
    }
}

impl<const N: usize> Bytes<N> {
    pub fn get(self, b: &[u8]) -> [u8; N] {
        b[self.0..self.0 + N].try_into().expect("N bytes")
    }
    /// Writes `v` at the field's start; `v` may be shorter than the field (a label).
    pub fn put(self, b: &mut [u8], v: &[u8]) {
        assert!(v.len() <= N, "{} bytes into a field of {N}", v.len());
        b[self.0..self.0 + v.len()].copy_from_slice(v);
    }
}

/// Splits a value into the low and high halves that ext4 stores in separate fields
/// (`*_lo`/`*_hi`): the low 32 bits, and the bits above them.
pub fn lo32(v: u64) -> u32 {
    (v & 0xFFFF_FFFF) as u32
}
/// The bits of `v` above the low 32, for a `*_hi` field of 32 bits.
pub fn hi32(v: u64) -> u32 {
    (v >> 32) as u32
}
/// The bits of `v` above the low 32, for a `*_hi` field of 16 bits: callers have checked that
/// `v` fits 48 bits (block numbers of a file system without the 64bit feature fit 32).
pub fn hi16(v: u64) -> u16 {
    ((v >> 32) & 0xFFFF) as u16
}
/// The low 16 bits of an id whose high half is stored elsewhere (`i_uid` / `l_i_uid_high`).
pub fn lo16(v: u32) -> u16 {
    (v & 0xFFFF) as u16
}
/// The high 16 bits of an id.
pub fn hi16_of32(v: u32) -> u16 {
    (v >> 16) as u16
}

/// Reserved inode numbers (`EXT4_*_INO` in ext4.h).
pub mod inum {
    /// `EXT4_ROOT_INO`.
    pub const ROOT: u32 = 2;
    /// `EXT4_JOURNAL_INO`.
    pub const JOURNAL: u32 = 8;
    /// `EXT4_GOOD_OLD_FIRST_INO`: the first inode not reserved, which mke2fs gives lost+found.
    pub const FIRST: u32 = 11;
}

/// `struct ext4_super_block`: 1024 bytes, 1024 bytes into the file system (and at the start
/// of each backup group's first block).
pub mod sb {
    use super::{Bytes, Le16, Le32, U8};

    /// Byte offset of the primary superblock (`SUPERBLOCK_OFFSET` in e2fsprogs).
    pub const OFFSET: u64 = 1024;
    /// `sizeof(struct ext4_super_block)`.
    pub const SIZE: usize = 1024;
    /// `EXT4_SUPER_MAGIC`, the value of `s_magic`.
    pub const EXT4_SUPER_MAGIC: u16 = 0xEF53;
    /// `EXT2_FLAGS_UNSIGNED_HASH` in `s_flags`: directory hashes treat names as unsigned chars.
    pub const FLAGS_UNSIGNED_HASH: u32 = 0x2;
    /// `EXT4_DEFM_XATTR_USER` in `s_default_mount_opts`: mount with user_xattr.
    pub const DEFM_XATTR_USER: u32 = 0x4;
    /// `EXT4_DEFM_ACL`: mount with acl.
    pub const DEFM_ACL: u32 = 0x8;
    /// `DX_HASH_HALF_MD4` in `s_def_hash_version`.
    pub const DX_HASH_HALF_MD4: u8 = 1;
    /// `EXT3_JNL_BACKUP_BLOCKS` in `s_jnl_backup_type`: `s_jnl_blocks` copies the journal
    /// inode's `i_block` and size.
    pub const JNL_BACKUP_BLOCKS: u8 = 1;
    /// `EXT4_CRC32C_CHKSUM` in `s_checksum_type`.
    pub const CRC32C_CHKSUM: u8 = 1;
    /// `EXT4_VALID_FS` in `s_state`: cleanly unmounted.
    pub const STATE_VALID: u16 = 1;
    /// `EXT4_ERRORS_CONTINUE` in `s_errors`.
    pub const ERRORS_CONTINUE: u16 = 1;
    /// `EXT4_DYNAMIC_REV` in `s_rev_level`: variable inode sizes, feature flags.
    pub const DYNAMIC_REV: u32 = 1;

    pub const INODES_COUNT: Le32 = Le32(0x00);
    pub const BLOCKS_COUNT_LO: Le32 = Le32(0x04);
    pub const R_BLOCKS_COUNT_LO: Le32 = Le32(0x08);
    pub const FREE_BLOCKS_COUNT_LO: Le32 = Le32(0x0C);
    pub const FREE_INODES_COUNT: Le32 = Le32(0x10);
    pub const FIRST_DATA_BLOCK: Le32 = Le32(0x14);
    /// log2(block size) - 10.
    pub const LOG_BLOCK_SIZE: Le32 = Le32(0x18);
    pub const LOG_CLUSTER_SIZE: Le32 = Le32(0x1C);
    pub const BLOCKS_PER_GROUP: Le32 = Le32(0x20);
    pub const CLUSTERS_PER_GROUP: Le32 = Le32(0x24);
    pub const INODES_PER_GROUP: Le32 = Le32(0x28);
    pub const WTIME: Le32 = Le32(0x30);
    pub const MAX_MNT_COUNT: Le16 = Le16(0x36);
    pub const MAGIC: Le16 = Le16(0x38);
    pub const STATE: Le16 = Le16(0x3A);
    pub const ERRORS: Le16 = Le16(0x3C);
    pub const LASTCHECK: Le32 = Le32(0x40);
    pub const REV_LEVEL: Le32 = Le32(0x4C);
    pub const FIRST_INO: Le32 = Le32(0x54);
    pub const INODE_SIZE: Le16 = Le16(0x58);
    pub const BLOCK_GROUP_NR: Le16 = Le16(0x5A);
    pub const FEATURE_COMPAT: Le32 = Le32(0x5C);
    pub const FEATURE_INCOMPAT: Le32 = Le32(0x60);
    pub const FEATURE_RO_COMPAT: Le32 = Le32(0x64);
    pub const UUID: Bytes<16> = Bytes(0x68);
    pub const VOLUME_NAME: Bytes<16> = Bytes(0x78);
    pub const JOURNAL_INUM: Le32 = Le32(0xE0);
    pub const HASH_SEED: Bytes<16> = Bytes(0xEC);
    pub const DEF_HASH_VERSION: U8 = U8(0xFC);
    pub const JNL_BACKUP_TYPE: U8 = U8(0xFD);
    /// Group descriptor size, with the 64bit feature.
    pub const DESC_SIZE: Le16 = Le16(0xFE);
    pub const DEFAULT_MOUNT_OPTS: Le32 = Le32(0x100);
    /// `s_first_meta_bg`: with meta_bg, the first descriptor block laid out per meta group.
    pub const FIRST_META_BG: Le32 = Le32(0x104);
    pub const MKFS_TIME: Le32 = Le32(0x108);
    /// `s_jnl_blocks[0..15]`: the journal inode's `i_block`.
    pub const JNL_BLOCKS: Bytes<60> = Bytes(0x10C);
    /// `s_jnl_blocks[15]`: the journal inode's `i_size_high`.
    pub const JNL_SIZE_HIGH: Le32 = Le32(0x10C + 60);
    /// `s_jnl_blocks[16]`: the journal inode's `i_size`.
    pub const JNL_SIZE: Le32 = Le32(0x10C + 64);
    pub const BLOCKS_COUNT_HI: Le32 = Le32(0x150);
    pub const FREE_BLOCKS_COUNT_HI: Le32 = Le32(0x158);
    pub const MIN_EXTRA_ISIZE: Le16 = Le16(0x15C);
    pub const WANT_EXTRA_ISIZE: Le16 = Le16(0x15E);
    pub const FLAGS: Le32 = Le32(0x160);
    pub const LOG_GROUPS_PER_FLEX: U8 = U8(0x174);
    pub const CHECKSUM_TYPE: U8 = U8(0x175);
    /// `s_backup_bgs[2]`: with sparse_super2, the only groups holding superblock backups.
    pub const BACKUP_BGS: [Le32; 2] = [Le32(0x24C), Le32(0x250)];
    /// crc32c of the superblock up to this field.
    pub const CHECKSUM: Le32 = Le32(0x3FC);
}

/// `struct ext4_group_desc`, in its 32-byte form (without the 64bit feature); the `_hi`
/// halves of the 64-byte form are only read.
pub mod gd {
    use super::{Le16, Le32};

    /// `EXT4_MIN_DESC_SIZE`: descriptors without the 64bit feature.
    pub const SIZE: usize = 32;
    /// `EXT4_MIN_DESC_SIZE_64BIT`: the smallest descriptor with the `_hi` halves.
    pub const SIZE_64BIT: usize = 64;
    /// `EXT4_BG_INODE_ZEROED` in `bg_flags`: the inode table is zeroed (holes read as zeros).
    pub const INODE_ZEROED: u16 = 0x4;

    pub const BLOCK_BITMAP_LO: Le32 = Le32(0x00);
    pub const INODE_BITMAP_LO: Le32 = Le32(0x04);
    pub const INODE_TABLE_LO: Le32 = Le32(0x08);
    pub const FREE_BLOCKS_COUNT_LO: Le16 = Le16(0x0C);
    pub const FREE_INODES_COUNT_LO: Le16 = Le16(0x0E);
    pub const USED_DIRS_COUNT_LO: Le16 = Le16(0x10);
    pub const FLAGS: Le16 = Le16(0x12);
    pub const BLOCK_BITMAP_CSUM_LO: Le16 = Le16(0x18);
    pub const INODE_BITMAP_CSUM_LO: Le16 = Le16(0x1A);
    pub const ITABLE_UNUSED_LO: Le16 = Le16(0x1C);
    /// crc16 slot holding the low half of the descriptor's crc32c.
    pub const CHECKSUM: Le16 = Le16(0x1E);
    pub const INODE_TABLE_HI: Le32 = Le32(0x28);
}

/// `struct ext4_inode`: the 128 bytes of the original inode, then `i_extra_isize` bytes of
/// extra fields, then in-inode extended attributes.
pub mod inode {
    use super::{Bytes, Le16, Le32};

    /// `EXT4_GOOD_OLD_INODE_SIZE`: where the extra fields start.
    pub const GOOD_OLD_SIZE: usize = 128;
    /// The extra fields kiln writes and reads (through `i_crtime_extra` and `i_version_hi`).
    pub const EXTRA_ISIZE: u16 = 32;
    /// Where in-inode extended attributes start: after the extra fields kiln writes.
    pub const XATTR_AT: usize = GOOD_OLD_SIZE + EXTRA_ISIZE as usize;
    /// `EXT4_INDEX_FL`: the directory has an htree index.
    pub const INDEX_FL: u32 = 0x1000;
    /// `EXT4_EXTENTS_FL`: `i_block` holds an extent tree.
    pub const EXTENTS_FL: u32 = 0x80000;
    /// `EXT4_INLINE_DATA_FL`: the data is in the inode.
    pub const INLINE_DATA_FL: u32 = 0x1000_0000;
    /// `S_IFMT` and the file types of `i_mode` (the kernel's stat.h).
    pub const S_IFMT: u16 = 0o170000;
    pub const S_IFDIR: u16 = 0o040000;
    pub const S_IFREG: u16 = 0o100000;
    pub const S_IFLNK: u16 = 0o120000;
    pub const S_IFCHR: u16 = 0o020000;
    pub const S_IFBLK: u16 = 0o060000;
    pub const S_IFIFO: u16 = 0o010000;
    pub const S_IFSOCK: u16 = 0o140000;
    /// A symlink target shorter than `i_block` is kept in it ("fast" symlink).
    pub const FAST_SYMLINK_MAX: usize = 59;
    /// `EXT4_HUGE_FILE_FL`: `i_blocks` counts file system blocks, not 512-byte sectors.
    pub const HUGE_FILE_FL: u32 = 0x40000;
    /// Block maps (files without `EXTENTS_FL`): `i_block` holds `EXT4_NDIR_BLOCKS` direct
    /// block numbers, then the single (`EXT4_IND_BLOCK`), double and triple indirect ones.
    pub const NDIR_BLOCKS: usize = 12;
    pub const IND_BLOCK: usize = 12;
    pub const DIND_BLOCK: usize = 13;
    pub const TIND_BLOCK: usize = 14;

    pub const MODE: Le16 = Le16(0x00);
    pub const UID: Le16 = Le16(0x02);
    pub const SIZE_LO: Le32 = Le32(0x04);
    pub const ATIME: Le32 = Le32(0x08);
    pub const CTIME: Le32 = Le32(0x0C);
    pub const MTIME: Le32 = Le32(0x10);
    pub const GID: Le16 = Le16(0x18);
    pub const LINKS_COUNT: Le16 = Le16(0x1A);
    /// In 512-byte sectors (without `EXT4_HUGE_FILE_FL`).
    pub const BLOCKS_LO: Le32 = Le32(0x1C);
    pub const FLAGS: Le32 = Le32(0x20);
    /// `i_block`: an extent tree root, a fast symlink's target or a device number.
    pub const BLOCK: Bytes<60> = Bytes(0x28);
    pub const FILE_ACL_LO: Le32 = Le32(0x68);
    pub const SIZE_HIGH: Le32 = Le32(0x6C);
    pub const BLOCKS_HIGH: Le16 = Le16(0x74);
    pub const FILE_ACL_HIGH: Le16 = Le16(0x76);
    pub const UID_HIGH: Le16 = Le16(0x78);
    pub const GID_HIGH: Le16 = Le16(0x7A);
    pub const CHECKSUM_LO: Le16 = Le16(0x7C);
    pub const EXTRA_ISIZE_FIELD: Le16 = Le16(0x80);
    pub const CHECKSUM_HI: Le16 = Le16(0x82);
    /// Extra time fields: two epoch bits (post-2038) and nanoseconds << 2.
    pub const CTIME_EXTRA: Le32 = Le32(0x84);
    pub const MTIME_EXTRA: Le32 = Le32(0x88);
    pub const ATIME_EXTRA: Le32 = Le32(0x8C);
    pub const CRTIME: Le32 = Le32(0x90);
    pub const CRTIME_EXTRA: Le32 = Le32(0x94);
}

/// Directory entries (`struct ext4_dir_entry_2`), the checksum tail of a leaf block
/// (`struct ext4_dir_entry_tail`), and the htree index (`struct dx_root_info`, `dx_countlimit`,
/// `dx_entry`, `dx_tail` in namei.c).
pub mod dirent {
    use super::{Le16, Le32, U8};

    /// Bytes before the name.
    pub const HEADER: usize = 8;
    pub const MAX_NAME_LEN: usize = 255;
    /// `EXT4_MAX_REC_LEN`: with 64 KiB blocks, how a `rec_len` of 65536 is stored (or as 0).
    pub const MAX_REC_LEN: u16 = 65535;
    pub const INODE: Le32 = Le32(0);
    pub const REC_LEN: Le16 = Le16(4);
    pub const NAME_LEN: U8 = U8(6);
    pub const FILE_TYPE: U8 = U8(7);

    /// `EXT4_FT_*`: the file type byte.
    pub const FT_REG_FILE: u8 = 1;
    pub const FT_DIR: u8 = 2;
    pub const FT_CHRDEV: u8 = 3;
    pub const FT_BLKDEV: u8 = 4;
    pub const FT_FIFO: u8 = 5;
    pub const FT_SOCK: u8 = 6;
    pub const FT_SYMLINK: u8 = 7;

    /// `sizeof(struct ext4_dir_entry_tail)`, at the end of every leaf block.
    pub const TAIL_SIZE: usize = 12;
    /// Within the tail: `det_rec_len` (always 12) and `det_reserved_ft`.
    pub const TAIL_REC_LEN: Le16 = Le16(4);
    pub const TAIL_FT: U8 = U8(7);
    pub const TAIL_CHECKSUM: Le32 = Le32(8);
    /// `EXT4_FT_DIR_CSUM`: the file type byte that marks the tail.
    pub const FT_DIR_CSUM: u8 = 0xDE;

    /// `dx_root_info`, after the fake `.` and `..` entries of the root block.
    pub const DX_ROOT_INFO_AT: usize = 24;
    pub const DX_INFO_HASH_VERSION: U8 = U8(4);
    pub const DX_INFO_LENGTH: U8 = U8(5);
    pub const DX_INFO_INDIRECT_LEVELS: U8 = U8(6);
    /// `sizeof(struct dx_root_info)`.
    pub const DX_INFO_SIZE: u8 = 8;
    /// `dx_countlimit`, in the first `dx_entry`'s place.
    pub const DX_LIMIT: Le16 = Le16(0);
    pub const DX_COUNT: Le16 = Le16(2);
    /// `sizeof(struct dx_entry)`: hash, then block.
    pub const DX_ENTRY_SIZE: usize = 8;
    pub const DX_HASH: Le32 = Le32(0);
    pub const DX_BLOCK: Le32 = Le32(4);
    /// `sizeof(struct dx_tail)`: reserved, then the checksum.
    pub const DX_TAIL_SIZE: usize = 8;
    pub const DX_TAIL_CHECKSUM: Le32 = Le32(4);
}

/// Extent trees (`fs/ext4/ext4_extents.h`): a 12-byte header, then 12-byte entries, leaves
/// (`struct ext4_extent`) at depth 0 and indexes (`struct ext4_extent_idx`) above.
pub mod extent {
    use super::{Le16, Le32};

    /// `EXT4_EXT_MAGIC`, the value of `eh_magic`.
    pub const EXT4_EXT_MAGIC: u16 = 0xF30A;
    /// `sizeof(struct ext4_extent_header)`, also the size of one entry.
    pub const HEADER: usize = 12;
    pub const ENTRY: usize = 12;
    /// `sizeof(struct ext4_extent_tail)`: the checksum after the last possible entry of a block.
    pub const TAIL: usize = 4;
    /// `EXT_INIT_MAX_LEN`: the longest initialized extent; longer lengths mark unwritten ones.
    pub const INIT_MAX_LEN: u16 = 32768;
    /// `EXT4_MAX_EXTENT_DEPTH`.
    pub const MAX_DEPTH: u16 = 5;
    /// Extents in an inode's `i_block` below the header: (60 - 12) / 12.
    pub const IN_INODE: u16 = 4;

    pub const EH_MAGIC: Le16 = Le16(0);
    pub const EH_ENTRIES: Le16 = Le16(2);
    pub const EH_MAX: Le16 = Le16(4);
    pub const EH_DEPTH: Le16 = Le16(6);

    pub const EE_BLOCK: Le32 = Le32(0);
    pub const EE_LEN: Le16 = Le16(4);
    pub const EE_START_HI: Le16 = Le16(6);
    pub const EE_START_LO: Le32 = Le32(8);

    pub const EI_BLOCK: Le32 = Le32(0);
    pub const EI_LEAF_LO: Le32 = Le32(4);
    pub const EI_LEAF_HI: Le16 = Le16(8);
}

/// Extended attributes (`fs/ext4/xattr.h`): a block starts with `struct ext4_xattr_header`,
/// the in-inode area with just the magic; then `struct ext4_xattr_entry`s, values from the end.
pub mod xattr {
    use super::{Le16, Le32, U8};

    /// `EXT4_XATTR_MAGIC`.
    pub const EXT4_XATTR_MAGIC: u32 = 0xEA02_0000;
    /// `sizeof(struct ext4_xattr_header)`.
    pub const BLOCK_HEADER: usize = 32;
    /// `sizeof(struct ext4_xattr_ibody_header)`.
    pub const IBODY_HEADER: usize = 4;
    /// `sizeof(struct ext4_xattr_entry)`, before the name.
    pub const ENTRY_HEADER: usize = 16;

    pub const H_MAGIC: Le32 = Le32(0);
    pub const H_REFCOUNT: Le32 = Le32(4);
    pub const H_BLOCKS: Le32 = Le32(8);
    pub const H_HASH: Le32 = Le32(12);
    pub const H_CHECKSUM: Le32 = Le32(16);

    pub const E_NAME_LEN: U8 = U8(0);
    pub const E_NAME_INDEX: U8 = U8(1);
    pub const E_VALUE_OFFS: Le16 = Le16(2);
    pub const E_VALUE_INUM: Le32 = Le32(4);
    pub const E_VALUE_SIZE: Le32 = Le32(8);
    pub const E_HASH: Le32 = Le32(12);
}

/// The jbd2 journal superblock (`journal_superblock_t` in `include/linux/jbd2.h`), big-endian.
pub mod jbd2 {
    use super::{Be32, Bytes};

    /// `JBD2_MAGIC_NUMBER`.
    pub const MAGIC_NUMBER: u32 = 0xC03B_3998;
    /// `JBD2_SUPERBLOCK_V2` in `h_blocktype`.
    pub const SUPERBLOCK_V2: u32 = 4;

    pub const H_MAGIC: Be32 = Be32(0);
    pub const H_BLOCKTYPE: Be32 = Be32(4);
    pub const S_BLOCKSIZE: Be32 = Be32(12);
    pub const S_MAXLEN: Be32 = Be32(16);
    pub const S_FIRST: Be32 = Be32(20);
    pub const S_SEQUENCE: Be32 = Be32(24);
    pub const S_UUID: Bytes<16> = Bytes(48);
    pub const S_NR_USERS: Be32 = Be32(64);
}

/// ext4 feature bits (Documentation/filesystems/ext4/super.rst): which set each is in, its bit
/// and e2fsprogs' name; the writer's sets and the reader's names both come from here.
pub mod features {
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Set {
        Compat,
        Incompat,
        RoCompat,
    }
    pub const HAS_JOURNAL: u32 = 0x4;
    pub const EXT_ATTR: u32 = 0x8;
    pub const DIR_INDEX: u32 = 0x20;
    pub const SPARSE_SUPER2: u32 = 0x200;
    pub const FILETYPE: u32 = 0x2;
    pub const META_BG: u32 = 0x10;
    pub const EXTENTS: u32 = 0x40;
    pub const BIT64: u32 = 0x80;
    pub const FLEX_BG: u32 = 0x200;
    pub const EA_INODE: u32 = 0x400;
    pub const INLINE_DATA: u32 = 0x8000;
    pub const SPARSE_SUPER: u32 = 0x1;
    pub const LARGE_FILE: u32 = 0x2;
    pub const HUGE_FILE: u32 = 0x8;
    pub const DIR_NLINK: u32 = 0x20;
    pub const EXTRA_ISIZE: u32 = 0x40;
    pub const BIGALLOC: u32 = 0x200;
    pub const METADATA_CSUM: u32 = 0x400;

    pub const NAMES: [(Set, u32, &str); 18] = [
        (Set::Compat, HAS_JOURNAL, "has_journal"),
        (Set::Compat, EXT_ATTR, "ext_attr"),
        (Set::Compat, DIR_INDEX, "dir_index"),
        (Set::Compat, SPARSE_SUPER2, "sparse_super2"),
        (Set::Incompat, FILETYPE, "filetype"),
        (Set::Incompat, META_BG, "meta_bg"),
        (Set::Incompat, EXTENTS, "extent"),
        (Set::Incompat, BIT64, "64bit"),
        (Set::Incompat, FLEX_BG, "flex_bg"),
        (Set::Incompat, EA_INODE, "ea_inode"),
        (Set::Incompat, INLINE_DATA, "inline_data"),
        (Set::RoCompat, SPARSE_SUPER, "sparse_super"),
        (Set::RoCompat, LARGE_FILE, "large_file"),
        (Set::RoCompat, HUGE_FILE, "huge_file"),
        (Set::RoCompat, DIR_NLINK, "dir_nlink"),
        (Set::RoCompat, EXTRA_ISIZE, "extra_isize"),
        (Set::RoCompat, BIGALLOC, "bigalloc"),
        (Set::RoCompat, METADATA_CSUM, "metadata_csum"),
    ];

    /// The names of the known features set in (compat, incompat, ro_compat).
    pub fn names(compat: u32, incompat: u32, ro_compat: u32) -> Vec<&'static str> {
        NAMES
            .iter()
            .filter(|(set, bit, _)| {
                let v = match set {
                    Set::Compat => compat,
                    Set::Incompat => incompat,
                    Set::RoCompat => ro_compat,
                };
                v & bit != 0
            })
            .map(|(_, _, n)| *n)
            .collect()
    }
}

// Checked when compiling: the last field of each structure ends inside it.
const _: () = {
    assert!(sb::CHECKSUM.0 + 4 == sb::SIZE);
    assert!(gd::CHECKSUM.0 + 2 == gd::SIZE);
    assert!(gd::INODE_TABLE_HI.0 + 4 <= gd::SIZE_64BIT);
    assert!(inode::CRTIME_EXTRA.0 + 4 <= inode::XATTR_AT);
    assert!(inode::BLOCK.0 + 60 <= inode::FILE_ACL_LO.0);
    assert!(extent::HEADER + extent::IN_INODE as usize * extent::ENTRY == 60);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_read_back_what_was_written_little_endian() {
        let mut b = [0u8; 8];
        Le32(2).put(&mut b, 0x1234_5678);
        assert_eq!(b, [0, 0, 0x78, 0x56, 0x34, 0x12, 0, 0]);
        assert_eq!(Le32(2).get(&b), 0x1234_5678);
        Le16(6).put(&mut b, 0xABCD);
        assert_eq!(&b[6..], &[0xCD, 0xAB]);
        assert_eq!(Le16(6).get(&b), 0xABCD);
        Be32(0).put(&mut b, 0x0102_0304);
        assert_eq!(&b[..4], &[1, 2, 3, 4]);
        assert_eq!((lo32(0x1_2345_6789), hi16(0x1_2345_6789)), (0x2345_6789, 1));
    }
}
