//! The ext4 writer, judged by e2fsprogs and the kernel: every image must be `e2fsck -fn` clean,
//! `debugfs` must read back what was put in, and a read-only loop mount (tests only; kiln never
//! mounts) must show exactly the source tree: kinds, modes, ids, nanosecond times, symlink
//! targets, device numbers, xattrs, hard-link groups and contents.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use kiln::formats::ext4::{self, Ext4Options, SizeSpec};
use kiln::formats::image::{Sink, SparseFile};
use kiln::formats::tree::{Content, Data, Dir, Kind, Meta, OnExisting, Segment, Timestamp, Tree};
use sha2::{Digest, Sha256};

use crate::common::{require_root, run_ok, stdout_of, tempdir, tool, XorShift};

fn meta(perm: u16, uid: u32, gid: u32, secs: i64, nanos: u32) -> Meta {
    Meta::new(perm, uid, gid, Timestamp::new(secs, nanos))
}

fn write_image(tree: &Tree, opts: &Ext4Options, out: &Path) -> ext4::Ext4Plan {
    let plan = ext4::plan(tree, opts).expect("plan");
    let mut f = SparseFile::create(out).unwrap();
    plan.write(tree, &mut f).unwrap();
    f.finish(plan.size_bytes()).unwrap();
    f.persist().unwrap();
    plan
}

fn e2fsck_clean(img: &Path) {
    let Some(e2fsck) = tool("e2fsck") else { return };
    let out = Command::new(e2fsck).arg("-fn").arg(img).output().unwrap();
    assert!(
        out.status.success(),
        "e2fsck -fn found problems ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Mounts read-only for the duration of `f`.
fn with_mount(img: &Path, f: impl FnOnce(&Path)) {
    if !require_root("loop-mounting the image") {
        return;
    }
    let t = tempdir();
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run_ok(Command::new("mount").args(["-o", "loop,ro"]).arg(img).arg(&mnt));
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(mnt.clone());
    f(&mnt);
}

fn get_xattrs(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 65536];
    // SAFETY: valid C string and buffer with its length.
    let n = unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "llistxattr {}", path.display());
    let mut out = BTreeMap::new();
    for name in names[..n as usize].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cn = CString::new(name).unwrap();
        let mut val = vec![0u8; 65536];
        // SAFETY: as above.
        let m = unsafe { libc::lgetxattr(p.as_ptr(), cn.as_ptr(), val.as_mut_ptr().cast(), val.len()) };
        assert!(
            m >= 0,
            "lgetxattr {} {:?}: {}",
            path.display(),
            String::from_utf8_lossy(name),
            std::io::Error::last_os_error()
        );
        out.insert(name.to_vec(), val[..m as usize].to_vec());
    }
    out
}

/// Compares the mounted tree with the source tree, entry by entry.
fn compare_with_mount(tree: &Tree, mnt: &Path, check_xattrs: bool) {
    let mut seen_ino: BTreeMap<u32, u64> = BTreeMap::new();
    let mut count = 0;
    tree.walk(|path, id, _| {
        let rel = std::str::from_utf8(&path[1..]).unwrap();
        let p = if rel.is_empty() { mnt.to_path_buf() } else { mnt.join(rel) };
        let inode = tree.inode(id);
        let st = std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let m = &inode.meta;
        assert_eq!(st.mode() & 0o7777, u32::from(m.perm), "{rel} mode");
        assert_eq!(st.mode() & 0o170000, u32::from(inode.kind.mode_type()), "{rel} type");
        assert_eq!((st.uid(), st.gid()), (m.uid, m.gid), "{rel} owner");
        assert_eq!((st.mtime(), st.mtime_nsec()), (m.mtime.secs, i64::from(m.mtime.nanos)), "{rel} mtime");
        // The root has one more link when the file system adds lost+found the tree lacks.
        let added = rel.is_empty() && tree.lookup(b"lost+found").is_err();
        assert_eq!(st.nlink(), u64::from(tree.nlink(id)) + u64::from(added), "{rel} nlink");
        if let Some(prev) = seen_ino.insert(id.0, st.ino()) {
            assert_eq!(prev, st.ino(), "{rel}: hard links share one inode");
        }
        match &inode.kind {
            Kind::File(c) => {
                let mut want = vec![0u8; c.size as usize];
                tree.read_content(c, 0, &mut want).unwrap();
                let got = std::fs::read(&p).unwrap();
                assert!(got == want, "{rel}: content differs");
            }
            Kind::Symlink(t) => {
                assert_eq!(std::fs::read_link(&p).unwrap().as_os_str().as_bytes(), t.as_slice(), "{rel}")
            }
            Kind::CharDev { major, minor } | Kind::BlockDev { major, minor } => {
                let rdev = st.rdev();
                assert_eq!((libc::major(rdev), libc::minor(rdev)), (*major, *minor), "{rel} device");
            }
            Kind::Fifo => assert!(st.file_type().is_fifo()),
            Kind::Socket => assert!(st.file_type().is_socket()),
            Kind::Dir(_) => {}
        }
        if check_xattrs {
            assert_eq!(get_xattrs(&p), m.xattrs, "{rel} xattrs");
        }
        count += 1;
    });
    // lost+found is the one entry the file system adds.
    let on_disk = walkdir_count(mnt);
    assert_eq!(on_disk, count + usize::from(tree.lookup(b"lost+found").is_err()), "entry count");
}

