//! Reading an ext2, ext3 or ext4 file system back into a [`Tree`], for `kiln inspect --audit`:
//! metadata from the inode tables, file contents by reference (each extent, or each run of
//! adjacent blocks of a block map, becomes a segment of the image file), so a whole root is
//! read without copying its data.
//!
//! What the kernel mounts is read: 1 KiB to 64 KiB blocks, 128-byte and larger inodes, group
//! descriptors in one table or spread over meta groups (`meta_bg`), files mapped by extent
//! trees or by ext2's direct and indirect blocks. Directories are read linearly, which also
//! covers htree ones (their index blocks look like empty entries).
//!
//! The input may come from any tool or from an attacker: every offset, count and length read
//! from disk is checked before use, recursion and loops are bounded, and a malformed structure
//! is an error naming it, never a panic. Checksums are not verified (e2fsck does that); what is
//! not understood (inline-data files) is reported as unreadable.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use crate::device::{Device, FileDevice};

use crate::tree::{Content, Data, Dir, Kind, Meta, OnExisting, Segment, SourceId, Timestamp, Tree};

use super::ondisk::{self, dirent, extent, features, gd, inode, inum, sb};

/// Directories larger than this are not a root file system's (and would be a memory bomb).
const MAX_DIR_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("no ext4 file system at offset {0} (bad superblock magic)")]
    NotExt4(u64),
    #[error("malformed ext4: {0}")]
    Malformed(String),
    #[error("reading the image: {0}")]
    Io(#[from] std::io::Error),
}

fn bad(what: impl Into<String>) -> ReadError {
    ReadError::Malformed(what.into())
}

/// The superblock: what reading needs, checked for sanity, and what `kiln inspect` shows.
#[derive(Debug, Clone)]
pub struct Superblock {
    pub block_size: u64,
    pub blocks: u64,
    pub free_blocks: u64,
    pub inodes: u32,
    pub free_inodes: u32,
    pub inodes_per_group: u32,
    pub blocks_per_group: u64,
    pub inode_size: u64,
    pub first_data_block: u64,
    pub desc_size: u64,
    /// With meta_bg: the first block of descriptors that lives in its meta group.
    pub first_meta_bg: u32,
    /// With sparse_super2: the two groups with superblock backups.
    pub backup_bgs: [u32; 2],
    /// Bytes per allocation cluster: the block size unless bigalloc.
    pub cluster_size: u64,
    pub compat: u32,
    pub incompat: u32,
    pub ro_compat: u32,
    pub uuid: [u8; 16],
    pub label: String,
}

impl Superblock {
    /// Parses the 1024-byte superblock.
    pub fn parse(raw: &[u8; sb::SIZE], offset: u64) -> Result<Superblock, ReadError> {
        if sb::MAGIC.get(raw) != sb::EXT4_SUPER_MAGIC {
            return Err(ReadError::NotExt4(offset));
        }
        let log = sb::LOG_BLOCK_SIZE.get(raw);
        if log > 6 {
            return Err(bad(format!("block size 1024 << {log}")));
        }
        let block_size = 1024u64 << log;
        let incompat = sb::FEATURE_INCOMPAT.get(raw);
        let bit64 = incompat & features::BIT64 != 0;
        let hi = |field: ondisk::Le32| if bit64 { u64::from(field.get(raw)) } else { 0 };
        let desc_size = if bit64 { u64::from(sb::DESC_SIZE.get(raw)) } else { gd::SIZE as u64 };
        let ro_compat = sb::FEATURE_RO_COMPAT.get(raw);
        let log_cluster = sb::LOG_CLUSTER_SIZE.get(raw);
        // The kernel's limits: clusters of one block up to 1 GiB.
        let cluster_size = match ro_compat & features::BIGALLOC {
            0 => block_size,
            _ if (log..=20).contains(&log_cluster) => 1024u64 << log_cluster,
            _ => return Err(bad(format!("clusters of 1024 << {log_cluster} bytes, blocks of {block_size}"))),
        };
        let sb = Superblock {
            block_size,
            blocks: u64::from(sb::BLOCKS_COUNT_LO.get(raw)) | hi(sb::BLOCKS_COUNT_HI) << 32,
            free_blocks: u64::from(sb::FREE_BLOCKS_COUNT_LO.get(raw)) | hi(sb::FREE_BLOCKS_COUNT_HI) << 32,
            inodes: sb::INODES_COUNT.get(raw),
            free_inodes: sb::FREE_INODES_COUNT.get(raw),
            inodes_per_group: sb::INODES_PER_GROUP.get(raw),
            blocks_per_group: u64::from(sb::BLOCKS_PER_GROUP.get(raw)),
            inode_size: u64::from(sb::INODE_SIZE.get(raw)),
            first_data_block: u64::from(sb::FIRST_DATA_BLOCK.get(raw)),
            desc_size,
            first_meta_bg: sb::FIRST_META_BG.get(raw),
            backup_bgs: sb::BACKUP_BGS.map(|f| f.get(raw)),
            cluster_size,
            compat: sb::FEATURE_COMPAT.get(raw),
            incompat,
            ro_compat,
            uuid: sb::UUID.get(raw),
            label: String::from_utf8_lossy(&sb::VOLUME_NAME.get(raw)).trim_end_matches('\0').to_string(),
        };
        let min_inode = inode::GOOD_OLD_SIZE as u64;
        if sb.inodes_per_group == 0
            || !(min_inode..=block_size).contains(&sb.inode_size)
            || sb.desc_size < gd::SIZE as u64
        {
            return Err(bad(format!(
                "{} inodes per group of {} bytes, group descriptors of {} bytes",
                sb.inodes_per_group, sb.inode_size, sb.desc_size
            )));
        }
        Ok(sb)
    }
}

impl Superblock {
    /// The superblock of the file system at byte `offset` of `image`; None when there is no
    /// ext4 magic there.
    pub fn read_at(image: &Path, offset: u64) -> Result<Option<Superblock>, ReadError> {
        Superblock::find(&*FileDevice::open(image)?, offset)
    }

