//! Disk assembly without mmdebstrap: a small synthetic root tree (kernel, initrd, systemd-boot
//! stand-ins) goes through `disk::esp_files`, `disk::plan` and `disk::write` into a sparse file
//! alongside the SHA-256 and per-block digest sinks, and the result is judged by sgdisk, sfdisk,
//! fsck.fat, mtools, blkid, e2fsck, sha256sum, dd and du — never by kiln's own readers.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln::disk::{self, BootSetup, DiskIds, DiskPlan, DiskSpec};
use kiln::formats::ext4::Ext4Options;
use kiln::formats::image::BlockMap;
use kiln::formats::image::{BlockDigests, Sha256Sink, Sink, SparseFile, Tee};
use kiln::formats::tree::{Content, Dir, Kind, Meta, OnExisting, Timestamp, Tree};
use kiln::manifest::EBS_BLOCK_SIZE;
use kiln::platform::{Arch, BootMode};
use serde_json::Value;

use crate::common::{run_ok, stdout_of, tempdir, tool};

const EPOCH: i64 = 1_700_000_000;

/// Bytes that are not all zeros and not repetitive, so a misplaced block shows.
fn pseudo(len: usize, salt: u8) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9 ^ salt as u32;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn root_tree(arch: Arch) -> Tree {
    let meta = Meta::new(0o755, 0, 0, Timestamp::new(EPOCH, 0));
    let mut t = Tree::new(meta.clone());
    let file = |t: &mut Tree, path: &str, bytes: Vec<u8>| {
        t.create_parents(path.as_bytes(), &meta).unwrap();
        t.insert(path.as_bytes(), Kind::File(Content::inline(bytes)), meta.clone(), OnExisting::Error).unwrap();
    };
    // Two kernels: the ESP must get the newer one (6.1.0-28 sorts after 6.1.0-9 numerically).
    file(&mut t, "/boot/vmlinuz-6.1.0-9-cloud-amd64", pseudo(100_000, 1));
    file(&mut t, "/boot/initrd.img-6.1.0-9-cloud-amd64", pseudo(100_000, 2));
    file(&mut t, "/boot/vmlinuz-6.1.0-28-cloud-amd64", pseudo(3_000_000, 3));
    file(&mut t, "/boot/initrd.img-6.1.0-28-cloud-amd64", pseudo(5_000_000, 4));
    file(&mut t, &format!("/{}", arch.systemd_boot_efi()), pseudo(120_000, 5));
    file(&mut t, "/etc/hostname", b"kiln\n".to_vec());
    t.create_parents(b"/var/lib/empty", &meta).unwrap();
    t.insert(b"/var/lib/empty", Kind::Dir(Dir::default()), meta.clone(), OnExisting::Error).unwrap();
    t
}

struct Built {
    _dir: tempfile::TempDir,
    image: PathBuf,
    plan: DiskPlan,
    ids: DiskIds,
    sha256: String,
    blocks: BlockMap,
}

fn build(seed: &[u8], arch: Arch, size: Option<u64>) -> Built {
    let tree = root_tree(arch);
    let ids = DiskIds::derive(seed);
    let boot = BootSetup { arch, mode: BootMode::Uefi, cmdline: vec!["quiet".into()] };
    let esp = disk::esp_files(&tree, &ids, &boot).expect("esp files");
    let spec = DiskSpec { size, esp_size_bytes: 64 << 20, boot, timestamp: EPOCH, bios_boot: None };
    let mut root_opts = Ext4Options::with_seed(&ids.root_fs_seed);
    root_opts.timestamp = EPOCH;
    let plan = disk::plan(&spec, &ids, &esp, &tree, root_opts).expect("plan");
    let dir = tempdir();
    let image = dir.path().join("disk.raw");
    let mut file = SparseFile::create(&image).unwrap();
    let mut sha = Sha256Sink::new();
    let mut blocks = BlockDigests::new(EBS_BLOCK_SIZE);
    {
        let mut tee = Tee(vec![&mut file as &mut dyn Sink, &mut sha, &mut blocks]);
        disk::write(&plan, &tree, &mut tee).expect("write");
    }
    file.persist().unwrap();
    Built { _dir: dir, image, plan, ids, sha256: sha.hex(), blocks: blocks.into_block_map() }
}

