//! `kiln diff`: what changed between two builds, the release note of a nightly image. Packages
//! from the manifests, or from dpkg's status in the image when it has none (added, removed,
//! changed version), files from the two ext4 root trees read back from the images (added,
//! removed, changed by kind, mode, owner, content digest, link target or extended attributes),
//! and the EBS blocks an incremental publish of the second on the first would send (the
//! publisher's own plan, `publish::blocks`). An image is kiln's (`NAME.raw` with its build
//! manifest) or a pulled AMI (`NAME.raw` with `NAME.pull.json`, see [`crate::pull`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::formats::ext4;
use crate::formats::inspect::{self, FileSystem};
use crate::formats::tree::{Kind, Tree};
use crate::launch::request::TestTarget;
use crate::manifest::Package;

#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error("{}: {source}", path.display())]
    Locate { path: PathBuf, source: Box<crate::launch::request::TestError> },
    #[error("{}: no manifest beside it; kiln diff compares kiln's images (NAME.raw with NAME.manifest.json) and pulled AMIs (NAME.raw with NAME.pull.json, from `kiln pull`)", path.display())]
    NoManifest { path: PathBuf },
    #[error("{}: {what}", path.display())]
    Read { path: PathBuf, what: String },
    #[error("planning the incremental upload: {0}")]
    Blocks(String),
}

/// One package whose presence or version differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PackageChange {
    pub name: String,
    /// `NAME:ARCH` version in A; None when only B has it.
    pub from: Option<String>,
    pub to: Option<String>,
}

/// One path whose entry differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileChange {
    pub path: String,
    /// `added`, `removed` or `changed`.
    pub change: &'static str,
    /// For `changed`: which of kind, mode, owner, content, target, xattrs differ.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub what: Vec<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Diff {
    pub a: String,
    pub b: String,
    pub a_sha256: String,
    pub b_sha256: String,
    pub packages: Vec<PackageChange>,
    pub files: Vec<FileChange>,
    /// EBS blocks (512 KiB) an incremental publish of B on A sends.
    pub blocks_changed: u64,
    pub block_size: u64,
}

impl Diff {
    pub fn differs(&self) -> bool {
        self.a_sha256 != self.b_sha256 || !self.packages.is_empty() || !self.files.is_empty()
    }
}

/// One side of a comparison: the image, and what its manifest (a build's or a pull's) says.
struct Side {
    image: PathBuf,
    sha256: String,
    size_bytes: u64,
    blocks: crate::manifest::BlockMap,
    /// None when the manifest does not list them (a pulled AMI).
    packages: Option<Vec<Package>>,
}

/// Compares the images at `a` and `b` (each an image, its build manifest, or a pulled AMI).
pub fn diff(a: &Path, b: &Path) -> Result<Diff, DiffError> {
    let (sa, sb) = (side(a)?, side(b)?);
    let (ta, tb) = (root_tree(&sa.image)?, root_tree(&sb.image)?);
    let files = compare_trees(&ta, &tb, &sa.image, &sb.image)?;
    let packages = |s: &Side, t: &Tree| match &s.packages {
        Some(p) => Ok(index(p)),
        None => dpkg_packages(t).map(|p| index(&p)).map_err(|what| DiffError::Read { path: s.image.clone(), what }),
    };
    let (pa, pb) = (packages(&sa, &ta)?, packages(&sb, &tb)?);
    let jobs = crate::publish::blocks::blocks_to_send(
        &sb.blocks,
        sb.size_bytes,
        crate::publish::blocks::Target::Child { parent: &sa.blocks },
    )
    .map_err(|e| DiffError::Blocks(e.to_string()))?;
    Ok(Diff {
        a: sa.image.display().to_string(),
        b: sb.image.display().to_string(),
        a_sha256: sa.sha256.clone(),
        b_sha256: sb.sha256.clone(),
        packages: compare_packages(&pa, &pb),
        files,
        blocks_changed: jobs.len() as u64,
        block_size: crate::manifest::EBS_BLOCK_SIZE,
    })
}

fn side(p: &Path) -> Result<Side, DiffError> {
    let pulled = crate::pull::PullManifest::beside(p);
    if let Some((image, m)) = pulled.map_err(|what| DiffError::Read { path: p.to_path_buf(), what })? {
        let blocks = crate::manifest::BlockMap::try_from(m.blocks)
            .map_err(|e| DiffError::Read { path: p.to_path_buf(), what: e.to_string() })?;
        return Ok(Side { image, sha256: m.image.sha256, size_bytes: m.image.size_bytes, blocks, packages: None });
    }
    let t = TestTarget::locate(p).map_err(|e| DiffError::Locate { path: p.to_path_buf(), source: Box::new(e) })?;
    match t.manifest {
        Some((_, m)) => Ok(Side {
            image: t.image,
            sha256: m.image.sha256.clone(),
            size_bytes: m.image.size_bytes,
            packages: Some(m.packages),
            blocks: m.blocks,
        }),
        None => Err(DiffError::NoManifest { path: p.to_path_buf() }),
    }
}

/// `NAME:ARCH` → version.
fn index(packages: &[Package]) -> BTreeMap<String, String> {
    packages.iter().map(|p| (format!("{}:{}", p.name, p.arch), p.version.clone())).collect()
}