    /// The superblock of the file system at byte `offset` of `dev`; None when there is no
    /// ext4 magic there.
    pub fn find(dev: &dyn Device, offset: u64) -> Result<Option<Superblock>, ReadError> {
        match Superblock::read_from(dev, offset) {
            Ok(sb) => Ok(Some(sb)),
            Err(ReadError::NotExt4(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The superblock of the file system at byte `offset` of `file`.
    fn read_from(dev: &dyn Device, offset: u64) -> Result<Superblock, ReadError> {
        let mut raw = [0u8; sb::SIZE];
        dev.read_exact_at(&mut raw, offset.checked_add(sb::OFFSET).ok_or_else(|| bad("offset"))?)?;
        Superblock::parse(&raw, offset)
    }

    /// e2fsprogs' names of the features set.
    pub fn feature_names(&self) -> Vec<&'static str> {
        features::names(self.compat, self.incompat, self.ro_compat)
    }

    /// Whether `group` starts with a superblock (a backup past group 0): the kernel's
    /// `ext4_bg_has_super()`.
    fn has_super(&self, group: u64) -> bool {
        if group == 0 {
            return true;
        }
        if self.compat & features::SPARSE_SUPER2 != 0 {
            return self.backup_bgs.iter().any(|&g| u64::from(g) == group);
        }
        if group == 1 || self.ro_compat & features::SPARSE_SUPER == 0 {
            return true;
        }
        // sparse_super: groups 1 and the powers of 3, 5 and 7.
        group % 2 == 1
            && [3u64, 5, 7].iter().any(|&b| {
                let mut n = b;
                while n < group {
                    n = n.saturating_mul(b);
                }
                n == group
            })
    }

    /// The block holding block `nr` of the group descriptors: the kernel's `descriptor_loc()`.
    fn descriptor_block(&self, nr: u64) -> Result<u64, ReadError> {
        // The superblock is at byte 1024: block 1 with 1 KiB blocks, else block 0.
        let sb_block = sb::OFFSET / self.block_size;
        if self.incompat & features::META_BG == 0 || nr < u64::from(self.first_meta_bg) {
            return Ok(sb_block + nr + 1);
        }
        // meta_bg: the descriptors of each meta group (as many groups as one block describes)
        // live in its first group, after that group's superblock backup, so the table never
        // has to grow into the blocks after it when the file system is resized.
        let group = nr * (self.block_size / self.desc_size);
        let mut skip = u64::from(self.has_super(group));
        // Block 0 of a 1 KiB file system is the boot block even when s_first_data_block says
        // otherwise (bigalloc).
        if self.block_size == 1024 && nr == 0 && self.first_data_block == 0 {
            skip += 1;
        }
        group
            .checked_mul(self.blocks_per_group)
            .and_then(|b| b.checked_add(self.first_data_block + skip))
            .ok_or_else(|| bad(format!("group descriptor block {nr} lies beyond any file system")))
    }
}

struct Reader {
    dev: Arc<dyn Device>,
    /// Byte offset of the file system in the image.
    base: u64,
    sb: Superblock,
    /// Inode table block of each group.
    tables: Vec<u64>,
    /// Blocks that block maps may still name (indirect blocks read and data blocks mapped),
    /// for the whole tree: every file owns distinct blocks, so together they can't name more
    /// than the file system holds. A hostile map that names one block again and again (an
    /// indirect block pointing at itself) runs out instead of costing time and memory in
    /// proportion to the pointers it can multiply.
    blocks_left: Cell<u64>,
}

/// One on-disk inode, decoded.
struct RawInode {
    mode: u16,
    uid: u32,
    gid: u32,
    size: u64,
    flags: u32,
    /// `i_blocks`, in 512-byte sectors.
    sectors: u64,
    file_acl: u64,
    block: [u8; 60],
    atime: Timestamp,
    mtime: Timestamp,
    ctime: Timestamp,
}

impl Reader {
    fn open(dev: Arc<dyn Device>, base: u64) -> Result<Reader, ReadError> {
        let sb = Superblock::read_from(&*dev, base)?;
        let groups = u64::from(sb.inodes.div_ceil(sb.inodes_per_group));
        // A terabyte file system has 8192 groups of 64 bytes: 32 MiB of descriptors is plenty.
        // The kernel takes only power-of-two sizes, which fill a block exactly.
        if groups == 0 || sb.desc_size > 1024 || !sb.desc_size.is_power_of_two() || groups * sb.desc_size > 32 << 20 {
            return Err(bad(format!("{groups} block groups of {}-byte descriptors", sb.desc_size)));
        }
        if sb.incompat & features::META_BG != 0 && sb.blocks_per_group == 0 {
            return Err(bad("meta_bg with 0 blocks per group"));
        }
        let device_blocks = dev.size().saturating_sub(base) / sb.block_size;
        let blocks_left = Cell::new(sb.blocks.min(device_blocks));
        let mut r = Reader { dev, base, sb, tables: Vec::new(), blocks_left };
        let per_block = r.sb.block_size / r.sb.desc_size;
        let mut table = Vec::with_capacity((groups * r.sb.desc_size) as usize);
        for nr in 0..groups.div_ceil(per_block) {
            let at = r.block_offset(r.sb.descriptor_block(nr)?)?;
            let mut block = vec![0u8; ((groups - nr * per_block).min(per_block) * r.sb.desc_size) as usize];
            r.dev.read_exact_at(&mut block, at)?;
            table.extend_from_slice(&block);
        }
        r.tables = table
            .chunks_exact(r.sb.desc_size as usize)
            .map(|d| {
                let lo = u64::from(gd::INODE_TABLE_LO.get(d));
                let hi = if r.sb.desc_size >= gd::SIZE_64BIT as u64 { u64::from(gd::INODE_TABLE_HI.get(d)) } else { 0 };
                lo | hi << 32
            })
            .collect();
        Ok(r)
    }

    /// Byte offset in the image of block `n`, checked against the file system's
    /// size and against overflow (a 64bit superblock can claim 2^64 blocks).
    fn block_offset(&self, n: u64) -> Result<u64, ReadError> {
        if n >= self.sb.blocks {
            return Err(bad(format!("block {n} beyond the file system's {} blocks", self.sb.blocks)));
        }
        n.checked_mul(self.sb.block_size)
            .and_then(|b| b.checked_add(self.base))
            .ok_or_else(|| bad(format!("block {n} lies beyond any image")))
    }

    /// Byte offset in the image of inode `ino`.
    fn inode_offset(&self, ino: u32) -> Result<u64, ReadError> {
        if ino == 0 || ino > self.sb.inodes {
            return Err(bad(format!("inode {ino} out of range")));
        }
        let i = u64::from(ino - 1);
        let ipg = u64::from(self.sb.inodes_per_group);
        let table = *self.tables.get((i / ipg) as usize).ok_or_else(|| bad(format!("inode {ino}: no group")))?;
        table
            .checked_mul(self.sb.block_size)
            .and_then(|t| t.checked_add((i % ipg) * self.sb.inode_size))
            .and_then(|t| t.checked_add(self.base))
            .ok_or_else(|| bad(format!("inode {ino}: table offset overflows")))
    }

    fn inode(&self, ino: u32) -> Result<RawInode, ReadError> {
        let off = self.inode_offset(ino)?;
        // Everything read lies in the first XATTR_AT bytes; a shorter inode reads as zeros there.
        let mut b = [0u8; inode::XATTR_AT];
        let n = (self.sb.inode_size as usize).min(b.len());
        self.dev.read_exact_at(&mut b[..n], off)?;
        // The extra fields past byte 128 carry nanoseconds and two epoch bits (post-2038).
        let extra = if n > inode::GOOD_OLD_SIZE { usize::from(inode::EXTRA_ISIZE_FIELD.get(&b)) } else { 0 };
        let time = |lo: ondisk::Le32, ext: ondisk::Le32| {
            let secs = i64::from(lo.get(&b) as i32);
            if extra >= ext.0 + 4 - inode::GOOD_OLD_SIZE {
                let e = ext.get(&b);
                Timestamp::new(secs + (i64::from(e & 3) << 32), e >> 2)
            } else {
                Timestamp::new(secs, 0)
            }
        };
        let flags = inode::FLAGS.get(&b);
        // The kernel's ext4_inode_blocks(): the high half and the unit only count with huge_file.
        let sectors = if self.sb.ro_compat & features::HUGE_FILE == 0 {
            u64::from(inode::BLOCKS_LO.get(&b))
        } else {
            let n = u64::from(inode::BLOCKS_HIGH.get(&b)) << 32 | u64::from(inode::BLOCKS_LO.get(&b));
            if flags & inode::HUGE_FILE_FL != 0 {
                n * (self.sb.block_size / 512)
            } else {
                n
            }
        };
        Ok(RawInode {
            mode: inode::MODE.get(&b),
            uid: u32::from(inode::UID.get(&b)) | u32::from(inode::UID_HIGH.get(&b)) << 16,
            gid: u32::from(inode::GID.get(&b)) | u32::from(inode::GID_HIGH.get(&b)) << 16,
            size: u64::from(inode::SIZE_LO.get(&b)) | u64::from(inode::SIZE_HIGH.get(&b)) << 32,
            flags,
            sectors,
            file_acl: u64::from(inode::FILE_ACL_HIGH.get(&b)) << 32 | u64::from(inode::FILE_ACL_LO.get(&b)),
            block: inode::BLOCK.get(&b),
            atime: time(inode::ATIME, inode::ATIME_EXTRA),
            ctime: time(inode::CTIME, inode::CTIME_EXTRA),
            mtime: time(inode::MTIME, inode::MTIME_EXTRA),
        })
    }

    fn block(&self, n: u64) -> Result<Vec<u8>, ReadError> {
        let at = self.block_offset(n)?;
        let mut b = vec![0u8; self.sb.block_size as usize];
        self.dev.read_exact_at(&mut b, at)?;
        Ok(b)
    }

    /// The file's data as (logical byte offset, length, byte offset in the image), sorted,
    /// non-overlapping and inside `size`; unwritten extents are holes.
    fn extents(
        &self,
        ino: u32,
        node: &[u8],
        depth_left: u16,
        size: u64,
        nodes_left: &mut u32,
        out: &mut Vec<(u64, u64, u64)>,
    ) -> Result<(), ReadError> {
        if node.len() < extent::HEADER || extent::EH_MAGIC.get(node) != extent::EXT4_EXT_MAGIC {
            return Err(bad(format!("inode {ino}: bad extent header")));
        }
        let (entries, depth) = (usize::from(extent::EH_ENTRIES.get(node)), extent::EH_DEPTH.get(node));
        if depth > depth_left || extent::HEADER + entries * extent::ENTRY > node.len() {
            return Err(bad(format!("inode {ino}: extent node of depth {depth} with {entries} entries")));
        }
        let bs = self.sb.block_size;
        for at in (0..entries).map(|k| extent::HEADER + k * extent::ENTRY) {
            let e = &node[at..at + extent::ENTRY];
            if depth == 0 {
                let logical = u64::from(extent::EE_BLOCK.get(e));
                let raw_len = extent::EE_LEN.get(e);
                if raw_len > extent::INIT_MAX_LEN {
                    continue; // unwritten: reads as zeros
                }
                let start = u64::from(extent::EE_START_HI.get(e)) << 32 | u64::from(extent::EE_START_LO.get(e));
                if start.checked_add(u64::from(raw_len)).is_none_or(|end| end > self.sb.blocks) {
                    return Err(bad(format!("inode {ino}: extent beyond the file system")));
                }
                let from = logical * bs;
                if from >= size {
                    continue;
                }
                let len = (u64::from(raw_len) * bs).min(size - from);
                // A 64bit superblock can claim blocks whose byte offset no u64 holds.
                let at = start
                    .checked_mul(bs)
                    .and_then(|b| b.checked_add(self.base))
                    .ok_or_else(|| bad(format!("inode {ino}: extent at block {start} lies beyond any image")))?;
                out.push((from, len, at));
            } else {
                let leaf = u64::from(extent::EI_LEAF_HI.get(e)) << 32 | u64::from(extent::EI_LEAF_LO.get(e));
                // Index nodes pointing at one leaf again and again would multiply the work.
                *nodes_left =
                    nodes_left.checked_sub(1).ok_or_else(|| bad(format!("inode {ino}: too many extent nodes")))?;
                let child = self.block(leaf)?;
                self.extents(ino, &child, depth - 1, size, nodes_left, out)?;
            }
        }
        Ok(())
    }

    /// Takes one block from the tree's budget for block maps.
    fn take_block(&self, ino: u32) -> Result<(), ReadError> {
        let left = self
            .blocks_left
            .get()
            .checked_sub(1)
            .ok_or_else(|| bad(format!("inode {ino}: block maps name more blocks than the file system holds")))?;
        self.blocks_left.set(left);
        Ok(())
    }

    /// Data block `n` of a block map at logical block `logical`, joined to the last run when it
    /// follows it on disk too (the allocator lays files out contiguously, save for the indirect
    /// blocks between their runs).
    fn map_block(&self, ino: u32, n: u64, logical: u64, runs: &mut Vec<(u64, u64, u64)>) -> Result<(), ReadError> {
        if n == 0 {
            return Ok(()); // a hole
        }
        if n >= self.sb.blocks {
            return Err(bad(format!("inode {ino}: block {n} beyond the file system's {} blocks", self.sb.blocks)));
        }
        self.take_block(ino)?;
        match runs.last_mut() {
            Some((l, p, count)) if *l + *count == logical && *p + *count == n => *count += 1,
            _ => runs.push((logical, n, 1)),
        }
        Ok(())
    }

    /// The data blocks under indirect block `n` of `level` (1: it lists data blocks; 2 and 3:
    /// it lists indirect blocks of the level below), whose first logical block is `first`;
    /// nothing at or past logical block `end` is read.
    fn indirect(
        &self,
        ino: u32,
        n: u64,
        level: u32,
        first: u64,
        end: u64,
        runs: &mut Vec<(u64, u64, u64)>,
    ) -> Result<(), ReadError> {
        if n == 0 {
            return Ok(()); // a hole as large as everything under it
        }
        self.take_block(ino)?;
        let block = self.block(n).map_err(|e| match e {
            ReadError::Malformed(what) => bad(format!("inode {ino}: indirect {what}")),
            e => e,
        })?;
        let span = (self.sb.block_size / 4).pow(level - 1);
        for (k, p) in block.chunks_exact(4).enumerate() {
            let logical = first + k as u64 * span;
            if logical >= end {
                break;
            }
            let child = u64::from(u32::from_le_bytes([p[0], p[1], p[2], p[3]]));
            if level == 1 {
                self.map_block(ino, child, logical, runs)?;
            } else {
                self.indirect(ino, child, level - 1, logical, end, runs)?;
            }
        }
        Ok(())
    }

    /// A block-mapped file's data as (logical block, block, count) runs, sorted: ext2's twelve
    /// direct blocks, then one single, one double and one triple indirect block. Subtrees
    /// wholly past `size` are not read, so a file reads at most the indirect blocks a file of
    /// its size needs; logical blocks past the triple indirect block's reach are holes.
    fn block_map(&self, ino: u32, inode: &RawInode) -> Result<Vec<(u64, u64, u64)>, ReadError> {
        let end = inode.size.div_ceil(self.sb.block_size);
        let ptr = |k: usize| u64::from(ondisk::Le32(4 * k).get(&inode.block));
        let mut runs = Vec::new();
        for k in 0..inode::NDIR_BLOCKS.min(end as usize) {
            self.map_block(ino, ptr(k), k as u64, &mut runs)?;
        }
        let per_block = self.sb.block_size / 4;
        let mut first = inode::NDIR_BLOCKS as u64;
        for (level, k) in [(1, inode::IND_BLOCK), (2, inode::DIND_BLOCK), (3, inode::TIND_BLOCK)] {
            if first >= end {
                break;
            }
            self.indirect(ino, ptr(k), level, first, end, &mut runs)?;
            first += per_block.pow(level);
        }
        Ok(runs)
    }

    fn content(&self, ino: u32, inode: &RawInode, source: SourceId) -> Result<Content, ReadError> {
        if inode.size == 0 {
            return Ok(Content::empty());
        }
        if inode.flags & inode::INLINE_DATA_FL != 0 {
            return Err(bad(format!("inode {ino}: inline-data files are not read")));
        }
        if inode.flags & inode::EXTENTS_FL == 0 {
            let bs = self.sb.block_size;
            let segments = self
                .block_map(ino, inode)?
                .into_iter()
                .map(|(logical, n, count)| {
                    // Block numbers are 32-bit and blocks at most 64 KiB: no product overflows.
                    let offset = logical * bs;
                    let len = (count * bs).min(inode.size - offset);
                    let at = self
                        .base
                        .checked_add(n * bs)
                        .ok_or_else(|| bad(format!("inode {ino}: block {n} lies beyond any image")))?;
                    Ok(Segment { offset, len, data: Data::Source { source, offset: at } })
                })
                .collect::<Result<_, ReadError>>()?;
            return Ok(Content { size: inode.size, segments });
        }
        let mut ext = Vec::new();
        // Every real file's extent tree fits: 4096 leaves map over a million extents.
        let mut nodes_left = 4096;
        self.extents(ino, &inode.block, extent::MAX_DEPTH, inode.size, &mut nodes_left, &mut ext)?;
        ext.sort_unstable();
        let mut segments: Vec<Segment> = Vec::with_capacity(ext.len());
        let mut end = 0;
        for (offset, len, at) in ext {
            if offset < end {
                return Err(bad(format!("inode {ino}: overlapping extents")));
            }
            end = offset + len;
            segments.push(Segment { offset, len, data: Data::Source { source, offset: at } });
        }
        Ok(Content { size: inode.size, segments })
    }

    fn bytes(&self, ino: u32, inode: &RawInode, source: SourceId, max: u64) -> Result<Vec<u8>, ReadError> {
        if inode.size > max {
            return Err(bad(format!("inode {ino}: {} bytes, more than {max}", inode.size)));
        }
        let content = self.content(ino, inode, source)?;
        let mut buf = vec![0u8; inode.size as usize];
        for s in &content.segments {
            if let Data::Source { offset, .. } = s.data {
                let to = &mut buf[s.offset as usize..(s.offset + s.len) as usize];
                self.dev.read_exact_at(to, offset)?;
            }
        }
        Ok(buf)
    }

    /// The named entries of a directory's blocks, sorted, without `.` and `..`.
    fn dir_entries(&self, dir_ino: u32, data: &[u8]) -> Result<Vec<(u32, Vec<u8>)>, ReadError> {
        let mut children = Vec::new();
        for block in data.chunks(self.sb.block_size as usize) {
            let mut at = 0usize;
            while at + dirent::HEADER <= block.len() {
                let e = &block[at..];
                let ino = dirent::INODE.get(e);
                let rec_len = rec_len_from_disk(dirent::REC_LEN.get(e), self.sb.block_size);
                let name_len = usize::from(dirent::NAME_LEN.get(e));
                if rec_len < dirent::HEADER || rec_len > e.len() || dirent::HEADER + name_len > rec_len {
                    return Err(bad(format!("directory inode {dir_ino}: bad entry at byte {at}")));
                }
                let name = &e[dirent::HEADER..dirent::HEADER + name_len];
                if ino != 0 && name != b"." && name != b".." && !name.is_empty() && !name.contains(&b'/') {
                    children.push((ino, name.to_vec()));
                }
                at += rec_len;
            }
        }
        children.sort();
        Ok(children)
    }

    /// What inode `ino` is; a directory is queued on `stack` to be walked (once).
    fn kind(
        &self,
        ino: u32,
        i: &RawInode,
        source: SourceId,
        path: &[u8],
        dirs_seen: &mut HashSet<u32>,
        stack: &mut Vec<(u32, Vec<u8>)>,
    ) -> Result<Kind, ReadError> {
        Ok(match i.mode & inode::S_IFMT {
            inode::S_IFDIR => {
                if !dirs_seen.insert(ino) {
                    return Err(bad(format!("directory inode {ino} is linked twice")));
                }
                stack.push((ino, path.to_vec()));
                Kind::Dir(Dir::default())
            }
            inode::S_IFREG => Kind::File(self.content(ino, i, source)?),
            // Inline data starts in i_block, which holds the whole of a short target.
            inode::S_IFLNK if i.flags & inode::INLINE_DATA_FL != 0 && i.size <= inode::FAST_SYMLINK_MAX as u64 => {
                Kind::Symlink(i.block[..i.size as usize].to_vec())
            }
            inode::S_IFLNK if self.is_fast_symlink(i) => {
                if i.size > inode::FAST_SYMLINK_MAX as u64 {
                    return Err(bad(format!("inode {ino}: a fast symlink of {} bytes", i.size)));
                }
                Kind::Symlink(i.block[..i.size as usize].to_vec())
            }
            inode::S_IFLNK => Kind::Symlink(self.bytes(ino, i, source, 4096)?),
            t @ (inode::S_IFCHR | inode::S_IFBLK) => {
                let (major, minor) = device_numbers(&i.block);
                if t == inode::S_IFCHR {
                    Kind::CharDev { major, minor }
                } else {
                    Kind::BlockDev { major, minor }
                }
            }
            inode::S_IFIFO => Kind::Fifo,
            inode::S_IFSOCK => Kind::Socket,
            t => return Err(bad(format!("inode {ino}: unknown file type {t:o}"))),
        })
    }

    /// Whether a symlink's target is in `i_block`, as the kernel's
    /// `ext4_inode_is_fast_symlink()` decides: it owns no block but an attribute block (the
    /// target's length does not decide: old kernels wrote short targets to a block too).
    fn is_fast_symlink(&self, i: &RawInode) -> bool {
        if self.sb.incompat & features::EA_INODE != 0 {
            // Attribute values in inodes of their own are counted in i_blocks.
            return i.size > 0 && i.size <= inode::FAST_SYMLINK_MAX as u64;
        }
        let xattr_sectors = if i.file_acl != 0 { self.sb.cluster_size / 512 } else { 0 };
        i.flags & inode::INLINE_DATA_FL == 0 && i.sectors == xattr_sectors
    }
}

/// A directory entry's length: 16 bits can't say 65536, the whole of a 64 KiB block, so that
/// is stored as 65535 or 0, and longer lengths (of larger blocks, which no kernel mounts) keep
/// their high bits in the low two (e2fsprogs' `ext2fs_get_rec_len()`).
fn rec_len_from_disk(raw: u16, block_size: u64) -> usize {
    let len = usize::from(raw);
    if block_size < 1 << 16 {
        len
    } else if raw == dirent::MAX_REC_LEN || raw == 0 {
        block_size as usize
    } else {
        (len & 65532) | ((len & 3) << 16)
    }
}

/// A device inode's numbers: the old 8:8 encoding in the first two bytes of `i_block`, else
/// the new 12:20 one (the kernel's `new_encode_dev`) in the next word.
fn device_numbers(b: &[u8; 60]) -> (u32, u32) {
    if b[0] != 0 || b[1] != 0 {
        (u32::from(b[1]), u32::from(b[0]))
    } else {
        let d = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        ((d & 0xfff00) >> 8, (d & 0xff) | ((d >> 12) & 0xfff00))
    }
}

fn meta(i: &RawInode) -> Meta {
    let mut m = Meta::new(i.mode & 0o7777, i.uid, i.gid, i.mtime);
    m.atime = i.atime;
    m.ctime = i.ctime;
    m
}

/// Reads the ext4 file system at byte `offset` of `image` into a tree whose file contents
/// refer to the image. Hard links come back as links; `lost+found` is kept.
pub fn read_tree(image: &Path, offset: u64) -> Result<Tree, ReadError> {
    read_tree_from(FileDevice::open(image)?, offset)
}

/// Reads the ext4 file system at byte `offset` of `dev` into a tree whose file contents refer
/// to `dev`.
pub fn read_tree_from(dev: Arc<dyn Device>, offset: u64) -> Result<Tree, ReadError> {
    let r = Reader::open(dev.clone(), offset)?;
    let root = r.inode(inum::ROOT)?;
    if root.mode & inode::S_IFMT != inode::S_IFDIR {
        return Err(bad("the root inode is not a directory"));
    }
    let mut tree = Tree::new(meta(&root));
    let source = tree.add_device(dev);
    // ext4 inode → its first path, for hard links; directories are walked once (a hostile
    // image can link a directory into itself).
    let mut seen: HashMap<u32, Vec<u8>> = HashMap::new();
    let mut dirs_seen = HashSet::from([inum::ROOT]);
    let mut stack: Vec<(u32, Vec<u8>)> = vec![(inum::ROOT, Vec::new())];
    let mut entries_left = u64::from(r.sb.inodes).saturating_mul(4);
    while let Some((dir_ino, dir_path)) = stack.pop() {
        let dir = r.inode(dir_ino)?;
        let data = r.bytes(dir_ino, &dir, source, MAX_DIR_BYTES)?;
        for (ino, name) in r.dir_entries(dir_ino, &data)? {
            entries_left = entries_left.checked_sub(1).ok_or_else(|| bad("more directory entries than inodes"))?;
            let mut path = dir_path.clone();
            path.push(b'/');
            path.extend_from_slice(&name);
            if let Some(first) = seen.get(&ino) {
                tree.link(&path, first, OnExisting::Error).map_err(|e| bad(e.to_string()))?;
                continue;
            }
            let i = r.inode(ino)?;
            let kind = r.kind(ino, &i, source, &path, &mut dirs_seen, &mut stack)?;
            tree.insert(&path, kind, meta(&i), OnExisting::Error).map_err(|e| bad(e.to_string()))?;
            seen.insert(ino, path);
        }
    }
    Ok(tree)
}

#[cfg(test)]
#[path = "read_tests.rs"]
mod mke2fs_tests;

#[cfg(test)]
mod tests {
    use super::*;

    /// An image whose 64bit superblock claims 2^64 - 1 blocks, with one group descriptor.
    fn huge_image(dir: &Path) -> std::path::PathBuf {
        let mut img = vec![0u8; 8192];
        let raw = &mut img[1024..2048];
        sb::MAGIC.put(raw, sb::EXT4_SUPER_MAGIC);
        sb::LOG_BLOCK_SIZE.put(raw, 2);
        sb::FEATURE_INCOMPAT.put(raw, features::BIT64);
        sb::BLOCKS_COUNT_LO.put(raw, u32::MAX);
        sb::BLOCKS_COUNT_HI.put(raw, u32::MAX);
        sb::INODES_COUNT.put(raw, 16);
        sb::INODES_PER_GROUP.put(raw, 16);
        sb::INODE_SIZE.put(raw, 256);
        sb::DESC_SIZE.put(raw, 64);
        let path = dir.join("huge.img");
        std::fs::write(&path, img).unwrap();
        path
    }

    #[test]
    fn a_block_whose_byte_offset_overflows_is_malformed_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let r = Reader::open(FileDevice::open(&huge_image(dir.path())).unwrap(), 0).unwrap();
        assert_eq!(r.sb.blocks, u64::MAX);
        // Inside the claimed size, but 2^60 blocks of 4 KiB lie past any u64 offset.
        match r.block(1 << 60) {
            Err(ReadError::Malformed(what)) => assert!(what.contains("beyond any image"), "{what}"),
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn the_superblock_is_read_where_the_writer_puts_it() {
        let dir = tempfile::tempdir().unwrap();
        let sb = Superblock::read_at(&huge_image(dir.path()), 0).unwrap().expect("ext4 magic");
        assert_eq!((sb.block_size, sb.inodes, sb.inode_size, sb.desc_size), (4096, 16, 256, 64));
        assert_eq!(sb.feature_names(), ["64bit"]);
    }

    const KIB: u64 = 1024;

    /// A file system of 64 blocks of 1 KiB holding only what the reader looks at: the
    /// superblock (block 1), one group descriptor (block 2) and 16 inodes of 128 bytes
    /// (blocks 3 and 4); the rest is for block maps.
    struct Tiny(Vec<u8>);

    impl Tiny {
        fn new() -> Tiny {
            let mut img = vec![0u8; 64 * KIB as usize];
            let raw = &mut img[1024..2048];
            sb::MAGIC.put(raw, sb::EXT4_SUPER_MAGIC);
            sb::BLOCKS_COUNT_LO.put(raw, 64);
            sb::FIRST_DATA_BLOCK.put(raw, 1);
            sb::BLOCKS_PER_GROUP.put(raw, 8192);
            sb::INODES_COUNT.put(raw, 16);
            sb::INODES_PER_GROUP.put(raw, 16);
            sb::INODE_SIZE.put(raw, 128);
            gd::INODE_TABLE_LO.put(&mut img[2048..], 3);
            Tiny(img)
        }

        /// Inode `ino`: a regular file of `size` bytes with `i_block` entries `ptrs`.
        fn file(&mut self, ino: u32, size: u64, ptrs: &[(usize, u32)]) -> &mut Tiny {
            let at = 3 * 1024 + (ino as usize - 1) * 128;
            let b = &mut self.0[at..at + 128];
            inode::MODE.put(b, inode::S_IFREG | 0o644);
            inode::SIZE_LO.put(b, ondisk::lo32(size));
            inode::SIZE_HIGH.put(b, ondisk::hi32(size));
            for &(k, n) in ptrs {
                ondisk::Le32(inode::BLOCK.0 + 4 * k).put(b, n);
            }
            self
        }

        /// Fills indirect block `n` with `ptrs` (the rest are holes).
        fn block(&mut self, n: usize, ptrs: &[(usize, u32)]) -> &mut Tiny {
            for &(k, p) in ptrs {
                ondisk::Le32(n * 1024 + 4 * k).put(&mut self.0, p);
            }
            self
        }

        fn content(&self, dir: &Path, ino: u32) -> Result<Content, ReadError> {
            let path = dir.join("tiny.img");
            std::fs::write(&path, &self.0).unwrap();
            let r = Reader::open(FileDevice::open(&path).unwrap(), 0).unwrap();
            r.content(ino, &r.inode(ino)?, SourceId(0))
        }
    }

    fn runs(c: &Content) -> Vec<(u64, u64, u64)> {
        c.segments
            .iter()
            .map(|s| match s.data {
                Data::Source { offset, .. } => (s.offset, s.len, offset / KIB),
                Data::Inline(_) => panic!("inline segment"),
            })
            .collect()
    }

    #[test]
    fn a_block_map_joins_adjacent_blocks_across_indirect_ones_and_keeps_holes() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Tiny::new();
        // Logical blocks 0-11 in blocks 20-31, 12 in 32 (past the indirect block 40 that lists
        // it), 13 a hole, 14 in 34; block 35 past the size is not the file's.
        let mut ptrs: Vec<(usize, u32)> = (0..12).map(|k| (k, 20 + k as u32)).collect();
        ptrs.push((inode::IND_BLOCK, 40));
        t.file(12, 14 * KIB + 10, &ptrs);
        t.block(40, &[(0, 32), (2, 34), (3, 35)]);
        let c = t.content(dir.path(), 12).unwrap();
        assert_eq!(c.size, 14 * KIB + 10);
        assert_eq!(runs(&c), [(0, 13 * KIB, 20), (14 * KIB, 10, 34)]);
    }

    #[test]
    fn a_block_map_pointing_beyond_the_file_system_is_malformed_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        for (ptrs, indirect) in [
            (vec![(0, 64)], vec![]),
            (vec![(0, u32::MAX)], vec![]),
            (vec![(inode::IND_BLOCK, 1000)], vec![]),
            (vec![(inode::DIND_BLOCK, 40)], vec![(40, 41), (41, 64)]),
        ] {
            let mut t = Tiny::new();
            t.file(12, 1 << 30, &ptrs);
            for (n, p) in indirect {
                t.block(n, &[(0, p)]);
            }
            match t.content(dir.path(), 12) {
                Err(ReadError::Malformed(what)) => assert!(what.contains("beyond"), "{what}"),
                other => panic!("{ptrs:?}: expected Malformed, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_size_of_2_pow_62_with_one_block_maps_one_block_and_allocates_nothing_more() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Tiny::new();
        // Past what the triple indirect block reaches (16 GiB at 1 KiB): holes, as the
        // kernel has nothing mapped there.
        t.file(12, 1 << 62, &[(0, 20), (inode::TIND_BLOCK, 40)]);
        t.block(40, &[(255, 41)]).block(41, &[(255, 42)]).block(42, &[(255, 43)]);
        let c = t.content(dir.path(), 12).unwrap();
        assert_eq!(c.size, 1 << 62);
        let last = (12 + 256 + 256 * 256 + 256 * 256 * 256 - 1) * KIB;
        assert_eq!(runs(&c), [(0, KIB, 20), (last, KIB, 43)]);
    }

    #[test]
    fn an_indirect_block_that_names_itself_runs_out_of_blocks() {
        let dir = tempfile::tempdir().unwrap();
        // Block 40 as a triple indirect block names itself 256 times on each level: 16 million
        // pointers from one block, unless the blocks of the file system bound the walk.
        let mut t = Tiny::new();
        t.file(12, 1 << 34, &[(inode::TIND_BLOCK, 40)]);
        t.block(40, &(0..256).map(|k| (k, 40)).collect::<Vec<_>>());
        match t.content(dir.path(), 12) {
            Err(ReadError::Malformed(what)) => assert!(what.contains("more blocks than"), "{what}"),
            other => panic!("expected Malformed, got {other:?}"),
        }
        // The budget is the tree's: files that each stay inside it still can't add up past it.
        let mut t = Tiny::new();
        let direct: Vec<(usize, u32)> = (0..12).map(|k| (k, 20 + k as u32)).collect();
        for ino in 11..=16 {
            t.file(ino, 12 * KIB, &direct);
        }
        let path = dir.path().join("shared.img");
        std::fs::write(&path, &t.0).unwrap();
        let r = Reader::open(FileDevice::open(&path).unwrap(), 0).unwrap();
        let read = (11..=16).map(|ino| r.content(ino, &r.inode(ino).unwrap(), SourceId(0)).is_ok());
        assert_eq!(read.collect::<Vec<_>>(), [true, true, true, true, true, false], "64 blocks hold 5 files of 12");
    }

    #[test]
    fn entry_lengths_of_64k_blocks_decode_as_e2fsprogs_does() {
        for (raw, bs, len) in [
            (12, 4096, 12),
            (0, 4096, 0),
            (65535, 4096, 65535),
            (12, 65536, 12),
            (65524, 65536, 65524),
            (65535, 65536, 65536),
            (0, 65536, 65536),
            (65532 | 1, 65536, 65532 + 65536),
        ] {
            assert_eq!(rec_len_from_disk(raw, bs), len, "{raw} with {bs}-byte blocks");
        }
        // A 64 KiB directory whose second block is empty: one unused entry as long as the block.
        let mut raw = [0u8; sb::SIZE];
        sb::MAGIC.put(&mut raw, sb::EXT4_SUPER_MAGIC);
        sb::LOG_BLOCK_SIZE.put(&mut raw, 6);
        sb::INODES_COUNT.put(&mut raw, 16);
        sb::INODES_PER_GROUP.put(&mut raw, 16);
        sb::INODE_SIZE.put(&mut raw, 256);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("any");
        std::fs::write(&path, b"").unwrap();
        let r = Reader {
            dev: FileDevice::open(&path).unwrap(),
            base: 0,
            sb: Superblock::parse(&raw, 0).unwrap(),
            tables: Vec::new(),
            blocks_left: Cell::new(0),
        };
        let mut data = vec![0u8; 2 << 16];
        for (at, ino, rec_len, name) in [(0, 2, 12, &b"."[..]), (12, 12, 65524, b"a")] {
            dirent::INODE.put(&mut data[at..], ino);
            dirent::REC_LEN.put(&mut data[at..], rec_len);
            dirent::NAME_LEN.put(&mut data[at..], name.len() as u8);
            data[at + dirent::HEADER..][..name.len()].copy_from_slice(name);
        }
        for stored in [0, dirent::MAX_REC_LEN] {
            dirent::REC_LEN.put(&mut data[1 << 16..], stored);
            assert_eq!(r.dir_entries(2, &data).unwrap(), [(12, b"a".to_vec())], "stored as {stored}");
        }
    }

    fn superblock(block_log: u32, ro_compat: u32, incompat: u32, first_meta_bg: u32) -> Superblock {
        let mut raw = [0u8; sb::SIZE];
        sb::MAGIC.put(&mut raw, sb::EXT4_SUPER_MAGIC);
        sb::LOG_BLOCK_SIZE.put(&mut raw, block_log);
        sb::FIRST_DATA_BLOCK.put(&mut raw, u32::from(block_log == 0));
        sb::BLOCKS_PER_GROUP.put(&mut raw, 8192 << block_log);
        sb::INODES_COUNT.put(&mut raw, 16);
        sb::INODES_PER_GROUP.put(&mut raw, 16);
        sb::INODE_SIZE.put(&mut raw, 256);
        sb::FEATURE_RO_COMPAT.put(&mut raw, ro_compat);
        sb::FEATURE_INCOMPAT.put(&mut raw, incompat);
        sb::FIRST_META_BG.put(&mut raw, first_meta_bg);
        Superblock::parse(&raw, 0).unwrap()
    }

    #[test]
    fn sparse_super_backups_are_in_groups_0_1_and_powers_of_3_5_and_7() {
        let sparse = superblock(0, features::SPARSE_SUPER, 0, 0);
        let with: Vec<u64> = (0..400).filter(|&g| sparse.has_super(g)).collect();
        assert_eq!(with, [0, 1, 3, 5, 7, 9, 25, 27, 49, 81, 125, 243, 343]);
        let every = superblock(0, 0, 0, 0);
        assert!((0..400).all(|g| every.has_super(g)));
    }

    #[test]
    fn descriptor_blocks_are_where_dumpe2fs_shows_them() {
        // Without meta_bg: one table after the superblock, block 2 with 1 KiB blocks, 1 else.
        assert_eq!(superblock(0, features::SPARSE_SUPER, 0, 0).descriptor_block(3).unwrap(), 5);
        assert_eq!(superblock(2, features::SPARSE_SUPER, 0, 0).descriptor_block(3).unwrap(), 4);
        // meta_bg, 32-byte descriptors in 1 KiB blocks: meta group 1 is groups 32-63, its
        // descriptors in the first block of group 32 (block 1 + 32 * 8192), which has no
        // superblock backup unless every group has one.
        let meta = superblock(0, features::SPARSE_SUPER, features::META_BG, 0);
        assert_eq!(meta.descriptor_block(0).unwrap(), 2);
        assert_eq!(meta.descriptor_block(1).unwrap(), 262_145);
        assert_eq!(superblock(0, 0, features::META_BG, 0).descriptor_block(1).unwrap(), 262_146);
        // The blocks before s_first_meta_bg keep the classic layout.
        let partly = superblock(0, features::SPARSE_SUPER, features::META_BG, 2);
        assert_eq!(partly.descriptor_block(1).unwrap(), 3);
        assert_eq!(partly.descriptor_block(2).unwrap(), 1 + 64 * 8192);
        // 4 KiB blocks: 128 descriptors a block, groups of 32768 blocks from block 0.
        let big = superblock(2, features::SPARSE_SUPER, features::META_BG, 0);
        assert_eq!(big.descriptor_block(1).unwrap(), 128 * 32768);
        // 1 KiB blocks numbered from 0 (bigalloc): the superblock is still block 1.
        for incompat in [0, features::META_BG] {
            let mut bigalloc = superblock(0, features::SPARSE_SUPER, incompat, 0);
            bigalloc.first_data_block = 0;
            assert_eq!(bigalloc.descriptor_block(0).unwrap(), 2, "{incompat:#x}");
        }
    }

    #[test]
    fn kiln_symlinks_read_back_with_and_without_an_attribute_block() {
        use crate::ext4::{plan, Ext4Options};
        let time = Timestamp::new(1_700_000_000, 0);
        let mut tree = Tree::new(Meta::new(0o755, 0, 0, time));
        let plain = Meta::new(0o777, 0, 0, time);
        // Too large for the inode's attribute space: it goes to a block, which i_blocks counts.
        let mut with_block = plain.clone();
        with_block.xattrs.insert(b"user.note".to_vec(), vec![b'x'; 300]);
        let cases = [
            ("fast", 59, &plain),
            ("slow", 60, &plain),
            ("fast-xattr", 59, &with_block),
            ("slow-xattr", 90, &with_block),
        ];
        let target = |len: usize| "0123456789".repeat(10).as_bytes()[..len].to_vec();
        for (name, len, meta) in cases {
            let path = format!("/{name}");
            tree.insert(path.as_bytes(), Kind::Symlink(target(len)), meta.clone(), OnExisting::Error).unwrap();
        }
        let plan = plan(&tree, &Ext4Options::with_seed(b"symlinks")).unwrap();
        let mut sink = crate::image::VecSink::default();
        plan.write(&tree, &mut sink).unwrap();
        crate::image::Sink::finish(&mut sink, plan.size_bytes()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("kiln.img");
        std::fs::write(&img, &sink.bytes).unwrap();
        let back = read_tree(&img, 0).unwrap();
        for (name, len, _) in cases {
            let id = back.lookup(format!("/{name}").as_bytes()).unwrap();
            assert_eq!(back.inode(id).kind, Kind::Symlink(target(len)), "{name}");
        }
    }
}
