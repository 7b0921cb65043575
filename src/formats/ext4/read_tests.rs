//! The reader against e2fsprogs: `mke2fs -d` lays one source directory out as ext2, ext3 and
//! ext4, block-mapped and extent-mapped, with 1 KiB to 64 KiB blocks, 128-byte inodes and
//! meta_bg. `e2fsck -fn` must find each file system clean (so it is what mke2fs meant it to
//! be), and the tree read back must be the source directory: paths, kinds, modes, owners,
//! times, sizes, contents, symlink targets and hard links. dumpe2fs and debugfs, reading the
//! same image, say where every group's inode table and each file's blocks are, and that the
//! files really are block-mapped where the test says so.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;
use crate::tree::InodeId;

/// The e2fsprogs programs; None (with a note) when mke2fs is not installed, which fails in CI.
struct E2fs {
    mke2fs: PathBuf,
    e2fsck: PathBuf,
    debugfs: PathBuf,
    dumpe2fs: PathBuf,
}

impl E2fs {
    fn find() -> Option<E2fs> {
        let path = std::env::var("PATH").unwrap_or_default();
        let dirs: Vec<PathBuf> =
            path.split(':').map(PathBuf::from).chain(["/usr/sbin", "/sbin"].map(PathBuf::from)).collect();
        let find = |name: &str| dirs.iter().map(|d| d.join(name)).find(|p| p.is_file());
        let Some(mke2fs) = find("mke2fs") else {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(!ci, "mke2fs is not installed; .ci/setup-host should have installed it");
            eprintln!("SKIP: mke2fs is not installed (e2fsprogs; run .ci/setup-host)");
            return None;
        };
        let with = |name: &str| find(name).unwrap_or_else(|| panic!("{name} is missing beside {}", mke2fs.display()));
        Some(E2fs { e2fsck: with("e2fsck"), debugfs: with("debugfs"), dumpe2fs: with("dumpe2fs"), mke2fs })
    }