/// Copies `len` bytes at `offset` out of `image` with dd (byte-granular via iflag; sparse, since
/// the root partition is mostly zeros and test machines are short of disk).
fn dd(image: &Path, offset: u64, len: u64, dest: &Path) {
    run_ok(
        Command::new("dd")
            .arg(format!("if={}", image.display()))
            .arg(format!("of={}", dest.display()))
            .arg("bs=1M")
            .arg(format!("skip={offset}"))
            .arg(format!("count={len}"))
            .args(["iflag=skip_bytes,count_bytes", "conv=sparse", "status=none"]),
    );
}

fn sha256sum(path: &Path) -> String {
    stdout_of(Command::new("sha256sum").arg(path)).split_whitespace().next().unwrap().to_string()
}

#[test]
fn partition_table_is_valid_and_matches_the_plan() {
    let b = build(b"disk-test", Arch::X86_64, None);
    let size = std::fs::metadata(&b.image).unwrap().len();
    assert_eq!(size, b.plan.size_bytes());
    assert_eq!(size % (1 << 30), 0, "auto size is whole GiB: {size}");

    let Some(sgdisk) = tool("sgdisk") else { return };
    let v = stdout_of(Command::new(&sgdisk).arg("-v").arg(&b.image));
    assert!(v.contains("No problems found"), "sgdisk -v:\n{v}");

    let Some(sfdisk) = tool("sfdisk") else { return };
    let j: Value = serde_json::from_str(&stdout_of(Command::new(&sfdisk).arg("--json").arg(&b.image))).unwrap();
    let pt = &j["partitiontable"];
    assert_eq!(pt["label"], "gpt");
    assert_eq!(pt["sectorsize"], 512);
    assert_eq!(
        pt["id"].as_str().unwrap().to_uppercase(),
        uuid::Uuid::from_bytes(b.ids.disk_guid).to_string().to_uppercase()
    );
    let parts = pt["partitions"].as_array().unwrap();
    let planned = b.plan.partitions();
    assert_eq!(parts.len(), planned.len());
    assert_eq!(planned.len(), 2, "UEFI: ESP and root only");
    for (got, want) in parts.iter().zip(&planned) {
        assert_eq!(got["start"].as_u64().unwrap(), want.first_lba, "{want:?}");
        assert_eq!(got["size"].as_u64().unwrap(), want.last_lba - want.first_lba + 1, "{want:?}");
        assert_eq!(got["type"].as_str().unwrap().to_uppercase(), want.type_guid.to_uppercase());
        assert_eq!(got["uuid"].as_str().unwrap().to_uppercase(), want.guid.to_uppercase());
        assert_eq!(got["name"].as_str().unwrap(), want.name);
        // 1 MiB alignment keeps every partition on whole 512 KiB EBS blocks.
        assert_eq!(want.first_lba % 2048, 0, "{want:?}");
    }
    assert_eq!(planned[0].name, "ESP");
    assert_eq!(planned[0].type_guid.to_uppercase(), disk::ESP_TYPE);
    assert_eq!(planned[1].name, "root");
    assert_eq!(planned[1].type_guid.to_uppercase(), Arch::X86_64.root_partition_type());
    assert_eq!(planned[1].guid.to_lowercase(), b.ids.root_partuuid());

    // Protective MBR: one partition of type 0xEE from LBA 1 covering the disk (or 2^32-1).
    let mbr = std::fs::read(&b.image).map(|v| v[..512].to_vec()).unwrap();
    assert_eq!(&mbr[510..], &[0x55, 0xAA]);
    assert_eq!(mbr[446 + 4], 0xEE, "partition type of MBR entry 1");
    assert_eq!(u32::from_le_bytes(mbr[446 + 8..446 + 12].try_into().unwrap()), 1);
    let sectors = u32::from_le_bytes(mbr[446 + 12..446 + 16].try_into().unwrap()) as u64;
    assert_eq!(sectors, (size / 512 - 1).min(u32::MAX as u64));
    for e in 1..4 {
        assert!(mbr[446 + 16 * e..446 + 16 * (e + 1)].iter().all(|&x| x == 0), "MBR entry {} not empty", e + 1);
    }
}

