//! `kiln build` end to end: the shipped minimal recipe becomes a disk that the reference tools
//! accept (sgdisk, sfdisk, fsck.fat, e2fsck, sha256sum), that holds what the recipe says
//! (debugfs, mtools), that boots to a login prompt under QEMU, and that is byte-identical when
//! built again from the same cached stage.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use kiln::manifest::Manifest;
use serde_json::Value;

use crate::common::{in_ci, kiln, run_ok, stdout_of, tempdir, tool};

const EPOCH: &str = "1700000000";

struct Built {
    _dir: tempfile::TempDir,
    out: PathBuf,
    manifest_path: PathBuf,
    manifest: Manifest,
}

fn root_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn build_recipe(recipe: &Path, out: &Path) -> Value {
    let o = run_ok(
        kiln()
            .arg("build")
            .arg(recipe)
            .arg("--out")
            .arg(out)
            .arg("--json")
            .env("KILN_CACHE_DIR", crate::common::cache_dir())
            .env("SOURCE_DATE_EPOCH", EPOCH),
    );
    serde_json::from_slice(&o.stdout).expect("--json prints one JSON object")
}

/// The minimal recipe, built once for the whole module (staging takes ~40 s).
fn minimal() -> Option<&'static Built> {
    static B: OnceLock<Option<Built>> = OnceLock::new();
    B.get_or_init(|| {
        tool("mmdebstrap")?;
        let dir = tempdir();
        let out = dir.path().join("out");
        let summary = build_recipe(&root_dir().join("recipes/debian-12-minimal.toml"), &out);
        let manifest_path = PathBuf::from(summary["manifest"].as_str().unwrap());
        let manifest = Manifest::load(&manifest_path).unwrap();
        Some(Built { _dir: dir, out, manifest_path, manifest })
    })
    .as_ref()
}

fn image(b: &Built) -> PathBuf {
    b.out.join(&b.manifest.image.file)
}

/// Copies one partition out of the image (dd with sparse output) for fsck tools.
fn extract_partition(b: &Built, number: u32, dest: &Path) {
    let p = b.manifest.disk.partitions.iter().find(|p| p.number == number).unwrap();
    run_ok(
        Command::new("dd")
            .arg(format!("if={}", image(b).display()))
            .arg(format!("of={}", dest.display()))
            .args(["bs=512", "conv=sparse", "status=none"])
            .arg(format!("skip={}", p.first_lba))
            .arg(format!("count={}", p.last_lba - p.first_lba + 1)),
    );
}

#[test]
fn partition_table_matches_the_manifest() {
    let Some(b) = minimal() else { return };
    let (Some(sgdisk), Some(sfdisk)) = (tool("sgdisk"), tool("sfdisk")) else { return };
    let v = stdout_of(Command::new(&sgdisk).arg("-v").arg(image(b)));
    assert!(v.contains("No problems found"), "sgdisk -v: {v}");
    let j: Value = serde_json::from_str(&stdout_of(Command::new(&sfdisk).arg("--json").arg(image(b)))).unwrap();
    let table = &j["partitiontable"];
    assert_eq!(table["label"], "gpt");
    assert_eq!(table["id"].as_str().unwrap().to_uppercase(), b.manifest.disk.guid.to_uppercase());
    let parts = table["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), b.manifest.disk.partitions.len());
    for (sp, mp) in parts.iter().zip(&b.manifest.disk.partitions) {
        assert_eq!(sp["start"].as_u64().unwrap(), mp.first_lba, "{mp:?}");
        assert_eq!(sp["size"].as_u64().unwrap(), mp.last_lba - mp.first_lba + 1, "{mp:?}");
        assert_eq!(sp["type"].as_str().unwrap().to_uppercase(), mp.type_guid.to_uppercase());
        assert_eq!(sp["uuid"].as_str().unwrap().to_uppercase(), mp.guid.to_uppercase());
        assert_eq!(mp.first_lba % 2048, 0, "1 MiB alignment");
        assert_eq!(mp.offset_bytes, mp.first_lba * 512);
    }
    let root = b.manifest.disk.partitions.iter().find(|p| p.filesystem == "ext4").unwrap();
    assert_eq!(root.type_guid.to_uppercase(), kiln::platform::Arch::X86_64.root_partition_type());
}

#[test]
fn checksum_file_verifies_with_sha256sum() {
    let Some(b) = minimal() else { return };
    let sums = std::fs::read_dir(&b.out)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "sha256"));
    let sums = sums.expect("NAME.raw.sha256 exists");
    let out = stdout_of(Command::new("sha256sum").arg("-c").arg(sums.file_name().unwrap()).current_dir(&b.out));
    assert!(out.trim().ends_with(": OK"), "{out}");
    let text = std::fs::read_to_string(&sums).unwrap();
    assert!(text.starts_with(&b.manifest.image.sha256));
}

/// Outputs are created as open(2) would create them (0666 less the umask, which kiln inherits
/// from this test), not owner-only: the uploader or artifact server of a build machine is
/// often another user. No temporary file is left beside them.
#[test]
fn outputs_follow_the_umask_and_leave_no_temporaries() {
    use std::os::unix::fs::PermissionsExt;
    let Some(b) = minimal() else { return };
    // What open(2) gives under this process's umask, which kiln inherited.
    let probe = tempdir();
    let made = std::fs::File::create(probe.path().join("probe")).unwrap();
    let expected = made.metadata().unwrap().permissions().mode() & 0o777;
    let mut names = Vec::new();
    for e in std::fs::read_dir(&b.out).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        let mode = e.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, expected, "{name} has mode {mode:o}, not {expected:o} as open(2) gives");
        assert!(!name.starts_with('.'), "{name} was left behind");
        names.push(name);
    }
    names.sort();
    for suffix in [".raw", ".raw.sha256", ".manifest.json", ".spdx.json", ".intoto.jsonl"] {
        assert!(names.iter().any(|n| n.ends_with(suffix)), "no *{suffix} among {names:?}");
    }
}

