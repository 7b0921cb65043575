//! Reading an ext4 file system back into a [`Tree`], for `kiln inspect --audit`: metadata from
//! the inode tables, file contents by reference (each extent becomes a segment of the image
//! file), so a whole root is read without copying its data.
//!
//! The input may come from any tool or from an attacker: every offset, count and length read
//! from disk is checked before use, recursion and loops are bounded, and a malformed structure
//! is an error naming it, never a panic. Checksums are not verified (e2fsck does that); what is
//! not understood (block-mapped or inline-data files) is reported as unreadable.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::tree::{Content, Data, Dir, Kind, Meta, OnExisting, Segment, SourceId, Timestamp, Tree};

use super::layout::{EXT4_EXTENTS_FL, ROOT_INO};

const MAGIC: u16 = 0xEF53;
const EXTENT_MAGIC: u16 = 0xF30A;
const INLINE_DATA_FL: u32 = 0x1000_0000;
/// Extent trees are at most 5 levels deep (the kernel's limit).
const MAX_EXTENT_DEPTH: u16 = 5;
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
    pub fn parse(sb: &[u8; 1024], offset: u64) -> Result<Superblock, ReadError> {
        let u16at = |o: usize| u16::from_le_bytes([sb[o], sb[o + 1]]);
        let u32at = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]);
        if u16at(0x38) != MAGIC {
            return Err(ReadError::NotExt4(offset));
        }
        let log = u32at(0x18);
        if log > 6 {
            return Err(bad(format!("block size 1024 << {log}")));
        }
        let block_size = 1024u64 << log;
        let incompat = u32at(0x60);
        let blocks_hi = if incompat & super::features::BIT64 != 0 { u64::from(u32at(0x150)) } else { 0 };
        let desc_size = if incompat & super::features::BIT64 != 0 { u64::from(u16at(0xFE)) } else { 32 };
        let inode_size = u64::from(u16at(0x58));
        let free_hi = if incompat & super::features::BIT64 != 0 { u64::from(u32at(0x158)) } else { 0 };
        let sb = Superblock {
            block_size,
            blocks: u64::from(u32at(0x04)) | blocks_hi << 32,
            free_blocks: u64::from(u32at(0x0C)) | free_hi << 32,
            inodes: u32at(0x00),
            free_inodes: u32at(0x10),
            inodes_per_group: u32at(0x28),
            inode_size,
            first_data_block: u64::from(u32at(0x14)),
            desc_size,
            compat: u32at(0x5C),
            incompat,
            ro_compat: u32at(0x64),
            uuid: sb[0x68..0x78].try_into().expect("16 bytes"),
            label: String::from_utf8_lossy(&sb[0x78..0x88]).trim_end_matches('\0').to_string(),
        };
        if sb.inodes_per_group == 0 || !(128..=block_size).contains(&sb.inode_size) || sb.desc_size < 32 {
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
        match Superblock::read_from(&File::open(image)?, offset) {
            Ok(sb) => Ok(Some(sb)),
            Err(ReadError::NotExt4(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The superblock of the file system at byte `offset` of `file`.
    fn read_from(file: &File, offset: u64) -> Result<Superblock, ReadError> {
        let mut raw = [0u8; 1024];
        file.read_exact_at(&mut raw, offset.checked_add(1024).ok_or_else(|| bad("offset"))?)?;
        Superblock::parse(&raw, offset)
    }

    /// e2fsprogs' names of the features set.
    pub fn feature_names(&self) -> Vec<&'static str> {
        super::features::names(self.compat, self.incompat, self.ro_compat)
    }
}

struct Reader {
    file: File,
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
    fn open(image: &Path, base: u64) -> Result<Reader, ReadError> {
        let file = File::open(image)?;
        let sb = Superblock::read_from(&file, base)?;
        let groups = u64::from(sb.inodes.div_ceil(sb.inodes_per_group));
        // A terabyte file system has 8192 groups of 64 bytes: 32 MiB of descriptors is plenty.
        if groups == 0 || sb.desc_size > 1024 || groups * sb.desc_size > 32 << 20 {
            return Err(bad(format!("{groups} block groups of {}-byte descriptors", sb.desc_size)));
        }
        let mut table = vec![0u8; (groups * sb.desc_size) as usize];
        let gdt = (sb.first_data_block + 1) * sb.block_size;
        file.read_exact_at(&mut table, base + gdt)?;
        let tables = table
            .chunks_exact(sb.desc_size as usize)
            .map(|d| {
                let lo = u64::from(u32::from_le_bytes([d[8], d[9], d[10], d[11]]));
                let hi = if sb.desc_size >= 64 {
                    u64::from(u32::from_le_bytes([d[0x28], d[0x29], d[0x2a], d[0x2b]]))
                } else {
                    0
                };
                lo | hi << 32
            })
            .collect();
        Ok(Reader { file, base, sb, tables })
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
        let mut b = [0u8; 160];
        let n = (self.sb.inode_size as usize).min(b.len());
        self.file.read_exact_at(&mut b[..n], off)?;
        let u16at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        // The extra fields past byte 128 carry nanoseconds and two epoch bits (post-2038).
        let extra = if n > 128 { usize::from(u16at(0x80)) } else { 0 };
        let time = |lo: usize, ext: usize| {
            let secs = i64::from(u32at(lo) as i32);
            if extra >= ext + 4 - 128 {
                let e = u32at(ext);
                Timestamp::new(secs + (i64::from(e & 3) << 32), e >> 2)
            } else {
                Timestamp::new(secs, 0)
            }
        };
        Ok(RawInode {
            mode: u16at(0x00),
            uid: u32::from(u16at(0x02)) | u32::from(u16at(0x78)) << 16,
            gid: u32::from(u16at(0x18)) | u32::from(u16at(0x7A)) << 16,
            size: u64::from(u32at(0x04)) | u64::from(u32at(0x6C)) << 32,
            flags: u32at(0x20),
            block: b[0x28..0x64].try_into().expect("60 bytes"),
            atime: time(0x08, 0x8C),
            ctime: time(0x0C, 0x84),
            mtime: time(0x10, 0x88),
        })
    }

    fn block(&self, n: u64) -> Result<Vec<u8>, ReadError> {
        if n >= self.sb.blocks {
            return Err(bad(format!("block {n} beyond the file system's {} blocks", self.sb.blocks)));
        }
        let mut b = vec![0u8; self.sb.block_size as usize];
        self.file.read_exact_at(&mut b, self.base + n * self.sb.block_size)?;
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
        let u16at = |o: usize| u16::from_le_bytes([node[o], node[o + 1]]);
        let u32at = |o: usize| u32::from_le_bytes([node[o], node[o + 1], node[o + 2], node[o + 3]]);
        if node.len() < 12 || u16at(0) != EXTENT_MAGIC {
            return Err(bad(format!("inode {ino}: bad extent header")));
        }
        let (entries, depth) = (usize::from(u16at(2)), u16at(6));
        if depth > depth_left || 12 + entries * 12 > node.len() {
            return Err(bad(format!("inode {ino}: extent node of depth {depth} with {entries} entries")));
        }
        let bs = self.sb.block_size;
        for e in (0..entries).map(|k| 12 + k * 12) {
            let logical = u64::from(u32at(e));
            if depth == 0 {
                let raw_len = u16at(e + 4);
                if raw_len > 32768 {
                    continue; // unwritten: reads as zeros
                }
                let start = u64::from(u16at(e + 6)) << 32 | u64::from(u32at(e + 8));
                if start.checked_add(u64::from(raw_len)).is_none_or(|end| end > self.sb.blocks) {
                    return Err(bad(format!("inode {ino}: extent beyond the file system")));
                }
                let from = logical * bs;
                if from >= size {
                    continue;
                }
                let len = (u64::from(raw_len) * bs).min(size - from);
                out.push((from, len, self.base + start * bs));
            } else {
                let leaf = u64::from(u16::from_le_bytes([node[e + 8], node[e + 9]])) << 32 | u64::from(u32at(e + 4));
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
        if inode.flags & INLINE_DATA_FL != 0 || inode.flags & EXT4_EXTENTS_FL == 0 {
            if inode.size == 0 {
                return Ok(Content::empty());
            }
            return Err(bad(format!("inode {ino}: block-mapped or inline-data files are not read")));
        }
        let mut ext = Vec::new();
        // Every real file's extent tree fits: 4096 leaves map over a million extents.
        let mut nodes_left = 4096;
        self.extents(ino, &inode.block, MAX_EXTENT_DEPTH, inode.size, &mut nodes_left, &mut ext)?;
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
                self.file.read_exact_at(to, offset)?;
            }
        }
        Ok(buf)
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
    let r = Reader::open(image, offset)?;
    let root = r.inode(ROOT_INO)?;
    if root.mode & 0o170000 != 0o040000 {
        return Err(bad("the root inode is not a directory"));
    }
    let mut tree = Tree::new(meta(&root));
    let source = tree.add_source(image)?;
    // ext4 inode → its first path, for hard links; directories are walked once (a hostile
    // image can link a directory into itself).
    let mut seen: HashMap<u32, Vec<u8>> = HashMap::new();
    let mut dirs_seen = std::collections::HashSet::from([ROOT_INO]);
    let mut stack: Vec<(u32, Vec<u8>)> = vec![(ROOT_INO, Vec::new())];
    let mut entries_left = u64::from(r.sb.inodes).saturating_mul(4);
    while let Some((dir_ino, dir_path)) = stack.pop() {
        let dir = r.inode(dir_ino)?;
        let data = r.bytes(dir_ino, &dir, source, MAX_DIR_BYTES)?;
        let mut children = Vec::new();
        for block in data.chunks(r.sb.block_size as usize) {
            let mut at = 0usize;
            while at + 8 <= block.len() {
                let ino = u32::from_le_bytes(block[at..at + 4].try_into().expect("4"));
                let rec_len = usize::from(u16::from_le_bytes([block[at + 4], block[at + 5]]));
                let name_len = usize::from(block[at + 6]);
                if rec_len < 8 || at + rec_len > block.len() || 8 + name_len > rec_len {
                    return Err(bad(format!("directory inode {dir_ino}: bad entry at byte {at}")));
                }
                let name = &block[at + 8..at + 8 + name_len];
                if ino != 0 && name != b"." && name != b".." && !name.is_empty() && !name.contains(&b'/') {
                    children.push((ino, name.to_vec()));
                }
                at += rec_len;
            }
        }
        children.sort();
        for (ino, name) in children {
            entries_left = entries_left.checked_sub(1).ok_or_else(|| bad("more directory entries than inodes"))?;
            let mut path = dir_path.clone();
            path.push(b'/');
            path.extend_from_slice(&name);
            if let Some(first) = seen.get(&ino) {
                tree.link(&path, first, OnExisting::Error).map_err(|e| bad(e.to_string()))?;
                continue;
            }
            let i = r.inode(ino)?;
            let kind = match i.mode & 0o170000 {
                0o040000 => {
                    if dirs_seen.insert(ino) {
                        stack.push((ino, path.clone()));
                    } else {
                        return Err(bad(format!("directory inode {ino} is linked twice")));
                    }
                    Kind::Dir(Dir::default())
                }
                0o100000 => Kind::File(r.content(ino, &i, source)?),
                0o120000 if i.size < 60 && i.flags & EXT4_EXTENTS_FL == 0 => {
                    Kind::Symlink(i.block[..i.size as usize].to_vec())
                }
                0o120000 => Kind::Symlink(r.bytes(ino, &i, source, 4096)?),
                0o020000 | 0o060000 => {
                    let b = &i.block;
                    let (major, minor) = if b[0] != 0 || b[1] != 0 {
                        (u32::from(b[1]), u32::from(b[0]))
                    } else {
                        let d = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                        ((d & 0xfff00) >> 8, (d & 0xff) | ((d >> 12) & 0xfff00))
                    };
                    if i.mode & 0o170000 == 0o020000 {
                        Kind::CharDev { major, minor }
                    } else {
                        Kind::BlockDev { major, minor }
                    }
                }
                0o010000 => Kind::Fifo,
                0o140000 => Kind::Socket,
                t => return Err(bad(format!("inode {ino}: unknown file type {t:o}"))),
            };
            tree.insert(&path, kind, meta(&i), OnExisting::Error).map_err(|e| bad(e.to_string()))?;
            seen.insert(ino, path);
        }
    }
    Ok(tree)
}
