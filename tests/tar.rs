//! The tar reader, judged by GNU tar: archives GNU tar writes from a real directory must read
//! back as exactly that directory (kinds, modes, ids, nanosecond times, xattrs, hard links,
//! sparse files, long names).

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use kiln::formats::tar::{read_tar, TarOptions};
use kiln::formats::tree::{Kind, Tree};

use crate::common::{run_ok, tempdir, tool};

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let rc = unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(rc, 0, "setxattr {name} on {}", path.display());
}

fn content_of(tree: &Tree, path: &str) -> Vec<u8> {
    let id = tree.lookup(path.as_bytes()).unwrap();
    let Kind::File(c) = &tree.inode(id).kind else { panic!("{path} is not a file") };
    let mut buf = vec![0u8; c.size as usize];
    tree.read_content(c, 0, &mut buf).unwrap();
    buf
}

#[test]
fn gnu_tar_archive_reads_back_as_the_directory() {
    let Some(tar) = tool("tar") else { return };
    let tmp = tempdir();
    let src = tmp.path().join("src");
    let deep = src.join("d".repeat(100)).join("e".repeat(120)).join("f".repeat(90));
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(src.join("hello"), b"hello world\n").unwrap();
    std::fs::write(deep.join("g".repeat(200)), b"deep").unwrap();
    std::fs::set_permissions(src.join("hello"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::fs::hard_link(src.join("hello"), src.join("hello-link")).unwrap();
    std::os::unix::fs::symlink("hello", src.join("sym")).unwrap();
    run_ok(Command::new("mkfifo").arg(src.join("fifo")));
    // A sparse file: 1 MiB hole, 4 KiB of data, 3 MiB hole at the end.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(src.join("sparse")).unwrap();
        f.write_all_at(&[0xab; 4096], 1 << 20).unwrap();
        f.set_len(4 << 20).unwrap();
    }
    set_xattr(&src.join("hello"), "user.kiln", b"value\0with nul");
    run_ok(Command::new("touch").args(["-h", "-d", "1969-07-20 20:17:40.123456789 UTC"]).arg(src.join("sym")));
    run_ok(Command::new("touch").args(["-d", "2100-01-01 00:00:00.5 UTC"]).arg(src.join("hello")));

    let archive = tmp.path().join("a.tar");
    run_ok(
        Command::new(tar)
            .args(["--format=pax", "--xattrs", "--xattrs-include=*", "--sparse", "--numeric-owner"])
            .args(["--owner=70000", "--group=80000"])
            .arg("-cf")
            .arg(&archive)
            .arg("-C")
            .arg(&src)
            .arg("."),
    );
    let tree = read_tar(&archive, &TarOptions { spool_dir: Some(tmp.path().to_path_buf()) }).unwrap();

    let hello = tree.lookup(b"hello").unwrap();
    assert_eq!(tree.lookup(b"/hello-link").unwrap(), hello, "hard link shares the inode");
    assert_eq!(tree.nlink(hello), 2);
    let m = &tree.inode(hello).meta;
    assert_eq!(m.perm, 0o4755);
    assert_eq!((m.uid, m.gid), (70000, 80000));
    assert_eq!(m.mtime.secs, 4102444800);
    assert_eq!(m.mtime.nanos, 500_000_000);
    assert_eq!(m.xattrs.get(&b"user.kiln"[..]).map(|v| v.as_slice()), Some(&b"value\0with nul"[..]));
    assert_eq!(content_of(&tree, "hello"), b"hello world\n");

    let sym = tree.lookup(b"sym").unwrap();
    assert_eq!(tree.inode(sym).kind, Kind::Symlink(b"hello".to_vec()));
    let st = std::fs::symlink_metadata(src.join("sym")).unwrap();
    assert_eq!(tree.inode(sym).meta.mtime.secs, st.mtime(), "pre-1970 time");
    assert_eq!(tree.inode(sym).meta.mtime.nanos as i64, st.mtime_nsec());

    assert_eq!(tree.inode(tree.lookup(b"fifo").unwrap()).kind, Kind::Fifo);

    let long = format!("{}/{}/{}/{}", "d".repeat(100), "e".repeat(120), "f".repeat(90), "g".repeat(200));
    assert_eq!(content_of(&tree, &long), b"deep");

    let sparse = content_of(&tree, "sparse");
    let on_disk = std::fs::read(src.join("sparse")).unwrap();
    assert_eq!(sparse.len(), on_disk.len());
    assert!(sparse == on_disk, "sparse file content differs");
    let Kind::File(c) = &tree.inode(tree.lookup(b"sparse").unwrap()).kind else { panic!() };
    assert!(c.data_bytes() < 64 * 1024, "holes stayed holes ({} data bytes)", c.data_bytes());

    // Every path GNU tar lists is in the tree, and nothing else.
    let listed = String::from_utf8(run_ok(Command::new("tar").arg("-tf").arg(&archive)).stdout).unwrap();
    let mut want: Vec<String> = listed
        .lines()
        .map(|l| l.trim_start_matches("./").trim_end_matches('/').to_string())
        .filter(|l| !l.is_empty())
        .collect();
    want.sort();
    let mut got = Vec::new();
    tree.walk(|p, _, _| {
        if p != b"/" {
            got.push(String::from_utf8_lossy(&p[1..]).into_owned())
        }
    });
    got.sort();
    assert_eq!(got, want);
}

#[test]
fn debian_root_reads_with_every_entry_and_exact_contents() {
    let Some(archive) = crate::common::debian_root_tar() else { return };
    let tree = read_tar(&archive, &TarOptions::default()).unwrap();
    let listing = String::from_utf8(run_ok(Command::new("tar").arg("-tvf").arg(&archive)).stdout).unwrap();
    let mut kinds: BTreeMap<char, usize> = BTreeMap::new();
    for l in listing.lines() {
        *kinds.entry(l.chars().next().unwrap()).or_default() += 1;
    }
    let mut got: BTreeMap<char, usize> = BTreeMap::new();
    tree.walk(|p, id, _| {
        if p == b"/" {
            return;
        }
        let c = match &tree.inode(id).kind {
            Kind::Dir(_) => 'd',
            Kind::File(_) => '-',
            Kind::Symlink(_) => 'l',
            Kind::CharDev { .. } => 'c',
            Kind::BlockDev { .. } => 'b',
            Kind::Fifo => 'p',
            Kind::Socket => 's',
        };
        *got.entry(c).or_default() += 1;
    });
    // GNU tar lists hard links as 'h'; they are files in the tree.
    let mut want = kinds.clone();
    if let Some(h) = want.remove(&'h') {
        *want.entry('-').or_default() += h;
    }
    // The root "./" is listed by tar but not walked as an entry.
    *want.get_mut(&'d').unwrap() -= 1;
    assert_eq!(got, want);
    assert!(tree.live_inodes().count() > 10_000);

    // A few contents, byte for byte, against `tar -xO`.
    for path in ["./usr/lib/os-release", "./etc/passwd", "./usr/bin/dpkg"] {
        let want = run_ok(Command::new("tar").arg("-xOf").arg(&archive).arg(path)).stdout;
        let id = tree.resolve(path.as_bytes()).unwrap_or_else(|e| panic!("{path}: {e}"));
        let Kind::File(c) = &tree.inode(id).kind else { panic!("{path}") };
        let mut buf = vec![0; c.size as usize];
        tree.read_content(c, 0, &mut buf).unwrap();
        assert!(buf == want, "{path} differs");
    }
}

mod hostile_archives {
    //! Corrupted and truncated archives end in an error, never a panic or a hang: a mutation
    //! fuzzer over a real GNU tar archive (the cargo-fuzz target in fuzz/ does the same
    //! coverage-guided, with nightly).
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn seed_archive() -> &'static Vec<u8> {
        static A: OnceLock<Vec<u8>> = OnceLock::new();
        A.get_or_init(|| std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/tar/seed.tar")).unwrap())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]
        #[test]
        fn mutated_archives_never_panic(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..12),
            cut in proptest::option::of(any::<prop::sample::Index>()),
        ) {
            let mut bytes = seed_archive().clone();
            for (at, v) in flips {
                let i = at.index(bytes.len());
                bytes[i] = v;
            }
            if let Some(c) = cut {
                let n = c.index(bytes.len());
                bytes.truncate(n);
            }
            let d = tempdir();
            let p = d.path().join("m.tar");
            std::fs::write(&p, &bytes).unwrap();
            if let Ok(tree) = read_tar(&p, &TarOptions { spool_dir: Some(d.path().to_path_buf()) }) {
                // Whatever was accepted must be readable within its own bounds.
                tree.walk(|_, id, _| {
                    if let Kind::File(c) = &tree.inode(id).kind {
                        let mut buf = vec![0u8; c.size.min(1 << 20) as usize];
                        let _ = tree.read_content(c, 0, &mut buf);
                    }
                });
            }
        }
    }
}