#[test]
fn filesystems_are_clean_by_fsck_fat_and_e2fsck() {
    let Some(b) = minimal() else { return };
    let (Some(fsck_fat), Some(e2fsck)) = (tool("fsck.fat"), tool("e2fsck")) else { return };
    let t = tempdir();
    let mut checked = Vec::new();
    for p in &b.manifest.disk.partitions {
        let dest = t.path().join(format!("p{}", p.number));
        let (judge, flag) = match p.filesystem.as_str() {
            "vfat" => (&fsck_fat, "-n"),
            "ext4" => (&e2fsck, "-fn"),
            // A BIOS boot partition holds no file system; the minimal image has none.
            other => panic!("partition {} has a file system no judge here knows: {other}", p.number),
        };
        extract_partition(b, p.number, &dest);
        run_ok(Command::new(judge).arg(flag).arg(&dest));
        checked.push(p.filesystem.clone());
    }
    // Both file systems were judged: a manifest listing fewer partitions fails here.
    checked.sort();
    assert_eq!(checked, ["ext4", "vfat"]);
}

#[test]
fn recipe_files_and_settings_are_in_the_image() {
    let Some(b) = minimal() else { return };
    let (Some(debugfs), Some(_)) = (tool("debugfs"), tool("mtype")) else { return };
    let t = tempdir();
    let root = b.manifest.disk.partitions.iter().find(|p| p.filesystem == "ext4").unwrap();
    let rootimg = t.path().join("root.img");
    extract_partition(b, root.number, &rootimg);
    let cat = |path: &str| stdout_of(Command::new(&debugfs).arg("-R").arg(format!("cat {path}")).arg(&rootimg));

    // Every inline file in the recipe, byte for byte.
    let recipe: toml::Value =
        toml::from_str(&std::fs::read_to_string(root_dir().join("recipes/debian-12-minimal.toml")).unwrap()).unwrap();
    let mut checked = 0;
    if let Some(files) = recipe.get("files").and_then(|f| f.as_array()) {
        for f in files {
            if let (Some(path), Some(content)) =
                (f.get("path").and_then(|v| v.as_str()), f.get("content").and_then(|v| v.as_str()))
            {
                assert_eq!(cat(path), content, "{path}");
                checked += 1;
            }
        }
    }
    assert!(checked > 0, "the minimal recipe should carry at least one inline file to check");
    if let Some(h) = recipe.get("system").and_then(|s| s.get("hostname")).and_then(|h| h.as_str()) {
        assert_eq!(cat("/etc/hostname").trim(), h);
    }
    // fstab names the root by the UUID the filesystem really has.
    let uuid = stdout_of(Command::new("blkid").args(["-o", "value", "-s", "UUID"]).arg(&rootimg));
    assert!(cat("/etc/fstab").contains(&format!("UUID={}", uuid.trim())), "{}", cat("/etc/fstab"));
    assert_eq!(cat("/etc/machine-id"), "");
    // The ESP's loader entry boots the root partition by its PARTUUID.
    let esp = b.manifest.disk.partitions.iter().find(|p| p.filesystem == "vfat").unwrap();
    let entry = stdout_of(
        Command::new("mtype")
            .arg("-i")
            .arg(format!("{}@@{}", image(b).display(), esp.offset_bytes))
            .arg("::/loader/entries/kiln.conf"),
    );
    let root_partuuid = root.guid.to_lowercase();
    assert!(entry.contains(&format!("root=PARTUUID={root_partuuid}")), "{entry}");
    assert!(entry.contains("console=ttyS0,115200n8") && entry.contains("nvme_core.io_timeout=4294967295"), "{entry}");
    let dir = stdout_of(
        Command::new("mdir")
            .arg("-i")
            .arg(format!("{}@@{}", image(b).display(), esp.offset_bytes))
            .arg("-b")
            .arg("::/EFI/BOOT"),
    );
    assert!(dir.to_uppercase().contains("BOOTX64.EFI"), "{dir}");
}

#[test]
fn manifest_lists_every_data_block_with_its_digest() {
    let Some(b) = minimal() else { return };
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(image(b)).unwrap();
    let mut buf = vec![0u8; kiln::manifest::EBS_BLOCK_SIZE as usize];
    let listed: std::collections::BTreeMap<u64, String> =
        b.manifest.blocks.data_blocks.iter().map(|d| (d.index, d.sha256.to_string())).collect();
    let blocks = b.manifest.image.size_bytes / kiln::manifest::EBS_BLOCK_SIZE;
    for i in 0..blocks {
        f.read_exact(&mut buf).unwrap();
        match listed.get(&i) {
            Some(d) => assert_eq!(*d, hex::encode(Sha256::digest(&buf)), "block {i}"),
            None => assert!(buf.iter().all(|&x| x == 0), "block {i} holds data but is not listed"),
        }
    }
}

#[test]
fn rebuilding_from_the_cached_stage_gives_the_same_bytes() {
    let Some(b) = minimal() else { return };
    let t = tempdir();
    // --offline: the same base even if the archive moved since the first build.
    let o = run_ok(
        kiln()
            .arg("build")
            .arg(root_dir().join("recipes/debian-12-minimal.toml"))
            .arg("--out")
            .arg(t.path())
            .args(["--json", "--offline"])
            .env("KILN_CACHE_DIR", crate::common::cache_dir())
            .env("SOURCE_DATE_EPOCH", EPOCH),
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("offline: the base was staged"));
    let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["base_cached"], true);
    assert_eq!(summary["sha256"].as_str().unwrap(), b.manifest.image.sha256);
    let second = Manifest::load(Path::new(summary["manifest"].as_str().unwrap())).unwrap();
    assert_eq!(second.blocks, b.manifest.blocks);
}

