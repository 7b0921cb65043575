//! kiln's in-memory root tree: every inode's metadata in memory, file contents by reference.
//!
//! Inodes and directory entries are kept apart so that hard links are simply two entries
//! naming one inode; link counts are derived, never stored. Directory entries live in a
//! `BTreeMap` so every walk is in byte order and inode numbering repeats from run to run.
//!
//! Contents are a list of data segments over a logical size; gaps are holes. A segment's bytes
//! are either held inline (small generated files) or a byte range of a registered source file
//! (a tarball on disk, a recipe file), read with positioned reads when the image is written, so
//! a 1 GiB root costs only its metadata in RAM.

use crate::device::{Device, FileDevice};
use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::Arc;

/// Longest name a directory entry may have (ext4's `name_len` is one byte).
pub const NAME_MAX: usize = 255;

/// Index of an inode in [`Tree::inodes`]. The root directory is always `InodeId(0)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InodeId(pub u32);

impl InodeId {
    pub const ROOT: InodeId = InodeId(0);
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Index of a registered source file in [`Tree::sources`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceId(pub u32);

/// Seconds and nanoseconds since the Unix epoch; seconds may be negative (before 1970).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

impl Timestamp {
    pub const fn new(secs: i64, nanos: u32) -> Self {
        Timestamp { secs, nanos }
    }
    /// Clamps to `max` (SOURCE_DATE_EPOCH semantics: nothing newer than the build's epoch).
    pub fn clamp_to(self, max: Timestamp) -> Timestamp {
        if self > max {
            max
        } else {
            self
        }
    }
}

/// Ownership, permissions, times and extended attributes of one inode.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Meta {
    /// Permission bits including setuid (0o4000), setgid (0o2000) and sticky (0o1000); the file
    /// type is carried by [`Kind`], never here.
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    /// Extended attributes by full name (`security.capability`, `user.foo`, ...), sorted.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Meta {
    /// Metadata with every time set to `time`.
    pub fn new(perm: u16, uid: u32, gid: u32, time: Timestamp) -> Self {
        Meta { perm: perm & 0o7777, uid, gid, atime: time, mtime: time, ctime: time, xattrs: BTreeMap::new() }
    }
}

/// Where the bytes of one data segment come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    /// Bytes held in memory; the segment's `len` equals the slice length.
    Inline(Arc<[u8]>),
    /// `len` bytes of a registered source file starting at `offset`.
    Source { source: SourceId, offset: u64 },
}

/// One run of file bytes at `offset` within the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub len: u64,
    pub data: Data,
}

/// A regular file's contents: a logical size and sorted, non-overlapping data segments.
/// Everything not covered by a segment is a hole and reads as zeros.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Content {
    pub size: u64,
    pub segments: Vec<Segment>,
}

impl Content {
    pub fn empty() -> Self {
        Content::default()
    }

    /// A whole file held in memory.
    pub fn inline(bytes: impl Into<Arc<[u8]>>) -> Self {
        let bytes: Arc<[u8]> = bytes.into();
        let size = bytes.len() as u64;
        if size == 0 {
            return Content::empty();
        }
        Content { size, segments: vec![Segment { offset: 0, len: size, data: Data::Inline(bytes) }] }
    }

    /// A whole file that is a byte range of a source.
    pub fn from_source(source: SourceId, offset: u64, len: u64) -> Self {
        if len == 0 {
            return Content::empty();
        }
        Content { size: len, segments: vec![Segment { offset: 0, len, data: Data::Source { source, offset } }] }
    }

