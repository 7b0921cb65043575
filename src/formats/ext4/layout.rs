//! Planning: geometry, inode numbers, block allocation, directory blocks, extent trees and
//! extended attributes, all decided before anything is written.

use std::collections::BTreeMap;

use super::csum;
use super::htree::{self, dirent_len};
use super::ondisk::{dirent, extent, hi16, inode, inum, jbd2, lo32, xattr};
use super::{Ext4Error, Ext4Options, SizeSpec, BLOCKS_PER_GROUP, BLOCK_SIZE, INODE_SIZE};
use crate::tree::{Content, InodeId, Kind, Meta, Timestamp, Tree};

pub(super) const INODES_PER_BLOCK: u64 = BLOCK_SIZE / INODE_SIZE;
/// Groups per flex group (`s_log_groups_per_flex` = 4), mke2fs's default.
pub(super) const FLEX: u64 = 16;
/// Longest initialized extent.
const MAX_EXTENT: u64 = extent::INIT_MAX_LEN as u64;
/// Extents in one 4 KiB leaf: (4096 - 12 header - 4 tail) / 12 = 340.
const LEAF_EXTENTS: usize = (BLOCK_SIZE as usize - extent::HEADER - extent::TAIL) / extent::ENTRY;
/// mke2fs gives lost+found the first inode that is not reserved; e2fsck expects it there.
const LOST_FOUND_INO: u32 = inum::FIRST;
/// Bytes after the 32-byte extra inode fields where in-inode xattrs live (256 - 128 - 32).
const IBODY_XATTR_SPACE: usize = INODE_SIZE as usize - inode::XATTR_AT;
/// Without the 64bit feature block numbers and counts are 32 bits (`s_blocks_count_lo`).
pub(super) const MAX_BLOCKS: u64 = u32::MAX as u64;
/// The largest file: logical block numbers are 32 bits (`ee_block`), as the kernel's
/// `ext4_max_size` computes it for extent files: (2^32 - 1) blocks.
pub(super) const MAX_FILE_BYTES: u64 = u32::MAX as u64 * BLOCK_SIZE;
/// Hard links of one inode: `i_links_count` is 16 bits, and the kernel's `EXT4_LINK_MAX`
/// is 65000 (a directory past it counts 1, the dir_nlink feature).
const MAX_LINKS: u32 = 65000;

/// Where everything is, for one file system.
#[derive(Debug, Clone)]
pub(super) struct Geometry {
    pub blocks: u64,
    pub groups: u64,
    pub inodes_per_group: u64,
    pub itable_blocks: u64,
    pub gdt_blocks: u64,
}

impl Geometry {
    pub fn has_super(&self, g: u64) -> bool {
        fn is_power(mut n: u64, b: u64) -> bool {
            while n > 1 && n % b == 0 {
                n /= b;
            }
            n == 1
        }
        g == 0 || g == 1 || is_power(g, 3) || is_power(g, 5) || is_power(g, 7)
    }
    pub fn group_start(&self, g: u64) -> u64 {
        g * BLOCKS_PER_GROUP
    }
    pub fn group_blocks(&self, g: u64) -> u64 {
        (self.blocks - self.group_start(g)).min(BLOCKS_PER_GROUP)
    }
    /// First block of a flex group's packed metadata.
    fn flex_meta_start(&self, leader: u64) -> u64 {
        self.group_start(leader) + if self.has_super(leader) { 1 + self.gdt_blocks } else { 0 }
    }
    fn flex_members(&self, leader: u64) -> u64 {
        (self.groups - leader).min(FLEX)
    }
    pub fn block_bitmap(&self, g: u64) -> u64 {
        let leader = g / FLEX * FLEX;
        self.flex_meta_start(leader) + (g - leader)
    }
    pub fn inode_bitmap(&self, g: u64) -> u64 {
        let leader = g / FLEX * FLEX;
        self.flex_meta_start(leader) + self.flex_members(leader) + (g - leader)
    }
    pub fn inode_table(&self, g: u64) -> u64 {
        let leader = g / FLEX * FLEX;
        self.flex_meta_start(leader) + 2 * self.flex_members(leader) + (g - leader) * self.itable_blocks
    }
    pub fn inodes(&self) -> u64 {
        self.groups * self.inodes_per_group
    }

    fn new(blocks: u64, inodes_wanted: u64) -> Geometry {
        let groups = blocks.div_ceil(BLOCKS_PER_GROUP);
        let ipg = inodes_wanted.div_ceil(groups).div_ceil(INODES_PER_BLOCK) * INODES_PER_BLOCK;
        // An inode bitmap is one block: at most 32768 inodes per group.
        let ipg = ipg.clamp(INODES_PER_BLOCK, BLOCK_SIZE * 8);
        Geometry {
            blocks,
            groups,
            inodes_per_group: ipg,
            itable_blocks: ipg / INODES_PER_BLOCK,
            gdt_blocks: (groups * 32).div_ceil(BLOCK_SIZE),
        }
    }

    /// Marks every metadata block; None when the metadata does not fit the blocks.
    fn metadata_map(&self) -> Option<Vec<u64>> {
        let mut map = vec![0u64; self.blocks.div_ceil(64) as usize];
        let mut mark = |b: u64| -> Option<()> {
            if b >= self.blocks {
                return None;
            }
            map[(b / 64) as usize] |= 1 << (b % 64);
            Some(())
        };
        for g in 0..self.groups {
            if self.has_super(g) {
                for b in 0..=self.gdt_blocks {
                    mark(self.group_start(g) + b)?;
                }
            }
            mark(self.block_bitmap(g))?;
            mark(self.inode_bitmap(g))?;
            for b in 0..self.itable_blocks {
                mark(self.inode_table(g) + b)?;
            }
        }
        Some(map)
    }
}

/// One inode as it will be written.
#[derive(Debug, Clone)]
pub(super) struct InodeRec {
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub atime: Timestamp,
    pub ctime: Timestamp,
    pub mtime: Timestamp,
    pub crtime: Timestamp,
    pub links: u16,
    pub flags: u32,
    pub i_block: [u8; 60],
    /// Blocks owned (data, extent leaves, xattr block), in file system blocks.
    pub fs_blocks: u64,
    pub file_acl: u64,
    /// In-inode xattr area (magic + entries + values), at most IBODY_XATTR_SPACE bytes.
    pub ibody_xattr: Vec<u8>,
    pub used: bool,
    pub is_dir: bool,
}

