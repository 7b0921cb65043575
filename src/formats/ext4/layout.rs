//! Planning: geometry, inode numbers, block allocation, directory blocks, extent trees and
//! extended attributes, all decided before anything is written.

use std::collections::BTreeMap;

use super::csum;
use super::{Ext4Error, Ext4Options, SizeSpec, BLOCKS_PER_GROUP, BLOCK_SIZE, INODE_SIZE};
use crate::tree::{Content, InodeId, Kind, Timestamp, Tree};

pub(super) const INODES_PER_BLOCK: u64 = BLOCK_SIZE / INODE_SIZE;
/// Groups per flex group (`s_log_groups_per_flex` = 4), mke2fs's default.
pub(super) const FLEX: u64 = 16;
/// Longest initialized extent.
const MAX_EXTENT: u64 = 32768;
/// Extents in one 4 KiB leaf: (4096 - 12 header - 4 tail) / 12.
const LEAF_EXTENTS: usize = 340;
pub(super) const ROOT_INO: u32 = 2;
pub(super) const JOURNAL_INO: u32 = 8;
pub(super) const LOST_FOUND_INO: u32 = 11;
pub(super) const FIRST_INO: u32 = 11;
/// Bytes after the 32-byte extra inode fields where in-inode xattrs live (256 - 128 - 32).
const IBODY_XATTR_SPACE: usize = 96;

pub(super) const EXT4_EXTENTS_FL: u32 = 0x80000;

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
    dirs: BTreeMap<u32, Vec<(Vec<u8>, u32, u8)>>,
    /// Parent of every directory, by ext4 inode.
    parent: BTreeMap<u32, u32>,
    data_blocks: u64,
    inode_count: u64,
    lost_found_made: bool,
    paths: BTreeMap<u32, String>,
}