    /// Bytes that hold data (the rest are holes).
    pub fn data_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// Checks the invariants writers rely on: sorted, non-overlapping, inside `size`,
    /// inline lengths matching.
    pub fn validate(&self) -> Result<(), TreeError> {
        let mut end = 0u64;
        for s in &self.segments {
            let seg_end = s.offset.checked_add(s.len).ok_or(TreeError::BadContent("segment end overflows"))?;
            if s.offset < end {
                return Err(TreeError::BadContent("segments overlap or are unsorted"));
            }
            if seg_end > self.size {
                return Err(TreeError::BadContent("segment extends past the file size"));
            }
            if let Data::Inline(b) = &s.data {
                if b.len() as u64 != s.len {
                    return Err(TreeError::BadContent("inline segment length mismatch"));
                }
            }
            end = seg_end;
        }
        Ok(())
    }
}

/// What an inode is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir(Dir),
    File(Content),
    Symlink(Vec<u8>),
    CharDev { major: u32, minor: u32 },
    BlockDev { major: u32, minor: u32 },
    Fifo,
    Socket,
}

impl Kind {
    /// The `S_IFMT` bits of this kind.
    pub fn mode_type(&self) -> u16 {
        match self {
            Kind::Dir(_) => 0o040000,
            Kind::File(_) => 0o100000,
            Kind::Symlink(_) => 0o120000,
            Kind::CharDev { .. } => 0o020000,
            Kind::BlockDev { .. } => 0o060000,
            Kind::Fifo => 0o010000,
            Kind::Socket => 0o140000,
        }
    }
    pub fn is_dir(&self) -> bool {
        matches!(self, Kind::Dir(_))
    }
    fn name(&self) -> &'static str {
        match self {
            Kind::Dir(_) => "directory",
            Kind::File(_) => "file",
            Kind::Symlink(_) => "symlink",
            Kind::CharDev { .. } => "character device",
            Kind::BlockDev { .. } => "block device",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
        }
    }
}

/// A directory's entries by name, in byte order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Dir {
    pub entries: BTreeMap<Vec<u8>, InodeId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    pub kind: Kind,
    pub meta: Meta,
    /// Number of directory entries naming this inode (the root counts its own "entry").
    /// For directories this is the entry count only; `..` links are added by [`Tree::nlink`].
    pub links: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TreeError {
    #[error("path {path:?} escapes the root (it has a `..` component)")]
    EscapesRoot { path: String },
    #[error("name {name:?} in {path:?} is {len} bytes long; names may be at most 255 bytes")]
    NameTooLong { path: String, name: String, len: usize },
    #[error("path {path:?} contains a NUL byte")]
    NulInName { path: String },
    #[error("path {path:?} names the root directory itself, which cannot be replaced by a {kind}")]
    RootNotDir { path: String, kind: &'static str },
    #[error("{path:?} appears twice; each path may be given once")]
    Duplicate { path: String },
    #[error("parent of {path:?} is a {kind}, not a directory")]
    ParentNotDir { path: String, kind: &'static str },
    #[error("parent directory of {path:?} does not exist")]
    MissingParent { path: String },
    #[error("hard link {path:?} points to {target:?}, which is not in the tree (a hard link must follow its target)")]
    LinkTargetMissing { path: String, target: String },
    #[error("hard link {path:?} points to directory {target:?}; directories cannot be hard-linked")]
    LinkToDir { path: String, target: String },
    #[error("{path:?} is not in the tree")]
    NotFound { path: String },
    #[error("bad file content: {0}")]
    BadContent(&'static str),
    #[error("too many inodes for one tree (limit 4294967295)")]
    TooManyInodes,
}

/// How [`Tree::insert`] treats an existing entry at the same path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExisting {
    /// Report [`TreeError::Duplicate`].
    Error,
    /// Replace it (an overlay); an existing directory replaced by a directory keeps its entries
    /// and only takes the new metadata.
    Replace,
}

/// Source files and disks that segments refer to, opened once and read with positioned reads.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    devices: Vec<Arc<dyn Device>>,
}

impl Sources {
    /// What a source is called in messages.
    pub fn name(&self, id: SourceId) -> String {
        self.devices[id.0 as usize].name()
    }

    /// Reads exactly `buf.len()` bytes of `source` at `offset`.
    pub fn read_exact_at(&self, id: SourceId, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.devices[id.0 as usize].read_exact_at(buf, offset)
    }
}

/// The root tree.
#[derive(Debug, Clone)]
pub struct Tree {
    inodes: Vec<Inode>,
    sources: Sources,
}

/// A path split into validated components, with its display form for errors.
struct SplitPath<'a> {
    parts: Vec<&'a [u8]>,
    display: String,
}