impl Default for InodeRec {
    fn default() -> Self {
        InodeRec {
            mode: 0,
            uid: 0,
            gid: 0,
            size: 0,
            atime: Timestamp::default(),
            ctime: Timestamp::default(),
            mtime: Timestamp::default(),
            crtime: Timestamp::default(),
            links: 0,
            flags: 0,
            i_block: [0; 60],
            fs_blocks: 0,
            file_acl: 0,
            ibody_xattr: Vec::new(),
            used: false,
            is_dir: false,
        }
    }
}

/// What a run of blocks holds.
#[derive(Debug, Clone)]
pub(super) enum RegionKind {
    /// File bytes: `tree_inode`'s logical blocks starting at `file_block`.
    File { tree_inode: InodeId, file_block: u64 },
    /// Pre-built blocks (directories, extent leaves, xattr blocks, slow symlinks, journal
    /// superblock), one entry per block.
    Built(Vec<usize>),
}

#[derive(Debug, Clone)]
pub(super) struct Region {
    pub start: u64,
    pub len: u64,
    pub kind: RegionKind,
}

/// A planned file system: written by [`Ext4Plan::write`].
#[derive(Debug, Clone)]
pub struct Ext4Plan {
    pub(super) geo: Geometry,
    pub(super) opts: Ext4Options,
    /// Inode `n` is `inodes[n - 1]`.
    pub(super) inodes: Vec<InodeRec>,
    pub(super) regions: Vec<Region>,
    pub(super) built: Vec<Vec<u8>>,
    /// Bitmap of every used block (metadata included).
    pub(super) used: Vec<u64>,
    pub(super) fs_seed: u32,
    pub(super) reserved_blocks: u64,
}

impl Ext4Plan {
    pub fn size_bytes(&self) -> u64 {
        self.geo.blocks * BLOCK_SIZE
    }
    pub fn uuid(&self) -> [u8; 16] {
        self.opts.uuid
    }
    pub fn label(&self) -> &str {
        &self.opts.label
    }
    pub(super) fn is_used(&self, b: u64) -> bool {
        self.used[(b / 64) as usize] & (1 << (b % 64)) != 0
    }
}

/// What the tree needs, independent of geometry.
struct Needs {
    /// ext4 inode number → tree inode (None for lost+found when kiln made it, and reserved).
    tree_of: Vec<Option<InodeId>>,
    /// Directory contents by ext4 inode: (name, child ino, file type).
    dirs: BTreeMap<u32, Vec<htree::Entry>>,
    /// Parent of every directory, by ext4 inode.
    parent: BTreeMap<u32, u32>,
    data_blocks: u64,
    inode_count: u64,
    lost_found_made: bool,
    paths: BTreeMap<u32, String>,
}

fn file_type(kind: &Kind) -> u8 {
    match kind {
        Kind::File(_) => dirent::FT_REG_FILE,
        Kind::Dir(_) => dirent::FT_DIR,
        Kind::CharDev { .. } => dirent::FT_CHRDEV,
        Kind::BlockDev { .. } => dirent::FT_BLKDEV,
        Kind::Fifo => dirent::FT_FIFO,
        Kind::Socket => dirent::FT_SOCK,
        Kind::Symlink(_) => dirent::FT_SYMLINK,
    }
}