fn file_type(kind: &Kind) -> u8 {
    match kind {
        Kind::File(_) => 1,
        Kind::Dir(_) => 2,
        Kind::CharDev { .. } => 3,
        Kind::BlockDev { .. } => 4,
        Kind::Fifo => 5,
        Kind::Socket => 6,
        Kind::Symlink(_) => 7,
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

use super::htree::{self, dirent_len};

/// Usable bytes of a directory block before the 12-byte checksum tail.
const DIR_USABLE: usize = BLOCK_SIZE as usize - 12;

/// Splits a directory's entries (after `.` and `..`) into blocks.
fn dir_block_count(entries: &[(Vec<u8>, u32, u8)]) -> u64 {
    let mut blocks = 1u64;
    let mut used = 12 + 12; // "." and ".."
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

fn collect(tree: &Tree, hash_seed: &[u8; 16]) -> Result<Needs, Ext4Error> {
    let mut ino_of = vec![0u32; tree.inodes().len()];
    let mut tree_of: Vec<Option<InodeId>> = vec![None; FIRST_INO as usize - 1];
    let mut paths = BTreeMap::new();
    ino_of[InodeId::ROOT.index()] = ROOT_INO;
    tree_of[ROOT_INO as usize - 1] = Some(InodeId::ROOT);
    paths.insert(ROOT_INO, "/".to_string());

    let root_entries = match &tree.root().kind {
        Kind::Dir(d) => d,
        _ => unreachable!("the root is a directory"),
    };
    let lf_existing = root_entries.entries.get(&b"lost+found"[..]).copied().filter(|id| tree.inode(*id).kind.is_dir());
    // lost+found is inode 11 as mke2fs makes it; e2fsck wants it to exist.
    tree_of.push(lf_existing);
    if let Some(id) = lf_existing {
        ino_of[id.index()] = LOST_FOUND_INO;
        paths.insert(LOST_FOUND_INO, "/lost+found".into());
    }
    let mut next = LOST_FOUND_INO + 1;
    let mut err: Option<Ext4Error> = None;
    tree.walk(|path, id, first| {
        if !first || id == InodeId::ROOT || ino_of[id.index()] != 0 || err.is_some() {
            return;
        }
        ino_of[id.index()] = next;
        tree_of.push(Some(id));
        paths.insert(next, String::from_utf8_lossy(path).into_owned());
        next = match next.checked_add(1) {
            Some(n) => n,
            None => {
                err = Some(Ext4Error::TooManyInodes { need: u64::from(u32::MAX) + 1, max: u64::from(u32::MAX) });
                next
            }
        };
    });
    if let Some(e) = err {
        return Err(e);
    }

    let mut dirs = BTreeMap::new();
    let mut parent = BTreeMap::new();
    let mut data_blocks = 0u64;
    parent.insert(ROOT_INO, ROOT_INO);
    for (idx, &ino) in ino_of.iter().enumerate() {
        if ino == 0 {
            continue;
        }
        let inode = &tree.inodes()[idx];
        let path = paths.get(&ino).cloned().unwrap_or_default();
        match &inode.kind {
            Kind::Dir(d) => {
                let mut entries = Vec::with_capacity(d.entries.len());
                for (name, child) in &d.entries {
                    if name.is_empty() || name.contains(&b'/') || name.contains(&0) || name.len() > 255 {
                        return Err(Ext4Error::Unsupported {
                            path: path.clone(),
                            what: format!("entry {:?} is not a valid file name", String::from_utf8_lossy(name)),
                        });
                    }
                    if name == b"." || name == b".." {
                        return Err(Ext4Error::Unsupported { path: path.clone(), what: "entry named . or ..".into() });
                    }
                    let cino = ino_of[child.index()];
                    let ck = &tree.inode(*child).kind;
                    if ck.is_dir() {
                        parent.insert(cino, ino);
                    }
                    entries.push((name.clone(), cino, file_type(ck)));
                }
                data_blocks += match htree::plan_leaves(&entries, hash_seed) {
                    None => dir_block_count(&entries),
                    Some(l) if l.fits() => l.block_count(),
                    Some(_) => {
                        return Err(Ext4Error::Unsupported {
                            path,
                            what: format!(
                                "a directory of {} entries needs a third htree level (the large_dir feature), which kiln does not write",
                                entries.len()
                            ),
                        })
                    }
                };
                dirs.insert(ino, entries);
            }
            Kind::File(c) => {
                c.validate()?;
                data_blocks += data_ranges(c).iter().map(|(a, b)| b - a).sum::<u64>();
                // Extent leaves for fragmented files: counted generously.
                data_blocks += (c.segments.len() as u64).div_ceil(LEAF_EXTENTS as u64 / 2);
                if tree.nlink(InodeId(idx as u32)) > 65000 {
                    return Err(Ext4Error::Unsupported { path, what: "more than 65000 hard links".into() });
                }
            }
            Kind::Symlink(t) => {
                if t.is_empty() || t.len() >= BLOCK_SIZE as usize {
                    return Err(Ext4Error::Unsupported { path, what: format!("symlink target of {} bytes", t.len()) });
                }
                if t.len() >= 60 {
                    data_blocks += 1;
                }
            }
            _ => {}
        }
        if !inode.meta.xattrs.is_empty() {
            data_blocks += 1;
        }
    }
    let lost_found_made = lf_existing.is_none();
    if lost_found_made {
        dirs.get_mut(&ROOT_INO).expect("root listed").push((b"lost+found".to_vec(), LOST_FOUND_INO, 2));
        dirs.insert(LOST_FOUND_INO, Vec::new());
        parent.insert(LOST_FOUND_INO, ROOT_INO);
        data_blocks += 1;
        paths.insert(LOST_FOUND_INO, "/lost+found".into());
    }
    let inode_count = u64::from(next - 1);
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
    let by_ratio = blocks * BLOCK_SIZE / opts.inode_ratio.max(1024);
    let wanted = by_ratio.max(needs.inode_count + opts.min_free_inodes);
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

/// Sequential allocator over the metadata map.
struct Alloc<'a> {
    used: &'a mut Vec<u64>,
    blocks: u64,
    cursor: u64,
}

impl Alloc<'_> {
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
    buf[0..2].copy_from_slice(&0xF30Au16.to_le_bytes());
    buf[2..4].copy_from_slice(&entries.to_le_bytes());
    buf[4..6].copy_from_slice(&max.to_le_bytes());
    buf[6..8].copy_from_slice(&depth.to_le_bytes());
    buf[8..12].copy_from_slice(&0u32.to_le_bytes());
}

fn put_extent(buf: &mut [u8], e: &Extent) {
    buf[0..4].copy_from_slice(&(e.logical as u32).to_le_bytes());
    buf[4..6].copy_from_slice(&(e.len as u16).to_le_bytes());
    buf[6..8].copy_from_slice(&((e.physical >> 32) as u16).to_le_bytes());
    buf[8..12].copy_from_slice(&(e.physical as u32).to_le_bytes());
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
        if suffix.len() > 255 || value.len() > 4000 {
            return Err(Ext4Error::XattrsTooLarge { path: path.into(), need: value.len() + suffix.len(), max: 4000 });
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
        let elen = (16 + e.name.len()).div_ceil(4) * 4;
        let vlen = e.value.len().div_ceil(4) * 4;
        if at + elen + 4 > value_end.checked_sub(vlen)? {
            return None;
        }
        value_end -= vlen;
        area[value_end..value_end + e.value.len()].copy_from_slice(&e.value);
        let hash = csum::xattr_entry_hash(&e.name, &e.value);
        hashes.push(hash);
        area[at] = e.name.len() as u8;
        area[at + 1] = e.index;
        area[at + 2..at + 4].copy_from_slice(&((value_end - offs_base) as u16).to_le_bytes());
        area[at + 4..at + 8].copy_from_slice(&0u32.to_le_bytes());
        area[at + 8..at + 12].copy_from_slice(&(e.value.len() as u32).to_le_bytes());
        area[at + 12..at + 16].copy_from_slice(&hash.to_le_bytes());
        area[at + 16..at + 16 + e.name.len()].copy_from_slice(&e.name);
        at += elen;
    }
    Some((area, hashes))
}

pub(super) fn plan(tree: &Tree, opts: &Ext4Options) -> Result<Ext4Plan, Ext4Error> {
    if opts.label.len() > 16 {
        return Err(Ext4Error::LabelTooLong { label: opts.label.clone(), len: opts.label.len() });
    }
    let needs = collect(tree, &opts.hash_seed)?;

    // Geometry: the given size, or the smallest that fits plus headroom.
    let (geo, meta_map) = match opts.size {
        SizeSpec::Bytes(b) => {
            let blocks = b / BLOCK_SIZE;
            match (blocks >= 256).then(|| try_geometry(blocks, &needs, opts)).flatten() {
                Some(g) => g,
                None => {
                    let need = smallest_fit(&needs, opts)?;
                    return Err(Ext4Error::TooSmall { need_bytes: need * BLOCK_SIZE, have_bytes: b });
                }
            }
        }
        SizeSpec::Auto { headroom_percent, min_free_bytes } => {
            let fit = smallest_fit(&needs, opts)?;
            let extra = (needs.data_blocks * u64::from(headroom_percent) / 100).max(min_free_bytes / BLOCK_SIZE);
            let reserve = (fit + extra) * u64::from(opts.reserved_percent) / 100;
            let blocks = smallest_fit_at_least(&needs, opts, fit + extra + reserve)?;
            try_geometry(blocks, &needs, opts).expect("smallest_fit_at_least found it")
        }
    };

    let mut used = meta_map;
    let fs_seed = csum::fs_seed(&opts.uuid);
    let mut inodes = vec![InodeRec::default(); geo.inodes() as usize];
    let mut regions: Vec<Region> = Vec::new();
    let mut built: Vec<Vec<u8>> = Vec::new();
    let total_blocks = geo.blocks;
    let mut alloc = Alloc { used: &mut used, blocks: total_blocks, cursor: 0 };
    let no_space = || Ext4Error::TooSmall { need_bytes: 0, have_bytes: total_blocks * BLOCK_SIZE };

    // The journal first, contiguous near the start like mke2fs's.
    let jblocks = journal_blocks(geo.blocks);
    let jruns = alloc.take(jblocks).ok_or_else(no_space)?;
    {
        let mut jsb = vec![0u8; BLOCK_SIZE as usize];
        let be = |v: u32| v.to_be_bytes();
        jsb[0..4].copy_from_slice(&be(0xC03B_3998));
        jsb[4..8].copy_from_slice(&be(4)); // superblock v2
        jsb[12..16].copy_from_slice(&be(BLOCK_SIZE as u32));
        jsb[16..20].copy_from_slice(&be(jblocks as u32));
        jsb[20..24].copy_from_slice(&be(1)); // first log block
        jsb[24..28].copy_from_slice(&be(1)); // first expected sequence
        jsb[48..64].copy_from_slice(&opts.uuid);
        jsb[64..68].copy_from_slice(&be(1)); // one user: this file system
        built.push(jsb);
        regions.push(Region { start: jruns[0].0, len: 1, kind: RegionKind::Built(vec![built.len() - 1]) });
        let extents = runs_to_extents(0, &jruns);
        let rec = &mut inodes[JOURNAL_INO as usize - 1];
        *rec = InodeRec {
            mode: 0o100600,
            size: jblocks * BLOCK_SIZE,
            links: 1,
            flags: EXT4_EXTENTS_FL,
            fs_blocks: jblocks,
            used: true,
            atime: Timestamp::new(opts.timestamp, 0),
            ctime: Timestamp::new(opts.timestamp, 0),
            mtime: Timestamp::new(opts.timestamp, 0),
            crtime: Timestamp::new(opts.timestamp, 0),
            ..Default::default()
        };
        let path = "<journal>";
        let (iblock, leaves) = extent_tree(path, &extents, &mut alloc, JOURNAL_INO, fs_seed)?;
        rec.i_block = iblock;
        for (b, blk) in leaves {
            rec.fs_blocks += 1;
            built.push(blk);
            regions.push(Region { start: b, len: 1, kind: RegionKind::Built(vec![built.len() - 1]) });
        }
    }

    // Every inode in number order: its blocks follow one another on disk.
    let max_ino = needs.tree_of.len() as u32;
    for ino in ROOT_INO..=max_ino {
        if ino < FIRST_INO && ino != ROOT_INO {
            continue;
        }
        let tid = needs.tree_of.get(ino as usize - 1).copied().flatten();
        let path = needs.paths.get(&ino).cloned().unwrap_or_default();
        let (kind, meta) = match tid {
            Some(id) => {
                let i = tree.inode(id);
                (Some(&i.kind), Some(&i.meta))
            }
            None => (None, None),
        };
        let t = |f: fn(&crate::tree::Meta) -> Timestamp| meta.map(f).unwrap_or(Timestamp::new(opts.timestamp, 0));
        let mut rec = InodeRec {
            mode: kind.map(|k| k.mode_type()).unwrap_or(0o040000) | meta.map(|m| m.perm).unwrap_or(0o700),
            uid: meta.map(|m| m.uid).unwrap_or(0),
            gid: meta.map(|m| m.gid).unwrap_or(0),
            atime: t(|m| m.atime),
            ctime: t(|m| m.ctime),
            mtime: t(|m| m.mtime),
            crtime: t(|m| m.ctime),
            used: true,
            ..Default::default()
        };
        rec.links = match tid {
            Some(id) => {
                let n = tree.nlink(id);
                let is_root = id == InodeId::ROOT;
                // The root gets lost+found's `..` when kiln makes lost+found.
                let n = if is_root && needs.lost_found_made { n + 1 } else { n };
                if kind.is_some_and(|k| k.is_dir()) && n > 65000 {
                    1
                } else {
                    n as u16
                }
            }
            None => 2,
        };

        // Extended attributes: in the inode when they fit, else one attribute block.
        if let Some(m) = meta.filter(|m| !m.xattrs.is_empty()) {
            let entries = xattr_entries(&path, &m.xattrs)?;
            if let Some((mut area, _)) = xattr_area(&entries, IBODY_XATTR_SPACE, 4, 4) {
                area[0..4].copy_from_slice(&0xEA02_0000u32.to_le_bytes());
                rec.ibody_xattr = area;
            } else {
                let (mut blk, hashes) =
                    xattr_area(&entries, BLOCK_SIZE as usize, 32, 0).ok_or_else(|| Ext4Error::XattrsTooLarge {
                        path: path.clone(),
                        need: entries.iter().map(|e| 16 + e.name.len() + e.value.len()).sum(),
                        max: BLOCK_SIZE as usize - 32,
                    })?;
                let b = alloc.take(1).ok_or_else(no_space)?[0].0;
                blk[0..4].copy_from_slice(&0xEA02_0000u32.to_le_bytes());
                blk[4..8].copy_from_slice(&1u32.to_le_bytes()); // refcount
                blk[8..12].copy_from_slice(&1u32.to_le_bytes()); // blocks
                blk[12..16].copy_from_slice(&csum::xattr_block_hash(&hashes).to_le_bytes());
                let c = csum::raw(csum::raw(fs_seed, &b.to_le_bytes()), &blk);
                blk[16..20].copy_from_slice(&c.to_le_bytes());
                built.push(blk);
                regions.push(Region { start: b, len: 1, kind: RegionKind::Built(vec![built.len() - 1]) });
                rec.file_acl = b;
                rec.fs_blocks += 1;
            }
        }

        let iseed = csum::inode_seed(fs_seed, ino, 0);
        match kind {
            Some(Kind::Dir(_)) | None => {
                rec.is_dir = true;
                let entries = &needs.dirs[&ino];
                let parent = needs.parent[&ino];
                let blocks = match htree::plan_leaves(entries, &opts.hash_seed) {
                    Some(leaves) => {
                        rec.flags |= htree::EXT4_INDEX_FL;
                        htree::write(ino, parent, entries, &leaves, iseed)
                    }
                    None => dir_blocks(ino, parent, entries, iseed),
                };
                let runs = alloc.take(blocks.len() as u64).ok_or_else(no_space)?;
                let first = built.len();
                built.extend(blocks);
                let mut k = first;
                for &(s, l) in &runs {
                    regions.push(Region { start: s, len: l, kind: RegionKind::Built((k..k + l as usize).collect()) });
                    k += l as usize;
                }
                rec.size = (built.len() - first) as u64 * BLOCK_SIZE;
                rec.flags |= EXT4_EXTENTS_FL;
                let extents = runs_to_extents(0, &runs);
                let (iblock, leaves) = extent_tree(&path, &extents, &mut alloc, ino, fs_seed)?;
                rec.i_block = iblock;
                rec.fs_blocks += runs.iter().map(|r| r.1).sum::<u64>() + leaves.len() as u64;
                push_leaves(&mut built, &mut regions, leaves);
            }
            Some(Kind::File(c)) => {
                rec.size = c.size;
                rec.flags = EXT4_EXTENTS_FL;
                let mut extents = Vec::new();
                for (a, b) in data_ranges(c) {
                    let runs = alloc.take(b - a).ok_or_else(no_space)?;
                    let mut logical = a;
                    for &(s, l) in &runs {
                        regions.push(Region {
                            start: s,
                            len: l,
                            kind: RegionKind::File { tree_inode: tid.expect("file"), file_block: logical },
                        });
                        logical += l;
                    }
                    extents.extend(runs_to_extents(a, &runs));
                    rec.fs_blocks += b - a;
                }
                let (iblock, leaves) = extent_tree(&path, &extents, &mut alloc, ino, fs_seed)?;
                rec.i_block = iblock;
                rec.fs_blocks += leaves.len() as u64;
                push_leaves(&mut built, &mut regions, leaves);
            }
            Some(Kind::Symlink(target)) => {
                rec.size = target.len() as u64;
                if target.len() < 60 {
                    rec.i_block[..target.len()].copy_from_slice(target);
                } else {
                    rec.flags = EXT4_EXTENTS_FL;
                    let b = alloc.take(1).ok_or_else(no_space)?[0].0;
                    let mut blk = vec![0u8; BLOCK_SIZE as usize];
                    blk[..target.len()].copy_from_slice(target);
                    built.push(blk);
                    regions.push(Region { start: b, len: 1, kind: RegionKind::Built(vec![built.len() - 1]) });
                    let (iblock, _) =
                        extent_tree(&path, &[Extent { logical: 0, len: 1, physical: b }], &mut alloc, ino, fs_seed)?;
                    rec.i_block = iblock;
                    rec.fs_blocks += 1;
                }
            }
            Some(Kind::CharDev { major, minor }) | Some(Kind::BlockDev { major, minor }) => {
                let (major, minor) = (*major, *minor);
                if major < 256 && minor < 256 {
                    rec.i_block[0..4].copy_from_slice(&((major << 8) | minor).to_le_bytes());
                } else {
                    let enc = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
                    rec.i_block[4..8].copy_from_slice(&enc.to_le_bytes());
                }
            }
            Some(Kind::Fifo) | Some(Kind::Socket) => {}
        }
        inodes[ino as usize - 1] = rec;
    }
    // Bad-blocks inode: owned by nobody, but e2fsck expects its times set as mke2fs does.
    let epoch = Timestamp::new(opts.timestamp, 0);
    inodes[0] = InodeRec { atime: epoch, ctime: epoch, mtime: epoch, crtime: epoch, used: true, ..Default::default() };

    regions.sort_by_key(|r| r.start);
    let reserved_blocks = geo.blocks * u64::from(opts.reserved_percent) / 100;
    Ok(Ext4Plan { geo, opts: opts.clone(), inodes, regions, built, used, fs_seed, reserved_blocks })
}

fn push_leaves(built: &mut Vec<Vec<u8>>, regions: &mut Vec<Region>, leaves: Vec<(u64, Vec<u8>)>) {
    for (b, blk) in leaves {
        built.push(blk);
        regions.push(Region { start: b, len: 1, kind: RegionKind::Built(vec![built.len() - 1]) });
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

/// The 60-byte `i_block` of an inode: an extent header and up to four extents.
type InodeBlock = [u8; 60];
/// An extent-tree block below the root: where it goes (block number) and its bytes.
type IndexBlock = (u64, Vec<u8>);

/// The inode's i_block (extent root) and any leaf blocks `(block, bytes)` it needs.
fn extent_tree(
    path: &str,
    extents: &[Extent],
    alloc: &mut Alloc<'_>,
    ino: u32,
    fs_seed: u32,
) -> Result<(InodeBlock, Vec<IndexBlock>), Ext4Error> {
    let mut iblock = [0u8; 60];
    if extents.len() <= 4 {
        put_extent_header(&mut iblock, extents.len() as u16, 4, 0);
        for (i, e) in extents.iter().enumerate() {
            put_extent(&mut iblock[12 + 12 * i..], e);
        }
        return Ok((iblock, Vec::new()));
    }
    let chunks: Vec<&[Extent]> = extents.chunks(LEAF_EXTENTS).collect();
    if chunks.len() > 4 {
        return Err(Ext4Error::TooFragmented { path: path.into(), extents: extents.len() });
    }
    let iseed = csum::inode_seed(fs_seed, ino, 0);
    let mut leaves = Vec::new();
    put_extent_header(&mut iblock, chunks.len() as u16, 4, 1);
    for (i, chunk) in chunks.iter().enumerate() {
        let b = alloc.take(1).ok_or(Ext4Error::TooSmall { need_bytes: 0, have_bytes: alloc.blocks * BLOCK_SIZE })?[0].0;
        let mut blk = vec![0u8; BLOCK_SIZE as usize];
        put_extent_header(&mut blk, chunk.len() as u16, LEAF_EXTENTS as u16, 0);
        for (j, e) in chunk.iter().enumerate() {
            put_extent(&mut blk[12 + 12 * j..], e);
        }
        let tail = 12 + 12 * LEAF_EXTENTS;
        let c = csum::raw(iseed, &blk[..tail]);
        blk[tail..tail + 4].copy_from_slice(&c.to_le_bytes());
        leaves.push((b, blk));
        let idx = &mut iblock[12 + 12 * i..12 + 12 * (i + 1)];
        idx[0..4].copy_from_slice(&(chunk[0].logical as u32).to_le_bytes());
        idx[4..8].copy_from_slice(&(b as u32).to_le_bytes());
        idx[8..10].copy_from_slice(&((b >> 32) as u16).to_le_bytes());
    }
    Ok((iblock, leaves))
}

/// A small directory's one linear block (or several, for callers that index nothing): `.`,
/// `..`, the entries, and the checksum tail in every block.
fn dir_blocks(ino: u32, parent: u32, entries: &[(Vec<u8>, u32, u8)], iseed: u32) -> Vec<Vec<u8>> {
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    let mut cur = vec![0u8; BLOCK_SIZE as usize];
    let mut at = 0usize;
    let mut last = 0usize;
    let put = |cur: &mut Vec<u8>, at: &mut usize, last: &mut usize, ino: u32, name: &[u8], ft: u8| {
        let l = dirent_len(name.len());
        cur[*at..*at + 4].copy_from_slice(&ino.to_le_bytes());
        cur[*at + 4..*at + 6].copy_from_slice(&(l as u16).to_le_bytes());
        cur[*at + 6] = name.len() as u8;
        cur[*at + 7] = ft;
        cur[*at + 8..*at + 8 + name.len()].copy_from_slice(name);
        *last = *at;
        *at += l;
    };
    let finish = |cur: &mut Vec<u8>, last: usize| htree::seal_leaf(cur, last, iseed);
    put(&mut cur, &mut at, &mut last, ino, b".", 2);
    put(&mut cur, &mut at, &mut last, parent, b"..", 2);
    for (name, cino, ft) in entries {
        let l = dirent_len(name.len());
        if at + l > DIR_USABLE {
            finish(&mut cur, last);
            blocks.push(std::mem::replace(&mut cur, vec![0u8; BLOCK_SIZE as usize]));
            at = 0;
        }
        put(&mut cur, &mut at, &mut last, *cino, name, *ft);
    }
    finish(&mut cur, last);
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