/// Bytes a command and everything it started read through system calls (`rchar`), taken from
/// a shell's own /proc/PID/io after it waited for the command: the kernel adds a reaped
/// child's I/O counters to its parent's. Page-cache hits count, so this measures copies, not
/// disk reads.
fn bytes_read_by(args: &[&std::ffi::OsStr], cache: &Path) -> u64 {
    let o = run_ok(
        Command::new("sh")
            .arg("-c")
            .arg("\"$@\" >/dev/null 2>&1 || exit 1; grep '^rchar:' /proc/$$/io")
            .arg("sh")
            .arg(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .env("KILN_CACHE_DIR", cache),
    );
    let text = String::from_utf8(o.stdout).unwrap();
    text.trim().strip_prefix("rchar:").unwrap().trim().parse().unwrap()
}

/// The archive is read once for assembly: headers at their exact size, contents skipped with a
/// seek and read once where the image is written. `kiln mkfs` reads at most 1.2 times the
/// archive (a buffer refilled after every seek read 40 times it). The first `kiln build` from a
/// tarball base reads it once more, whole, for the recipe's hash (`recipe.sha256` covers the
/// base); it remembers that digest in its cache, so the next build reads the archive once.
#[test]
fn the_tarball_is_read_once() {
    let Some(archive) = crate::common::debian_root_tar() else { return };
    let size = std::fs::metadata(&archive).unwrap().len();
    let t = tempdir();
    let (img, cache) = (t.path().join("root.img"), t.path().join("cache"));
    let mkfs = bytes_read_by(
        &[OsStr::new("mkfs"), archive.as_os_str(), img.as_os_str(), OsStr::new("--size"), OsStr::new("3GiB")],
        &cache,
    );
    assert!(mkfs <= size * 12 / 10, "kiln mkfs read {mkfs} bytes of a {size}-byte archive");
    assert!(mkfs >= size / 2, "kiln mkfs read {mkfs} bytes: the contents were not read at all?");
    let recipe = t.path().join("read-once.toml");
    std::fs::write(
        &recipe,
        format!(
            "[image]\nname = \"read-once\"\narch = \"x86_64\"\nbase = {{ tarball = \"{}\" }}\n\n[system]\nnetwork = \"none\"\n",
            archive.display()
        ),
    )
    .unwrap();
    let out = t.path().join("out");
    let build_args = [OsStr::new("build"), recipe.as_os_str(), OsStr::new("--out"), out.as_os_str()];
    let first = bytes_read_by(&build_args, &cache);
    let manifest = t.path().join("out/read-once-x86_64.manifest.json");
    let hash = |m: &Path| kiln::manifest::Manifest::load(m).unwrap().recipe.sha256;
    let first_hash = hash(&manifest);
    assert!(first <= size * 22 / 10, "the first kiln build read {first} bytes of a {size}-byte archive");
    let again = bytes_read_by(&build_args, &cache);
    assert!(again <= size * 12 / 10, "a rebuild read {again} bytes of a {size}-byte archive");
    assert!(again >= size / 2, "a rebuild read {again} bytes: the contents were not read at all?");
    assert_eq!(hash(&manifest), first_hash, "the remembered digest gives the same recipe hash");
}

/// Every entry of a tree as `(path, kind, perm, uid, gid, contents or target)`, for comparing two
/// trees entry by entry.
fn listing(tree: &Tree) -> Vec<(String, String, u16, u32, u32, Vec<u8>)> {
    let mut out = Vec::new();
    tree.walk(|path, id, _| {
        let inode = tree.inode(id);
        let (kind, data) = match &inode.kind {
            Kind::File(c) => {
                let mut buf = vec![0u8; c.size as usize];
                tree.read_content(c, 0, &mut buf).unwrap();
                ("file", buf)
            }
            Kind::Dir(_) => ("dir", Vec::new()),
            Kind::Symlink(t) => ("symlink", t.clone()),
            _ => ("other", Vec::new()),
        };
        let m = &inode.meta;
        out.push((String::from_utf8_lossy(path).into_owned(), kind.to_string(), m.perm, m.uid, m.gid, data));
    });
    out
}

/// A base archive with a delta laid over it (what a service layer changed, archived by GNU tar
/// from the changed paths alone) reads as the whole directory after the change: contents,
/// modes, owners, a file replaced by a symlink, a new directory, and a hard link to a file the
/// delta does not carry.
#[test]
fn a_delta_laid_over_its_base_reads_as_the_whole_changed_tree() {
    let Some(tar) = tool("tar") else { return };
    let tmp = tempdir();
    let root = tmp.path().join("root");
    std::fs::create_dir_all(root.join("etc/app")).unwrap();
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::write(root.join("etc/app/config"), b"old\n").unwrap();
    std::fs::write(root.join("etc/keep"), b"unchanged\n").unwrap();
    std::fs::write(root.join("usr/bin/tool"), b"#!/bin/sh\n").unwrap();
    std::fs::write(root.join("etc/becomes-link"), b"a file first\n").unwrap();
    let pack = |out: &Path, list: Option<&[&str]>| {
        let mut c = Command::new(&tar);
        c.args(["--format=pax", "--numeric-owner", "-C"]).arg(&root).arg("-cf").arg(out);
        match list {
            Some(paths) => c.arg("--no-recursion").args(paths),
            None => c.arg("."),
        };
        run_ok(&mut c);
    };
    let base = tmp.path().join("base.tar");
    pack(&base, None);

    // The layer's changes.
    std::fs::write(root.join("etc/app/config"), b"new, longer contents\n").unwrap();
    std::fs::set_permissions(root.join("etc/app/config"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(root.join("etc/app"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::fs::remove_file(root.join("etc/becomes-link")).unwrap();
    std::os::unix::fs::symlink("keep", root.join("etc/becomes-link")).unwrap();
    std::fs::create_dir_all(root.join("var/lib/svc")).unwrap();
    std::fs::write(root.join("var/lib/svc/state"), b"state\n").unwrap();
    std::fs::hard_link(root.join("usr/bin/tool"), root.join("usr/bin/tool-alias")).unwrap();
    let delta = tmp.path().join("delta.tar");
    let changed = [
        "./etc/app",
        "./etc/app/config",
        "./etc/becomes-link",
        "./var",
        "./var/lib",
        "./var/lib/svc",
        "./var/lib/svc/state",
        "./usr/bin/tool",
        "./usr/bin/tool-alias",
    ];
    pack(&delta, Some(&changed));
    let whole = tmp.path().join("whole.tar");
    pack(&whole, None);

    let opts = TarOptions::default();
    let mut tree = read_tar(&base, &opts).unwrap();
    kiln::formats::tar::overlay_tar(&mut tree, &delta, &opts).unwrap();
    let expected = read_tar(&whole, &opts).unwrap();
    let (got, want) = (listing(&tree), listing(&expected));
    assert_eq!(got.len(), want.len(), "{got:#?}\n{want:#?}");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g, w);
    }
    // The hard link is one inode with two names, as in the directory.
    let a = tree.lookup(b"/usr/bin/tool").unwrap();
    assert_eq!(tree.lookup(b"/usr/bin/tool-alias").unwrap(), a);
    assert_eq!(tree.nlink(a), 2);
    // Without the overlay the base alone differs from the whole tree: the check above can fail.
    assert_ne!(listing(&read_tar(&base, &opts).unwrap()).len(), want.len());
}