    /// `e2fsck -fn`: no problem found, nothing changed.
    fn clean(&self, img: &Path, what: &str) {
        let out = Command::new(&self.e2fsck).arg("-fn").arg(img).output().unwrap();
        assert!(
            out.status.success(),
            "{what}: e2fsck -fn found problems ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn debugfs(&self, img: &Path, request: &str) -> String {
        stdout(Command::new(&self.debugfs).arg("-R").arg(request).arg(img))
    }
}

fn stdout(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Bytes in which no block repeats another: each 8-byte word hashes its index (splitmix64),
/// so a block read from the wrong place never compares equal.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut i = 0u64;
    while out.len() < len {
        let mut z = seed.wrapping_mul(0x2545_f491_4f6c_dd1d).wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// The source directory every variant is made from.
fn source_tree(src: &Path) {
    let write = |path: &str, bytes: &[u8]| std::fs::write(src.join(path), bytes).unwrap();
    let mode =
        |path: &str, mode: u32| std::fs::set_permissions(src.join(path), PermissionsExt::from_mode(mode)).unwrap();
    std::fs::create_dir_all(src.join("d/e/f")).unwrap();
    std::fs::create_dir_all(src.join("many")).unwrap();
    std::fs::create_dir_all(src.join("empty-dir")).unwrap();
    for (i, len) in [0, 1, 4095, 4096, 70_000].into_iter().enumerate() {
        write(&format!("f{len}"), &pattern(i as u64, len));
    }
    // Past 12 + 256 blocks of 1 KiB: double indirect.
    write("big", &pattern(10, 5 << 20));
    let hole = File::create(src.join("hole")).unwrap();
    hole.set_len(3 << 20).unwrap();
    hole.write_all_at(b"after three mebibytes of hole", 3 << 20).unwrap();
    // Past 12 + 256 + 65536 blocks of 1 KiB: triple indirect.
    let far = File::create(src.join("far")).unwrap();
    far.write_all_at(&pattern(11, 3000), 0).unwrap();
    far.write_all_at(&pattern(12, 5000), 80 << 20).unwrap();
    // Targets of 60 bytes and more are in a block ("slow"), shorter ones in i_block.
    let target = |len: usize| "abcdefghij".repeat(20)[..len].to_string();
    std::os::unix::fs::symlink(target(150), src.join("long-link")).unwrap();
    std::os::unix::fs::symlink(target(60), src.join("link-60")).unwrap();
    std::os::unix::fs::symlink(target(59), src.join("link-59")).unwrap();
    std::os::unix::fs::symlink("f1", src.join("short-link")).unwrap();
    // Names long enough that 300 entries outgrow even a 64 KiB block.
    for i in 0..300 {
        write(&format!("many/{i:03}-{}", "n".repeat(240)), format!("{i}\n").as_bytes());
    }
    write("d/e/f/deep", b"deep\n");
    write("setuid", b"#!/bin/sh\n");
    mode("setuid", 0o4755);
    std::fs::hard_link(src.join("setuid"), src.join("d/hard")).unwrap();
    write("private", b"secret\n");
    mode("private", 0o600);
    // Ids past 16 bits need the high halves (in the first 128 bytes of the inode too).
    let _ = std::os::unix::fs::chown(src.join("private"), Some(100_000), Some(200_000));
}

/// Every path under `dir` (as the tree spells it: `/a/b`) and where it is.
fn source_paths(dir: &Path, prefix: &[u8], out: &mut BTreeMap<Vec<u8>, PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let mut path = prefix.to_vec();
        path.push(b'/');
        path.extend_from_slice(entry.file_name().as_bytes());
        if entry.file_type().unwrap().is_dir() {
            source_paths(&entry.path(), &path, out);
        }
        out.insert(path, entry.path());
    }
}

/// A file's bytes read through its segments from the tree's sources, holes as zeros.
fn file_bytes(tree: &Tree, c: &Content) -> Vec<u8> {
    c.validate().unwrap();
    let mut buf = vec![0u8; c.size as usize];
    for s in &c.segments {
        let Data::Source { source, offset } = s.data else { panic!("an inline segment") };
        tree.sources().read_exact_at(source, offset, &mut buf[s.offset as usize..(s.offset + s.len) as usize]).unwrap();
    }
    buf
}

/// The tree is the source directory, plus mke2fs's lost+found.
fn compare(tree: &Tree, src: &Path, what: &str) {
    let mut got: BTreeMap<Vec<u8>, InodeId> = BTreeMap::new();
    tree.walk(|path, id, _| {
        got.insert(path.to_vec(), id);
    });
    let root = tree.root();
    assert_eq!((root.meta.uid, root.meta.gid), (0, 0), "{what}: root_owner=0:0");
    got.remove(&b"/"[..]);
    let lost = got.remove(&b"/lost+found"[..]).unwrap_or_else(|| panic!("{what}: no lost+found"));
    assert!(tree.inode(lost).kind.is_dir());
    let mut want = BTreeMap::new();
    source_paths(src, b"", &mut want);
    let names =
        |keys: Vec<&Vec<u8>>| keys.into_iter().map(|k| String::from_utf8_lossy(k).into_owned()).collect::<Vec<_>>();
    assert_eq!(names(got.keys().collect()), names(want.keys().collect()), "{what}: paths");
    // Hard links: one source inode is one tree inode, and the other way round.
    let (mut by_source, mut by_tree) = (HashMap::new(), HashMap::new());
    for (path, &id) in &got {
        let shown = format!("{what}: {}", String::from_utf8_lossy(path));
        let p = &want[path];
        let m = std::fs::symlink_metadata(p).unwrap();
        assert_eq!(*by_source.entry(m.ino()).or_insert(id), id, "{shown}: a hard link to another inode");
        assert_eq!(*by_tree.entry(id).or_insert(m.ino()), m.ino(), "{shown}: linked to an inode it is not");
        let node = tree.inode(id);
        assert_eq!(u32::from(node.meta.perm), m.mode() & 0o7777, "{shown}: mode");
        assert_eq!((node.meta.uid, node.meta.gid), (m.uid(), m.gid()), "{shown}: owner");
        assert_eq!(node.meta.mtime.secs, m.mtime(), "{shown}: mtime");
        match &node.kind {
            Kind::Dir(_) => assert!(m.is_dir(), "{shown}: a directory"),
            Kind::Symlink(target) => {
                assert!(m.file_type().is_symlink(), "{shown}: a symlink");
                assert_eq!(target.as_slice(), std::fs::read_link(p).unwrap().as_os_str().as_bytes(), "{shown}");
            }
            Kind::File(c) => {
                assert!(m.is_file(), "{shown}: a file");
                assert_eq!(c.size, m.len(), "{shown}: size");
                assert!(file_bytes(tree, c) == std::fs::read(p).unwrap(), "{shown}: content");
            }
            k => panic!("{shown}: {k:?}"),
        }
    }
}

/// `Flags:` of a debugfs `stat`.
fn inode_flags(stat: &str) -> u32 {
    let at = stat.find("Flags: 0x").unwrap_or_else(|| panic!("no flags in\n{stat}")) + "Flags: 0x".len();
    let hex: String = stat[at..].chars().take_while(char::is_ascii_hexdigit).collect();
    u32::from_str_radix(&hex, 16).unwrap()
}

/// The data blocks a debugfs `stat` lists (after `BLOCKS:` or `EXTENTS:`) as (logical block,
/// block, count), adjacent ones joined; indirect and index blocks, `(IND)`, `(ETB0)` and the
/// like, left out.
fn debugfs_runs(stat: &str) -> Vec<(u64, u64, u64)> {
    let list: Vec<&str> = stat
        .lines()
        .skip_while(|l| !(l.starts_with("BLOCKS:") || l.starts_with("EXTENTS:")))
        .skip(1)
        .take_while(|l| !l.starts_with("TOTAL"))
        .collect();
    let range = |s: &str| -> Option<(u64, u64)> {
        match s.split_once('-') {
            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
            None => s.parse().ok().map(|a| (a, a)),
        }
    };
    let mut runs: Vec<(u64, u64, u64)> = Vec::new();
    for item in list.join(", ").split(", ").map(str::trim).filter(|s| !s.is_empty()) {
        let (logical, physical) = item.split_once(':').unwrap_or_else(|| panic!("{item:?} in\n{stat}"));
        let Some((first, last)) = range(logical.trim_start_matches('(').trim_end_matches(')')) else { continue };
        let (at, _) = range(physical.split_whitespace().next().unwrap()).unwrap_or_else(|| panic!("{item:?}"));
        match runs.last_mut() {
            Some((l, p, n)) if *l + *n == first && *p + *n == at => *n += last - first + 1,
            _ => runs.push((first, at, last - first + 1)),
        }
    }
    runs
}

/// A file's segments in blocks: (logical block, block, count).
fn tree_runs(tree: &Tree, path: &str, bs: u64) -> Vec<(u64, u64, u64)> {
    let Kind::File(c) = &tree.inode(tree.lookup(path.as_bytes()).unwrap()).kind else { panic!("{path}: not a file") };
    c.segments
        .iter()
        .map(|s| {
            let Data::Source { offset, .. } = s.data else { panic!("{path}: an inline segment") };
            (s.offset / bs, offset / bs, s.len.div_ceil(bs))
        })
        .collect()
}

/// Each group's inode table as `dumpe2fs` lists them, in group order.
fn dumpe2fs_inode_tables(listing: &str) -> Vec<u64> {
    listing
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Inode table at "))
        .map(|l| l.split('-').next().unwrap().parse().unwrap())
        .collect()
}

/// Each group's free inodes as `dumpe2fs` lists them, in group order.
fn dumpe2fs_free_inodes(listing: &str) -> Vec<u64> {
    listing
        .lines()
        .filter_map(|l| l.split(", ").find_map(|part| part.trim().strip_suffix(" free inodes")))
        .map(|n| n.parse().unwrap())
        .collect()
}

struct Variant {
    args: &'static str,
    size: &'static str,
    /// No extent feature: every file maps its blocks ext2's way.
    block_mapped: bool,
    /// Then `e2fsck -fyD`, which indexes the directories (htree) that mke2fs left linear.
    rehash: bool,
}

const fn variant(args: &'static str, size: &'static str, block_mapped: bool, rehash: bool) -> Variant {
    Variant { args, size, block_mapped, rehash }
}

/// What mke2fs makes. Files under 512 MiB get 1 KiB blocks unless told otherwise (mke2fs.conf's
/// "small" type); `-O ^extent` needs `^64bit` too (mke2fs refuses 64bit without extents).
/// meta_bg needs more groups than one block of descriptors describes (16 of 64 bytes or 32 of
/// 32 bytes, 8 MiB each with 1 KiB blocks): 300 MiB is 38 groups, and 16 inodes a group
/// (`-N 600`) spread the source's inodes into the later meta groups, whose descriptors are
/// elsewhere.
const VARIANTS: [Variant; 16] = [
    variant("-t ext2 -b 1024", "64M", true, false),
    variant("-t ext2 -b 4096", "64M", true, true),
    variant("-t ext3 -b 1024", "64M", true, true),
    variant("-t ext3 -b 2048", "64M", true, false),
    variant("-t ext3 -I 128", "64M", true, false),
    variant("-t ext4 -O ^extent,^64bit -b 1024", "64M", true, true),
    variant("-t ext4 -O ^extent,^64bit -b 4096", "64M", true, false),
    variant("-t ext2 -b 65536", "64M", true, true),
    variant("-t ext4 -b 65536", "64M", false, true),
    variant("-t ext4 -O meta_bg,^resize_inode -N 600", "300M", false, false),
    variant("-t ext4 -O 64bit,meta_bg,^resize_inode -b 1024 -N 600", "300M", false, true),
    variant("-t ext4 -O meta_bg,^resize_inode,^sparse_super -b 1024 -N 600", "300M", false, false),
    // 32-byte descriptors: meta groups of 32 groups, and 8 inodes a group to reach past them.
    variant("-t ext2 -O meta_bg,^resize_inode -b 1024 -I 128 -N 600", "600M", true, false),
    // bigalloc: block 0 of a 1 KiB file system stays the boot block though s_first_data_block
    // is 0; groups of 2 KiB clusters are 16 MiB, so meta groups need 600 MiB.
    variant("-t ext4 -O bigalloc -b 1024 -C 2048", "64M", false, false),
    variant("-t ext4 -O bigalloc,meta_bg,^resize_inode -b 1024 -C 2048 -N 600", "600M", false, false),
    variant("-t ext4", "64M", false, false),
];

#[test]
fn every_layout_mke2fs_makes_reads_back_as_the_source_directory() {
    let Some(e2) = E2fs::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    source_tree(&src);
    let img = dir.path().join("fs.img");
    for v in &VARIANTS {
        let what = v.args;
        let _ = std::fs::remove_file(&img);
        let mut mke2fs = Command::new(&e2.mke2fs);
        mke2fs.args(["-q", "-F", "-E", "root_owner=0:0", "-d"]).arg(&src).args(v.args.split(' '));
        stdout(mke2fs.arg(&img).arg(v.size));
        e2.clean(&img, what);
        if v.rehash {
            let status = Command::new(&e2.e2fsck).arg("-fyD").arg(&img).output().unwrap().status;
            assert!(matches!(status.code(), Some(0 | 1)), "{what}: e2fsck -fyD: {status}");
            e2.clean(&img, what);
            let many = e2.debugfs(&img, "stat /many");
            assert!(inode_flags(&many) & inode::INDEX_FL != 0, "{what}: /many has no htree index:\n{many}");
        }

        // What the file system is: the extent feature and flag, or neither.
        let header = stdout(Command::new(&e2.dumpe2fs).arg("-h").arg(&img));
        let features = header.lines().find(|l| l.starts_with("Filesystem features:")).unwrap();
        assert_eq!(features.split_whitespace().any(|f| f == "extent"), !v.block_mapped, "{what}: {features}");
        let big = e2.debugfs(&img, "stat /big");
        assert_eq!(inode_flags(&big) & inode::EXTENTS_FL == 0, v.block_mapped, "{what}: /big\n{big}");

        // Every group's descriptor is found: its inode table is where dumpe2fs says.
        let r = Reader::open(FileDevice::open(&img).unwrap(), 0).unwrap();
        let listing = stdout(Command::new(&e2.dumpe2fs).arg(&img));
        assert_eq!(r.tables, dumpe2fs_inode_tables(&listing), "{what}: inode tables");
        let bs = r.sb.block_size;
        if v.args.contains("meta_bg") {
            // Files live in groups past the first meta group, whose descriptors are elsewhere.
            let first_outside = (bs / r.sb.desc_size) as usize;
            let free = dumpe2fs_free_inodes(&listing);
            let ipg = u64::from(r.sb.inodes_per_group);
            assert!((first_outside..free.len()).any(|g| free[g] < ipg), "{what}: free inodes by group {free:?}");
        }

        let tree = read_tree_from(FileDevice::open(&img).unwrap(), 0).unwrap_or_else(|e| panic!("{what}: {e}"));
        compare(&tree, &src, what);

        // Each file's blocks are where debugfs finds them, adjacent ones one segment.
        for path in ["/big", "/hole", "/far", "/f70000", "/f4096"] {
            let stat = e2.debugfs(&img, &format!("stat {path}"));
            assert_eq!(tree_runs(&tree, path, bs), debugfs_runs(&stat), "{what}: {path}\n{stat}");
        }
        let runs = tree_runs(&tree, "/big", bs).len() as u64;
        assert!(runs * 10 < (5 << 20) / bs, "{what}: /big in {runs} segments");
        // The walk went as deep as the test says: double indirect for /big up to 4 KiB
        // blocks, triple for /far with 1 KiB blocks.
        if v.block_mapped && bs <= 4096 {
            assert!(big.contains("(DIND)"), "{what}: /big\n{big}");
        }
        if v.block_mapped && bs == 1024 {
            let far = e2.debugfs(&img, "stat /far");
            assert!(far.contains("(TIND)"), "{what}: /far\n{far}");
        }
    }
}

/// Whether a symlink's target is in i_block is the kernel's question of whether the inode
/// owns blocks, not of the target's length: a 10-byte target in a block is read from the
/// block, and a "fast" target longer than i_block holds is malformed.
#[test]
fn a_symlink_is_fast_when_it_owns_no_block_whatever_its_length() {
    let Some(e2) = E2fs::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let target = "0123456789".repeat(10);
    std::os::unix::fs::symlink(&target, src.join("slow")).unwrap();
    std::os::unix::fs::symlink("short", src.join("fast")).unwrap();
    let img = dir.path().join("fs.img");
    stdout(Command::new(&e2.mke2fs).args(["-q", "-F", "-t", "ext2", "-b", "1024", "-d"]).arg(&src).arg(&img).arg("8M"));
    e2.clean(&img, "ext2");
    let good = std::fs::read(&img).unwrap();
    let r = Reader::open(FileDevice::open(&img).unwrap(), 0).unwrap();
    let inode_at = |path: &str| {
        let stat = e2.debugfs(&img, &format!("stat /{path}"));
        let ino = stat.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{stat}"));
        r.inode_offset(ino).unwrap() as usize
    };
    let (slow, fast) = (inode_at("slow"), inode_at("fast"));

    let mut short_slow = good.clone();
    inode::SIZE_LO.put(&mut short_slow[slow..], 10);
    std::fs::write(&img, &short_slow).unwrap();
    let tree = read_tree(&img, 0).unwrap();
    assert_eq!(tree.inode(tree.lookup(b"/slow").unwrap()).kind, Kind::Symlink(target[..10].into()));
    assert_eq!(tree.inode(tree.lookup(b"/fast").unwrap()).kind, Kind::Symlink(b"short".to_vec()));

    let mut long_fast = good;
    inode::SIZE_LO.put(&mut long_fast[fast..], 70);
    std::fs::write(&img, &long_fast).unwrap();
    match read_tree(&img, 0) {
        Err(ReadError::Malformed(what)) => assert!(what.contains("fast symlink of 70 bytes"), "{what}"),
        other => panic!("expected Malformed, got {other:?}"),
    }
}

/// An image in memory, so that hundreds of damaged copies cost no file writes.
#[derive(Debug)]
struct Memory(Vec<u8>);

impl Device for Memory {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let from = usize::try_from(offset).ok().filter(|&o| o <= self.0.len());
        let src = from.and_then(|o| self.0[o..].get(..buf.len())).ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn name(&self) -> String {
        "memory".into()
    }
}

/// Every block a debugfs `stat` lists, indirect ones (`(IND)`, `(DIND)`, ...) included.
fn listed_blocks(stat: &str) -> Vec<u64> {
    let list = stat.lines().skip_while(|l| !l.starts_with("BLOCKS:")).nth(1).unwrap_or("");
    let mut blocks = Vec::new();
    for item in list.split(", ") {
        let Some((_, physical)) = item.trim().split_once(':') else { continue };
        let (first, last) = physical.split_once('-').unwrap_or((physical, physical));
        blocks.extend(first.parse::<u64>().unwrap()..=last.parse::<u64>().unwrap());
    }
    blocks
}

/// Damaged block-mapped file systems (bytes changed in the descriptors, inodes, indirect
/// blocks and directories; indirect blocks made to point at each other, at themselves and past
/// the end) give an error or a tree, never a panic, a hang or a huge allocation.
#[test]
fn a_damaged_block_mapped_file_system_is_an_error_or_a_tree_never_a_panic() {
    let Some(e2) = E2fs::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("dir")).unwrap();
    // 300 KiB: past 12 + 256 blocks, so it has a double indirect block.
    std::fs::write(src.join("file"), pattern(1, 300 << 10)).unwrap();
    for i in 0..60 {
        std::fs::write(src.join(format!("dir/entry-{i:02}")), pattern(i, i as usize * 100)).unwrap();
    }
    std::os::unix::fs::symlink("x".repeat(100), src.join("slow")).unwrap();
    let img = dir.path().join("fs.img");
    stdout(Command::new(&e2.mke2fs).args(["-q", "-F", "-t", "ext2", "-b", "1024", "-d"]).arg(&src).arg(&img).arg("2M"));
    e2.clean(&img, "ext2");
    let good = std::fs::read(&img).unwrap();
    assert!(read_tree_from(Arc::new(Memory(good.clone())), 0).is_ok());

    // Where the metadata is: superblock and descriptors, the used part of the inode table,
    // the file's indirect blocks, the directories' and the symlink's blocks.
    let r = Reader::open(Arc::new(Memory(good.clone())), 0).unwrap();
    let file = e2.debugfs(&img, "stat /file");
    let indirect: Vec<u64> = ["(IND):", "(DIND):"]
        .iter()
        .map(|label| {
            let at = file.find(label).unwrap_or_else(|| panic!("no {label} in\n{file}")) + label.len();
            file[at..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
        })
        .collect();
    let mut regions: Vec<(u64, u64)> = vec![(1024, 2048), (r.tables[0] * 1024, 80 * r.sb.inode_size)];
    regions.extend(indirect.iter().map(|&b| (b * 1024, 1024)));
    for path in ["/", "/dir", "/slow"] {
        regions.extend(listed_blocks(&e2.debugfs(&img, &format!("stat {path}"))).into_iter().map(|b| (b * 1024, 1024)));
    }

    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut trees, mut errors) = (0, 0);
    for round in 0..1000 {
        let mut bad = good.clone();
        for _ in 0..1 + next() % 8 {
            let (start, len) = regions[(next() % regions.len() as u64) as usize];
            let at = (start + next() % len) as usize;
            bad[at] = next() as u8;
        }
        // A pointer in an indirect block at another indirect block (a loop), or far away.
        if round % 2 == 0 {
            let b = indirect[(next() % 2) as usize];
            let at = (b * 1024 + next() % 256 * 4) as usize;
            let to = [indirect[0], indirect[1], u32::MAX.into(), next() % 4096][(next() % 4) as usize];
            bad[at..at + 4].copy_from_slice(&(to as u32).to_le_bytes());
        }
        match read_tree_from(Arc::new(Memory(bad)), 0) {
            Ok(_) => trees += 1,
            Err(_) => errors += 1,
        }
    }
    // Most damage is noticed, some is not (a changed byte of file data or of a timestamp).
    assert!(errors > 50 && trees > 50, "{trees} trees, {errors} errors");
}