fn walkdir_count(p: &Path) -> usize {
    let mut n = 1;
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            n += walkdir_count(&e.path());
        } else {
            n += 1;
        }
    }
    n
}

/// Every entry kind and the edge cases e2fsprogs' own tests use.
fn edge_case_tree() -> Tree {
    let mut t = Tree::new(meta(0o755, 0, 0, 1_700_000_000, 0));
    let ins = |t: &mut Tree, p: &str, k: Kind, m: Meta| {
        t.insert(p.as_bytes(), k, m, OnExisting::Error).unwrap();
    };
    ins(&mut t, "dir", Kind::Dir(Dir::default()), meta(0o2775, 70000, 80000, 1_600_000_000, 123_456_789));
    ins(&mut t, "dir/empty-dir", Kind::Dir(Dir::default()), meta(0o1777, 0, 0, 1_600_000_000, 0));
    ins(&mut t, "dir/nested", Kind::Dir(Dir::default()), meta(0o700, 1, 1, 0, 0));
    ins(&mut t, "dir/nested/deeper", Kind::Dir(Dir::default()), meta(0o755, 0, 0, 0, 0));
    ins(&mut t, "empty", Kind::File(Content::empty()), meta(0o644, 0, 0, 1, 1));
    ins(
        &mut t,
        "hello",
        Kind::File(Content::inline(&b"hello, ext4\n"[..])),
        meta(0o4755, 65536, 2_000_000_000, 1_700_000_000, 999_999_999),
    );
    t.link(b"dir/hello-link", b"hello", OnExisting::Error).unwrap();
    t.link(b"dir/nested/hello-link2", b"hello", OnExisting::Error).unwrap();
    let long_name = "n".repeat(255);
    ins(&mut t, &format!("dir/{long_name}"), Kind::File(Content::inline(&b"long"[..])), meta(0o600, 0, 0, 5, 0));
    ins(
        &mut t,
        "before-1970",
        Kind::File(Content::inline(&b"old"[..])),
        meta(0o644, 0, 0, -1_000_000_000, 250_000_000),
    );
    ins(&mut t, "after-2038", Kind::File(Content::inline(&b"new"[..])), meta(0o644, 0, 0, 4_102_444_800, 5));
    ins(&mut t, "fast-symlink", Kind::Symlink(b"hello".to_vec()), meta(0o777, 0, 0, 2, 0));
    ins(&mut t, "slow-symlink", Kind::Symlink(format!("dir/{long_name}").into_bytes()), meta(0o777, 0, 0, 2, 0));
    ins(&mut t, "null", Kind::CharDev { major: 1, minor: 3 }, meta(0o666, 0, 0, 3, 0));
    ins(&mut t, "big-dev", Kind::BlockDev { major: 259, minor: 70000 }, meta(0o660, 0, 6, 3, 0));
    ins(&mut t, "fifo", Kind::Fifo, meta(0o600, 0, 0, 3, 0));
    ins(&mut t, "socket", Kind::Socket, meta(0o755, 0, 0, 3, 0));
    let mut caps = meta(0o755, 0, 0, 4, 0);
    // cap_net_raw+ep, as iputils-ping carries it.
    caps.xattrs
        .insert(b"security.capability".to_vec(), vec![1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    caps.xattrs.insert(b"user.note".to_vec(), b"kiln".to_vec());
    ins(&mut t, "ping", Kind::File(Content::inline(&b"\x7fELF"[..])), caps);
    let mut big = meta(0o644, 0, 0, 4, 0);
    big.xattrs.insert(b"user.big".to_vec(), vec![b'x'; 1500]);
    big.xattrs.insert(b"user.other".to_vec(), vec![b'y'; 300]);
    ins(&mut t, "xattr-block", Kind::File(Content::inline(&b"x"[..])), big);
    // A file with holes at odd offsets.
    let seg =
        |off: u64, bytes: &[u8]| Segment { offset: off, len: bytes.len() as u64, data: Data::Inline(Arc::from(bytes)) };
    let holes = Content {
        size: 10_000_000,
        segments: vec![seg(4097, b"abc"), seg(5_000_000, &[7u8; 9000]), seg(9_999_999, b"z")],
    };
    ins(&mut t, "holes", Kind::File(holes), meta(0o644, 0, 0, 4, 0));
    t
}

fn opts(seed: &str) -> Ext4Options {
    let mut o = Ext4Options::with_seed(seed.as_bytes());
    o.label = "kiln-test".into();
    o.timestamp = 1_700_000_000;
    o
}

#[test]
fn every_entry_kind_is_clean_and_reads_back() {
    let t = tempdir();
    let tree = edge_case_tree();
    let img = t.path().join("edge.img");
    write_image(&tree, &opts("edge"), &img);
    e2fsck_clean(&img);
    // debugfs, an independent reader, on a few fields the mount cannot show directly.
    if let Some(debugfs) = tool("debugfs") {
        let stat = stdout_of(Command::new(&debugfs).arg("-R").arg("stat /hello").arg(&img));
        assert!(stat.contains("User: 65536") && stat.contains("Group: 2000000000"), "{stat}");
        assert!(stat.contains("Links: 3"), "{stat}");
        let ea = stdout_of(Command::new(&debugfs).arg("-R").arg("ea_list /ping").arg(&img));
        assert!(ea.contains("user.note") && ea.contains("security.capability"), "{ea}");
        let cat = stdout_of(Command::new(&debugfs).arg("-R").arg("cat /dir/hello-link").arg(&img));
        assert_eq!(cat, "hello, ext4\n");
        let label = stdout_of(Command::new("blkid").args(["-o", "value", "-s", "LABEL"]).arg(&img));
        assert_eq!(label.trim(), "kiln-test");
    }
    with_mount(&img, |mnt| compare_with_mount(&tree, mnt, true));
    // kiln's reader gives back what the kernel sees (extended attributes are not read back).
    let back = ext4::read_tree(&img, 0).unwrap();
    with_mount(&img, |mnt| compare_with_mount(&back, mnt, false));
}

/// A file system made by e2fsprogs (`mke2fs -d`, its defaults: another allocator, htree
/// directories, fast and slow symlinks, hard links, holes) reads back as the kernel sees it.
#[test]
fn the_reader_reads_what_mke2fs_wrote() {
    let Some(mke2fs) = tool("mke2fs") else { return };
    let t = tempdir();
    let src = t.path().join("src");
    std::fs::create_dir_all(src.join("etc/many")).unwrap();
    for i in 0..3000 {
        std::fs::write(src.join(format!("etc/many/file-{i:05}")), format!("{i}\n")).unwrap();
    }
    let random = XorShift(0x9e37_79b9_7f4a_7c15).bytes(3_000_000);
    std::fs::write(src.join("random.bin"), &random).unwrap();
    let sparse = std::fs::File::create(src.join("sparse")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"start", 0).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"middle", 6_000_000).unwrap();
    sparse.set_len(20_000_000).unwrap();
    std::fs::write(src.join("setuid"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(src.join("setuid"), std::os::unix::fs::PermissionsExt::from_mode(0o4755)).unwrap();
    std::fs::hard_link(src.join("setuid"), src.join("etc/hardlink")).unwrap();
    std::os::unix::fs::symlink("../random.bin", src.join("etc/fast")).unwrap();
    std::os::unix::fs::symlink("x".repeat(200), src.join("etc/slow")).unwrap();
    let fifo = CString::new(src.join("fifo").as_os_str().as_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let img = t.path().join("mke2fs.img");
    run_ok(Command::new(mke2fs).args(["-q", "-F", "-t", "ext4", "-d"]).arg(&src).arg(&img).arg("64M"));
    let tree = ext4::read_tree(&img, 0).unwrap();
    assert!(tree.lookup(b"/etc/many/file-02999").is_ok());
    let c = match &tree.inode(tree.lookup(b"/random.bin").unwrap()).kind {
        Kind::File(c) => c.clone(),
        k => panic!("{k:?}"),
    };
    let mut got = vec![0u8; c.size as usize];
    tree.read_content(&c, 0, &mut got).unwrap();
    assert!(got == random, "random.bin reads back");
    with_mount(&img, |mnt| compare_with_mount(&tree, mnt, false));
}

/// Damaged file systems (bytes flipped all over the metadata) give an error or a tree, never
/// a panic, a hang or an allocation the size of a corrupt length.
#[test]
fn the_reader_survives_corrupt_metadata() {
    let Some(mke2fs) = tool("mke2fs") else { return };
    let t = tempdir();
    let src = t.path().join("src");
    std::fs::create_dir_all(src.join("a/b")).unwrap();
    for i in 0..200 {
        std::fs::write(src.join(format!("a/b/f{i}")), vec![b'k'; i * 97]).unwrap();
    }
    std::os::unix::fs::symlink("a/b/f1", src.join("link")).unwrap();
    let img = t.path().join("good.img");
    run_ok(Command::new(mke2fs).args(["-q", "-F", "-t", "ext4", "-d"]).arg(&src).arg(&img).arg("8M"));
    let good = std::fs::read(&img).unwrap();
    // Metadata lives in the first 1.5 MiB of so small a file system (superblock, group
    // descriptors, bitmaps, inode table, directories); flip bytes there.
    let span = good.len().min(1_536 << 10);
    let bad = t.path().join("bad.img");
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let mut next = || rng.next_u64();
    let (mut ok, mut err) = (0, 0);
    for _ in 0..300 {
        let mut img = good.clone();
        for _ in 0..(1 + next() % 64) {
            let at = (next() % span as u64) as usize;
            img[at] = next() as u8;
        }
        std::fs::write(&bad, &img).unwrap();
        match ext4::read_tree(&bad, 0) {
            Ok(_) => ok += 1,
            Err(_) => err += 1,
        }
    }
    assert_eq!(ok + err, 300);
    assert!(ext4::read_tree(&img, 0).is_ok());
    assert!(ext4::read_tree(&img, 4096).is_err(), "no superblock there");
}

#[test]
fn same_tree_and_seed_give_identical_bytes() {
    let t = tempdir();
    let tree = edge_case_tree();
    let (a, b, c) = (t.path().join("a.img"), t.path().join("b.img"), t.path().join("c.img"));
    write_image(&tree, &opts("same"), &a);
    write_image(&tree, &opts("same"), &b);
    write_image(&tree, &opts("other"), &c);
    let h = |p: &Path| hex::encode(Sha256::digest(std::fs::read(p).unwrap()));
    assert_eq!(h(&a), h(&b));
    assert_ne!(h(&a), h(&c), "the seed reaches the UUID");
}

#[test]
fn a_directory_of_100000_entries_is_hashed_and_every_name_is_found() {
    let t = tempdir();
    let mut tree = Tree::new(meta(0o755, 0, 0, 0, 0));
    tree.insert(b"big", Kind::Dir(Dir::default()), meta(0o755, 0, 0, 0, 0), OnExisting::Error).unwrap();
    for i in 0..100_000u32 {
        let name = format!("big/entry-{i:06}-with-a-longer-name");
        tree.insert(name.as_bytes(), Kind::File(Content::empty()), meta(0o644, 0, 0, 0, 0), OnExisting::Error).unwrap();
    }
    // Names that exercise the hash: longer than one 32-byte round, bytes above 0x7f (where
    // signed and unsigned hashing differ), one byte, 255 bytes.
    tree.insert(b"mixed", Kind::Dir(Dir::default()), meta(0o755, 0, 0, 0, 0), OnExisting::Error).unwrap();
    let mut mixed = Vec::new();
    for i in 0..3000usize {
        let mut name = format!("{i}-").into_bytes();
        name.extend(std::iter::repeat_n("é✓z".as_bytes(), i % 60).flatten());
        name.truncate(255);
        while std::str::from_utf8(&name).is_err() {
            name.pop();
        }
        mixed.push(name);
    }
    mixed.push(b"x".to_vec());
    for name in &mixed {
        let path = [b"mixed/".as_slice(), name].concat();
        tree.insert(&path, Kind::File(Content::empty()), meta(0o644, 0, 0, 0, 0), OnExisting::Error).unwrap();
    }
    let img = t.path().join("big.img");
    write_image(&tree, &opts("big"), &img);
    e2fsck_clean(&img);
    if let Some(debugfs) = tool("debugfs") {
        // debugfs reads the index: two levels for 100,000 names, one for 3,001.
        for (dir, levels) in [("/big", 1), ("/mixed", 0)] {
            let out = Command::new(&debugfs).arg("-R").arg(format!("htree_dump {dir}")).arg(&img).output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains(&format!("Indirect levels: {levels}")), "{dir}:\n{}", &text[..text.len().min(2000)]);
            assert!(text.contains("Hash Version: 1"), "{dir}: half_md4");
        }
    }
    with_mount(&img, |mnt| {
        assert_eq!(std::fs::read_dir(mnt.join("big")).unwrap().count(), 100_000);
        // The kernel looks names up through the index: a wrong hash would hide them.
        for i in (0..100_000u32).step_by(997).chain([99_999]) {
            let p = mnt.join(format!("big/entry-{i:06}-with-a-longer-name"));
            assert!(p.is_file(), "{} not found by lookup", p.display());
        }
        use std::os::unix::ffi::OsStrExt;
        for name in &mixed {
            let p = mnt.join("mixed").join(std::ffi::OsStr::from_bytes(name));
            assert!(p.is_file(), "{} not found by lookup", p.display());
        }
    });
}

#[test]
fn large_and_sparse_files_need_extent_index_blocks() {
    let t = tempdir();
    // 600 MiB of data from a source file: more than four 128 MiB extents.
    let src = t.path().join("600m.bin");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src).unwrap());
        let mut block = [0u8; 65536];
        for i in 0..(600u64 << 20) / 65536 {
            block[..8].copy_from_slice(&i.to_le_bytes());
            block[65528..].copy_from_slice(&(!i).to_le_bytes());
            f.write_all(&block).unwrap();
        }
    }
    let mut tree = Tree::new(meta(0o755, 0, 0, 0, 0));
    let s = tree.add_source(&src).unwrap();
    tree.insert(b"600m", Kind::File(Content::from_source(s, 0, 600 << 20)), meta(0o644, 0, 0, 0, 0), OnExisting::Error)
        .unwrap();
    // 2 GiB sparse, data in three places, one past 1 GiB.
    let seg =
        |off: u64, bytes: &[u8]| Segment { offset: off, len: bytes.len() as u64, data: Data::Inline(Arc::from(bytes)) };
    let sparse = Content {
        size: 2 << 30,
        segments: vec![seg(0, b"start"), seg(1 << 30, &[0x5a; 70000]), seg((2 << 30) - 3, b"end")],
    };
    tree.insert(b"sparse-2g", Kind::File(sparse), meta(0o644, 0, 0, 0, 0), OnExisting::Error).unwrap();
    let img = t.path().join("large.img");
    let plan = write_image(&tree, &opts("large"), &img);
    assert!(plan.size_bytes() < 1 << 30, "holes take no space ({} bytes)", plan.size_bytes());
    e2fsck_clean(&img);
    if let Some(debugfs) = tool("debugfs") {
        let ex = stdout_of(Command::new(&debugfs).arg("-R").arg("ex /600m").arg(&img));
        assert!(ex.lines().any(|l| l.trim_start().starts_with("0/ 1")), "expected an index level:\n{ex}");
    }
    with_mount(&img, |mnt| compare_with_mount(&tree, mnt, false));
}

