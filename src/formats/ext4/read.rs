//! Reading an ext4 file system back into a [`Tree`], for `kiln inspect --audit`: metadata from
//! the inode tables, file contents by reference (each extent becomes a segment of the image
//! file), so a whole root is read without copying its data.
//!
//! The input may come from any tool or from an attacker: every offset, count and length read
//! from disk is checked before use, recursion and loops are bounded, and a malformed structure
//! is an error naming it, never a panic. Checksums are not verified (e2fsck does that); what is
//! not understood (block-mapped or inline-data files) is reported as unreadable.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use crate::device::{Device, FileDevice};

use crate::tree::{Content, Data, Dir, Kind, Meta, OnExisting, Segment, SourceId, Timestamp, Tree};

use super::ondisk::{self, dirent, extent, gd, inode, inum, sb};

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
    pub inode_size: u64,
    pub first_data_block: u64,
    pub desc_size: u64,
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
        let bit64 = incompat & super::features::BIT64 != 0;
        let hi = |field: ondisk::Le32| if bit64 { u64::from(field.get(raw)) } else { 0 };
        let desc_size = if bit64 { u64::from(sb::DESC_SIZE.get(raw)) } else { gd::SIZE as u64 };
        let sb = Superblock {
            block_size,
            blocks: u64::from(sb::BLOCKS_COUNT_LO.get(raw)) | hi(sb::BLOCKS_COUNT_HI) << 32,
            free_blocks: u64::from(sb::FREE_BLOCKS_COUNT_LO.get(raw)) | hi(sb::FREE_BLOCKS_COUNT_HI) << 32,
            inodes: sb::INODES_COUNT.get(raw),
            free_inodes: sb::FREE_INODES_COUNT.get(raw),
            inodes_per_group: sb::INODES_PER_GROUP.get(raw),
            inode_size: u64::from(sb::INODE_SIZE.get(raw)),
            first_data_block: u64::from(sb::FIRST_DATA_BLOCK.get(raw)),
            desc_size,
            compat: sb::FEATURE_COMPAT.get(raw),
            incompat,
            ro_compat: sb::FEATURE_RO_COMPAT.get(raw),
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
        super::features::names(self.compat, self.incompat, self.ro_compat)
    }
}

struct Reader {
    dev: Arc<dyn Device>,
    /// Byte offset of the file system in the image.
    base: u64,
    sb: Superblock,
    /// Inode table block of each group.
    tables: Vec<u64>,
}

/// One on-disk inode, decoded.
struct RawInode {
    mode: u16,
    uid: u32,
    gid: u32,
    size: u64,
    flags: u32,
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
        if groups == 0 || sb.desc_size > 1024 || groups * sb.desc_size > 32 << 20 {
            return Err(bad(format!("{groups} block groups of {}-byte descriptors", sb.desc_size)));
        }
        let mut table = vec![0u8; (groups * sb.desc_size) as usize];
        // The descriptors start in the block after the superblock's.
        let gdt = (sb.first_data_block + 1) * sb.block_size;
        dev.read_exact_at(&mut table, base.checked_add(gdt).ok_or_else(|| bad("descriptor table offset"))?)?;
        let tables = table
            .chunks_exact(sb.desc_size as usize)
            .map(|d| {
                let lo = u64::from(gd::INODE_TABLE_LO.get(d));
                let hi = if sb.desc_size >= gd::SIZE_64BIT as u64 { u64::from(gd::INODE_TABLE_HI.get(d)) } else { 0 };
                lo | hi << 32
            })
            .collect();
        Ok(Reader { dev, base, sb, tables })
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

    fn inode(&self, ino: u32) -> Result<RawInode, ReadError> {
        if ino == 0 || ino > self.sb.inodes {
            return Err(bad(format!("inode {ino} out of range")));
        }
        let i = u64::from(ino - 1);
        let ipg = u64::from(self.sb.inodes_per_group);
        let table = *self.tables.get((i / ipg) as usize).ok_or_else(|| bad(format!("inode {ino}: no group")))?;
        let off = table
            .checked_mul(self.sb.block_size)
            .and_then(|t| t.checked_add((i % ipg) * self.sb.inode_size))
            .and_then(|t| t.checked_add(self.base))
            .ok_or_else(|| bad(format!("inode {ino}: table offset overflows")))?;
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
        Ok(RawInode {
            mode: inode::MODE.get(&b),
            uid: u32::from(inode::UID.get(&b)) | u32::from(inode::UID_HIGH.get(&b)) << 16,
            gid: u32::from(inode::GID.get(&b)) | u32::from(inode::GID_HIGH.get(&b)) << 16,
            size: u64::from(inode::SIZE_LO.get(&b)) | u64::from(inode::SIZE_HIGH.get(&b)) << 32,
            flags: inode::FLAGS.get(&b),
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

    fn content(&self, ino: u32, inode: &RawInode, source: SourceId) -> Result<Content, ReadError> {
        if inode.flags & inode::INLINE_DATA_FL != 0 || inode.flags & inode::EXTENTS_FL == 0 {
            if inode.size == 0 {
                return Ok(Content::empty());
            }
            return Err(bad(format!("inode {ino}: block-mapped or inline-data files are not read")));
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
                let rec_len = usize::from(dirent::REC_LEN.get(e));
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
            inode::S_IFLNK if i.size <= inode::FAST_SYMLINK_MAX as u64 && i.flags & inode::EXTENTS_FL == 0 => {
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
mod tests {
    use super::*;
    use crate::ext4::features;

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
}