#[test]
fn boots_to_a_login_prompt() {
    let Some(b) = minimal() else { return };
    if tool("qemu-system-x86_64").is_none() {
        return;
    }
    let o = kiln().arg("boot").arg(image(b)).args(["--timeout", "900"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "kiln boot failed:\n{err}");
    if in_ci() {
        eprintln!("{err}");
    }
}

/// Builds a recipe once per test binary run (cached stage, fixed epoch), keyed by recipe+arch.
fn built(recipe: &str, arch: Option<&str>) -> Option<Built> {
    tool("mmdebstrap")?;
    let dir = tempdir();
    let out = dir.path().join("out");
    let mut cmd = kiln();
    cmd.arg("build").arg(root_dir().join(recipe)).arg("--out").arg(&out).arg("--json");
    if let Some(a) = arch {
        cmd.args(["--arch", a]);
    }
    let o = run_ok(cmd.env("KILN_CACHE_DIR", crate::common::cache_dir()).env("SOURCE_DATE_EPOCH", EPOCH));
    let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
    let manifest_path = PathBuf::from(summary["manifest"].as_str().unwrap());
    let manifest = Manifest::load(&manifest_path).unwrap();
    Some(Built { _dir: dir, out, manifest_path, manifest })
}

fn boot_ok(image: &Path, extra: &[&str]) {
    let o = kiln().arg("boot").arg(image).args(extra).output().unwrap();
    assert!(o.status.success(), "kiln boot {extra:?} failed:\n{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn hybrid_image_boots_with_bios_and_with_uefi() {
    let Some(b) = built("fixtures/build/hybrid.toml", None) else { return };
    if tool("qemu-system-x86_64").is_none() {
        return;
    }
    let img = image(&b);
    // A BIOS boot partition, GRUB's code in a still-valid protective MBR.
    let parts = &b.manifest.disk.partitions;
    assert_eq!(parts[0].type_guid, "21686148-6449-6E6F-744E-656564454649");
    let v = stdout_of(Command::new("sgdisk").arg("-v").arg(&img));
    assert!(v.contains("No problems found"), "{v}");
    let mbr = std::fs::read(&img).unwrap()[..512].to_vec();
    assert_eq!(&mbr[510..], &[0x55, 0xaa]);
    assert_eq!(mbr[0x1c2], 0xee, "protective MBR partition type");
    let boot_img = std::fs::read("/usr/lib/grub/i386-pc/boot.img").ok();
    if let Some(bi) = boot_img {
        assert_eq!(&mbr[..0x5a], &bi[..0x5a], "GRUB's boot code in the MBR");
    }
    let out = stdout_of(kiln().arg("inspect").arg(&img));
    assert!(out.to_lowercase().contains("bios"), "kiln inspect shows the BIOS boot partition:\n{out}");
    boot_ok(&img, &["--firmware", "bios", "--timeout", "900"]);
    boot_ok(&img, &["--firmware", "uefi", "--timeout", "900"]);

    // As an instance-store bundle: bundled from its build manifest, restored by
    // `kiln unbundle`, byte-identical, and it boots with SeaBIOS the way those families boot.
    if tool("openssl").is_none() {
        return;
    }
    let keys = b.out.join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let (user_key, user_cert) = crate::bundle::keypair(&keys, "user", false);
    let (_k, ec2_cert) = crate::bundle::keypair(&keys, "ec2", true);
    let bundle_dir = b.out.join("bundle");
    let o = kiln()
        .arg("bundle")
        .arg(&b.manifest_path)
        .args(["--account", "123456789012"])
        .arg("--user-cert")
        .arg(&user_cert)
        .arg("--user-key")
        .arg(&user_key)
        .arg("--ec2-cert")
        .arg(&ec2_cert)
        .arg("-o")
        .arg(&bundle_dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "kiln bundle failed:\n{err}");
    assert!(!err.contains("warning"), "a hybrid image boots BIOS; no warning expected:\n{err}");
    let restored = b.out.join("restored.raw");
    run_ok(
        kiln()
            .arg("unbundle")
            .arg(bundle_dir.join(format!("{}.manifest.xml", b.manifest.name)))
            .arg("--user-key")
            .arg(&user_key)
            .arg("-o")
            .arg(&restored),
    );
    let sum = stdout_of(Command::new("sha256sum").arg(&restored));
    assert_eq!(&sum[..64], b.manifest.image.sha256, "unbundled image differs from the built one");
    boot_ok(&restored, &["--firmware", "bios", "--timeout", "900"]);
}

/// A Debian 13 hybrid image boots with SeaBIOS on GRUB built from trixie's own modules: the
/// MBR holds the image's boot.img (read from its root with debugfs), not the build host's.
#[test]
fn debian_13_hybrid_boots_bios_with_its_own_grub() {
    let Some(b) = built("fixtures/build/hybrid-13.toml", None) else { return };
    let (Some(debugfs), Some(_)) = (tool("debugfs"), tool("qemu-system-x86_64")) else { return };
    assert_eq!(b.manifest.os_name(), "debian-13");
    let t = tempdir();
    let root = b.manifest.disk.partitions.iter().find(|p| p.filesystem == "ext4").unwrap();
    let rootimg = t.path().join("root.img");
    extract_partition(&b, root.number, &rootimg);
    let own = t.path().join("boot.img");
    run_ok(
        Command::new(debugfs)
            .arg("-R")
            .arg(format!("dump /usr/lib/grub/i386-pc/boot.img {}", own.display()))
            .arg(&rootimg),
    );
    let own = std::fs::read(&own).unwrap();
    let mbr = std::fs::read(image(&b)).unwrap()[..512].to_vec();
    assert_eq!(&mbr[..0x5a], &own[..0x5a], "the MBR holds the image's own boot.img");
    let grub = b.manifest.packages.iter().find(|p| p.name == "grub-pc-bin").expect("grub-pc-bin installed");
    assert!(grub.version.starts_with("2.12"), "trixie's GRUB: {grub:?}");
    boot_ok(&image(&b), &["--firmware", "bios", "--timeout", "900"]);
}

/// The build-time audit refuses what a golden image must not carry, naming each path and how
/// to allow it, writes no image, and builds once the recipe allows each path explicitly.
#[test]
fn audit_refuses_planted_faults_unless_allowed() {
    if tool("mmdebstrap").is_none() {
        return;
    }
    let t = tempdir();
    let o = kiln()
        .arg("build")
        .arg(root_dir().join("fixtures/build/audit-faults.toml"))
        .arg("--out")
        .arg(t.path())
        .env("KILN_CACHE_DIR", crate::common::cache_dir())
        .env("SOURCE_DATE_EPOCH", EPOCH)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the audit let planted faults through:\n{err}");
    for (path, what) in [
        ("/root/.ssh/id_ed25519", "a private key"),
        ("/etc/resolv.conf", "static resolver"),
        ("/etc/app.conf", "world-writable"),
    ] {
        assert!(err.lines().any(|l| l.contains(path) && l.contains(what)), "{path} ({what}) not reported:\n{err}");
    }
    assert!(err.contains("3 findings") && err.contains("[audit] allow"), "{err}");
    assert!(!t.path().join("audit-faults-x86_64.raw").exists(), "no image is written when the audit fails");
    let Some(b) = built("fixtures/build/audit-allowed.toml", None) else { return };
    assert!(image(&b).is_file());

    // The finished image, read back from its ext4 by `kiln inspect --audit`, shows the same
    // findings (the recipe's allowances are not in the image); --allow accepts each; the clean
    // minimal image has none.
    let planted = ["/root/.ssh/id_ed25519", "/etc/resolv.conf", "/etc/app.conf"];
    let o = kiln().args(["inspect", "--audit", "--json"]).arg(image(&b)).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let root = v["partitions"].as_array().unwrap().iter().find(|p| p["filesystem"]["type"] == "ext4").unwrap();
    let audit = &root["filesystem"]["audit"];
    let mut found: Vec<&str> =
        audit["findings"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
    found.sort();
    let mut want = planted.to_vec();
    want.sort();
    assert_eq!(found, want, "{audit:#}");
    assert!(audit["files"].as_u64().unwrap() > 5000, "the whole root was read: {audit}");
    let mut allow = kiln();
    allow.args(["inspect", "--audit"]).arg(image(&b));
    for p in planted {
        allow.args(["--allow", p]);
    }
    let o = run_ok(&mut allow);
    assert!(String::from_utf8_lossy(&o.stdout).contains("0 finding(s)"));
    let Some(clean) = minimal() else { return };
    let o = run_ok(kiln().args(["inspect", "--audit"]).arg(image(clean)));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("audit:") && text.contains("0 finding(s)"), "{text}");
}

/// What generalization removed and first boot replaces, read back with debugfs: no host keys,
/// no seeds or build-host resolver, resolv.conf pointing at systemd-resolved, /etc/hosts with
/// no stale line for the host's name, C.UTF-8, deb822 apt sources with -updates and security.
#[test]
fn the_image_is_generalized() {
    let Some(b) = minimal() else { return };
    let Some(debugfs) = tool("debugfs") else { return };
    let t = tempdir();
    let root = b.manifest.disk.partitions.iter().find(|p| p.filesystem == "ext4").unwrap();
    let rootimg = t.path().join("root.img");
    extract_partition(b, root.number, &rootimg);
    let run = |req: &str| {
        let o = Command::new(&debugfs).arg("-R").arg(req).arg(&rootimg).output().unwrap();
        (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let ls = run("ls -l /etc/ssh").0;
    assert!(ls.contains("sshd_config"), "openssh-server is in the minimal image: {ls}");
    assert!(!ls.contains("ssh_host_"), "host keys baked into the image:\n{ls}");
    for gone in [
        "/var/lib/systemd/random-seed",
        "/var/lib/systemd/credential.secret",
        "/var/lib/dbus/machine-id",
        "/etc/apt/sources.list",
    ] {
        assert!(run(&format!("stat {gone}")).1.contains("File not found"), "{gone} is in the image");
    }
    assert!(run("stat /etc/resolv.conf").0.contains("Fast link dest: \"../run/systemd/resolve/stub-resolv.conf\""));
    let (hosts, _) = run("cat /etc/hosts");
    assert!(hosts.contains("localhost") && !hosts.contains("127.0.1.1"), "{hosts}");
    assert_eq!(run("cat /etc/default/locale").0, "LANG=C.UTF-8\n");
    let (sources, _) = run("cat /etc/apt/sources.list.d/debian.sources");
    assert!(sources.contains("Suites: bookworm bookworm-updates"), "{sources}");
    if kiln::stage::debian::host_security_mirror().is_some() {
        assert!(sources.contains("Suites: bookworm-security"), "{sources}");
    }
    assert!(run("ls /var/log").0.lines().all(|l| !l.contains(".log")), "log files left in /var/log");
}

/// The SBOM beside the manifest is valid SPDX by the SPDX project's own tool, and lists exactly
/// the manifest's packages with the image's SHA-256.
#[test]
fn sbom_is_valid_spdx_and_matches_the_manifest() {
    let Some(b) = minimal() else { return };
    let sbom_path = b.out.join(format!("{}.spdx.json", b.manifest.name));
    let doc: Value = serde_json::from_slice(&std::fs::read(&sbom_path).unwrap()).unwrap();
    assert_eq!(doc["spdxVersion"], "SPDX-2.3");
    let image = &doc["packages"][0];
    assert_eq!(image["checksums"][0]["checksumValue"], b.manifest.image.sha256.as_str());
    let mut listed: Vec<(String, String, String)> = doc["packages"].as_array().unwrap()[1..]
        .iter()
        .map(|p| {
            let purl = p["externalRefs"][0]["referenceLocator"].as_str().unwrap();
            let arch = purl.split("arch=").nth(1).unwrap().split('&').next().unwrap().to_string();
            (p["name"].as_str().unwrap().to_string(), p["versionInfo"].as_str().unwrap().to_string(), arch)
        })
        .collect();
    listed.sort();
    let want: Vec<(String, String, String)> =
        b.manifest.packages.iter().map(|p| (p.name.clone(), p.version.clone(), p.arch.clone())).collect();
    assert_eq!(listed, want);
    let declared = doc["packages"].as_array().unwrap().iter().filter(|p| p["licenseDeclared"] != "NOASSERTION").count();
    assert!(declared > want.len() / 2, "most Debian packages have a machine-readable copyright file");
    let Some(venv) = crate::common::venv_program("spdx-venv", "pyspdxtools", "setup-spdx") else { return };
    let o = Command::new(&venv).arg("-i").arg(&sbom_path).output().unwrap();
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success() && !out.to_lowercase().contains("invalid"), "pyspdxtools rejects the SBOM:\n{out}");
}

/// The staged base follows the archive: built twice against an unchanged archive, the base is
/// kept; once the archive changes (here a suite disappears from it, served by a proxy to the
/// build host's own mirror), the next build stages afresh, records the new state and drops the
/// stale base; --offline then builds from the cache without the archive, and without it and
/// without --offline the build says to use --offline.
#[test]
fn a_stale_base_is_restaged_and_an_unchanged_one_kept() {
    if tool("mmdebstrap").is_none() {
        return;
    }
    let Some(upstream) = kiln::stage::debian::host_mirror() else {
        assert!(!in_ci(), "the CI host's apt sources name a Debian mirror");
        return;
    };
    let t = tempdir();
    let cache = t.path().join("cache");
    let hide = t.path().join("hidden");
    std::fs::write(&hide, "").unwrap();
    /// The proxy ends with the test, even when an assertion fails.
    struct Proxy(std::process::Child);
    impl Drop for Proxy {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut proxy = Proxy(
        std::process::Command::new("python3")
            .arg(root_dir().join("fixtures/archive/proxy.py"))
            .arg(&upstream)
            .arg(&hide)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let port = {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(proxy.0.stdout.take().unwrap()).read_line(&mut line).unwrap();
        line.trim().to_string()
    };
    let mirror = format!("http://127.0.0.1:{port}");
    let build_to = |out: &str, extra: &[&str]| {
        kiln()
            .arg("build")
            .arg(root_dir().join("fixtures/build/fresh.toml"))
            .arg("--out")
            .arg(t.path().join(out))
            .args(["--json", "--mirror", &mirror])
            .args(extra)
            .env("KILN_CACHE_DIR", &cache)
            .env("SOURCE_DATE_EPOCH", EPOCH)
            .output()
            .unwrap()
    };
    let build = |extra: &[&str]| build_to("out", extra);
    let summary = |o: &std::process::Output| -> Value {
        assert!(o.status.success(), "kiln build failed:\n{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let bases = || {
        let mut v: Vec<String> = std::fs::read_dir(cache.join("bases"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".tar"))
            .collect();
        v.sort();
        v
    };
    let suites = |s: &Value| -> Vec<String> {
        s["base"]["archive"].as_array().unwrap().iter().map(|a| a["suite"].as_str().unwrap().to_string()).collect()
    };

    // Two builds of the recipe at once on one empty cache: one stages, the other waits for
    // it (a lock per cache entry) and reuses the base; both images are the same bytes.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| build_to("out", &[]));
        let b = s.spawn(|| build_to("out-concurrent", &[]));
        (summary(&a.join().unwrap()), summary(&b.join().unwrap()))
    });
    let mut cached = [a["base_cached"].as_bool().unwrap(), b["base_cached"].as_bool().unwrap()];
    cached.sort();
    assert_eq!(cached, [false, true], "one build stages, the other reuses: {a:#} {b:#}");
    assert_eq!(a["sha256"], b["sha256"]);
    assert_eq!(a["base"], b["base"]);
    assert_eq!(bases().len(), 1);
    let first = if a["base_cached"] == false { a } else { b };
    assert_eq!(first["base_cached"], false);
    assert!(suites(&first).starts_with(&["bookworm".to_string(), "bookworm-updates".to_string()]), "{first:#}");
    for a in first["base"]["archive"].as_array().unwrap() {
        assert!(a["date"].as_str().unwrap().contains(" UTC"), "the InRelease's Date: {a}");
        assert_eq!(a["sha256"].as_str().unwrap().len(), 64);
    }
    let staged_at = first["base"]["staged_at"].as_str().unwrap().to_string();
    assert!(staged_at.ends_with('Z') && staged_at.contains('T'), "RFC 3339: {staged_at}");
    let manifest = Manifest::load(Path::new(first["manifest"].as_str().unwrap())).unwrap();
    assert_eq!(manifest.base.as_ref().unwrap().staged_at, staged_at, "the manifest records the staging");

    // The archive did not change: the base is kept.
    let second = summary(&build(&[]));
    assert_eq!(second["base_cached"], true);
    assert_eq!(second["base"], first["base"]);
    let before = bases();
    assert_eq!(before.len(), 1, "{before:?}");

    // apt's real answer was understood: the base carries its resolution.
    let resolved = first["base"]["resolved"].as_str().unwrap_or_default().to_string();
    assert_eq!(resolved.len(), 64, "no resolution recorded: {first:#}");

    // The archive changed (bookworm-updates is gone). Whether the base is staged afresh
    // depends on whether a package it holds came from there: apt's resolution decides, and
    // --json says which rule applied. Either way the new state is remembered and the stale
    // entry gone.
    std::fs::write(&hide, "/dists/bookworm-updates/\n").unwrap();
    let third = summary(&build(&[]));
    let why = third["base_origin"]["why"].as_str().unwrap_or_default();
    match third["base_origin"]["from"].as_str() {
        Some("cache") => {
            assert!(why.contains("same versions"), "{third:#}");
            assert_eq!(third["base"], first["base"], "a reused base is the one staged");
        }
        Some("staged") => {
            assert!(why.contains("changed"), "{third:#}");
            assert!(!suites(&third).contains(&"bookworm-updates".to_string()), "{third:#}");
            assert_ne!(third["base"]["cache_key"], first["base"]["cache_key"]);
            assert_ne!(third["base"]["resolved"].as_str(), Some(resolved.as_str()));
        }
        other => panic!("the base came from {other:?}: {third:#}"),
    }
    let after = bases();
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(after, before);

    // No archive at all: offline builds from the cache and says how old it is; online refuses.
    drop(proxy);
    let o = build(&["--offline"]);
    let offline = summary(&o);
    assert_eq!(offline["base_cached"], true);
    assert!(offline["base_age_secs"].is_u64());
    assert_eq!(offline["base"], third["base"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("offline: the base was staged"));
    let o = build(&[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("InRelease") && err.contains("--offline"), "{err}");
    // Offline with nothing cached for these inputs says so.
    let o = kiln()
        .arg("build")
        .arg(root_dir().join("fixtures/build/fresh.toml"))
        .arg("--out")
        .arg(t.path().join("out2"))
        .args(["--offline", "--mirror", "http://127.0.0.1:9/none"])
        .env("KILN_CACHE_DIR", &cache)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no base is cached"), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Names of the hidden (temporary) files in `dir`.
fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

/// Starts `kiln build` and sends `signal` once the image is being written (its temporary
/// file exists); returns the exit status and stderr.
fn build_stopped_by(recipe: &Path, out: &Path, cache: &Path, signal: i32) -> (std::process::ExitStatus, String) {
    let mut child = kiln()
        .arg("build")
        .arg(recipe)
        .arg("--out")
        .arg(out)
        .arg("-q")
        .env("KILN_CACHE_DIR", cache)
        .env("SOURCE_DATE_EPOCH", EPOCH)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !temporaries(out).iter().any(|n| n.ends_with(".partial")) {
        assert!(started.elapsed().as_secs() < 120, "the build never started writing its image");
        assert!(child.try_wait().unwrap().is_none(), "the build ended before it could be stopped");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, signal) };
    let out = child.wait_with_output().unwrap();
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Build servers stop jobs: SIGINT and SIGTERM end a build cleanly (exit 130 and 143, a
/// message, temporary files removed, the previous outputs untouched); a build killed with
/// SIGKILL leaves its temporary image, which the next build removes.
#[test]
fn a_stopped_build_publishes_nothing_and_a_killed_one_is_cleaned_up() {
    use std::os::unix::process::ExitStatusExt;
    let Some(archive) = crate::common::debian_root_tar() else { return };
    let t = tempdir();
    let (out, cache, recipe) = (t.path().join("out"), t.path().join("cache"), t.path().join("stop.toml"));
    let write_recipe = |motd: &str| {
        std::fs::write(
            &recipe,
            format!(
                "[image]\nname = \"stop\"\narch = \"x86_64\"\nsize = \"3GiB\"\nbase = {{ tarball = \"{}\" }}\n\n[system]\nnetwork = \"none\"\n\n[[files]]\npath = \"/etc/motd\"\ncontent = \"{motd}\"\n",
                archive.display()
            ),
        )
        .unwrap()
    };
    let build = || {
        run_ok(
            kiln()
                .arg("build")
                .arg(&recipe)
                .arg("--out")
                .arg(&out)
                .env("KILN_CACHE_DIR", &cache)
                .env("SOURCE_DATE_EPOCH", EPOCH),
        )
    };
    write_recipe("first");
    build();
    let manifest = std::fs::read(out.join("stop-x86_64.manifest.json")).unwrap();
    let sums = std::fs::read(out.join("stop-x86_64.raw.sha256")).unwrap();

    write_recipe("second");
    for (signal, code, name) in [(libc::SIGINT, 130, "SIGINT"), (libc::SIGTERM, 143, "SIGTERM")] {
        let (status, err) = build_stopped_by(&recipe, &out, &cache, signal);
        assert_eq!(status.code(), Some(code), "{name}: {status:?}, stderr: {err}");
        assert!(err.contains(&format!("stopped by {name}")) && err.contains("nothing new was published"), "{err}");
        assert_eq!(temporaries(&out), Vec::<String>::new(), "{name} left temporary files");
        assert_eq!(std::fs::read(out.join("stop-x86_64.manifest.json")).unwrap(), manifest, "{name}");
        assert_eq!(std::fs::read(out.join("stop-x86_64.raw.sha256")).unwrap(), sums, "{name}");
        let check = stdout_of(Command::new("sha256sum").arg("-c").arg("stop-x86_64.raw.sha256").current_dir(&out));
        assert!(check.trim().ends_with(": OK"), "{name}: the earlier image no longer matches: {check}");
    }

    let (status, _) = build_stopped_by(&recipe, &out, &cache, libc::SIGKILL);
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    let left = temporaries(&out);
    assert_eq!(left.len(), 1, "SIGKILL should leave the temporary image: {left:?}");
    // Only leftovers a few seconds old are taken for a dead build's: age this one.
    let f = std::fs::File::options().write(true).open(out.join(&left[0])).unwrap();
    f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(60)).unwrap();
    drop(f);
    build();
    assert_eq!(temporaries(&out), Vec::<String>::new(), "the next build did not clean up");
    assert_ne!(std::fs::read(out.join("stop-x86_64.manifest.json")).unwrap(), manifest);
    let check = stdout_of(Command::new("sha256sum").arg("-c").arg("stop-x86_64.raw.sha256").current_dir(&out));
    assert!(check.trim().ends_with(": OK"), "{check}");
}

/// Pids of running processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        if String::from_utf8_lossy(&cmd).contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

/// A build killed outright (SIGKILL) while mmdebstrap stages its base takes mmdebstrap down
/// with it (an orphan would go on writing the partial tarball the next build writes afresh),
/// and the next build stages a whole base.
#[test]
fn a_build_killed_while_staging_takes_mmdebstrap_with_it() {
    if tool("mmdebstrap").is_none() {
        return;
    }
    if kiln::stage::debian::host_mirror().is_none() {
        assert!(!in_ci(), "the CI host's apt sources name a Debian mirror");
        return;
    }
    let t = tempdir();
    let cache = t.path().join("cache");
    let build = || {
        kiln()
            .arg("build")
            .arg(root_dir().join("fixtures/build/fresh.toml"))
            .arg("--out")
            .arg(t.path().join("out"))
            .arg("--json")
            .env("KILN_CACHE_DIR", &cache)
            .env("SOURCE_DATE_EPOCH", EPOCH)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut child = build();
    let marker = cache.join("bases").to_string_lossy().into_owned();
    let started = std::time::Instant::now();
    let staging = loop {
        let p: Vec<u32> = processes_with(&marker).into_iter().filter(|&p| p != child.id()).collect();
        if !p.is_empty() {
            break p;
        }
        assert!(started.elapsed().as_secs() < 120, "mmdebstrap never started");
        assert!(child.try_wait().unwrap().is_none(), "the build ended before staging");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    std::thread::sleep(std::time::Duration::from_secs(2));
    child.kill().unwrap();
    child.wait().unwrap();
    let started = std::time::Instant::now();
    while staging.iter().any(|p| Path::new(&format!("/proc/{p}")).exists() && processes_with(&marker).contains(p)) {
        assert!(started.elapsed().as_secs() < 30, "mmdebstrap outlived the build that started it");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = build().wait_with_output().unwrap();
    assert!(out.status.success(), "the next build failed");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["base_cached"], false, "a killed staging must not be reused: {v:#}");
}

/// A root tarball made byte for byte by this test (no mmdebstrap): kernels, initrd,
/// systemd-boot stand-ins, a user database and dpkg status, so `kiln build` runs its whole
/// pipeline (generalize, [[files]], generated system files, audit, ESP, disk, records) on
/// inputs that never change.
pub(crate) fn synthetic_base(dir: &Path) -> PathBuf {
    synthetic_base_with(dir, "2.10-3")
}

/// [`synthetic_base`] with package `hello` at `hello_version` in dpkg's status.
pub(crate) fn synthetic_base_with(dir: &Path, hello_version: &str) -> PathBuf {
    let path = dir.join("base.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
    let mut rng = crate::common::XorShift(0x9e37_79b9_7f4a_7c15);
    let add = crate::common::tar_entry;
    for d in ["./", "./boot/", "./etc/", "./usr/", "./usr/lib/", "./usr/lib/systemd/", "./usr/lib/systemd/boot/"] {
        add(&mut b, d, 0o755, b"");
    }
    for d in ["./usr/lib/systemd/boot/efi/", "./var/", "./var/lib/", "./var/lib/dpkg/", "./root/", "./tmp/"] {
        add(&mut b, d, 0o755, b"");
    }
    for d in ["./usr/share/", "./usr/share/zoneinfo/", "./usr/share/zoneinfo/Europe/"] {
        add(&mut b, d, 0o755, b"");
    }
    add(&mut b, "./boot/vmlinuz-6.1.0-28-cloud-amd64", 0o644, &rng.bytes(2_000_000));
    add(&mut b, "./boot/initrd.img-6.1.0-28-cloud-amd64", 0o644, &rng.bytes(3_000_000));
    add(&mut b, "./usr/lib/systemd/boot/efi/systemd-bootx64.efi", 0o644, &rng.bytes(100_000));
    add(&mut b, "./usr/share/zoneinfo/Europe/Berlin", 0o644, b"TZif2 stand-in");
    add(
        &mut b,
        "./etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/bash\n_kiln:x:101:101::/nonexistent:/usr/sbin/nologin\n",
    );
    add(&mut b, "./etc/group", 0o644, b"root:x:0:\n_kiln:x:101:\n");
    add(&mut b, "./etc/machine-id", 0o444, b"0123456789abcdef0123456789abcdef\n");
    add(&mut b, "./etc/os-release", 0o644, b"PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\n");
    add(
        &mut b,
        "./var/lib/dpkg/status",
        0o644,
        format!(
            "Package: base-files\nStatus: install ok installed\nArchitecture: amd64\nVersion: 12.4\n\nPackage: hello\nStatus: install ok installed\nArchitecture: amd64\nVersion: {hello_version}\n\n"
        )
        .as_bytes(),
    );
    b.into_inner().unwrap();
    path
}

/// `kiln build` of a tarball base gives the bytes recorded before the build became a list of
/// library steps: the pipeline's order (files before system files, times clamped, audit) and
/// every generated file are pinned, not only the disk writer.
#[test]
fn a_tarball_build_gives_the_bytes_recorded_before_the_refactor() {
    let t = tempdir();
    synthetic_base(t.path());
    let recipe = t.path().join("pinned.toml");
    std::fs::write(
        &recipe,
        "[image]\nname = \"pinned\"\narch = \"x86_64\"\nbase = { tarball = \"base.tar\" }\n\n\
         [system]\nhostname = \"pinned\"\nnetwork = \"none\"\ntimezone = \"Europe/Berlin\"\n\
         kernel_cmdline = [\"quiet\"]\n\n\
         [[files]]\npath = \"/etc/motd\"\ncontent = \"pinned\\n\"\n\n\
         [[files]]\npath = \"/srv/data\"\ncontent = \"owned\\n\"\nowner = \"_kiln:_kiln\"\nmode = \"0640\"\n",
    )
    .unwrap();
    let out = t.path().join("out");
    let summary = run_ok(
        kiln()
            .arg("build")
            .arg(&recipe)
            .arg("--out")
            .arg(&out)
            .arg("--json")
            .env("KILN_CACHE_DIR", t.path().join("cache"))
            .env("SOURCE_DATE_EPOCH", EPOCH),
    );
    let summary: Value = serde_json::from_slice(&summary.stdout).unwrap();
    let sha = summary["sha256"].as_str().unwrap();
    assert_eq!(sha, "a641c7a1f860a925721154b339c212e05546441d323d7bb64d6b76d2250b8c4c", "the image's bytes changed");
}

/// Two CI runners that stage the same recipe from the same archive (separate caches, no
/// SOURCE_DATE_EPOCH anywhere) build the same bytes: the default epoch is the newest date the
/// installed packages carry, not the moment either runner staged them.
#[test]
fn two_cold_builds_on_two_runners_give_the_same_bytes() {
    if tool("mmdebstrap").is_none() {
        return;
    }
    let t = tempdir();
    let build = |runner: &str| {
        let o = run_ok(
            kiln()
                .arg("build")
                .arg(root_dir().join("recipes/debian-12-minimal.toml"))
                .arg("--out")
                .arg(t.path().join(runner).join("out"))
                .arg("--json")
                .env("KILN_CACHE_DIR", t.path().join(runner).join("cache"))
                .env_remove("SOURCE_DATE_EPOCH"),
        );
        let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(summary["base_cached"], false, "{runner} did not stage afresh");
        let manifest = Manifest::load(Path::new(summary["manifest"].as_str().unwrap())).unwrap();
        (summary["sha256"].as_str().unwrap().to_string(), manifest)
    };
    let (a, ma) = build("runner-a");
    // A second apart at the least: the staging times differ.
    std::thread::sleep(std::time::Duration::from_secs(1));
    let (b, mb) = build("runner-b");
    let staged_at = |m: &Manifest| m.base.as_ref().unwrap().staged_at.clone();
    assert_ne!(staged_at(&ma), staged_at(&mb));
    assert_eq!(ma.source_date_epoch, mb.source_date_epoch, "the epoch follows the staging");
    assert_eq!(a, b, "two runners built different bytes from the same packages");
}

/// A local Debian archive on 127.0.0.1 whose state a test sets (its InRelease's Date) and an
/// mmdebstrap stand-in on PATH that stages the synthetic base and answers `--simulate` with the
/// version the test sets for every requested package, and the synthetic base's own packages as
/// they are installed ("garbled": an answer kiln cannot read; "drift": the simulation names
/// another version of a package than the staging installs, as a mirror behind a CDN may do).
/// What it judges is kiln's use of them; apt's real answer is read in
/// `a_stale_base_is_restaged_and_an_unchanged_one_kept`.
pub(crate) struct FakeArchive {
    pub port: u16,
    pub bin: PathBuf,
    release: PathBuf,
    version: PathBuf,
    stagings: PathBuf,
}

impl FakeArchive {
    pub fn start(dir: &Path) -> FakeArchive {
        let synthetic = synthetic_base(dir);
        let archive = dir.join("archive");
        let release = archive.join("20261201T000000Z/dists/bookworm");
        std::fs::create_dir_all(&release).unwrap();
        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let port = server.server_addr().to_ip().unwrap().port();
        std::thread::spawn(move || {
            for req in server.incoming_requests() {
                let path = archive.join(req.url().trim_start_matches('/'));
                let _ = match std::fs::read(&path) {
                    Ok(b) => req.respond(tiny_http::Response::from_data(b)),
                    Err(_) => req.respond(tiny_http::Response::empty(404)),
                };
            }
        });
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let (version, stagings) = (dir.join("version"), dir.join("stagings"));
        std::fs::write(
            bin.join("mmdebstrap"),
            format!(
                "#!/bin/sh\n\
                 for a in \"$@\"; do case \"$a\" in --include=*) inc=\"${{a#--include=}}\";; esac; done\n\
                 for a in \"$@\"; do case \"$a\" in --simulate)\n\
                   v=$(cat {version}); [ \"$v\" = garbled ] && {{ echo 'apt said something else' >&2; exit 0; }}\n\
                   for p in $(echo \"$inc\" | tr , ' '); do echo \"Inst $p ($v Debian:12.15/oldstable [amd64])\" >&2; done\n\
                   echo 'Inst base-files (12.4 Debian:12.15/oldstable [amd64])' >&2\n\
                   h=2.10-3; [ \"$v\" = drift ] && h=2.10-4\n\
                   echo \"Inst hello ($h Debian:12.15/oldstable [amd64])\" >&2\n\
                   exit 0;; esac; done\n\
                 echo staged >> {stagings}\n\
                 for a in \"$@\"; do case \"$a\" in *.tar.partial) cp {synthetic} \"$a\";; esac; done\n",
                version = version.display(),
                stagings = stagings.display(),
                synthetic = synthetic.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(bin.join("mmdebstrap"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let a = FakeArchive { port, bin, release, version, stagings };
        a.set("Tue, 01 Dec 2026 08:00:00 UTC", "1.0-1");
        a
    }

    /// The archive as signed on `date`, with every package at `version`.
    pub fn set(&self, date: &str, version: &str) {
        let text = format!("Origin: Debian\nSuite: bookworm\nCodename: bookworm\nDate: {date}\nValid-Until: {date}\n");
        std::fs::write(self.release.join("InRelease"), text).unwrap();
        std::fs::write(&self.version, version).unwrap();
    }

    /// The `[image]` lines of a recipe built from this archive.
    pub fn image_section(&self, name: &str) -> String {
        format!(
            "[image]\nname = \"{name}\"\nos = \"debian-12\"\narch = \"x86_64\"\n\
             snapshot = \"20261201T000000Z\"\nmirror = \"http://127.0.0.1:{}/{{snapshot}}\"\n",
            self.port
        )
    }

    /// PATH with the stand-in first.
    pub fn path(&self) -> String {
        format!("{}:{}", self.bin.display(), std::env::var("PATH").unwrap_or_default())
    }

    /// How many times the stand-in staged.
    pub fn stagings(&self) -> usize {
        std::fs::read_to_string(&self.stagings).unwrap_or_default().lines().count()
    }
}

/// The base's cache key follows what is installed, not the archive's signature. A local
/// archive is re-signed with a new Date and nothing else changes: the base is reused, and
/// --json says why. A package version changes: re-staged. apt's answer is not understood:
/// re-staged, never taken for "nothing changed".
#[test]
fn a_re_signed_archive_reuses_the_base_and_a_changed_version_restages() {
    let t = tempdir();
    let fake = FakeArchive::start(t.path());
    let recipe = t.path().join("resign.toml");
    std::fs::write(&recipe, format!("{}\n[system]\nnetwork = \"none\"\n", fake.image_section("resign"))).unwrap();
    let build = |date: &str, v: &str| -> Value {
        fake.set(date, v);
        let o = run_ok(
            kiln()
                .arg("build")
                .arg(&recipe)
                .arg("--out")
                .arg(t.path().join("out"))
                .arg("--json")
                .env("PATH", fake.path())
                .env("KILN_CACHE_DIR", t.path().join("cache"))
                .env("SOURCE_DATE_EPOCH", EPOCH),
        );
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let stagings = || fake.stagings();

    let first = build("Tue, 01 Dec 2026 08:00:00 UTC", "1.0-1");
    assert_eq!((first["base_origin"]["from"].as_str(), stagings()), (Some("staged"), 1), "{first:#}");
    assert!(first["base"]["resolved"].as_str().is_some_and(|r| r.len() == 64), "{first:#}");

    let resigned = build("Tue, 08 Dec 2026 08:00:00 UTC", "1.0-1");
    assert_eq!(stagings(), 1, "a re-signed archive re-staged the base: {resigned:#}");
    assert_eq!(resigned["base_origin"]["from"], "cache", "{resigned:#}");
    let why = resigned["base_origin"]["why"].as_str().unwrap();
    assert!(why.contains("re-signed") && why.contains("same versions"), "{why}");
    assert_eq!(resigned["sha256"], first["sha256"]);
    assert_eq!(resigned["base"]["resolved"], first["base"]["resolved"]);
    // The new state is remembered: the next build at it asks apt nothing (a garbled answer
    // would otherwise re-stage).
    let again = build("Tue, 08 Dec 2026 08:00:00 UTC", "garbled");
    assert_eq!((again["base_origin"]["from"].as_str(), stagings()), (Some("cache"), 1), "{again:#}");

    let bumped = build("Wed, 09 Dec 2026 08:00:00 UTC", "1.0-2");
    assert_eq!((bumped["base_origin"]["from"].as_str(), stagings()), (Some("staged"), 2), "{bumped:#}");
    assert!(bumped["base_origin"]["why"].as_str().unwrap().contains("changed"), "{bumped:#}");
    assert_ne!(bumped["base"]["resolved"], first["base"]["resolved"]);

    let garbled = build("Thu, 10 Dec 2026 08:00:00 UTC", "garbled");
    assert_eq!((garbled["base_origin"]["from"].as_str(), stagings()), (Some("staged"), 3), "{garbled:#}");
    assert_eq!(garbled["base"].get("resolved"), None, "{garbled:#}");

    // The staging installed another version than the simulation named: the base does not
    // carry that resolution, so no later state that resolves so can reuse it.
    let drifted = build("Fri, 11 Dec 2026 08:00:00 UTC", "drift");
    assert_eq!((drifted["base_origin"]["from"].as_str(), stagings()), (Some("staged"), 4), "{drifted:#}");
    assert_eq!(drifted["base"].get("resolved"), None, "{drifted:#}");
    let again = build("Sat, 12 Dec 2026 08:00:00 UTC", "drift");
    assert_eq!((again["base_origin"]["from"].as_str(), stagings()), (Some("staged"), 5), "{again:#}");
}
