//! Recipes: the shipped ones load and pass `kiln check`; every error class names the file,
//! line, column and key and says what is accepted; `extends` merges as documented; the recipe
//! hash follows the bytes it covers and nothing else.
//!
//! Bad fixtures live in fixtures/recipes/bad/, each with `# expect: FRAGMENT` lines that the
//! rendered error must contain (fragments include `file:line:col`).

use std::path::{Path, PathBuf};

use kiln::platform::{Arch, BootMode};
use kiln::recipe::{self, Base, DiskSize, FileContent, FileKind, Network, Os, RecipeError};

use std::process::Command;

use crate::common::{debian_root_tar, kiln, run_ok, stdout_of, tempdir, tool};

const BAD: &str = "fixtures/recipes/bad";
const SHIPPED: [&str; 4] = [
    "recipes/debian-12-minimal.toml",
    "recipes/debian-12-ec2.toml",
    "recipes/web-server.toml",
    "recipes/debian-13-ec2.toml",
];

fn expectations(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines().filter_map(|l| l.strip_prefix("# expect: ")).map(str::to_string).collect()
}

/// Loads a bad fixture and checks its error carries every expected fragment.
fn check_bad(name: &str) -> RecipeError {
    let path = PathBuf::from(BAD).join(name);
    let expect = expectations(&path);
    assert!(!expect.is_empty(), "{name} has no `# expect:` lines");
    let err = match recipe::load(&path) {
        Ok(r) => panic!("{name} loaded but should not have: {r:?}"),
        Err(e) => e,
    };
    let text = err.to_string();
    for e in &expect {
        assert!(text.contains(e.as_str()), "error for {name} lacks {e:?}; it was:\n{text}");
    }
    err
}

/// The first diagnostic's key, for the tests that check the key is named.
fn first_key(e: &RecipeError) -> String {
    e.diagnostics().first().and_then(|d| d.key.clone()).unwrap_or_default()
}

#[test]
fn unknown_key_suggests_the_nearest() {
    let e = check_bad("unknown-key.toml");
    assert_eq!(first_key(&e), "pakages");
    // The offending line is shown with a caret under the key.
    assert!(e.to_string().contains("9 | [pakages]\n  |  ^^^^^^^"), "{e}");
    let e = check_bad("unknown-key-nested.toml");
    assert_eq!(first_key(&e), "image.sise");
    let e = check_bad("unknown-key-inline.toml");
    assert_eq!(first_key(&e), "ami.root_volume.tpye");
    check_bad("top-level-misplaced.toml");
}

#[test]
fn wrong_type_names_the_key_and_the_expected_form() {
    let e = check_bad("wrong-type.toml");
    assert_eq!(first_key(&e), "image.size");
    let e = check_bad("wrong-type-mode.toml");
    assert_eq!(first_key(&e), "files[0].mode");
}

#[test]
fn bad_enum_value_lists_the_accepted_values() {
    let e = check_bad("bad-os.toml");
    assert_eq!(first_key(&e), "image.os");
    let e = check_bad("bad-boot.toml");
    assert_eq!(first_key(&e), "image.boot");
}

#[test]
fn missing_source_file() {
    let e = check_bad("missing-source.toml");
    assert_eq!(first_key(&e), "files[0].source");
    let abs = std::fs::canonicalize(BAD).unwrap().join("files/absent.conf");
    assert!(e.to_string().contains(&abs.display().to_string()), "the resolved path is shown: {e}");
}

#[test]
fn bad_size() {
    let e = check_bad("bad-size.toml");
    assert_eq!(first_key(&e), "image.size");
}

#[test]
fn extends_cycle() {
    let e = check_bad("extends-cycle.toml");
    assert_eq!(first_key(&e), "extends");
}