/// Logical block ranges `[start, end)` that hold data.
fn data_ranges(c: &Content) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for s in &c.segments {
        if s.len == 0 {
            continue;
        }
        let (a, b) = (s.offset / BLOCK_SIZE, (s.offset + s.len).div_ceil(BLOCK_SIZE));
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// Usable bytes of a directory block before the 12-byte checksum tail.
const DIR_USABLE: usize = BLOCK_SIZE as usize - dirent::TAIL_SIZE;

/// Splits a directory's entries (after `.` and `..`) into blocks.
fn dir_block_count(entries: &[htree::Entry]) -> u64 {
    let mut blocks = 1u64;
    let mut used = dirent_len(1) + dirent_len(2); // "." and ".."
    for (name, _, _) in entries {
        let l = dirent_len(name.len());
        if used + l > DIR_USABLE {
            blocks += 1;
            used = 0;
        }
        used += l;
    }
    blocks
}

/// ext4 inode numbers for the tree: the root is 2, an existing `/lost+found` 11, and every
/// other inode the next number in walk (sorted path) order, hard links sharing theirs.
struct Numbering {
    /// Tree inode index → ext4 inode number (0: not numbered yet).
    ino_of: Vec<u32>,
    tree_of: Vec<Option<InodeId>>,
    paths: BTreeMap<u32, String>,
    /// The tree's own `/lost+found`, when it has a directory there.
    lost_found: Option<InodeId>,
    /// The highest number given.
    last: u32,
}

fn number_inodes(tree: &Tree) -> Result<Numbering, Ext4Error> {
    let mut ino_of = vec![0u32; tree.inodes().len()];
    let mut tree_of: Vec<Option<InodeId>> = vec![None; inum::FIRST as usize - 1];
    let mut paths = BTreeMap::new();
    ino_of[InodeId::ROOT.index()] = inum::ROOT;
    tree_of[inum::ROOT as usize - 1] = Some(InodeId::ROOT);
    paths.insert(inum::ROOT, "/".to_string());

    let Kind::Dir(root) = &tree.root().kind else { unreachable!("the root is a directory") };
    let lost_found = root.entries.get(&b"lost+found"[..]).copied().filter(|id| tree.inode(*id).kind.is_dir());
    // lost+found is inode 11 as mke2fs makes it; e2fsck wants it to exist.
    tree_of.push(lost_found);
    if let Some(id) = lost_found {
        ino_of[id.index()] = LOST_FOUND_INO;
        paths.insert(LOST_FOUND_INO, "/lost+found".into());
    }
    let mut next = Some(LOST_FOUND_INO + 1);
    let mut last = LOST_FOUND_INO;
    tree.walk(|path, id, first| {
        if !first || id == InodeId::ROOT || ino_of[id.index()] != 0 {
            return;
        }
        // Once u32::MAX is given nothing more is numbered; the error follows the walk.
        let Some(ino) = next else { return };
        ino_of[id.index()] = ino;
        tree_of.push(Some(id));
        paths.insert(ino, String::from_utf8_lossy(path).into_owned());
        last = ino;
        next = ino.checked_add(1);
    });
    if next.is_none() {
        return Err(Ext4Error::TooManyInodes { need: u64::from(u32::MAX) + 1, max: u64::from(u32::MAX) });
    }
    Ok(Numbering { ino_of, tree_of, paths, lost_found, last })
}

/// A directory's entries as ext4 sees them, each name checked; records each subdirectory's
/// parent.
fn dir_entries(
    tree: &Tree,
    dir: &crate::tree::Dir,
    ino: u32,
    path: &str,
    ino_of: &[u32],
    parent: &mut BTreeMap<u32, u32>,
) -> Result<Vec<htree::Entry>, Ext4Error> {
    let mut entries = Vec::with_capacity(dir.entries.len());
    for (name, child) in &dir.entries {
        if name.is_empty() || name.contains(&b'/') || name.contains(&0) || name.len() > dirent::MAX_NAME_LEN {
            return Err(Ext4Error::Unsupported {
                path: path.into(),
                what: format!("entry {:?} is not a valid file name", String::from_utf8_lossy(name)),
            });
        }
        if name == b"." || name == b".." {
            return Err(Ext4Error::Unsupported { path: path.into(), what: "entry named . or ..".into() });
        }
        let cino = ino_of[child.index()];
        let ck = &tree.inode(*child).kind;
        if ck.is_dir() {
            parent.insert(cino, ino);
        }
        entries.push((name.clone(), cino, file_type(ck)));
    }
    Ok(entries)
}

/// Blocks a directory of `entries` takes: linear when one block holds them, else an htree.
fn dir_data_blocks(path: &str, entries: &[htree::Entry], hash_seed: &[u8; 16]) -> Result<u64, Ext4Error> {
    match htree::plan_leaves(entries, hash_seed) {
        None => Ok(dir_block_count(entries)),
        Some(l) if l.fits() => Ok(l.block_count()),
        Some(_) => Err(Ext4Error::Unsupported {
            path: path.into(),
            what: format!(
                "a directory of {} entries needs a third htree level (the large_dir feature), which kiln does not write",
                entries.len()
            ),
        }),
    }
}

/// Data blocks of a regular file, with its extent leaves counted generously; a file that
/// ext4 cannot hold is an error.
fn file_data_blocks(path: &str, c: &Content) -> Result<u64, Ext4Error> {
    c.validate()?;
    // Logical block numbers are 32 bits: a larger (say, sparse) file would wrap around.
    if c.size > MAX_FILE_BYTES {
        return Err(Ext4Error::FileTooLarge { path: path.into(), size_bytes: c.size, max_bytes: MAX_FILE_BYTES });
    }
    let data: u64 = data_ranges(c).iter().map(|(a, b)| b - a).sum();
    let leaves = (c.segments.len() as u64).div_ceil(LEAF_EXTENTS as u64 / 2);
    Ok(data + leaves)
}

fn collect(tree: &Tree, hash_seed: &[u8; 16]) -> Result<Needs, Ext4Error> {
    let Numbering { ino_of, tree_of, mut paths, lost_found, last } = number_inodes(tree)?;
    let mut dirs = BTreeMap::new();
    let mut parent = BTreeMap::from([(inum::ROOT, inum::ROOT)]);
    let mut data_blocks = 0u64;
    for (idx, &ino) in ino_of.iter().enumerate() {
        if ino == 0 {
            continue;
        }
        let inode = &tree.inodes()[idx];
        let path = paths.get(&ino).cloned().unwrap_or_default();
        // A directory past the limit counts 1 link (dir_nlink); nothing else may pass it.
        if !inode.kind.is_dir() {
            let links = tree.nlink(InodeId(idx as u32));
            if links > MAX_LINKS {
                return Err(Ext4Error::TooManyLinks { path, links, max: MAX_LINKS });
            }
        }
        let blocks = match &inode.kind {
            Kind::Dir(d) => {
                let entries = dir_entries(tree, d, ino, &path, &ino_of, &mut parent)?;
                let blocks = dir_data_blocks(&path, &entries, hash_seed)?;
                dirs.insert(ino, entries);
                blocks
            }
            Kind::File(c) => file_data_blocks(&path, c)?,
            Kind::Symlink(t) => {
                if t.is_empty() || t.len() >= BLOCK_SIZE as usize {
                    return Err(Ext4Error::Unsupported { path, what: format!("symlink target of {} bytes", t.len()) });
                }
                u64::from(t.len() > inode::FAST_SYMLINK_MAX)
            }
            _ => 0,
        };
        let xattr_block = u64::from(!inode.meta.xattrs.is_empty());
        // Saturates rather than wraps: a sum past MAX_BLOCKS is refused by `geometry`.
        data_blocks = data_blocks.saturating_add(blocks).saturating_add(xattr_block);
    }
    let lost_found_made = lost_found.is_none();
    if lost_found_made {
        let entry = (b"lost+found".to_vec(), LOST_FOUND_INO, dirent::FT_DIR);
        dirs.get_mut(&inum::ROOT).expect("root listed").push(entry);
        dirs.insert(LOST_FOUND_INO, Vec::new());
        parent.insert(LOST_FOUND_INO, inum::ROOT);
        data_blocks = data_blocks.saturating_add(1);
        paths.insert(LOST_FOUND_INO, "/lost+found".into());
    }
    let inode_count = u64::from(last);
    Ok(Needs { tree_of, dirs, parent, data_blocks, inode_count, lost_found_made, paths })
}

/// Journal size for a file system of `blocks` (e2fsprogs' default table, in blocks).
fn journal_blocks(blocks: u64) -> u64 {
    match blocks {
        0..=32767 => 1024,
        32768..=262143 => 4096,
        262144..=524287 => 8192,
        524288..=1048575 => 16384,
        1048576..=2097151 => 32768,
        _ => 65536,
    }
}

fn count_ones(map: &[u64]) -> u64 {
    map.iter().map(|w| u64::from(w.count_ones())).sum()
}

/// Geometry for `blocks`, or None when metadata and contents do not fit.
fn try_geometry(blocks: u64, needs: &Needs, opts: &Ext4Options) -> Option<(Geometry, Vec<u64>)> {
    debug_assert!(blocks <= MAX_BLOCKS, "callers keep block counts to 32 bits");
    let by_ratio = blocks * BLOCK_SIZE / opts.inode_ratio.max(1024);
    let wanted = by_ratio.max(needs.inode_count.saturating_add(opts.min_free_inodes));
    let geo = Geometry::new(blocks, wanted);
    if geo.inodes() < needs.inode_count || geo.inodes() > u64::from(u32::MAX) {
        return None;
    }
    // The last group must hold at least its own bitmaps' worth; tiny tails confuse tools.
    if geo.groups > 1 && geo.group_blocks(geo.groups - 1) < 64 {
        return None;
    }
    let map = geo.metadata_map()?;
    let meta = count_ones(&map);
    let need = meta + needs.data_blocks + journal_blocks(blocks);
    (need <= blocks).then_some((geo, map))
}

/// Sequential allocator over the block bitmap (metadata marked in advance).
struct Alloc {
    used: Vec<u64>,
    blocks: u64,
    cursor: u64,
}

impl Alloc {
    fn is_used(&self, b: u64) -> bool {
        self.used[(b / 64) as usize] & (1 << (b % 64)) != 0
    }
    fn mark(&mut self, b: u64) {
        self.used[(b / 64) as usize] |= 1 << (b % 64);
    }
    /// `n` blocks as contiguous runs `(start, len)`, in ascending order.
    fn take(&mut self, mut n: u64) -> Option<Vec<(u64, u64)>> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        while n > 0 {
            while self.cursor < self.blocks && self.is_used(self.cursor) {
                self.cursor += 1;
            }
            if self.cursor >= self.blocks {
                return None;
            }
            let start = self.cursor;
            while n > 0 && self.cursor < self.blocks && !self.is_used(self.cursor) {
                self.mark(self.cursor);
                self.cursor += 1;
                n -= 1;
            }
            runs.push((start, self.cursor - start));
        }
        Some(runs)
    }
}