#[test]
fn the_debian_root_is_clean_and_mounts_as_the_tarball() {
    let Some(archive) = crate::common::debian_root_tar() else { return };
    let t = tempdir();
    let img = t.path().join("debian.img");
    let out = crate::common::kiln()
        .arg("mkfs")
        .arg(&archive)
        .arg(&img)
        .args(["--size", "2GiB", "--label", "root"])
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    e2fsck_clean(&img);
    let mut tree = kiln::formats::tar::read_tar(&archive, &Default::default()).unwrap();
    tree.clamp_times(Timestamp::new(1_700_000_000, 0));
    with_mount(&img, |mnt| compare_with_mount(&tree, mnt, true));
}

#[test]
fn too_small_a_size_says_how_much_is_needed() {
    let tree = edge_case_tree();
    let mut o = opts("small");
    o.size = SizeSpec::Bytes(1 << 20);
    let err = ext4::plan(&tree, &o).unwrap_err().to_string();
    assert!(err.starts_with("root needs at least ") && err.contains("the image gives 0.00 GiB"), "{err}");
}

#[test]
fn mkfs_refuses_a_tarball_that_escapes_the_root() {
    let t = tempdir();
    // A hand-made ustar header for "../evil" (GNU tar refuses to write one).
    let mut hdr = [0u8; 512];
    hdr[..7].copy_from_slice(b"../evil");
    hdr[100..108].copy_from_slice(b"0000644\0");
    hdr[108..116].copy_from_slice(b"0000000\0");
    hdr[116..124].copy_from_slice(b"0000000\0");
    hdr[124..136].copy_from_slice(b"00000000000\0");
    hdr[136..148].copy_from_slice(b"00000000000\0");
    hdr[156] = b'0';
    hdr[257..263].copy_from_slice(b"ustar\0");
    hdr[263..265].copy_from_slice(b"00");
    hdr[148..156].copy_from_slice(b"        ");
    let sum: u32 = hdr.iter().map(|&b| u32::from(b)).sum();
    hdr[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    let archive = t.path().join("evil.tar");
    std::fs::write(&archive, [hdr.as_slice(), &[0u8; 1024]].concat()).unwrap();
    let img = t.path().join("evil.img");
    let out = crate::common::kiln().arg("mkfs").arg(&archive).arg(&img).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("escapes the root"), "{err}");
    assert!(!img.exists(), "nothing is left at the output path");
}