#[test]
fn error_inside_an_extended_recipe_names_that_file() {
    let e = check_bad("extended-error.toml");
    let d = &e.diagnostics()[0];
    let pos = d.position.as_ref().unwrap();
    assert_eq!(pos.file, Path::new("fixtures/recipes/bad/parts/broken-base.toml"));
    assert_eq!((pos.line, pos.column), (6, 6));
    assert_eq!(d.extended_by, vec![PathBuf::from("fixtures/recipes/bad/extended-error.toml")]);
    // Parse-time errors (unknown keys) in a base name the base too.
    check_bad("extended-unknown-key.toml");
}

#[test]
fn bad_ami_values() {
    let e = check_bad("ami-values.toml");
    // Every problem is reported at once, in file order.
    let lines: Vec<usize> = e.diagnostics().iter().map(|d| d.position.as_ref().unwrap().line).collect();
    assert!(lines.len() >= 6, "{e}");
    assert!(lines.windows(2).all(|w| w[0] <= w[1]), "{lines:?}");
    check_bad("ami-ranges.toml");
}

/// Release settings: retention counts and SSM parameter names EC2 and SSM would refuse, each
/// pointed at.
#[test]
fn bad_release_settings() {
    let e = check_bad("ami-release.toml");
    assert_eq!(first_key(&e), "ami.keep");
    assert_eq!(e.diagnostics().len(), 10, "{e}");
}

#[test]
fn arm64_refuses_legacy_bios() {
    let e = check_bad("arm64-legacy-bios.toml");
    assert_eq!(first_key(&e), "image.boot");
    let e = check_bad("arm64-ami-legacy-bios.toml");
    assert_eq!(first_key(&e), "ami.boot_mode");
    check_bad("bundle-arm64.toml");
}

#[test]
fn tpm_needs_uefi() {
    let e = check_bad("tpm-without-uefi.toml");
    assert_eq!(first_key(&e), "ami.tpm");
}

#[test]
fn other_error_classes() {
    for f in [
        "syntax.toml",
        "files-two-kinds.toml",
        "files-bad-path.toml",
        "missing-name.toml",
        "exclude-required.toml",
        "snapshot-without-mirror.toml",
        "bundle-account.toml",
    ] {
        check_bad(f);
    }
}

/// Every bad fixture fails with its expected messages (so none is left untested).
#[test]
fn every_bad_fixture_fails_as_expected() {
    let mut n = 0;
    for entry in std::fs::read_dir(BAD).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "toml") {
            check_bad(p.file_name().unwrap().to_str().unwrap());
            n += 1;
        }
    }
    assert!(n >= 20, "only {n} bad fixtures");
}

#[test]
fn shipped_recipes_load() {
    for r in SHIPPED {
        let rec = recipe::load(Path::new(r)).unwrap_or_else(|e| panic!("{r}:\n{e}"));
        let os = if r.contains("debian-13") { Os::Debian13 } else { Os::Debian12 };
        assert_eq!(rec.os, Some(os), "{r}");
        assert_eq!(rec.arch, Arch::X86_64);
        assert_eq!(rec.boot, BootMode::Uefi);
        assert!(rec.warnings.is_empty(), "{r}: {:?}", rec.warnings);
        // No mirror written into the shipped recipes: the build host's apt sources decide.
        assert!(matches!(&rec.base, Base::Debian { mirror: None, .. }), "{r}");
    }
    let min = recipe::load(Path::new(SHIPPED[0])).unwrap();
    assert_eq!(min.size, DiskSize::Bytes(2 << 30));
    assert_eq!(min.packages, ["openssh-server"], "the minimal image adds only an SSH server");

    let ec2 = recipe::load(Path::new(SHIPPED[1])).unwrap();
    for p in ["openssh-server", "cloud-init"] {
        assert!(ec2.packages.iter().any(|x| x == p), "{p}");
    }
    assert_eq!(ec2.system.mount_esp.as_deref(), Some("/boot/efi"));
    let cfg = ec2.files.iter().find(|f| f.path.starts_with("/etc/cloud/cloud.cfg.d/")).expect("cloud-init config");
    let FileKind::File { content: FileContent::Inline(bytes) } = &cfg.kind else { panic!("{cfg:?}") };
    assert!(String::from_utf8_lossy(bytes).contains("datasource_list: [ Ec2, None ]"));
    let ami = ec2.ami.as_ref().expect("[ami]");
    assert!(!ami.launch_permissions.public && ami.launch_permissions.accounts.is_empty());
    assert_eq!(ami.boot_mode.as_str(), "uefi");

    let web = recipe::load(Path::new(SHIPPED[2])).unwrap();
    assert_eq!(web.output_name(), "web-server-x86_64");
    assert!(web.packages.contains(&"nginx".to_string()));
    assert_eq!(web.system.services_enable, vec!["nginx"]);
    // From the base: size and /etc/motd (first, since the base's files come first).
    assert_eq!(web.size, DiskSize::Bytes(2 << 30));
    assert_eq!(web.files[0].path, "/etc/motd");
    assert!(web.files.iter().any(|f| f.path == "/var/www/html/index.html"));
    assert_eq!(web.recipe_files().len(), 2);
}