/// An extent: logical block, length, physical block.
#[derive(Debug, Clone, Copy)]
struct Extent {
    logical: u64,
    len: u64,
    physical: u64,
}

fn put_extent_header(buf: &mut [u8], entries: u16, max: u16, depth: u16) {
    extent::EH_MAGIC.put(buf, extent::EXT4_EXT_MAGIC);
    extent::EH_ENTRIES.put(buf, entries);
    extent::EH_MAX.put(buf, max);
    extent::EH_DEPTH.put(buf, depth);
}

/// A logical block number: below 2^32 because `collect` refused larger files.
fn logical32(logical: u64) -> u32 {
    u32::try_from(logical).expect("files are at most MAX_FILE_BYTES")
}

fn put_extent(buf: &mut [u8], e: &Extent) {
    extent::EE_BLOCK.put(buf, logical32(e.logical));
    extent::EE_LEN.put(buf, u16::try_from(e.len).expect("extents are at most MAX_EXTENT blocks"));
    extent::EE_START_HI.put(buf, hi16(e.physical));
    extent::EE_START_LO.put(buf, lo32(e.physical));
}

/// Name index and suffix of an xattr name (the kernel's prefix table).
fn xattr_index(name: &[u8]) -> Option<(u8, &[u8])> {
    const PREFIXES: [(&[u8], u8); 8] = [
        (b"system.posix_acl_access", 2),
        (b"system.posix_acl_default", 3),
        (b"system.richacl", 8),
        (b"user.", 1),
        (b"trusted.", 4),
        (b"security.", 6),
        (b"system.", 7),
        (b"", 0),
    ];
    PREFIXES.iter().find(|(p, _)| name.starts_with(p)).map(|(p, i)| (*i, &name[p.len()..]))
}

/// Converts a POSIX ACL from the xattr (VFS) format to ext4's on-disk format.
fn acl_to_disk(v: &[u8]) -> Option<Vec<u8>> {
    if v.len() < 4 || (v.len() - 4) % 8 != 0 || u32::from_le_bytes(v[0..4].try_into().ok()?) != 2 {
        return None;
    }
    let mut out = 1u32.to_le_bytes().to_vec();
    for e in v[4..].chunks(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        out.extend_from_slice(&e[0..4]);
        // ACL_USER (2) and ACL_GROUP (8) carry an id; the others are short entries.
        if tag == 2 || tag == 8 {
            out.extend_from_slice(&e[4..8]);
        }
    }
    Some(out)
}

struct XattrEntry {
    index: u8,
    name: Vec<u8>,
    value: Vec<u8>,
}

/// The largest value kiln writes: it must fit the attribute block with its header and entry.
const MAX_XATTR_VALUE: usize = 4000;

fn xattr_entries(path: &str, xattrs: &BTreeMap<Vec<u8>, Vec<u8>>) -> Result<Vec<XattrEntry>, Ext4Error> {
    let mut out = Vec::new();
    for (full, value) in xattrs {
        let (index, suffix) = xattr_index(full).expect("the empty prefix matches");
        if index == 0 {
            return Err(Ext4Error::Unsupported {
                path: path.into(),
                what: format!("extended attribute {:?} has no known namespace", String::from_utf8_lossy(full)),
            });
        }
        let value = if index == 2 || index == 3 {
            acl_to_disk(value).ok_or_else(|| Ext4Error::Unsupported {
                path: path.into(),
                what: format!("{} is not a valid POSIX ACL", String::from_utf8_lossy(full)),
            })?
        } else {
            value.clone()
        };
        if suffix.len() > usize::from(u8::MAX) || value.len() > MAX_XATTR_VALUE {
            return Err(Ext4Error::XattrsTooLarge {
                path: path.into(),
                need: value.len() + suffix.len(),
                max: MAX_XATTR_VALUE,
            });
        }
        out.push(XattrEntry { index, name: suffix.to_vec(), value });
    }
    out.sort_by(|a, b| (a.index, a.name.len(), &a.name).cmp(&(b.index, b.name.len(), &b.name)));
    Ok(out)
}

/// Lays `entries` out in an area of `size` bytes: entry table from `table_at`, values packed
/// from the end. Value offsets are relative to `offs_base`. Returns None when they do not fit.
fn xattr_area(entries: &[XattrEntry], size: usize, table_at: usize, offs_base: usize) -> Option<(Vec<u8>, Vec<u32>)> {
    let mut area = vec![0u8; size];
    let mut at = table_at;
    let mut value_end = size;
    let mut hashes = Vec::new();
    for e in entries {
        let elen = (xattr::ENTRY_HEADER + e.name.len()).div_ceil(4) * 4;
        let vlen = e.value.len().div_ceil(4) * 4;
        // The entry table ends in four zero bytes.
        if at + elen + 4 > value_end.checked_sub(vlen)? {
            return None;
        }
        value_end -= vlen;
        area[value_end..value_end + e.value.len()].copy_from_slice(&e.value);
        let hash = csum::xattr_entry_hash(&e.name, &e.value);
        hashes.push(hash);
        let entry = &mut area[at..];
        // Names are at most 255 bytes, values 4000, areas one block: xattr_entries checked.
        xattr::E_NAME_LEN.put(entry, u8::try_from(e.name.len()).ok()?);
        xattr::E_NAME_INDEX.put(entry, e.index);
        xattr::E_VALUE_OFFS.put(entry, u16::try_from(value_end - offs_base).ok()?);
        xattr::E_VALUE_INUM.put(entry, 0);
        xattr::E_VALUE_SIZE.put(entry, u32::try_from(e.value.len()).ok()?);
        xattr::E_HASH.put(entry, hash);
        entry[xattr::ENTRY_HEADER..xattr::ENTRY_HEADER + e.name.len()].copy_from_slice(&e.name);
        at += elen;
    }
    Some((area, hashes))
}