mod random_trees {
    //! Random trees (names, kinds, sizes, holes, ids, times, xattrs, hard links) must all be
    //! e2fsck-clean and read back through the kernel exactly.
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Node {
        File { size: u64, hole_at: Option<u64>, seed: u8 },
        Dir(Vec<(String, Node)>),
        Symlink(String),
        Fifo,
        Dev(u32, u32),
    }

    fn name() -> impl Strategy<Value = String> {
        proptest::string::string_regex("[a-zA-Z0-9._-]{1,40}")
            .unwrap()
            .prop_filter("not a dot name", |n| n != "." && n != "..")
    }

    fn node() -> impl Strategy<Value = Node> {
        let leaf = prop_oneof![
            (0u64..300_000, proptest::option::of(0u64..200_000), any::<u8>())
                .prop_map(|(size, hole_at, seed)| Node::File { size, hole_at, seed }),
            "[a-z/]{1,100}".prop_map(Node::Symlink),
            Just(Node::Fifo),
            (0u32..4096, 0u32..1_000_000).prop_map(|(a, b)| Node::Dev(a, b)),
        ];
        leaf.prop_recursive(3, 40, 8, |inner| {
            proptest::collection::btree_map(name(), inner, 0..8).prop_map(|m| Node::Dir(m.into_iter().collect()))
        })
    }