#[test]
fn esp_is_clean_and_holds_the_boot_files() {
    let b = build(b"disk-test", Arch::X86_64, None);
    let esp = &b.plan.partitions()[0];
    let t = tempdir();
    let img = t.path().join("esp.img");
    dd(&b.image, esp.offset_bytes, esp.size_bytes, &img);
    if let Some(fsck) = tool("fsck.fat") {
        run_ok(Command::new(fsck).arg("-n").arg(&img));
    }
    if let Some(blkid) = tool("blkid") {
        let out = stdout_of(Command::new(blkid).args(["-p", "-o", "value", "-s", "UUID"]).arg(&img));
        assert_eq!(out.trim(), b.ids.esp_fs_uuid());
        let fs = stdout_of(Command::new("blkid").args(["-p", "-o", "value", "-s", "TYPE"]).arg(&img));
        assert_eq!(fs.trim(), "vfat");
    }
    let (Some(mdir), Some(mtype), Some(mcopy)) = (tool("mdir"), tool("mtype"), tool("mcopy")) else { return };
    // mtools reads the partition in place: image@@offset.
    let at = format!("{}@@{}", b.image.display(), esp.offset_bytes);
    let listing = stdout_of(Command::new(&mdir).args(["-/", "-b", "-i", &at, "::/"]));
    for want in [
        "::/EFI/BOOT/BOOTX64.EFI",
        "::/vmlinuz",
        "::/initrd.img",
        "::/loader/loader.conf",
        "::/loader/entries/kiln.conf",
    ] {
        assert!(listing.lines().any(|l| l.eq_ignore_ascii_case(want)), "{want} missing from the ESP:\n{listing}");
    }
    let entry = stdout_of(Command::new(&mtype).args(["-i", &at, "::/loader/entries/kiln.conf"]));
    assert!(entry.contains(&format!("root=PARTUUID={} ", b.ids.root_partuuid())), "{entry}");
    assert!(entry.contains("console=ttyS0,115200n8"), "{entry}");
    assert!(entry.contains("nvme_core.io_timeout=4294967295"), "{entry}");
    assert!(entry.trim_end().ends_with("quiet"), "recipe cmdline goes last: {entry}");
    assert!(entry.contains("6.1.0-28-cloud-amd64"), "newest kernel by version: {entry}");
    let loader = stdout_of(Command::new(&mtype).args(["-i", &at, "::/loader/loader.conf"]));
    assert!(loader.contains("timeout 0"), "{loader}");
    // Contents survive byte for byte: the kernel is the newer one, the EFI binary is systemd-boot's.
    for (esp_path, want) in [("::/vmlinuz", pseudo(3_000_000, 3)), ("::/EFI/BOOT/BOOTX64.EFI", pseudo(120_000, 5))] {
        let dest = t.path().join("out");
        let _ = std::fs::remove_file(&dest);
        run_ok(Command::new(&mcopy).args(["-n", "-i", &at, esp_path]).arg(&dest));
        assert!(std::fs::read(&dest).unwrap() == want, "{esp_path} differs from the root tree's file");
    }
}

#[test]
fn root_partition_is_clean_ext4_with_the_planned_uuid() {
    let b = build(b"disk-test", Arch::X86_64, None);
    let root = &b.plan.partitions()[1];
    let t = tempdir();
    let img = t.path().join("root.img");
    dd(&b.image, root.offset_bytes, root.size_bytes, &img);
    if let Some(e2fsck) = tool("e2fsck") {
        let out = Command::new(e2fsck).arg("-fn").arg(&img).output().unwrap();
        assert!(out.status.success(), "e2fsck -fn:\n{}", String::from_utf8_lossy(&out.stdout));
    }
    if let Some(dumpe2fs) = tool("dumpe2fs") {
        let h = stdout_of(Command::new(dumpe2fs).arg("-h").arg(&img));
        let uuid = h.lines().find_map(|l| l.strip_prefix("Filesystem UUID:")).unwrap().trim().to_string();
        assert_eq!(Some(uuid), root.fs_uuid, "{h}");
        let blocks: u64 = h.lines().find_map(|l| l.strip_prefix("Block count:")).unwrap().trim().parse().unwrap();
        let bs: u64 = h.lines().find_map(|l| l.strip_prefix("Block size:")).unwrap().trim().parse().unwrap();
        // The file system fills its partition (no unreachable tail).
        assert_eq!(blocks * bs, root.size_bytes, "{h}");
    }
    if let Some(debugfs) = tool("debugfs") {
        let out = stdout_of(Command::new(debugfs).args(["-R", "cat /etc/hostname"]).arg(&img));
        assert_eq!(out, "kiln\n");
    }
}