pub(super) fn plan(tree: &Tree, opts: &Ext4Options) -> Result<Ext4Plan, Ext4Error> {
    if opts.label.len() > 16 {
        return Err(Ext4Error::LabelTooLong { label: opts.label.clone(), len: opts.label.len() });
    }
    // More would make the reserved count larger than the file system (and than its field).
    if opts.reserved_percent > 100 {
        return Err(Ext4Error::ReservedTooLarge { percent: opts.reserved_percent });
    }
    let needs = collect(tree, &opts.hash_seed)?;
    let (geo, meta_map) = geometry(&needs, opts)?;
    let mut p = Planner::new(tree, opts, geo, meta_map);
    // The journal first, contiguous near the start like mke2fs's.
    p.journal()?;
    // Every inode in number order: its blocks follow one another on disk.
    let max_ino = u32::try_from(needs.tree_of.len()).expect("collect numbers inodes in 32 bits");
    for ino in (inum::ROOT..=max_ino).filter(|&i| i == inum::ROOT || i >= inum::FIRST) {
        p.inode(&needs, ino)?;
    }
    Ok(p.finish())
}

/// Geometry: the given size, or the smallest that fits plus headroom.
fn geometry(needs: &Needs, opts: &Ext4Options) -> Result<(Geometry, Vec<u64>), Ext4Error> {
    if needs.data_blocks > MAX_BLOCKS {
        return Err(Ext4Error::TooManyBlocks { blocks: needs.data_blocks, max: MAX_BLOCKS });
    }
    match opts.size {
        SizeSpec::Bytes(b) => {
            let blocks = b / BLOCK_SIZE;
            if blocks > MAX_BLOCKS {
                return Err(Ext4Error::TooManyBlocks { blocks, max: MAX_BLOCKS });
            }
            match (blocks >= 256).then(|| try_geometry(blocks, needs, opts)).flatten() {
                Some(g) => Ok(g),
                None => {
                    let need = smallest_fit(needs, opts)?;
                    Err(Ext4Error::TooSmall { need_bytes: need * BLOCK_SIZE, have_bytes: b })
                }
            }
        }
        SizeSpec::Auto { headroom_percent, min_free_bytes } => {
            let fit = smallest_fit(needs, opts)?;
            // No overflow: fit and data_blocks are below 2^32, min_free_bytes / BLOCK_SIZE below
            // 2^52, and reserved_percent at most 100. A sum past MAX_BLOCKS is refused below.
            let extra = (needs.data_blocks * u64::from(headroom_percent) / 100).max(min_free_bytes / BLOCK_SIZE);
            let reserve = (fit + extra) * u64::from(opts.reserved_percent) / 100;
            let want = fit + extra + reserve;
            let blocks = smallest_fit_at_least(needs, opts, want)?;
            Ok(try_geometry(blocks, needs, opts).expect("smallest_fit_at_least found it"))
        }
    }
}

/// The 60-byte `i_block` of an inode: an extent header and up to four extents.
type InodeBlock = [u8; 60];

/// The state of planning once the geometry is settled: block allocation, the inode records
/// and the blocks that will be written, filled in inode by inode.
struct Planner<'a> {
    tree: &'a Tree,
    opts: &'a Ext4Options,
    geo: Geometry,
    fs_seed: u32,
    alloc: Alloc,
    inodes: Vec<InodeRec>,
    regions: Vec<Region>,
    built: Vec<Vec<u8>>,
}

impl<'a> Planner<'a> {
    fn new(tree: &'a Tree, opts: &'a Ext4Options, geo: Geometry, meta_map: Vec<u64>) -> Self {
        let inodes = vec![InodeRec::default(); geo.inodes() as usize];
        let alloc = Alloc { used: meta_map, blocks: geo.blocks, cursor: 0 };
        let fs_seed = csum::fs_seed(&opts.uuid);
        Planner { tree, opts, geo, fs_seed, alloc, inodes, regions: Vec::new(), built: Vec::new() }
    }

    fn no_space(&self) -> Ext4Error {
        Ext4Error::TooSmall { need_bytes: 0, have_bytes: self.alloc.blocks * BLOCK_SIZE }
    }

    fn take(&mut self, n: u64) -> Result<Vec<(u64, u64)>, Ext4Error> {
        self.alloc.take(n).ok_or_else(|| self.no_space())
    }

    /// One block, allocated and filled with `bytes`.
    fn take_one(&mut self, bytes: Vec<u8>) -> Result<u64, Ext4Error> {
        let b = self.take(1)?[0].0;
        self.put_block(b, bytes);
        Ok(b)
    }

    fn put_block(&mut self, at: u64, bytes: Vec<u8>) {
        self.built.push(bytes);
        self.regions.push(Region { start: at, len: 1, kind: RegionKind::Built(vec![self.built.len() - 1]) });
    }

    fn timestamp(&self) -> Timestamp {
        Timestamp::new(self.opts.timestamp, 0)
    }