fn split_path(path: &[u8]) -> Result<SplitPath<'_>, TreeError> {
    let display = String::from_utf8_lossy(path).into_owned();
    if path.contains(&0) {
        return Err(TreeError::NulInName { path: display });
    }
    let mut parts = Vec::new();
    for part in path.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err(TreeError::EscapesRoot { path: display }),
            name => {
                if name.len() > NAME_MAX {
                    return Err(TreeError::NameTooLong {
                        path: display.clone(),
                        name: String::from_utf8_lossy(name).into_owned(),
                        len: name.len(),
                    });
                }
                parts.push(name);
            }
        }
    }
    Ok(SplitPath { parts, display })
}

impl Tree {
    /// A tree holding only the root directory.
    pub fn new(root_meta: Meta) -> Self {
        Tree {
            inodes: vec![Inode { kind: Kind::Dir(Dir::default()), meta: root_meta, links: 1 }],
            sources: Sources::default(),
        }
    }

    pub fn sources(&self) -> &Sources {
        &self.sources
    }

    /// Registers a file whose byte ranges segments may refer to.
    pub fn add_source(&mut self, path: &Path) -> io::Result<SourceId> {
        Ok(self.add_device(FileDevice::open(path)?))
    }

    /// Registers a disk whose byte ranges segments may refer to.
    pub fn add_device(&mut self, dev: Arc<dyn Device>) -> SourceId {
        let id = SourceId(self.sources.devices.len() as u32);
        self.sources.devices.push(dev);
        id
    }

    pub fn inodes(&self) -> &[Inode] {
        &self.inodes
    }
    pub fn inode(&self, id: InodeId) -> &Inode {
        &self.inodes[id.index()]
    }
    pub fn root(&self) -> &Inode {
        &self.inodes[0]
    }

    /// Number of inodes that are reachable from the root (unlinked inodes left behind by
    /// [`OnExisting::Replace`] are not counted).
    pub fn live_inodes(&self) -> impl Iterator<Item = (InodeId, &Inode)> {
        self.inodes.iter().enumerate().filter(|(_, i)| i.links > 0).map(|(n, i)| (InodeId(n as u32), i))
    }

    /// The link count a filesystem should record: entries naming the inode, plus for a
    /// directory its `.` entry and one `..` from each subdirectory.
    pub fn nlink(&self, id: InodeId) -> u32 {
        let inode = self.inode(id);
        match &inode.kind {
            Kind::Dir(d) => {
                let subdirs = d.entries.values().filter(|c| self.inode(**c).kind.is_dir()).count() as u32;
                // Root has no parent entry but its own `..` points to itself.
                let own = if id == InodeId::ROOT { 1 } else { inode.links };
                own + 1 + subdirs
            }
            _ => inode.links,
        }
    }

    /// Looks a path up.
    pub fn lookup(&self, path: &[u8]) -> Result<InodeId, TreeError> {
        let sp = split_path(path)?;
        let mut cur = InodeId::ROOT;
        for part in &sp.parts {
            match &self.inode(cur).kind {
                Kind::Dir(d) => match d.entries.get(*part) {
                    Some(id) => cur = *id,
                    None => return Err(TreeError::NotFound { path: sp.display }),
                },
                _ => return Err(TreeError::NotFound { path: sp.display }),
            }
        }
        Ok(cur)
    }