#[test]
fn same_seed_same_bytes_other_seed_other_ids() {
    let a = build(b"seed-a", Arch::X86_64, Some(1 << 30));
    let a2 = build(b"seed-a", Arch::X86_64, Some(1 << 30));
    let c = build(b"seed-c", Arch::X86_64, Some(1 << 30));
    assert_eq!(sha256sum(&a.image), sha256sum(&a2.image), "same inputs must give the same image");
    assert_ne!(sha256sum(&a.image), sha256sum(&c.image));
    let (pa, pc) = (a.plan.partitions(), c.plan.partitions());
    for (x, y) in pa.iter().zip(&pc) {
        assert_ne!(x.guid, y.guid, "partition GUIDs must follow the seed");
        assert_eq!((x.first_lba, x.last_lba), (y.first_lba, y.last_lba), "layout must not");
    }
}

#[test]
fn digests_match_sha256sum_and_dd_and_the_file_is_sparse() {
    let b = build(b"digests", Arch::X86_64, Some(2 << 30));
    assert_eq!(b.sha256, sha256sum(&b.image), "Sha256Sink vs sha256sum of the written file");

    let bs = b.blocks.block_size;
    assert_eq!(bs, 512 * 1024);
    let size = b.plan.size_bytes();
    let listed: std::collections::BTreeMap<u64, &str> =
        b.blocks.data_blocks.iter().map(|d| (d.index, d.sha256.as_str())).collect();
    assert!(listed.keys().zip(listed.keys().skip(1)).all(|(x, y)| x < y));
    assert!(listed.contains_key(&0), "block 0 holds the MBR and GPT");
    assert!(listed.contains_key(&(size / bs - 1)), "the last block holds the backup GPT");

    // Sample: every listed block among the first and last few, the ESP's and root's first blocks,
    // and some that are not listed (which must read as zeros).
    let t = tempdir();
    let blk = t.path().join("blk");
    let zero_hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(vec![0u8; bs as usize]));
    let parts = b.plan.partitions();
    let mut sample: Vec<u64> = listed.keys().copied().take(4).collect();
    sample.extend(listed.keys().rev().copied().take(4));
    sample.extend(parts.iter().map(|p| p.offset_bytes / bs));
    sample.extend([1, 2, 3, size / bs / 2, size / bs - 2]);
    sample.sort();
    sample.dedup();
    for i in sample {
        dd(&b.image, i * bs, bs, &blk);
        let got = sha256sum(&blk);
        match listed.get(&i) {
            Some(want) => assert_eq!(&got, want, "block {i}"),
            None => assert_eq!(got, zero_hash, "block {i} is not in the block map but is not zeros"),
        }
    }

    // Sparse: allocated space is far below the apparent size (2 GiB disk, ~10 MB of data).
    let du = stdout_of(Command::new("du").args(["-k"]).arg(&b.image));
    let kib: u64 = du.split_whitespace().next().unwrap().parse().unwrap();
    assert!(kib * 1024 < size / 20, "image allocates {kib} KiB of {size} bytes");
}

#[test]
fn arm64_disk_uses_the_arm64_root_type_and_bootloader_path() {
    let b = build(b"disk-test", Arch::Arm64, None);
    let parts = b.plan.partitions();
    assert_eq!(parts[1].type_guid.to_uppercase(), Arch::Arm64.root_partition_type());
    let Some(sfdisk) = tool("sfdisk") else { return };
    let j: Value = serde_json::from_str(&stdout_of(Command::new(&sfdisk).arg("--json").arg(&b.image))).unwrap();
    let t = j["partitiontable"]["partitions"][1]["type"].as_str().unwrap().to_uppercase();
    assert_eq!(t, "B921B045-1DF0-41C3-AF44-4C6F280D3FAE");
    let Some(mdir) = tool("mdir") else { return };
    let at = format!("{}@@{}", b.image.display(), parts[0].offset_bytes);
    let listing = stdout_of(Command::new(&mdir).args(["-/", "-b", "-i", &at, "::/EFI/BOOT"]));
    assert!(listing.to_uppercase().contains("BOOTAA64.EFI"), "{listing}");
}