/// The packages dpkg's status file in `tree` calls installed, read as staging reads them.
fn dpkg_packages(tree: &Tree) -> Result<Vec<Package>, String> {
    const STATUS: &[u8] = b"/var/lib/dpkg/status";
    // The image may come from anywhere: a status file claiming gigabytes is not read whole.
    if let Ok(id) = tree.lookup(STATUS) {
        if let Kind::File(c) = &tree.inode(id).kind {
            if c.size > 256 << 20 {
                return Err(format!("/var/lib/dpkg/status is {} bytes", c.size));
            }
        }
    }
    match tree.file_bytes(STATUS) {
        Ok(Some(buf)) => Ok(crate::stage::debian::parse_dpkg_status(&String::from_utf8_lossy(&buf))),
        Ok(None) => Ok(Vec::new()),
        Err(e) => Err(format!("reading /var/lib/dpkg/status: {e}")),
    }
}

/// The root file system's tree: the first ext4 partition of the disk.
fn root_tree(image: &Path) -> Result<Tree, DiffError> {
    let read = |what: String| DiffError::Read { path: image.to_path_buf(), what };
    let disk = inspect::read(image).map_err(|e| read(format!("reading its partition table: {e}")))?;
    let offset = disk
        .partitions
        .iter()
        .find(|p| matches!(p.filesystem, Some(FileSystem::Ext4(_))))
        .and_then(|p| p.offset_bytes)
        .ok_or_else(|| read("no ext4 root file system".into()))?;
    ext4::read_tree(image, offset).map_err(|e| read(format!("reading the root file system: {e}")))
}

fn compare_packages(pa: &BTreeMap<String, String>, pb: &BTreeMap<String, String>) -> Vec<PackageChange> {
    let mut names: Vec<&String> = pa.keys().chain(pb.keys()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .filter(|n| pa.get(*n) != pb.get(*n))
        .map(|n| PackageChange { name: n.clone(), from: pa.get(n).cloned(), to: pb.get(n).cloned() })
        .collect()
}

/// What a path holds, as compared: kind, mode, owner, content digest or link target, xattrs.
#[derive(PartialEq, Eq)]
struct Entry {
    kind: &'static str,
    perm: u16,
    owner: (u32, u32),
    content: Option<[u8; 32]>,
    target: Option<Vec<u8>>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

fn entries(tree: &Tree, image: &Path) -> Result<BTreeMap<Vec<u8>, Entry>, DiffError> {
    let mut out = BTreeMap::new();
    let mut failed = None;
    tree.walk(|path, id, _| {
        let inode = tree.inode(id);
        let (kind, content, target) = match &inode.kind {
            Kind::Dir(_) => ("directory", None, None),
            Kind::File(c) => {
                let digest = content_digest(tree, c);
                if let Err(e) = &digest {
                    failed.get_or_insert_with(|| format!("reading {}: {e}", String::from_utf8_lossy(path)));
                }
                ("file", digest.ok(), None)
            }
            Kind::Symlink(t) => ("symlink", None, Some(t.clone())),
            Kind::CharDev { major, minor } => ("char device", None, Some(format!("{major}:{minor}").into_bytes())),
            Kind::BlockDev { major, minor } => ("block device", None, Some(format!("{major}:{minor}").into_bytes())),
            Kind::Fifo => ("fifo", None, None),
            Kind::Socket => ("socket", None, None),
        };
        let m = &inode.meta;
        out.insert(
            path.to_vec(),
            Entry { kind, perm: m.perm, owner: (m.uid, m.gid), content, target, xattrs: m.xattrs.clone() },
        );
    });
    match failed {
        Some(what) => Err(DiffError::Read { path: image.to_path_buf(), what }),
        None => Ok(out),
    }
}

fn content_digest(tree: &Tree, c: &crate::formats::tree::Content) -> std::io::Result<[u8; 32]> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < c.size {
        let n = (c.size - at).min(buf.len() as u64) as usize;
        tree.read_content(c, at, &mut buf[..n])?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(h.finalize().into())
}

fn compare_trees(a: &Tree, b: &Tree, ia: &Path, ib: &Path) -> Result<Vec<FileChange>, DiffError> {
    let (ea, eb) = (entries(a, ia)?, entries(b, ib)?);
    let mut paths: Vec<&Vec<u8>> = ea.keys().chain(eb.keys()).collect();
    paths.sort();
    paths.dedup();
    let mut out = Vec::new();
    for p in paths {
        let path = String::from_utf8_lossy(p).into_owned();
        match (ea.get(p), eb.get(p)) {
            (None, Some(_)) => out.push(FileChange { path, change: "added", what: vec![] }),
            (Some(_), None) => out.push(FileChange { path, change: "removed", what: vec![] }),
            (Some(x), Some(y)) if x != y => {
                let what = [
                    ("kind", x.kind != y.kind),
                    ("mode", x.perm != y.perm),
                    ("owner", x.owner != y.owner),
                    ("content", x.content != y.content),
                    ("target", x.target != y.target),
                    ("xattrs", x.xattrs != y.xattrs),
                ]
                .into_iter()
                .filter_map(|(w, differs)| differs.then_some(w))
                .collect();
                out.push(FileChange { path, change: "changed", what });
            }
            _ => {}
        }
    }
    Ok(out)
}