    /// The jbd2 journal: an empty log whose superblock is its first block.
    fn journal(&mut self) -> Result<(), Ext4Error> {
        let jblocks = journal_blocks(self.geo.blocks);
        let jruns = self.take(jblocks)?;
        let mut jsb = vec![0u8; BLOCK_SIZE as usize];
        jbd2::H_MAGIC.put(&mut jsb, jbd2::MAGIC_NUMBER);
        jbd2::H_BLOCKTYPE.put(&mut jsb, jbd2::SUPERBLOCK_V2);
        jbd2::S_BLOCKSIZE.put(&mut jsb, BLOCK_SIZE as u32);
        jbd2::S_MAXLEN.put(&mut jsb, u32::try_from(jblocks).expect("at most 65536 journal blocks"));
        jbd2::S_FIRST.put(&mut jsb, 1); // first log block
        jbd2::S_SEQUENCE.put(&mut jsb, 1); // first expected sequence
        jbd2::S_UUID.put(&mut jsb, &self.opts.uuid);
        jbd2::S_NR_USERS.put(&mut jsb, 1); // one user: this file system
        self.put_block(jruns[0].0, jsb);
        let t = self.timestamp();
        let mut rec = InodeRec {
            mode: inode::S_IFREG | 0o600,
            size: jblocks * BLOCK_SIZE,
            links: 1,
            flags: inode::EXTENTS_FL,
            fs_blocks: jblocks,
            used: true,
            atime: t,
            ctime: t,
            mtime: t,
            crtime: t,
            ..Default::default()
        };
        let (iblock, leaves) = self.extent_tree("<journal>", &runs_to_extents(0, &jruns), inum::JOURNAL)?;
        rec.i_block = iblock;
        rec.fs_blocks += leaves;
        self.inodes[inum::JOURNAL as usize - 1] = rec;
        Ok(())
    }

    /// Inode `ino`: its record, attributes and contents.
    fn inode(&mut self, needs: &Needs, ino: u32) -> Result<(), Ext4Error> {
        let tid = needs.tree_of.get(ino as usize - 1).copied().flatten();
        let path = needs.paths.get(&ino).cloned().unwrap_or_default();
        let tree = self.tree;
        let (kind, meta) = match tid {
            Some(id) => (Some(&tree.inode(id).kind), Some(&tree.inode(id).meta)),
            None => (None, None),
        };
        let mut rec = self.record(kind, meta);
        rec.links = match tid {
            Some(id) => {
                let n = tree.nlink(id);
                // The root gets lost+found's `..` when kiln makes lost+found.
                let n = if id == InodeId::ROOT && needs.lost_found_made { n + 1 } else { n };
                if kind.is_some_and(|k| k.is_dir()) && n > MAX_LINKS {
                    1
                } else {
                    u16::try_from(n).expect("collect refused more than MAX_LINKS links")
                }
            }
            None => 2,
        };
        if let Some(m) = meta.filter(|m| !m.xattrs.is_empty()) {
            self.xattrs(&mut rec, &path, m)?;
        }
        match kind {
            Some(Kind::Dir(_)) | None => self.directory(&mut rec, needs, ino, &path)?,
            Some(Kind::File(c)) => self.file(&mut rec, c, tid.expect("a file is in the tree"), ino, &path)?,
            Some(Kind::Symlink(target)) => self.symlink(&mut rec, target, ino, &path)?,
            Some(Kind::CharDev { major, minor }) | Some(Kind::BlockDev { major, minor }) => {
                device_block(&mut rec.i_block, *major, *minor)
            }
            Some(Kind::Fifo) | Some(Kind::Socket) => {}
        }
        self.inodes[ino as usize - 1] = rec;
        Ok(())
    }

    /// Mode, owner and times: the tree's, or for kiln's own lost+found root's 0700 at the
    /// build's timestamp.
    fn record(&self, kind: Option<&Kind>, meta: Option<&Meta>) -> InodeRec {
        let epoch = self.timestamp();
        let t = |f: fn(&Meta) -> Timestamp| meta.map(f).unwrap_or(epoch);
        InodeRec {
            mode: kind.map(|k| k.mode_type()).unwrap_or(inode::S_IFDIR) | meta.map(|m| m.perm).unwrap_or(0o700),
            uid: meta.map(|m| m.uid).unwrap_or(0),
            gid: meta.map(|m| m.gid).unwrap_or(0),
            atime: t(|m| m.atime),
            ctime: t(|m| m.ctime),
            mtime: t(|m| m.mtime),
            crtime: t(|m| m.ctime),
            used: true,
            ..Default::default()
        }
    }

    /// Extended attributes: in the inode when they fit, else one attribute block.
    fn xattrs(&mut self, rec: &mut InodeRec, path: &str, meta: &Meta) -> Result<(), Ext4Error> {
        let entries = xattr_entries(path, &meta.xattrs)?;
        if let Some((mut area, _)) = xattr_area(&entries, IBODY_XATTR_SPACE, xattr::IBODY_HEADER, xattr::IBODY_HEADER) {
            xattr::H_MAGIC.put(&mut area, xattr::EXT4_XATTR_MAGIC);
            rec.ibody_xattr = area;
            return Ok(());
        }
        let (mut blk, hashes) = xattr_area(&entries, BLOCK_SIZE as usize, xattr::BLOCK_HEADER, 0).ok_or_else(|| {
            Ext4Error::XattrsTooLarge {
                path: path.into(),
                need: entries.iter().map(|e| xattr::ENTRY_HEADER + e.name.len() + e.value.len()).sum(),
                max: BLOCK_SIZE as usize - xattr::BLOCK_HEADER,
            }
        })?;
        let b = self.take(1)?[0].0;
        xattr::H_MAGIC.put(&mut blk, xattr::EXT4_XATTR_MAGIC);
        xattr::H_REFCOUNT.put(&mut blk, 1);
        xattr::H_BLOCKS.put(&mut blk, 1);
        xattr::H_HASH.put(&mut blk, csum::xattr_block_hash(&hashes));
        let c = csum::raw(csum::raw(self.fs_seed, &b.to_le_bytes()), &blk);
        xattr::H_CHECKSUM.put(&mut blk, c);
        self.put_block(b, blk);
        rec.file_acl = b;
        rec.fs_blocks += 1;
        Ok(())
    }

    /// A directory's blocks (linear, or hashed with an htree index) and its extent tree.
    fn directory(&mut self, rec: &mut InodeRec, needs: &Needs, ino: u32, path: &str) -> Result<(), Ext4Error> {
        rec.is_dir = true;
        let entries = &needs.dirs[&ino];
        let parent = needs.parent[&ino];
        let iseed = csum::inode_seed(self.fs_seed, ino, 0);
        let blocks = match htree::plan_leaves(entries, &self.opts.hash_seed) {
            Some(leaves) => {
                rec.flags |= inode::INDEX_FL;
                htree::write(ino, parent, entries, &leaves, iseed)
            }
            None => dir_blocks(ino, parent, entries, iseed),
        };
        let count = blocks.len() as u64;
        let runs = self.take(count)?;
        let mut k = self.built.len();
        self.built.extend(blocks);
        for &(s, l) in &runs {
            let l_blocks = usize::try_from(l).expect("runs are shorter than the directory");
            self.regions.push(Region { start: s, len: l, kind: RegionKind::Built((k..k + l_blocks).collect()) });
            k += l_blocks;
        }
        rec.size = count * BLOCK_SIZE;
        rec.flags |= inode::EXTENTS_FL;
        let (iblock, leaves) = self.extent_tree(path, &runs_to_extents(0, &runs), ino)?;
        rec.i_block = iblock;
        rec.fs_blocks += count + leaves;
        Ok(())
    }