#[test]
fn missing_kernel_is_a_clear_error() {
    let meta = Meta::new(0o755, 0, 0, Timestamp::new(EPOCH, 0));
    let tree = Tree::new(meta);
    let ids = DiskIds::derive(b"x");
    let boot = BootSetup { arch: Arch::X86_64, mode: BootMode::Uefi, cmdline: vec![] };
    let err = disk::esp_files(&tree, &ids, &boot).unwrap_err().to_string();
    assert!(err.contains("linux-image-cloud-amd64"), "{err}");
}

/// `kiln inspect --json` against sfdisk (table), dumpe2fs (ext4 superblock) and blkid (FAT id).
#[test]
fn inspect_agrees_with_sfdisk_dumpe2fs_and_blkid() {
    let b = build(b"inspect", Arch::X86_64, None);
    let j: Value =
        serde_json::from_str(&stdout_of(crate::common::kiln().arg("inspect").arg(&b.image).arg("--json"))).unwrap();
    let (Some(sfdisk), Some(dumpe2fs), Some(blkid)) = (tool("sfdisk"), tool("dumpe2fs"), tool("blkid")) else {
        return;
    };
    let s: Value = serde_json::from_str(&stdout_of(Command::new(&sfdisk).arg("--json").arg(&b.image))).unwrap();
    let sp = s["partitiontable"]["partitions"].as_array().unwrap();
    let ip = j["partitions"].as_array().unwrap();
    assert_eq!(sp.len(), ip.len());
    for (x, y) in sp.iter().zip(ip) {
        assert_eq!(x["start"], y["first_lba"]);
        assert_eq!(x["uuid"].as_str().unwrap().to_uppercase(), y["guid"].as_str().unwrap());
        assert_eq!(x["type"].as_str().unwrap().to_uppercase(), y["type_guid"].as_str().unwrap());
    }
    let t = tempdir();
    let parts = b.plan.partitions();
    let esp = t.path().join("esp");
    dd(&b.image, parts[0].offset_bytes, parts[0].size_bytes, &esp);
    let id = stdout_of(Command::new(&blkid).args(["-p", "-o", "value", "-s", "UUID"]).arg(&esp));
    assert_eq!(ip[0]["filesystem"]["volume_id"].as_str().unwrap(), id.trim());
    let root = t.path().join("root");
    dd(&b.image, parts[1].offset_bytes, parts[1].size_bytes, &root);
    let h = stdout_of(Command::new(&dumpe2fs).arg("-h").arg(&root));
    let field = |k: &str| h.lines().find_map(|l| l.strip_prefix(k)).unwrap().trim().to_string();
    let fs = &ip[1]["filesystem"];
    assert_eq!(fs["uuid"].as_str().unwrap(), field("Filesystem UUID:"));
    assert_eq!(fs["blocks"].as_u64().unwrap().to_string(), field("Block count:"));
    assert_eq!(fs["free_blocks"].as_u64().unwrap().to_string(), field("Free blocks:"));
    assert_eq!(fs["inodes"].as_u64().unwrap().to_string(), field("Inode count:"));
}