#[test]
fn kiln_check_passes_on_shipped_recipes() {
    for r in SHIPPED {
        let out = kiln().args(["check", r]).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{r}: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains(": ok") && stdout.contains("sha256"), "{stdout}");
        let out = kiln().args(["check", r, "--arch", "arm64", "--json"]).output().unwrap();
        assert!(out.status.success(), "{r} --arch arm64: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["valid"], true);
        assert_eq!(v["arch"], "arm64");
        assert!(v["output_name"].as_str().unwrap().ends_with("-arm64"));
    }
}

#[test]
fn kiln_check_fails_with_the_position() {
    let out = kiln().args(["check", "fixtures/recipes/bad/bad-size.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fixtures/recipes/bad/bad-size.toml:6:8:"), "{err}");
    assert!(err.contains("6 | size = \"2GB\""), "{err}");

    let out = kiln().args(["check", "--json", "fixtures/recipes/bad/unknown-key.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], false);
    assert_eq!(v["errors"][0]["line"], 9);
    assert_eq!(v["errors"][0]["column"], 2);
    assert_eq!(v["errors"][0]["key"], "pakages");

    let out = kiln().args(["check", "no/such/recipe.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read recipe no/such/recipe.toml"));
}

#[test]
fn full_recipe_every_key() {
    let r = recipe::load(Path::new("fixtures/recipes/good/full.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.name, "full");
    assert_eq!(r.os, Some(Os::Debian13));
    assert_eq!(r.boot, BootMode::Hybrid);
    assert_eq!(r.size, DiskSize::Bytes(3 << 30));
    assert_eq!(
        r.base,
        Base::Debian {
            suite: "trixie".into(),
            mirror: Some("http://archive.example.org/debian-snapshots/20250601T000000Z".into()),
            snapshot: Some("20250601T000000Z".into()),
            components: vec!["main".into(), "contrib".into()],
            apt_mirror: Some("http://apt.example.org/debian".into()),
            apt_security_mirror: None,
        }
    );
    assert_eq!(r.source_date_epoch, Some(1_700_000_000));
    // include appends across extends, is sorted and de-duplicated; exclude removes.
    assert_eq!(r.packages, vec!["curl", "locales-all", "nginx", "openssh-server"]);
    assert_eq!(r.exclude_packages, vec!["vim-tiny"]);
    // files append: the base's motd first, then the child's (applied later, so it wins).
    let paths: Vec<&str> = r.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        ["/etc/motd", "/etc/motd", "/usr/local/bin/hello", "/srv/www", "/etc/localtime-link", "/etc/secret"]
    );
    let hello = &r.files[2];
    let FileKind::File { content: FileContent::Source(p) } = &hello.kind else { panic!() };
    assert!(p.is_absolute() && p.ends_with("fixtures/recipes/good/files/hello.sh"), "{p:?}");
    assert_eq!(hello.mode, 0o755, "an executable source stays executable");
    let www = &r.files[3];
    assert_eq!((www.kind.clone(), www.mode), (FileKind::Dir, 0o750));
    assert_eq!((www.user.as_deref(), www.group.as_deref()), (Some("www-data"), Some("www-data")));
    let passwd = "root:x:0:0:root:/root:/bin/bash\nwww-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\n";
    let group = "root:x:0:\nwww-data:x:33:\n";
    assert_eq!(www.resolve_owner(passwd, group), Ok((33, 33)));
    assert!(www.resolve_owner("root:x:0:0::/:/bin/sh\n", group).unwrap_err().to_string().contains("`www-data`"));
    assert_eq!(r.files[4].kind, FileKind::Symlink { target: "/usr/share/zoneinfo/Etc/UTC".into() });
    assert_eq!((r.files[5].mode, r.files[5].uid, r.files[5].gid), (0o600, 0, 33));
    assert!(r.files[5].origin.starts_with("fixtures/recipes/good/full.toml:"), "{}", r.files[5].origin);

    let s = &r.system;
    assert_eq!(s.hostname.as_deref(), Some("full.example"));
    assert_eq!(s.services_enable, vec!["ssh", "nginx"], "base's first; ssh.service is ssh");
    assert_eq!(s.services_disable, vec!["apt-daily.timer"]);
    assert_eq!(s.kernel_cmdline, vec!["console=tty0", "quiet"]);
    assert_eq!(s.timezone.as_deref(), Some("Europe/Paris"));
    assert_eq!(s.locale.as_deref(), Some("en_US.UTF-8"));
    assert_eq!(s.network, Network::Dhcp);
    assert_eq!(s.mount_esp.as_deref(), Some("/boot/efi"));

    let a = r.ami.as_ref().unwrap();
    assert_eq!(a.name, "full-{arch}-{date}-{sha}");
    assert_eq!(a.regions, vec!["eu-west-1", "us-east-1", "ap-southeast-2"]);
    // Only the region with settings of its own is listed; the first keeps `kms_key_arn`.
    assert_eq!(a.region_settings.keys().collect::<Vec<_>>(), ["us-east-1"]);
    let (via, key) = a.region("us-east-1", "eu-west-1");
    assert_eq!((via.as_str(), key.map(|k| &k[..24])), ("upload", Some("arn:aws:kms:us-east-1:12")));
    assert_eq!(a.region("ap-southeast-2", "eu-west-1"), (kiln::ec2::Delivery::Copy, None));
    assert_eq!(a.region("eu-west-1", "eu-west-1").1, a.kms_key_arn.as_deref());
    // `--region us-east-1 --region eu-west-1`: each region keeps its own key.
    let (via, key) = a.region("us-east-1", "us-east-1");
    assert_eq!((via.as_str(), key.map(|k| &k[..24])), ("upload", Some("arn:aws:kms:us-east-1:12")));
    assert_eq!(a.region("eu-west-1", "us-east-1"), (kiln::ec2::Delivery::Copy, a.kms_key_arn.as_deref()));
    assert_eq!(a.root_volume.size_gib, Some(8));
    assert_eq!((a.root_volume.iops, a.root_volume.throughput), (Some(4000), Some(250)));
    assert_eq!(a.boot_mode.as_str(), "uefi-preferred");
    assert!(a.ena && a.sriov && !a.tpm && a.encrypted);
    assert_eq!(a.imds.map(|i| i.as_str()), Some("v2.0"));
    assert_eq!(a.launch_permissions.accounts, vec!["123456789012", "012345678901"]);
    assert_eq!(a.launch_permissions.organizational_units.len(), 1);
    assert_eq!(a.keep, Some(5));
    assert_eq!(a.deprecate_after.as_ref().map(|d| d.to_string()).as_deref(), Some("365d"));
    assert_eq!(a.protect, Some(kiln::ec2::Protection::EnabledWithCooldown));
    assert_eq!((a.keep_if_launched_within_days, a.disable_before_delete_days), (Some(30), Some(7)));
    assert_eq!(a.copy_within_minutes, Some(60));
    assert_eq!(a.ssm_parameters, ["/golden/{name}/{arch}/latest", "/golden/{name}/{arch}/{date}"]);
    // tags merge key by key, the child winning.
    assert_eq!(a.tags.get("team").map(String::as_str), Some("platform"));
    assert_eq!(a.tags.get("owner").map(String::as_str), Some("base-team"));
    assert_eq!(a.volumes.len(), 1);
    assert_eq!(
        (a.volumes[0].volume_type.as_str(), a.volumes[0].iops, a.volumes[0].delete_on_termination),
        ("io2", Some(5000), false)
    );
    let b = r.bundle.as_ref().unwrap();
    assert_eq!(b.account.as_deref(), Some("123456789012"));
    assert_eq!(b.upload.as_deref(), Some("s3://my-bucket/images"));
}

#[test]
fn arch_override_revalidates() {
    let r = recipe::load(Path::new("fixtures/recipes/good/full.toml")).unwrap();
    // full.toml boots hybrid, which has a BIOS half: not buildable for arm64.
    let e = r.with_arch(Arch::Arm64).unwrap_err().to_string();
    assert!(e.contains("cannot be built for arm64 (arm64 was chosen with --arch)"), "{e}");
    assert!(e.contains("instance-store bundles cannot be built for arm64"), "{e}");

    let web = recipe::load(Path::new(SHIPPED[2])).unwrap();
    let sha = web.sha256.clone();
    let arm = web.with_arch(Arch::Arm64).unwrap();
    assert_eq!((arm.arch, arm.boot), (Arch::Arm64, BootMode::Uefi));
    assert_eq!(arm.output_name(), "web-server-arm64");
    assert_eq!(arm.sha256, sha, "the recipe hash covers the recipe, not the --arch flag");
}

#[test]
fn tarball_base() {
    let dir = tempdir();
    std::fs::write(dir.path().join("rootfs.tar"), b"not really a tar, but recipes only check it exists").unwrap();
    let recipe = dir.path().join("r.toml");
    std::fs::write(&recipe, "[image]\nname = \"t\"\nbase = { tarball = \"rootfs.tar\" }\n").unwrap();
    let r = recipe::load(&recipe).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.os, None);
    assert_eq!(r.base, Base::Tarball(std::fs::canonicalize(dir.path()).unwrap().join("rootfs.tar")));
    assert_eq!(r.size, DiskSize::Auto);
    let sha = r.sha256.clone();
    std::fs::write(dir.path().join("rootfs.tar"), b"another root").unwrap();
    assert_ne!(recipe::load(&recipe).unwrap().sha256, sha, "the tarball's bytes are hashed");

    std::fs::write(&recipe, "[image]\nname = \"t\"\nos = \"debian-12\"\nbase = { tarball = \"rootfs.tar\" }\n[packages]\ninclude = [\"nginx\"]\n").unwrap();
    let e = recipe::load(&recipe).unwrap_err().to_string();
    assert!(e.contains("r.toml:3:6: `os` cannot be combined with `base.tarball`"), "{e}");
    assert!(e.contains("[packages] cannot be used with a tarball base"), "{e}");
}

fn copy_shipped(to: &Path) {
    std::fs::create_dir_all(to.join("files")).unwrap();
    for f in ["debian-12-minimal.toml", "web-server.toml", "files/index.html"] {
        std::fs::copy(Path::new("recipes").join(f), to.join(f)).unwrap();
    }
}

#[test]
fn recipe_hash_follows_the_bytes_it_covers() {
    let dir = tempdir();
    let a = dir.path().join("a");
    copy_shipped(&a);
    let web = a.join("web-server.toml");
    let h1 = recipe::load(&web).unwrap().sha256;
    assert_eq!(h1.len(), 64);
    assert_eq!(recipe::load(&web).unwrap().sha256, h1, "stable across loads");

    // The same recipes elsewhere hash the same: paths are not part of it.
    let b = dir.path().join("b");
    copy_shipped(&b);
    assert_eq!(recipe::load(&b.join("web-server.toml")).unwrap().sha256, h1);
    // …and so does the shipped copy itself.
    assert_eq!(recipe::load(Path::new(SHIPPED[2])).unwrap().sha256, h1);

    // A referenced source file changes: the hash changes; restored: back to the same.
    let page = a.join("files/index.html");
    let orig = std::fs::read(&page).unwrap();
    std::fs::write(&page, b"<h1>changed</h1>\n").unwrap();
    let h2 = recipe::load(&web).unwrap().sha256;
    assert_ne!(h2, h1);
    std::fs::write(&page, &orig).unwrap();
    assert_eq!(recipe::load(&web).unwrap().sha256, h1);

    // The extended recipe changes: the hash changes.
    let base = a.join("debian-12-minimal.toml");
    let text = std::fs::read_to_string(&base).unwrap();
    std::fs::write(&base, text.replace("Baked by kiln.", "Baked by kiln!")).unwrap();
    assert_ne!(recipe::load(&web).unwrap().sha256, h1);
}

#[test]
fn bundle_on_uefi_only_image_warns() {
    let dir = tempdir();
    let p = dir.path().join("r.toml");
    std::fs::write(&p, "[image]\nname = \"b\"\nos = \"debian-12\"\n[bundle]\naccount = \"123456789012\"\n").unwrap();
    let r = recipe::load(&p).unwrap();
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    assert!(r.warnings[0].contains("legacy BIOS"), "{:?}", r.warnings);
}

/// Each recipe's relative paths resolve against its own directory, wherever the child is.
#[test]
fn extended_recipes_resolve_paths_against_their_own_directory() {
    let dir = tempdir();
    let base_dir = dir.path().join("team/base");
    let child_dir = dir.path().join("apps/web");
    std::fs::create_dir_all(base_dir.join("files")).unwrap();
    std::fs::create_dir_all(child_dir.join("files")).unwrap();
    std::fs::write(base_dir.join("files/motd"), "base\n").unwrap();
    std::fs::write(child_dir.join("files/motd"), "child\n").unwrap();
    std::fs::write(
        base_dir.join("golden.toml"),
        "[image]\nos = \"debian-12\"\n[[files]]\npath = \"/etc/motd\"\nsource = \"files/motd\"\n",
    )
    .unwrap();
    std::fs::write(
        child_dir.join("web.toml"),
        "extends = \"../../team/base/golden.toml\"\n[image]\nname = \"web\"\n[[files]]\npath = \"/etc/motd.d/web\"\nsource = \"files/motd\"\n",
    )
    .unwrap();
    let r = recipe::load(&child_dir.join("web.toml")).unwrap_or_else(|e| panic!("{e}"));
    let sources: Vec<PathBuf> = r
        .files
        .iter()
        .map(|f| match &f.kind {
            FileKind::File { content: FileContent::Source(p) } => p.clone(),
            k => panic!("{k:?}"),
        })
        .collect();
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap();
    assert_eq!(sources, vec![canon(&base_dir.join("files/motd")), canon(&child_dir.join("files/motd"))]);

    // A missing source in the base is reported in the base, with the base's directory.
    std::fs::remove_file(base_dir.join("files/motd")).unwrap();
    let e = recipe::load(&child_dir.join("web.toml")).unwrap_err().to_string();
    assert!(e.contains("team/base/golden.toml:5:10: source file `files/motd` cannot be read"), "{e}");
    assert!(e.contains(&canon(&base_dir).display().to_string()), "{e}");
    assert!(e.contains("is extended by"), "{e}");
}

#[test]
fn files_under_the_esp_mount_point_warn() {
    let dir = tempdir();
    let p = dir.path().join("r.toml");
    std::fs::write(
        &p,
        "[image]\nname = \"w\"\nos = \"debian-12\"\n[system]\nmount_esp = \"/boot/efi\"\n[[files]]\npath = \"/boot/efi/x.conf\"\ncontent = \"x\"\n[[files]]\npath = \"/boot/efiles\"\ncontent = \"not under the mount\"\n",
    )
    .unwrap();
    let r = recipe::load(&p).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    assert!(r.warnings[0].contains("/boot/efi/x.conf is under /boot/efi"), "{:?}", r.warnings);
    let out = kiln().arg("check").arg(&p).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("kiln: warning: [[files]] /boot/efi/x.conf"));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 300, ..Default::default() })]

    /// Mangled recipes never panic the loader, and every error points inside the file it names.
    #[test]
    fn mangled_recipes_fail_cleanly(
        edits in proptest::collection::vec((0usize..2000, 0usize..6, proptest::sample::select(vec![
            "", "\"", "'", "[", "]", "[[", "=", "\n", "{", "}", ",", "x", "0", "-", ".", "é", "\r\n", "\t", "#",
            "size = \"1GB\"\n", "[ami]\n", "boot_mode = \"legacy-bios\"\n", "arch = \"arm64\"\n", "mode = \"9\"\n",
        ])), 1..6)
    ) {
        let base = std::fs::read_to_string("recipes/debian-12-ec2.toml").unwrap();
        let mut text = base.into_bytes();
        for (at, del, ins) in edits {
            let at = at % (text.len() + 1);
            let end = (at + del).min(text.len());
            text.splice(at..end, ins.bytes());
        }
        let dir = tempdir();
        std::fs::create_dir_all(dir.path().join("files")).unwrap();
        std::fs::copy("recipes/files/sshd-hardening.conf", dir.path().join("files/sshd-hardening.conf")).unwrap();
        let p = dir.path().join("r.toml");
        std::fs::write(&p, &text).unwrap();
        if let Err(e) = recipe::load(&p) {
            let rendered = e.to_string();
            proptest::prop_assert!(!rendered.is_empty());
            for d in e.diagnostics() {
                let pos = d.position.as_ref().unwrap();
                let lines = String::from_utf8_lossy(&text).split('\n').count();
                proptest::prop_assert!(pos.line >= 1 && pos.line <= lines, "{rendered}");
                proptest::prop_assert!(pos.column >= 1, "{rendered}");
            }
        }
    }
}