    fn build(t: &mut Tree, path: &str, n: &Node, m: Meta) {
        let kind = match n {
            Node::File { size, hole_at, seed } => {
                let bytes: Vec<u8> = (0..*size).map(|i| (i as u8).wrapping_mul(31).wrapping_add(*seed)).collect();
                let mut segs = vec![];
                match hole_at {
                    Some(h) if *h < *size => {
                        let h = *h as usize;
                        if h > 0 {
                            segs.push(Segment {
                                offset: 0,
                                len: h as u64,
                                data: Data::Inline(Arc::from(&bytes[..h.min(5000)])),
                            });
                            segs[0].len = h.min(5000) as u64;
                        }
                        let tail = (h + 70_000).min(bytes.len());
                        if tail < bytes.len() {
                            segs.push(Segment {
                                offset: tail as u64,
                                len: (bytes.len() - tail) as u64,
                                data: Data::Inline(Arc::from(&bytes[tail..])),
                            });
                        }
                        Kind::File(Content { size: *size, segments: segs })
                    }
                    _ => Kind::File(Content::inline(bytes)),
                }
            }
            Node::Dir(_) => Kind::Dir(Dir::default()),
            Node::Symlink(s) => Kind::Symlink(s.clone().into_bytes()),
            Node::Fifo => Kind::Fifo,
            Node::Dev(a, b) => Kind::CharDev { major: *a, minor: *b },
        };
        t.insert(path.as_bytes(), kind, m.clone(), OnExisting::Error).unwrap();
        if let Node::Dir(children) = n {
            for (i, (cn, c)) in children.iter().enumerate() {
                let mut cm = m.clone();
                cm.xattrs.clear();
                cm.uid = m.uid.wrapping_mul(7).wrapping_add(i as u32) % 3_000_000;
                cm.mtime = Timestamp::new(m.mtime.secs - 86_400 * i as i64 * 400, (i as u32) * 12345);
                // The kernel allows user.* attributes on files and directories only.
                if i % 3 == 0 && matches!(c, Node::File { .. } | Node::Dir(_)) {
                    cm.xattrs.insert(format!("user.k{i}").into_bytes(), vec![i as u8; i * 50]);
                }
                build(t, &format!("{path}/{cn}"), c, cm);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
        #[test]
        fn random_trees_are_clean_and_round_trip(root in proptest::collection::btree_map(name(), node(), 1..10), link in any::<bool>()) {
            let mut t = Tree::new(meta(0o755, 0, 0, 1_700_000_000, 0));
            for (n, node) in &root {
                build(&mut t, n, node, meta(0o640, 1000, 1000, 1_650_000_000, 7));
            }
            if link {
                // Link the first regular file found, if any.
                let mut first = None;
                t.walk(|p, id, _| if first.is_none() && matches!(t.inode(id).kind, Kind::File(_)) { first = Some(p.to_vec()) });
                if let Some(p) = first {
                    t.link(b"extra-hard-link", &p, OnExisting::Error).unwrap();
                }
            }
            let d = tempdir();
            let img = d.path().join("r.img");
            write_image(&t, &opts("prop"), &img);
            e2fsck_clean(&img);
            with_mount(&img, |mnt| compare_with_mount(&t, mnt, true));
        }
    }
}

/// `kiln inspect --audit` on file systems as other tools make them: a piece of this Debian
/// machine's root (its /etc, /usr/sbin and zoneinfo, with a planted private key, SSH host key,
/// setuid file and world-writable file) made by `mke2fs -t ext2`, `-t ext3` and `-t ext4 -O
/// ^extent` with 1 KiB and 64 KiB blocks, as a whole-disk file system. Every variant reads every
/// file (the count equals the source's entries) and finds exactly what the default ext4 of the
/// same tree finds; the block-mapped ones really are block-mapped (no `extent` feature).
#[test]
fn inspect_audits_ext2_ext3_and_block_mapped_ext4_like_default_ext4() {
    let Some(mke2fs) = tool("mke2fs") else { return };
    if !require_root("copying a root tree with its owners") {
        return;
    }
    let t = tempdir();
    let src = t.path().join("root");
    std::fs::create_dir_all(src.join("usr/share")).unwrap();
    for (from, to) in [("/etc", "etc"), ("/usr/sbin", "usr/sbin"), ("/usr/share/zoneinfo", "usr/share/zoneinfo")] {
        run_ok(Command::new("cp").args(["-a", from]).arg(src.join(to)));
    }
    // What the audit must find whatever the host's /etc holds.
    std::fs::create_dir_all(src.join("root/.ssh")).unwrap();
    std::fs::write(src.join("root/.ssh/id_ed25519"), "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n").unwrap();
    std::fs::write(src.join("etc/ssh_host_planted_key"), "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n").unwrap();
    let set_mode = |p: &str, m: u32| {
        std::fs::set_permissions(src.join(p), std::os::unix::fs::PermissionsExt::from_mode(m)).unwrap()
    };
    std::fs::write(src.join("usr/sbin/planted-setuid"), b"#!/bin/sh\n").unwrap();
    set_mode("usr/sbin/planted-setuid", 0o4755);
    std::fs::write(src.join("etc/planted-world-writable"), b"x\n").unwrap();
    set_mode("etc/planted-world-writable", 0o666);
    let entries = walkdir_count(&src);

    let audit = |args: &[&str], name: &str| -> serde_json::Value {
        let img = t.path().join(format!("{name}.img"));
        run_ok(
            Command::new(&mke2fs)
                .args(["-q", "-F", "-E", "root_owner=0:0"])
                .args(args)
                .arg("-d")
                .arg(&src)
                .arg(&img)
                .arg("256M"),
        );
        e2fsck_clean(&img);
        let o = crate::common::kiln().args(["inspect", "--audit", "--json"]).arg(&img).output().unwrap();
        assert_eq!(o.status.code(), Some(1), "{name}: findings exit 1\n{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["table"], "none", "{name}: a file system on the whole disk");
        v["partitions"][0]["filesystem"].clone()
    };
    let reference = audit(&["-t", "ext4"], "ext4");
    let files = reference["audit"]["files"].as_u64().unwrap();
    // The root directory plus every entry under it (lost+found is the file system's own).
    assert_eq!(files, entries as u64 + 1, "{reference}");
    let findings = reference["audit"]["findings"].clone();
    let found: Vec<&str> = findings.as_array().unwrap().iter().filter_map(|f| f["path"].as_str()).collect();
    for planted in [
        "/root/.ssh/id_ed25519",
        "/etc/ssh_host_planted_key",
        "/usr/sbin/planted-setuid",
        "/etc/planted-world-writable",
    ] {
        assert!(found.contains(&planted), "{planted} not found: {findings}");
    }
    for (args, name, version, block_size) in [
        (&["-t", "ext2", "-b", "1024"][..], "ext2-1k", "ext2", 1024),
        (&["-t", "ext3", "-b", "1024"][..], "ext3-1k", "ext3", 1024),
        (&["-t", "ext4", "-O", "^extent,^64bit", "-b", "1024"][..], "ext4-noextent-1k", "ext4", 1024),
        (&["-t", "ext2", "-b", "65536"][..], "ext2-64k", "ext2", 65536),
        (&["-t", "ext3", "-b", "65536"][..], "ext3-64k", "ext3", 65536),
        (&["-t", "ext4", "-O", "^extent,^64bit", "-b", "65536"][..], "ext4-noextent-64k", "ext4", 65536),
        (&["-t", "ext4", "-O", "64bit,meta_bg,^resize_inode", "-b", "4096"][..], "ext4-meta-bg", "ext4", 4096),
    ] {
        let fs = audit(args, name);
        assert_eq!(
            (fs["version"].as_str(), fs["block_size"].as_u64()),
            (Some(version), Some(block_size)),
            "{name}: {fs}"
        );
        let features: Vec<&str> = fs["features"].as_array().unwrap().iter().filter_map(|f| f.as_str()).collect();
        assert_eq!(features.contains(&"extent"), name == "ext4-meta-bg", "{name}: {features:?}");
        assert_eq!(fs["audit"]["files"].as_u64(), Some(files), "{name}: every file read");
        assert_eq!(fs["audit"]["findings"], findings, "{name}: the same findings as default ext4");
    }
}