    /// A regular file: its data ranges allocated in order, holes left out.
    fn file(&mut self, rec: &mut InodeRec, c: &Content, tid: InodeId, ino: u32, path: &str) -> Result<(), Ext4Error> {
        rec.size = c.size;
        rec.flags = inode::EXTENTS_FL;
        let mut extents = Vec::new();
        for (a, b) in data_ranges(c) {
            let runs = self.take(b - a)?;
            let mut logical = a;
            for &(s, l) in &runs {
                let kind = RegionKind::File { tree_inode: tid, file_block: logical };
                self.regions.push(Region { start: s, len: l, kind });
                logical += l;
            }
            extents.extend(runs_to_extents(a, &runs));
            rec.fs_blocks += b - a;
        }
        let (iblock, leaves) = self.extent_tree(path, &extents, ino)?;
        rec.i_block = iblock;
        rec.fs_blocks += leaves;
        Ok(())
    }

    /// A symlink: its target in `i_block` when short ("fast"), else in one block.
    fn symlink(&mut self, rec: &mut InodeRec, target: &[u8], ino: u32, path: &str) -> Result<(), Ext4Error> {
        rec.size = target.len() as u64;
        if target.len() <= inode::FAST_SYMLINK_MAX {
            rec.i_block[..target.len()].copy_from_slice(target);
            return Ok(());
        }
        rec.flags = inode::EXTENTS_FL;
        let mut blk = vec![0u8; BLOCK_SIZE as usize];
        blk[..target.len()].copy_from_slice(target);
        let b = self.take_one(blk)?;
        let (iblock, _) = self.extent_tree(path, &[Extent { logical: 0, len: 1, physical: b }], ino)?;
        rec.i_block = iblock;
        rec.fs_blocks += 1;
        Ok(())
    }

    /// The inode's i_block (extent root), and how many leaf blocks it needed (allocated and
    /// filled here): up to four extents in the inode, else one level of leaves.
    fn extent_tree(&mut self, path: &str, extents: &[Extent], ino: u32) -> Result<(InodeBlock, u64), Ext4Error> {
        let mut iblock = [0u8; 60];
        let count = |n: usize| u16::try_from(n).expect("at most LEAF_EXTENTS");
        if extents.len() <= usize::from(extent::IN_INODE) {
            put_extent_header(&mut iblock, count(extents.len()), extent::IN_INODE, 0);
            for (i, e) in extents.iter().enumerate() {
                put_extent(&mut iblock[extent::HEADER + extent::ENTRY * i..], e);
            }
            return Ok((iblock, 0));
        }
        let chunks: Vec<&[Extent]> = extents.chunks(LEAF_EXTENTS).collect();
        if chunks.len() > usize::from(extent::IN_INODE) {
            return Err(Ext4Error::TooFragmented { path: path.into(), extents: extents.len() });
        }
        let iseed = csum::inode_seed(self.fs_seed, ino, 0);
        put_extent_header(&mut iblock, count(chunks.len()), extent::IN_INODE, 1);
        for (i, chunk) in chunks.iter().enumerate() {
            let b = self.take(1)?[0].0;
            let mut blk = vec![0u8; BLOCK_SIZE as usize];
            put_extent_header(&mut blk, count(chunk.len()), count(LEAF_EXTENTS), 0);
            for (j, e) in chunk.iter().enumerate() {
                put_extent(&mut blk[extent::HEADER + extent::ENTRY * j..], e);
            }
            let tail = extent::HEADER + extent::ENTRY * LEAF_EXTENTS;
            let c = csum::raw(iseed, &blk[..tail]);
            blk[tail..tail + extent::TAIL].copy_from_slice(&c.to_le_bytes());
            self.put_block(b, blk);
            let idx = &mut iblock[extent::HEADER + extent::ENTRY * i..];
            extent::EI_BLOCK.put(idx, logical32(chunk[0].logical));
            extent::EI_LEAF_LO.put(idx, lo32(b));
            extent::EI_LEAF_HI.put(idx, hi16(b));
        }
        Ok((iblock, chunks.len() as u64))
    }

    fn finish(mut self) -> Ext4Plan {
        // Bad-blocks inode: owned by nobody, but e2fsck expects its times set as mke2fs does.
        let epoch = self.timestamp();
        self.inodes[0] =
            InodeRec { atime: epoch, ctime: epoch, mtime: epoch, crtime: epoch, used: true, ..Default::default() };
        self.regions.sort_by_key(|r| r.start);
        let reserved_blocks = self.geo.blocks * u64::from(self.opts.reserved_percent) / 100;
        Ext4Plan {
            geo: self.geo,
            opts: self.opts.clone(),
            inodes: self.inodes,
            regions: self.regions,
            built: self.built,
            used: self.alloc.used,
            fs_seed: self.fs_seed,
            reserved_blocks,
        }
    }
}

/// A device's numbers in `i_block`: the old 8:8 encoding in the first word when both fit a
/// byte, else the new 12:20 one (`new_encode_dev`) in the second.
fn device_block(i_block: &mut InodeBlock, major: u32, minor: u32) {
    if major < 256 && minor < 256 {
        i_block[0..4].copy_from_slice(&((major << 8) | minor).to_le_bytes());
    } else {
        let enc = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
        i_block[4..8].copy_from_slice(&enc.to_le_bytes());
    }
}

/// Physical runs for logical blocks from `logical` on, as extents of at most MAX_EXTENT.
fn runs_to_extents(mut logical: u64, runs: &[(u64, u64)]) -> Vec<Extent> {
    let mut out = Vec::new();
    for &(mut start, mut len) in runs {
        while len > 0 {
            let n = len.min(MAX_EXTENT);
            out.push(Extent { logical, len: n, physical: start });
            logical += n;
            start += n;
            len -= n;
        }
    }
    out
}