    /// Looks a path up the way the booted system would: symlinks (absolute ones relative to
    /// this tree's root) are followed, `..` stops at the root, at most 40 links deep.
    pub fn resolve(&self, path: &[u8]) -> Result<InodeId, TreeError> {
        let display = || String::from_utf8_lossy(path).into_owned();
        if path.contains(&0) {
            return Err(TreeError::NulInName { path: display() });
        }
        // Components still to walk, last first; the directories walked so far.
        let mut todo: Vec<Vec<u8>> = path.split(|&b| b == b'/').rev().map(<[u8]>::to_vec).collect();
        let mut stack = vec![InodeId::ROOT];
        let mut hops = 0;
        while let Some(part) = todo.pop() {
            match part.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    if stack.len() > 1 {
                        stack.pop();
                    }
                    continue;
                }
                _ => {}
            }
            let cur = *stack.last().expect("root stays");
            let Kind::Dir(d) = &self.inode(cur).kind else { return Err(TreeError::NotFound { path: display() }) };
            let next = *d.entries.get(&part).ok_or_else(|| TreeError::NotFound { path: display() })?;
            if let Kind::Symlink(target) = &self.inode(next).kind {
                hops += 1;
                if hops > 40 {
                    return Err(TreeError::NotFound { path: display() });
                }
                if target.starts_with(b"/") {
                    stack.truncate(1);
                }
                todo.extend(target.split(|&b| b == b'/').rev().map(<[u8]>::to_vec));
                continue;
            }
            stack.push(next);
        }
        Ok(*stack.last().expect("root stays"))
    }

    fn parent_of(&self, sp: &SplitPath<'_>) -> Result<InodeId, TreeError> {
        let mut cur = InodeId::ROOT;
        for part in &sp.parts[..sp.parts.len() - 1] {
            let next = match &self.inode(cur).kind {
                Kind::Dir(d) => d.entries.get(*part).copied(),
                other => return Err(TreeError::ParentNotDir { path: sp.display.clone(), kind: other.name() }),
            };
            cur = next.ok_or_else(|| TreeError::MissingParent { path: sp.display.clone() })?;
        }
        match &self.inode(cur).kind {
            Kind::Dir(_) => Ok(cur),
            other => Err(TreeError::ParentNotDir { path: sp.display.clone(), kind: other.name() }),
        }
    }

    /// Creates every missing directory on the way to `path` (not `path` itself) with `meta`.
    pub fn create_parents(&mut self, path: &[u8], meta: &Meta) -> Result<(), TreeError> {
        let sp = split_path(path)?;
        let mut cur = InodeId::ROOT;
        for part in sp.parts.iter().take(sp.parts.len().saturating_sub(1)) {
            let next = match &self.inode(cur).kind {
                Kind::Dir(d) => d.entries.get(*part).copied(),
                other => return Err(TreeError::ParentNotDir { path: sp.display.clone(), kind: other.name() }),
            };
            cur = match next {
                Some(id) => id,
                None => {
                    let id = self.push(Inode { kind: Kind::Dir(Dir::default()), meta: meta.clone(), links: 1 })?;
                    self.dir_mut(cur).entries.insert(part.to_vec(), id);
                    id
                }
            };
        }
        Ok(())
    }

    fn push(&mut self, inode: Inode) -> Result<InodeId, TreeError> {
        let n = u32::try_from(self.inodes.len()).map_err(|_| TreeError::TooManyInodes)?;
        self.inodes.push(inode);
        Ok(InodeId(n))
    }

    fn dir_mut(&mut self, id: InodeId) -> &mut Dir {
        match &mut self.inodes[id.index()].kind {
            Kind::Dir(d) => d,
            _ => unreachable!("caller checked that {id:?} is a directory"),
        }
    }

    /// Inserts a new inode at `path`. The parent directory must exist.
    pub fn insert(
        &mut self,
        path: &[u8],
        kind: Kind,
        mut meta: Meta,
        on_existing: OnExisting,
    ) -> Result<InodeId, TreeError> {
        if let Kind::File(c) = &kind {
            c.validate()?;
        }
        meta.perm &= 0o7777;
        let sp = split_path(path)?;
        if sp.parts.is_empty() {
            // The root itself: only a directory may stand there; it takes the new metadata.
            return match kind {
                Kind::Dir(_) => {
                    self.inodes[0].meta = meta;
                    Ok(InodeId::ROOT)
                }
                other => Err(TreeError::RootNotDir { path: sp.display, kind: other.name() }),
            };
        }
        let parent = self.parent_of(&sp)?;
        let name = *sp.parts.last().expect("non-empty");
        if let Some(&existing) = self.dir_ref(parent).entries.get(name) {
            if on_existing == OnExisting::Error {
                return Err(TreeError::Duplicate { path: sp.display });
            }
            if self.inode(existing).kind.is_dir() && kind.is_dir() {
                self.inodes[existing.index()].meta = meta;
                return Ok(existing);
            }
            self.unlink(existing);
        }
        let id = self.push(Inode { kind, meta, links: 1 })?;
        self.dir_mut(parent).entries.insert(name.to_vec(), id);
        Ok(id)
    }

    /// Adds a hard link at `path` to the inode at `target`.
    pub fn link(&mut self, path: &[u8], target: &[u8], on_existing: OnExisting) -> Result<InodeId, TreeError> {
        let sp = split_path(path)?;
        let target_id = match self.lookup(target) {
            Ok(id) => id,
            Err(_) => {
                return Err(TreeError::LinkTargetMissing {
                    path: sp.display,
                    target: String::from_utf8_lossy(target).into_owned(),
                })
            }
        };
        if self.inode(target_id).kind.is_dir() {
            return Err(TreeError::LinkToDir {
                path: sp.display,
                target: String::from_utf8_lossy(target).into_owned(),
            });
        }
        if sp.parts.is_empty() {
            return Err(TreeError::RootNotDir { path: sp.display, kind: "hard link" });
        }
        let parent = self.parent_of(&sp)?;
        let name = *sp.parts.last().expect("non-empty");
        if let Some(&existing) = self.dir_ref(parent).entries.get(name) {
            if existing == target_id {
                return Ok(target_id);
            }
            if on_existing == OnExisting::Error {
                return Err(TreeError::Duplicate { path: sp.display });
            }
            self.unlink(existing);
        }
        self.inodes[target_id.index()].links += 1;
        self.dir_mut(parent).entries.insert(name.to_vec(), target_id);
        Ok(target_id)
    }

    /// Removes the entry at `path` (and, for a directory, everything below it).
    pub fn remove(&mut self, path: &[u8]) -> Result<(), TreeError> {
        let sp = split_path(path)?;
        if sp.parts.is_empty() {
            return Err(TreeError::RootNotDir { path: sp.display, kind: "removal" });
        }
        let parent = self.parent_of(&sp)?;
        let name = *sp.parts.last().expect("non-empty");
        let id = self.dir_mut(parent).entries.remove(name).ok_or(TreeError::NotFound { path: sp.display })?;
        self.unlink(id);
        Ok(())
    }

    fn dir_ref(&self, id: InodeId) -> &Dir {
        match &self.inodes[id.index()].kind {
            Kind::Dir(d) => d,
            _ => unreachable!("caller checked that {id:?} is a directory"),
        }
    }

    /// Drops one link to `id` whose directory entry the caller has replaced or removed; an
    /// inode left with no links releases its subtree.
    fn unlink(&mut self, id: InodeId) {
        let inode = &mut self.inodes[id.index()];
        inode.links = inode.links.saturating_sub(1);
        if inode.links == 0 {
            if let Kind::Dir(d) = std::mem::take(&mut inode.kind) {
                for child in d.entries.into_values() {
                    self.unlink(child);
                }
            }
        }
    }

    /// Visits every reachable entry depth-first in byte order, parents before children:
    /// `f(path, id, first_sighting)`. `first_sighting` is false for the second and later
    /// entries naming a hard-linked inode.
    pub fn walk(&self, mut f: impl FnMut(&[u8], InodeId, bool)) {
        let mut seen = vec![false; self.inodes.len()];
        let mut path = Vec::new();
        seen[0] = true;
        f(b"/", InodeId::ROOT, true);
        self.walk_dir(InodeId::ROOT, &mut path, &mut seen, &mut f);
    }

    fn walk_dir(&self, dir: InodeId, path: &mut Vec<u8>, seen: &mut [bool], f: &mut impl FnMut(&[u8], InodeId, bool)) {
        let Kind::Dir(d) = &self.inode(dir).kind else { return };
        for (name, &child) in &d.entries {
            let len = path.len();
            path.push(b'/');
            path.extend_from_slice(name);
            let first = !seen[child.index()];
            seen[child.index()] = true;
            f(path, child, first);
            if first && self.inode(child).kind.is_dir() {
                self.walk_dir(child, path, seen, f);
            }
            path.truncate(len);
        }
    }

    /// Clamps every timestamp to `epoch` (reproducible builds: SOURCE_DATE_EPOCH).
    pub fn clamp_times(&mut self, epoch: Timestamp) {
        for inode in &mut self.inodes {
            let m = &mut inode.meta;
            m.atime = m.atime.clamp_to(epoch);
            m.mtime = m.mtime.clamp_to(epoch);
            m.ctime = m.ctime.clamp_to(epoch);
        }
    }

    /// The whole content of the regular file at `path` (symlinks followed); None when there is
    /// no regular file there.
    pub fn file_bytes(&self, path: &[u8]) -> io::Result<Option<Vec<u8>>> {
        let Ok(id) = self.resolve(path) else { return Ok(None) };
        let Kind::File(c) = &self.inode(id).kind else { return Ok(None) };
        let len = usize::try_from(c.size).map_err(|_| io::Error::other("file too large for memory"))?;
        let mut buf = vec![0u8; len];
        self.read_content(c, 0, &mut buf)?;
        Ok(Some(buf))
    }

    /// Reads `buf.len()` bytes of a file's content at `offset`, zero-filling holes.
    pub fn read_content(&self, content: &Content, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        let end = offset + buf.len() as u64;
        let first = content.segments.partition_point(|s| s.offset + s.len <= offset);
        for s in &content.segments[first..] {
            if s.offset >= end {
                break;
            }
            let from = s.offset.max(offset);
            let to = (s.offset + s.len).min(end);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match &s.data {
                Data::Inline(b) => dst.copy_from_slice(&b[(from - s.offset) as usize..(to - s.offset) as usize]),
                Data::Source { source, offset: src_off } => {
                    self.sources.read_exact_at(*source, src_off + (from - s.offset), dst)?
                }
            }
        }
        Ok(())
    }
}