/// `root_tree` plus what stresses the ext4 writer's layout: a directory large enough for an
/// htree index, fast and slow symlinks, hard links, devices, a fifo, extended attributes, a
/// setuid file, a sparse file with a hole between two runs, and a file of many extents' worth.
fn rich_tree(arch: Arch) -> Tree {
    let mut t = root_tree(arch);
    let meta = Meta::new(0o755, 0, 0, Timestamp::new(EPOCH, 0));
    let ins = |t: &mut Tree, path: &str, kind: Kind, meta: Meta| {
        t.create_parents(path.as_bytes(), &meta).unwrap();
        t.insert(path.as_bytes(), kind, meta, OnExisting::Error).unwrap();
    };
    for i in 0..700 {
        let name = format!("/usr/share/many/file-with-a-longish-name-{i:04}");
        ins(&mut t, &name, Kind::File(Content::inline(pseudo(i % 97, i as u8))), meta.clone());
    }
    ins(&mut t, "/usr/bin/fast", Kind::Symlink(b"../share/many".to_vec()), meta.clone());
    ins(&mut t, "/usr/bin/slow", Kind::Symlink(vec![b'x'; 200]), meta.clone());
    ins(&mut t, "/usr/bin/suid", Kind::File(Content::inline(pseudo(5000, 9))), Meta::new(0o4755, 0, 0, meta.mtime));
    t.link(b"/usr/bin/suid-link", b"/usr/bin/suid", OnExisting::Error).unwrap();
    ins(&mut t, "/dev/null", Kind::CharDev { major: 1, minor: 3 }, Meta::new(0o666, 0, 0, meta.mtime));
    ins(&mut t, "/dev/sda", Kind::BlockDev { major: 8, minor: 0 }, Meta::new(0o660, 0, 6, meta.mtime));
    ins(&mut t, "/run/initctl", Kind::Fifo, Meta::new(0o600, 0, 0, meta.mtime));
    let mut capped = Meta::new(0o755, 1000, 1000, Timestamp::new(EPOCH - 86_400, 123_456_789));
    capped.xattrs.insert(b"security.capability".to_vec(), pseudo(20, 11));
    capped.xattrs.insert(b"user.kiln".to_vec(), b"pinned".to_vec());
    ins(&mut t, "/usr/bin/ping", Kind::File(Content::inline(pseudo(70_000, 12))), capped);
    let chunk: std::sync::Arc<[u8]> = pseudo(300_000, 13).into();
    let sparse = Content {
        size: 40 << 20,
        segments: vec![
            kiln::formats::tree::Segment {
                offset: 0,
                len: 300_000,
                data: kiln::formats::tree::Data::Inline(chunk.clone()),
            },
            kiln::formats::tree::Segment {
                offset: 30 << 20,
                len: 300_000,
                data: kiln::formats::tree::Data::Inline(chunk),
            },
        ],
    };
    ins(&mut t, "/var/lib/sparse.img", Kind::File(sparse), meta.clone());
    ins(&mut t, "/opt/big", Kind::File(Content::inline(pseudo(20 << 20, 14))), meta.clone());
    t
}

/// The same inputs give the same bytes, and the bytes recorded before the house's second step
/// (ext4's shared on-disk layout, the library pipeline): a refactor that changes one byte of
/// any structure fails here. A change meant to alter the image updates these digests in the
/// same commit, saying why.
#[test]
fn image_bytes_are_those_recorded_before_the_refactor() {
    let pinned = [
        (Arch::X86_64, Some(1u64 << 30), "c0489d9783e52ecd6b598088307f322feb5779db6ed8613c784e33708e355245"),
        (Arch::Arm64, None, "ac8ec0b7cc0d36a3e62d251d35dccf8d71b73629aa49d3198efdff4333a3d1e6"),
    ];
    for (arch, size, want) in pinned {
        let tree = rich_tree(arch);
        let ids = DiskIds::derive(b"pinned");
        let boot = BootSetup { arch, mode: BootMode::Uefi, cmdline: vec![] };
        let esp = disk::esp_files(&tree, &ids, &boot).unwrap();
        let spec = DiskSpec { size, esp_size_bytes: 64 << 20, boot, timestamp: EPOCH, bios_boot: None };
        let mut root_opts = Ext4Options::with_seed(&ids.root_fs_seed);
        root_opts.timestamp = EPOCH;
        root_opts.label = "root".into();
        let plan = disk::plan(&spec, &ids, &esp, &tree, root_opts).unwrap();
        let dir = tempdir();
        let image = dir.path().join("pinned.raw");
        let mut file = SparseFile::create(&image).unwrap();
        let mut sha = Sha256Sink::new();
        disk::write(&plan, &tree, &mut Tee(vec![&mut file as &mut dyn Sink, &mut sha])).unwrap();
        file.persist().unwrap();
        // The pinned bytes are a clean file system by e2fsprogs, not only a digest.
        let root = &plan.partitions()[1];
        let img = dir.path().join("root.img");
        dd(&image, root.offset_bytes, root.size_bytes, &img);
        if let Some(e2fsck) = tool("e2fsck") {
            let out = Command::new(e2fsck).arg("-fn").arg(&img).output().unwrap();
            assert!(out.status.success(), "{arch:?}: e2fsck -fn:\n{}", String::from_utf8_lossy(&out.stdout));
        }
        assert_eq!(sha.hex(), want, "{arch:?}: the image's bytes changed");
    }
}