/// A small directory's one linear block (or several, for callers that index nothing): `.`,
/// `..`, the entries, and the checksum tail in every block.
fn dir_blocks(ino: u32, parent: u32, entries: &[htree::Entry], iseed: u32) -> Vec<Vec<u8>> {
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    let mut cur = vec![0u8; BLOCK_SIZE as usize];
    let mut at = 0usize;
    let mut last = 0usize;
    let put = |cur: &mut Vec<u8>, at: &mut usize, last: &mut usize, ino: u32, name: &[u8], ft: u8| {
        let l = dirent_len(name.len());
        htree::put_dirent(cur, *at, ino, l, name, ft);
        *last = *at;
        *at += l;
    };
    put(&mut cur, &mut at, &mut last, ino, b".", dirent::FT_DIR);
    put(&mut cur, &mut at, &mut last, parent, b"..", dirent::FT_DIR);
    for (name, cino, ft) in entries {
        let l = dirent_len(name.len());
        if at + l > DIR_USABLE {
            htree::seal_leaf(&mut cur, last, iseed);
            blocks.push(std::mem::replace(&mut cur, vec![0u8; BLOCK_SIZE as usize]));
            at = 0;
        }
        put(&mut cur, &mut at, &mut last, *cino, name, *ft);
    }
    htree::seal_leaf(&mut cur, last, iseed);
    blocks.push(cur);
    blocks
}

/// The smallest block count whose geometry fits.
fn smallest_fit(needs: &Needs, opts: &Ext4Options) -> Result<u64, Ext4Error> {
    smallest_fit_at_least(needs, opts, 256)
}

fn smallest_fit_at_least(needs: &Needs, opts: &Ext4Options, from: u64) -> Result<u64, Ext4Error> {
    // Metadata grows with the block count, so search upward from an estimate in 1% steps,
    // then settle on the exact smallest by bisection.
    if from > MAX_BLOCKS {
        return Err(Ext4Error::TooManyBlocks { blocks: from, max: MAX_BLOCKS });
    }
    let mut hi = from.max(256);
    let limit = 1u64 << 32;
    while try_geometry(hi, needs, opts).is_none() {
        hi = hi + hi / 16 + 256;
        if hi >= limit {
            return Err(Ext4Error::TooManyInodes { need: needs.inode_count, max: u64::from(u32::MAX) });
        }
    }
    let mut lo = from.max(256);
    if lo == hi {
        return Ok(hi);
    }
    // Fit is not strictly monotonic near group boundaries; bisection finds a fitting size
    // within the bracket, and we keep the found one.
    while lo + 1 < hi {
        let mid = lo + (hi - lo) / 2;
        if try_geometry(mid, needs, opts).is_some() {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::tree::{Data, Meta, OnExisting, Segment};

    fn tree_with(path: &[u8], kind: Kind) -> Tree {
        let mut tree = Tree::new(Meta::new(0o755, 0, 0, Timestamp::default()));
        tree.insert(path, kind, Meta::new(0o644, 0, 0, Timestamp::default()), OnExisting::Error).unwrap();
        tree
    }

    fn small() -> Ext4Options {
        Ext4Options { size: SizeSpec::Bytes(64 << 20), ..Ext4Options::default() }
    }

    #[test]
    fn a_file_larger_than_ext4_holds_is_refused_with_its_size() {
        // All hole: without the check the plan succeeds and i_size says 16 TiB and more.
        let size = MAX_FILE_BYTES + 1;
        let tree = tree_with(b"/big", Kind::File(Content { size, segments: Vec::new() }));
        match plan(&tree, &small()) {
            Err(Ext4Error::FileTooLarge { path, size_bytes, max_bytes }) => {
                assert_eq!((path.as_str(), size_bytes, max_bytes), ("/big", size, MAX_FILE_BYTES));
            }
            other => panic!("expected FileTooLarge, got {other:?}"),
        }
    }

    #[test]
    fn data_past_logical_block_2_pow_32_is_refused_not_wrapped() {
        // A (hostile) sparse map can put one byte at 32 TiB: its extent's ee_block would wrap.
        let offset = 1u64 << 45;
        let seg = Segment { offset, len: 1, data: Data::Inline(Arc::from(&b"x"[..])) };
        let tree = tree_with(b"/far", Kind::File(Content { size: offset + 1, segments: vec![seg] }));
        assert!(
            matches!(plan(&tree, &small()), Err(Ext4Error::FileTooLarge { size_bytes, .. }) if size_bytes == offset + 1)
        );
    }

    #[test]
    fn a_size_past_32_bit_block_numbers_is_refused_before_anything_is_allocated() {
        let opts = Ext4Options { size: SizeSpec::Bytes(1 << 45), ..Ext4Options::default() };
        let tree = tree_with(b"/f", Kind::File(Content::inline(&b"x"[..])));
        match plan(&tree, &opts) {
            Err(Ext4Error::TooManyBlocks { blocks, max }) => assert_eq!((blocks, max), (1 << 33, MAX_BLOCKS)),
            other => panic!("expected TooManyBlocks, got {other:?}"),
        }
    }

    #[test]
    fn headroom_options_that_overflow_are_refused() {
        let tree = tree_with(b"/f", Kind::File(Content::inline(&b"x"[..])));
        // The free space asked for is past 2^32 blocks.
        let auto = SizeSpec::Auto { headroom_percent: 20, min_free_bytes: u64::MAX };
        let opts = Ext4Options { size: auto, ..Ext4Options::default() };
        assert!(matches!(plan(&tree, &opts), Err(Ext4Error::TooManyBlocks { .. })), "{:?}", plan(&tree, &opts).err());
        // A reserve larger than the file system is refused before it is computed.
        let opts = Ext4Options { size: auto, reserved_percent: u32::MAX, ..Ext4Options::default() };
        assert!(matches!(plan(&tree, &opts), Err(Ext4Error::ReservedTooLarge { percent: u32::MAX })));
    }

    #[test]
    fn more_hard_links_than_i_links_count_holds_are_refused_for_any_kind() {
        // i_links_count is 16 bits: a fifo with 65536 names would have been written with 0.
        let mut tree = tree_with(b"/p", Kind::Fifo);
        let links = 65_536u32;
        for i in 1..links {
            tree.link(format!("/p{i}").as_bytes(), b"/p", OnExisting::Error).unwrap();
        }
        match plan(&tree, &small()) {
            Err(Ext4Error::TooManyLinks { path, links: n, max }) => {
                assert_eq!((path.as_str(), n, max), ("/p", links, MAX_LINKS));
            }
            other => panic!("expected TooManyLinks, got {other:?}"),
        }
    }
}