impl Default for Kind {
    /// What an unlinked inode is left holding.
    fn default() -> Self {
        Kind::Fifo
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m() -> Meta {
        Meta::new(0o755, 0, 0, Timestamp::new(0, 0))
    }

    #[test]
    fn hard_links_share_an_inode_and_count() {
        let mut t = Tree::new(m());
        t.insert(b"etc", Kind::Dir(Dir::default()), m(), OnExisting::Error).unwrap();
        let a = t.insert(b"etc/a", Kind::File(Content::inline(&b"x"[..])), m(), OnExisting::Error).unwrap();
        let b = t.link(b"/etc/b", b"etc/a", OnExisting::Error).unwrap();
        assert_eq!(a, b);
        assert_eq!(t.nlink(a), 2);
        assert_eq!(t.nlink(InodeId::ROOT), 3);
        t.remove(b"etc/a").unwrap();
        assert_eq!(t.nlink(b), 1);
    }

    #[test]
    fn rejects_bad_paths() {
        let mut t = Tree::new(m());
        let long = vec![b'a'; 256];
        assert!(matches!(t.insert(&long, Kind::Fifo, m(), OnExisting::Error), Err(TreeError::NameTooLong { .. })));
        assert!(matches!(t.insert(b"../x", Kind::Fifo, m(), OnExisting::Error), Err(TreeError::EscapesRoot { .. })));
        assert!(matches!(t.insert(b"a\0b", Kind::Fifo, m(), OnExisting::Error), Err(TreeError::NulInName { .. })));
        assert!(matches!(t.insert(b"x/y", Kind::Fifo, m(), OnExisting::Error), Err(TreeError::MissingParent { .. })));
        t.insert(b"f", Kind::Fifo, m(), OnExisting::Error).unwrap();
        assert!(matches!(t.insert(b"f", Kind::Fifo, m(), OnExisting::Error), Err(TreeError::Duplicate { .. })));
        assert!(matches!(t.insert(b"f/y", Kind::Fifo, m(), OnExisting::Error), Err(TreeError::ParentNotDir { .. })));
        assert!(matches!(t.link(b"g", b"nope", OnExisting::Error), Err(TreeError::LinkTargetMissing { .. })));
        let ok = vec![b'a'; 255];
        t.insert(&ok, Kind::Fifo, m(), OnExisting::Error).unwrap();
    }

    #[test]
    fn replacing_a_directory_with_a_file_drops_its_subtree() {
        let mut t = Tree::new(m());
        t.insert(b"d", Kind::Dir(Dir::default()), m(), OnExisting::Error).unwrap();
        let f = t.insert(b"d/f", Kind::Fifo, m(), OnExisting::Error).unwrap();
        t.insert(b"d", Kind::Fifo, m(), OnExisting::Replace).unwrap();
        assert_eq!(t.inode(f).links, 0);
        let mut n = 0;
        t.walk(|_, _, _| n += 1);
        assert_eq!(n, 2);
    }

    #[test]
    fn resolve_follows_relative_and_absolute_links() {
        let mut t = Tree::new(m());
        t.insert(b"usr", Kind::Dir(Dir::default()), m(), OnExisting::Error).unwrap();
        t.insert(b"usr/lib", Kind::Dir(Dir::default()), m(), OnExisting::Error).unwrap();
        let f = t.insert(b"usr/lib/os-release", Kind::Fifo, m(), OnExisting::Error).unwrap();
        t.insert(b"lib", Kind::Symlink(b"usr/lib".to_vec()), m(), OnExisting::Error).unwrap();
        t.insert(b"etc", Kind::Dir(Dir::default()), m(), OnExisting::Error).unwrap();
        t.insert(b"etc/os-release", Kind::Symlink(b"../usr/lib/os-release".to_vec()), m(), OnExisting::Error).unwrap();
        t.insert(b"etc/abs", Kind::Symlink(b"/lib/os-release".to_vec()), m(), OnExisting::Error).unwrap();
        t.insert(b"loop", Kind::Symlink(b"loop".to_vec()), m(), OnExisting::Error).unwrap();
        assert_eq!(t.resolve(b"/etc/os-release").unwrap(), f);
        assert_eq!(t.resolve(b"etc/abs").unwrap(), f);
        assert_eq!(t.resolve(b"/lib/os-release").unwrap(), f);
        assert_eq!(t.resolve(b"/../../lib/../lib/os-release").unwrap(), f);
        assert!(t.resolve(b"loop").is_err());
    }

    #[test]
    fn read_content_fills_holes_with_zeros() {
        let t = Tree::new(m());
        let c = Content {
            size: 10,
            segments: vec![Segment { offset: 4, len: 3, data: Data::Inline(Arc::from(&b"abc"[..])) }],
        };
        c.validate().unwrap();
        let mut buf = [0xffu8; 8];
        t.read_content(&c, 2, &mut buf).unwrap();
        assert_eq!(&buf, b"\0\0abc\0\0\0");
    }
}