#[test]
fn root_volume_size_follows_the_image_when_not_given() {
    let dir = tempdir();
    let p = dir.path().join("r.toml");
    std::fs::write(
        &p,
        "[image]\nname = \"a\"\nos = \"debian-12\"\nsize = \"auto\"\n[ami]\nregions = [\"us-east-1\"]\n",
    )
    .unwrap();
    let ami = recipe::load(&p).unwrap().ami.unwrap();
    assert_eq!(ami.root_volume.size_gib, None, "unknown until built");
    assert_eq!(recipe::with_root_size(ami.clone(), (1 << 30) + 1).root_volume.size_gib, Some(2));
    assert_eq!(recipe::with_root_size(ami, 1 << 30).root_volume.size_gib, Some(1));
    // With a fixed image size, the default is known at once (2.5 GiB → 3 GiB).
    std::fs::write(&p, "[image]\nname = \"a\"\nos = \"debian-12\"\nsize = \"2560MiB\"\n[ami]\n").unwrap();
    let ami = recipe::load(&p).unwrap().ami.unwrap();
    assert_eq!(ami.root_volume.size_gib, Some(3));
    assert_eq!(recipe::with_root_size(ami, 100 << 30).root_volume.size_gib, Some(3), "a set size is kept");
}

/// What a recipe says about files and system settings is what debugfs finds in the built
/// image: named owners resolved through the image's /etc/passwd, modes, an executable source,
/// a symlink, the time zone, and no DHCP file with `network = "none"`.
#[test]
fn recipe_settings_reach_the_image() {
    let (Some(tar), Some(debugfs)) = (debian_root_tar(), tool("debugfs")) else { return };
    let dir = tempdir();
    std::fs::create_dir_all(dir.path().join("files")).unwrap();
    let hello = dir.path().join("files/hello.sh");
    std::fs::write(&hello, "#!/bin/sh\necho hello\n").unwrap();
    std::fs::set_permissions(&hello, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let recipe = dir.path().join("settings.toml");
    std::fs::write(
        &recipe,
        format!(
            r#"[image]
name = "settings"
base = {{ tarball = "{}" }}
size = "2GiB"
source_date_epoch = 1700000000

[[files]]
path = "/srv/www"
dir = true
mode = "0750"
owner = "www-data:www-data"

[[files]]
path = "/usr/local/bin/hello"
source = "files/hello.sh"

[[files]]
path = "/etc/kiln-link"
symlink = "/etc/hostname"

[[files]]
path = "/etc/secret"
content = "s3cret\n"
mode = "0600"
owner = "0:33"

[system]
hostname = "settings"
timezone = "Etc/UTC"
network = "none"
"#,
            tar.display()
        ),
    )
    .unwrap();
    let out = dir.path().join("out");
    run_ok(kiln().arg("build").arg(&recipe).arg("--out").arg(&out));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("settings-x86_64.manifest.json")).unwrap()).unwrap();
    let root = manifest["disk"]["partitions"].as_array().unwrap().iter().find(|p| p["filesystem"] == "ext4").unwrap();
    let img = format!("{}?offset={}", out.join("settings-x86_64.raw").display(), root["offset_bytes"]);
    let stat = |p: &str| stdout_of(Command::new(&debugfs).arg("-R").arg(format!("stat {p}")).arg(&img));
    let has = |s: &str, want: &str| assert!(s.contains(want), "want {want:?} in:\n{s}");

    let www = stat("/srv/www");
    has(&www, "Type: directory");
    has(&www, "Mode:  0750");
    has(&www, "User:    33   Group:    33");
    let hello = stat("/usr/local/bin/hello");
    has(&hello, "Type: regular");
    has(&hello, "Mode:  0755");
    has(&stat("/etc/kiln-link"), "Fast link dest: \"/etc/hostname\"");
    let secret = stat("/etc/secret");
    has(&secret, "Mode:  0600");
    has(&secret, "User:     0   Group:    33");
    has(&stat("/etc/localtime"), "Fast link dest: \"/usr/share/zoneinfo/Etc/UTC\"");
    let cat = |p: &str| stdout_of(Command::new(&debugfs).arg("-R").arg(format!("cat {p}")).arg(&img));
    assert_eq!(cat("/etc/secret"), "s3cret\n");
    assert_eq!(cat("/etc/timezone"), "Etc/UTC\n");
    assert_eq!(cat("/usr/local/bin/hello"), "#!/bin/sh\necho hello\n");
    let net = stdout_of(Command::new(&debugfs).arg("-R").arg("ls -l /etc/systemd/network").arg(&img));
    assert!(!net.contains("80-kiln-dhcp.network"), "network = \"none\" writes no DHCP config:\n{net}");
    // The recipe hash in the manifest is the one `kiln check` reports.
    let check: serde_json::Value =
        serde_json::from_slice(&run_ok(kiln().args(["check", "--json"]).arg(&recipe)).stdout).unwrap();
    assert_eq!(manifest["recipe"]["sha256"], check["sha256"]);
}

/// Every independent problem in one run, as compilers do: a wrong type and a misspelt key
/// (which stop the TOML parser) and a bad value (which the validator finds) come out together,
/// each with its own position, in the text and in `--json`.
#[test]
fn every_problem_in_one_run() {
    let e = check_bad("three-faults.toml");
    assert_eq!(e.diagnostics().len(), 3, "{e}");
    let out = kiln().args(["check", "--json", "fixtures/recipes/bad/three-faults.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let errors = v["errors"].as_array().unwrap();
    let mut lines: Vec<u64> = errors.iter().map(|e| e["line"].as_u64().unwrap()).collect();
    lines.sort();
    assert_eq!(lines, [9, 10, 13], "{v:#}");
}
