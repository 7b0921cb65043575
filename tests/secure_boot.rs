//! Secure Boot's formats, judged by independent tools: python-uefivars (the AWS project that
//! defines EC2's `UefiData` format) decodes kiln's variable store, efitools writes the
//! signature lists it must hold, and sbsigntool's `sbverify` checks kiln's Authenticode
//! signatures on real EFI binaries.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use kiln::formats::authenticode::{self, Signer};
use kiln::formats::efi_vars::{self, SecureBootKeys};

use serde_json::Value;

use crate::common::{cache_dir, in_ci, kiln, run_ok, stdout_of, tempdir, tool};

/// A self-signed RSA-2048 certificate and its key, made by openssl: (key.pem, cert.pem, cert.der).
fn openssl_cert(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let (key, pem, der) =
        (dir.join(format!("{name}.key")), dir.join(format!("{name}.crt")), dir.join(format!("{name}.der")));
    run_ok(
        Command::new("openssl")
            .args(["req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "3650"])
            .arg("-subj")
            .arg(format!("/CN=kiln test {name}/"))
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&pem)
            .stderr(Stdio::null()),
    );
    run_ok(Command::new("openssl").args(["x509", "-outform", "der", "-in"]).arg(&pem).arg("-out").arg(&der));
    (key, pem, der)
}

/// python-uefivars from its venv (.ci/setup-uefi).
fn uefivars() -> Option<PathBuf> {
    crate::common::venv_program("uefi-venv", "uefivars", "setup-uefi")
}

const OWNER: &str = "6b696c6e-2d73-6563-7572-652d626f6f74";

/// kiln's UefiData holds exactly the recipe's certificates, as python-uefivars reads it: the
/// store decodes to the same variables, attributes and bytes as the store uefivars itself
/// makes from signature lists efitools wrote for the same certificates.
#[test]
fn uefi_data_decodes_with_uefivars_to_the_certificates_given() {
    let (Some(uefivars), Some(_), Some(_)) = (uefivars(), tool("openssl"), tool("cert-to-efi-sig-list")) else {
        return;
    };
    let dir = tempdir();
    let d = dir.path();
    let pk = openssl_cert(d, "PK");
    let kek = openssl_cert(d, "KEK");
    let db = openssl_cert(d, "db");
    let extra = openssl_cert(d, "vendor-ca");

    let keys = SecureBootKeys {
        owner: OWNER.parse().unwrap(),
        pk: std::fs::read(&pk.2).unwrap(),
        kek: vec![std::fs::read(&kek.2).unwrap()],
        db: vec![std::fs::read(&db.2).unwrap(), std::fs::read(&extra.2).unwrap()],
        dbx: None,
    };
    let ours = d.join("kiln.aws");
    std::fs::write(&ours, efi_vars::encode_aws(&keys.variables())).unwrap();

    // efitools' lists, one per certificate, concatenated as a db with two certificates is.
    let esl = |cert: &Path, out: &str| {
        run_ok(Command::new("cert-to-efi-sig-list").args(["-g", OWNER]).arg(cert).arg(d.join(out)));
        std::fs::read(d.join(out)).unwrap()
    };
    std::fs::write(d.join("PK.esl"), esl(&pk.1, "pk1.esl")).unwrap();
    std::fs::write(d.join("KEK.esl"), esl(&kek.1, "kek1.esl")).unwrap();
    std::fs::write(d.join("db.esl"), [esl(&db.1, "db1.esl"), esl(&extra.1, "db2.esl")].concat()).unwrap();
    let theirs = d.join("uefivars.aws");
    run_ok(
        Command::new(&uefivars)
            .args(["-i", "none", "-o", "aws", "-O"])
            .arg(&theirs)
            .arg("-P")
            .arg(d.join("PK.esl"))
            .arg("-K")
            .arg(d.join("KEK.esl"))
            .arg("--db")
            .arg(d.join("db.esl")),
    );

    let json = |store: &Path| -> serde_json::Value {
        let out = run_ok(Command::new(&uefivars).args(["-i", "aws", "-o", "json", "-I"]).arg(store));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (a, b) = (json(&ours), json(&theirs));
    let names: Vec<_> = a["variables"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["PK", "KEK", "db"]);
    assert_eq!(a, b, "uefivars reads kiln's store differently from its own");
    // And the planted fault: a db without the vendor's certificate is told apart.
    let short = SecureBootKeys { db: keys.db[..1].to_vec(), ..keys.clone() };
    std::fs::write(&ours, efi_vars::encode_aws(&short.variables())).unwrap();
    assert_ne!(json(&ours), b);
}

/// An EFI binary signed by kiln verifies with sbverify against the db certificate, and with no
/// other; a changed byte breaks it; signing a signed binary again replaces its signature.
#[test]
fn sbverify_accepts_what_kiln_signs_and_nothing_else() {
    let (Some(_), Some(sbverify)) = (tool("openssl"), tool("sbverify")) else {
        return;
    };
    let loader = Path::new("/usr/lib/systemd/boot/efi/systemd-bootx64.efi");
    if !loader.is_file() {
        assert!(!in_ci(), "systemd-boot-efi is not installed; .ci/setup-host should have installed it");
        eprintln!("SKIP: {} is missing (apt-get install systemd-boot-efi)", loader.display());
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let db = openssl_cert(d, "db");
    let other = openssl_cert(d, "other");
    let signer =
        Signer::from_pem(&std::fs::read_to_string(&db.0).unwrap(), &std::fs::read_to_string(&db.1).unwrap()).unwrap();
    let wrong = Signer::from_pem(&std::fs::read_to_string(&other.0).unwrap(), &std::fs::read_to_string(&db.1).unwrap());
    assert!(wrong.is_err(), "a key that is not the certificate's is refused");

    let unsigned = std::fs::read(loader).unwrap();
    let signed = authenticode::sign(&unsigned, &signer).unwrap();
    assert_eq!(authenticode::sign(&unsigned, &signer).unwrap(), signed, "signing is deterministic");
    // The digest leaves the signature out: it is the unsigned image's, padded to eight bytes
    // as the signer padded it.
    let mut padded = unsigned.clone();
    padded.resize(unsigned.len().next_multiple_of(8), 0);
    assert_eq!(authenticode::image_digest(&signed).unwrap(), authenticode::image_digest(&padded).unwrap());
    let verify = |bytes: &[u8], cert: &Path| {
        let f = d.join("check.efi");
        std::fs::write(&f, bytes).unwrap();
        let o = Command::new(&sbverify).arg("--cert").arg(cert).arg(&f).output().unwrap();
        (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
    };
    let (ok, out) = verify(&signed, &db.1);
    assert!(ok && out.contains("Signature verification OK"), "sbverify refuses kiln's signature:\n{out}");
    assert!(!verify(&signed, &other.1).0, "verified against a certificate that did not sign it");
    assert!(!verify(&unsigned, &db.1).0, "an unsigned binary verified");
    let mut changed = signed.clone();
    changed[0x1000] ^= 1;
    assert!(!verify(&changed, &db.1).0, "a changed byte still verified");

    // Signed again (by the other key): one signature, the new one.
    let other_signer =
        Signer::from_pem(&std::fs::read_to_string(&other.0).unwrap(), &std::fs::read_to_string(&other.1).unwrap())
            .unwrap();
    let resigned = authenticode::sign(&signed, &other_signer).unwrap();
    assert!(verify(&resigned, &other.1).0);
    assert!(!verify(&resigned, &db.1).0, "the old signature survived");
    std::fs::write(d.join("list.efi"), &resigned).unwrap();
    let list = run_ok(Command::new(&sbverify).arg("--list").arg(d.join("list.efi")));
    let listed = String::from_utf8_lossy(&list.stdout);
    assert_eq!(listed.lines().filter(|l| l.starts_with("signature ")).count(), 1, "{listed}");
    assert!(listed.contains("/CN=kiln test other") && !listed.contains("/CN=kiln test db"), "{listed}");
}

/// A root tarball with the host's real systemd-boot and systemd stub (systemd-boot-efi), a
/// stand-in kernel that is a PE image, and an initrd of random bytes.
fn secure_boot_base(dir: &Path) -> Option<PathBuf> {
    let efi = Path::new("/usr/lib/systemd/boot/efi");
    if !efi.join("linuxx64.efi.stub").is_file() {
        assert!(!in_ci(), "systemd-boot-efi is not installed; .ci/setup-host should have installed it");
        eprintln!("SKIP: systemd-boot-efi is not installed");
        return None;
    }
    let path = dir.join("base.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
    let mut add = |path: &str, bytes: &[u8]| {
        crate::common::tar_entry(&mut b, path, if path.ends_with('/') { 0o755 } else { 0o644 }, bytes)
    };
    for d in ["./", "./boot/", "./etc/", "./usr/", "./usr/lib/", "./usr/lib/systemd/", "./usr/lib/systemd/boot/"] {
        add(d, b"");
    }
    for d in ["./usr/lib/systemd/boot/efi/", "./var/", "./var/lib/", "./var/lib/dpkg/", "./root/", "./tmp/"] {
        add(d, b"");
    }
    let mut rng = crate::common::XorShift(0x5ec0_b007);
    let loader = std::fs::read(efi.join("systemd-bootx64.efi")).unwrap();
    add("./boot/vmlinuz-6.1.0-28-cloud-amd64", &loader);
    add("./boot/initrd.img-6.1.0-28-cloud-amd64", &rng.bytes(1_000_000));
    add("./usr/lib/systemd/boot/efi/systemd-bootx64.efi", &loader);
    add("./usr/lib/systemd/boot/efi/linuxx64.efi.stub", &std::fs::read(efi.join("linuxx64.efi.stub")).unwrap());
    add("./etc/passwd", b"root:x:0:0:root:/root:/bin/bash\n");
    add("./etc/group", b"root:x:0:\n");
    add("./usr/lib/os-release", b"PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\n");
    add(
        "./var/lib/dpkg/status",
        b"Package: base-files\nStatus: install ok installed\nArchitecture: amd64\nVersion: 12.4\n\n",
    );
    b.into_inner().unwrap();
    Some(path)
}

/// `kiln build RECIPE --out OUT --json` with its cache in `cache`, at a fixed epoch; panics
/// when the build fails.
fn build_json(recipe: &Path, out: &Path, cache: &Path) -> std::process::Output {
    run_ok(
        kiln()
            .arg("build")
            .arg(recipe)
            .arg("--out")
            .arg(out)
            .arg("--json")
            .env("KILN_CACHE_DIR", cache)
            .env("SOURCE_DATE_EPOCH", "1700000000"),
    )
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// `kiln build` of a `[secure_boot]` recipe: the ESP holds systemd-boot and one unified kernel
/// image, both verified by sbverify against the db certificate, the UKI's sections (read by
/// objdump) holding the kernel, initrd and command line; the manifest names the keys by the
/// digests of openssl's DER and the signed files by the Authenticode digests pesign computes;
/// its UefiData holds efitools' signature lists as uefivars reads it; two builds give the same
/// bytes, and no private key is in the image or the manifest.
#[test]
fn a_secure_boot_build_signs_its_boot_chain_and_records_its_keys() {
    let tools = ["openssl", "sbverify", "pesign", "objcopy", "mcopy", "cert-to-efi-sig-list"];
    if tools.iter().any(|t| tool(t).is_none()) {
        return;
    }
    let Some(uefivars) = uefivars() else { return };
    let t = tempdir();
    let d = t.path();
    let Some(_) = secure_boot_base(d) else { return };
    let (_, pk, pk_der) = openssl_cert(d, "PK");
    let (_, _, kek_der) = openssl_cert(d, "KEK");
    let (db_key, db, db_der) = openssl_cert(d, "db");
    let recipe = d.join("signed.toml");
    let text = "[image]\nname = \"signed\"\narch = \"x86_64\"\nboot = \"uefi\"\nbase = { tarball = \"base.tar\" }\n\n\
                [system]\nnetwork = \"none\"\nkernel_cmdline = [\"quiet\"]\n\n\
                [ami]\nregions = [\"us-east-1\"]\ntpm = true\n\n\
                [secure_boot]\npk = \"PK.crt\"\nkek = [\"KEK.crt\"]\ndb = [\"db.crt\"]\nkey = \"db.key\"\n";
    std::fs::write(&recipe, text).unwrap();
    let build = |out: &str| -> Value {
        let o = build_json(&recipe, &d.join(out), &d.join("cache"));
        let log = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(!log.contains("PRIVATE KEY"), "the key reached the build's output");
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let summary = build("a");
    assert_eq!(build("b")["sha256"], summary["sha256"], "two builds of one signed recipe differ");
    let image = PathBuf::from(summary["image"].as_str().unwrap());
    let manifest_text = std::fs::read_to_string(summary["manifest"].as_str().unwrap()).unwrap();
    assert!(!manifest_text.contains("PRIVATE"));
    let manifest: Value = serde_json::from_str(&manifest_text).unwrap();
    let sb = &manifest["secure_boot"];
    let der = |p: &Path| sha256_hex(&std::fs::read(p).unwrap());
    assert_eq!(sb["pk"], der(&pk_der));
    assert_eq!(sb["kek"], serde_json::json!([der(&kek_der)]));
    assert_eq!(sb["db"], serde_json::json!([der(&db_der)]));
    assert_eq!(sb["signed_by"], der(&db_der));
    assert_eq!(manifest["ami"]["tpm"], true);

    // The ESP, copied out by mtools at the offset the manifest gives.
    let esp = manifest["disk"]["partitions"].as_array().unwrap().iter().find(|p| p["filesystem"] == "vfat").unwrap();
    let at = format!("{}@@{}", image.display(), esp["offset_bytes"]);
    let copy = |from: &str, to: &str| {
        run_ok(Command::new("mcopy").args(["-n", "-i", &at]).arg(format!("::{from}")).arg(d.join(to)));
        d.join(to)
    };
    let listing = stdout_of(Command::new("mdir").args(["-b", "-/", "-i", &at, "::"]));
    assert!(
        !listing.to_lowercase().contains("vmlinuz") && !listing.contains("entries"),
        "unsigned boot files on the ESP:\n{listing}"
    );
    let loader = copy(sb["loader"]["path"].as_str().unwrap(), "loader.efi");
    let uki = copy(sb["uki"]["path"].as_str().unwrap(), "uki.efi");
    for (f, digest) in [(&loader, &sb["loader"]), (&uki, &sb["uki"])] {
        let o = Command::new("sbverify").arg("--cert").arg(&db).arg(f).output().unwrap();
        assert!(o.status.success(), "sbverify refuses {}: {}", f.display(), String::from_utf8_lossy(&o.stderr));
        let hash = stdout_of(Command::new("pesign").arg("-h").arg("-i").arg(f));
        assert_eq!(hash.trim().strip_prefix("hash: "), digest["authenticode_sha256"].as_str(), "{}", f.display());
    }
    let section = |name: &str| {
        let out = d.join(format!("section{name}"));
        run_ok(
            Command::new("objcopy")
                .arg(format!("--dump-section={name}={}", out.display()))
                .arg(&uki)
                .arg(d.join("scratch")),
        );
        std::fs::read(out).unwrap()
    };
    let cmdline = String::from_utf8(section(".cmdline")).unwrap();
    assert_eq!(sb["cmdline"], cmdline);
    assert!(cmdline.starts_with("root=PARTUUID=") && cmdline.ends_with(" quiet"), "{cmdline}");
    assert_eq!(section(".linux"), std::fs::read("/usr/lib/systemd/boot/efi/systemd-bootx64.efi").unwrap());
    assert_eq!(section(".uname"), b"6.1.0-28-cloud-amd64");
    assert_eq!(section(".initrd").len(), 1_000_000);

    // The AMI's variable store: PK as efitools writes its signature list, as uefivars reads it.
    let store = d.join("store.aws");
    std::fs::write(&store, sb["uefi_data"].as_str().unwrap()).unwrap();
    let json: Value = serde_json::from_slice(
        &run_ok(Command::new(&uefivars).args(["-i", "aws", "-o", "json", "-I"]).arg(&store)).stdout,
    )
    .unwrap();
    run_ok(Command::new("cert-to-efi-sig-list").args(["-g", OWNER]).arg(&pk).arg(d.join("PK.esl")));
    let vars = json["variables"].as_array().unwrap();
    assert_eq!(vars.iter().map(|v| v["name"].as_str().unwrap()).collect::<Vec<_>>(), ["PK", "KEK", "db"]);
    assert_eq!(vars[0]["data"], hex::encode(std::fs::read(d.join("PK.esl")).unwrap()));

    // No private key anywhere in the image's bytes.
    let key_body: String = std::fs::read_to_string(&db_key).unwrap().lines().nth(1).unwrap().to_string();
    let bytes = std::fs::read(&image).unwrap();
    assert!(!bytes.windows(key_body.len()).any(|w| w == key_body.as_bytes()), "the db key is in the image");
}

/// A recipe whose key is not db's, or whose image can boot BIOS, is refused by `kiln check`,
/// at the line, with what to do.
#[test]
fn secure_boot_recipes_that_cannot_work_are_refused_at_the_line() {
    if tool("openssl").is_none() {
        return;
    }
    let t = tempdir();
    let d = t.path();
    for n in ["PK", "KEK", "db", "other"] {
        openssl_cert(d, n);
    }
    std::fs::write(d.join("base.tar"), b"").unwrap();
    let check = |boot: &str, key: &str| -> String {
        let recipe = d.join("r.toml");
        std::fs::write(
            &recipe,
            format!(
                "[image]\nname = \"r\"\narch = \"x86_64\"\nboot = \"{boot}\"\nbase = {{ tarball = \"base.tar\" }}\n\n\
                 [secure_boot]\npk = \"PK.crt\"\nkek = [\"KEK.crt\"]\ndb = [\"db.crt\"]\nkey = \"{key}\"\n"
            ),
        )
        .unwrap();
        let o = kiln().arg("check").arg(&recipe).output().unwrap();
        let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        if o.status.success() {
            String::new()
        } else {
            out
        }
    };
    assert_eq!(check("uefi", "db.key"), "", "a sound recipe is refused");
    let summary = stdout_of(kiln().arg("check").arg(d.join("r.toml")));
    assert!(summary.contains("PK, 1 KEK, 1 db; the boot chain signed by db[0]"), "{summary}");
    let wrong = check("uefi", "other.key");
    assert!(wrong.contains("r.toml:11") && wrong.contains("not the key of any certificate in db"), "{wrong}");
    let hybrid = check("hybrid", "db.key");
    assert!(hybrid.contains("Secure Boot needs a UEFI-only image") && hybrid.contains("boot = \"uefi\""), "{hybrid}");
    let recipe = d.join("g.toml");
    std::fs::write(
        &recipe,
        "[image]\nname = \"g\"\narch = \"x86_64\"\nboot = \"uefi\"\nbase = { tarball = \"base.tar\" }\n\n\
         [secure_boot]\ngenerate = true\npk = \"PK.crt\"\n",
    )
    .unwrap();
    let both = String::from_utf8_lossy(&kiln().arg("check").arg(&recipe).output().unwrap().stderr).into_owned();
    assert!(both.contains("g.toml:9") && both.contains("`pk` cannot be combined with `generate = true`"), "{both}");
    let swapped = check("uefi", "db.crt");
    assert!(swapped.contains("r.toml:11") && swapped.contains("is a certificate, not a private key"), "{swapped}");
}

/// The EC2 recipe with `[secure_boot]` (keys made by openssl) and a TPM, built once for the
/// tests that launch it: the image and its manifest.
fn signed_ec2() -> Option<&'static (PathBuf, PathBuf)> {
    static I: OnceLock<Option<(PathBuf, PathBuf)>> = OnceLock::new();
    I.get_or_init(|| {
        for t in ["mmdebstrap", "qemu-system-x86_64", "qemu-img", "ssh", "openssl", "swtpm", "virt-fw-vars"] {
            tool(t)?;
        }
        let dir = Box::leak(Box::new(tempdir()));
        let d = dir.path();
        for n in ["PK", "KEK", "db"] {
            openssl_cert(d, n);
        }
        let recipe = d.join("signed-ec2.toml");
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/debian-12-ec2.toml");
        std::fs::write(
            &recipe,
            format!(
                "extends = \"{}\"\n\n[image]\nname = \"signed-ec2\"\n\n[ami]\ntpm = true\n\n\
                 [secure_boot]\npk = \"PK.crt\"\nkek = [\"KEK.crt\"]\ndb = [\"db.crt\"]\nkey = \"db.key\"\n",
                base.display()
            ),
        )
        .unwrap();
        let o = build_json(&recipe, &d.join("out"), &cache_dir());
        let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
        Some((PathBuf::from(summary["image"].as_str().unwrap()), PathBuf::from(summary["manifest"].as_str().unwrap())))
    })
    .as_ref()
}

/// `kiln test` of the signed EC2 image: it launches clean with the AMI's own variable store
/// in OVMF's Secure Boot build, the guest says Secure Boot is on, and the PCRs swtpm measured
/// equal the manifest's predictions for PCR 4 and 7.
#[test]
fn a_signed_ec2_image_launches_clean_with_secure_boot_enforcing_and_the_predicted_pcrs() {
    let Some((image, manifest)) = signed_ec2() else { return };
    let m = kiln::manifest::Manifest::load(manifest).unwrap();
    let sb = m.secure_boot.as_ref().expect("a [secure_boot] build records it");
    assert_eq!(sb.pcrs.keys().copied().collect::<Vec<_>>(), [4, 7]);
    let (passed, report, err) = crate::launch::kiln_test(image, &[]);
    let checks = crate::launch::checks(&report, 0);
    assert!(passed, "kiln test failed:\n{checks:#?}\n{err}");
    for id in ["secure-boot", "pcrs", "systemd"] {
        assert!(checks.iter().any(|(i, s, _)| i == id && s == "pass"), "{id} did not pass: {checks:#?}");
    }
}

/// The firmware that boots the signed image refuses the same image with one byte of its
/// kernel changed, and an unsigned image: no kernel starts, the firmware says Access Denied
/// and gives up.
#[test]
fn the_same_firmware_refuses_a_changed_kernel_and_an_unsigned_image() {
    let Some((image, manifest)) = signed_ec2() else { return };
    let Some(unsigned) = crate::launch::ec2_image() else { return };
    if tool("mcopy").is_none() {
        return;
    }
    let m: Value = serde_json::from_slice(&std::fs::read(manifest).unwrap()).unwrap();
    let esp = m["disk"]["partitions"].as_array().unwrap().iter().find(|p| p["filesystem"] == "vfat").unwrap();
    let (esp_at, esp_len) = (esp["offset_bytes"].as_u64().unwrap(), esp["size_bytes"].as_u64().unwrap());
    let dir = tempdir();
    let d = dir.path();
    let name = image.file_name().unwrap();
    let refused = |raw: &Path, what: &str| {
        let o = kiln()
            .arg("boot")
            .arg(raw)
            .args(["--console", "--timeout", "900", "--expect", "No bootable option or device was found"])
            .output()
            .unwrap();
        let console = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{what}: the firmware did not give up:\n{console}");
        assert!(console.contains("Access Denied"), "{what}: no Access Denied:\n{console}");
        assert!(!console.contains("Linux version"), "{what}: a kernel started:\n{console}");
    };

    // One byte of the kernel inside the UKI, changed on the ESP.
    let changed = d.join("changed");
    std::fs::create_dir(&changed).unwrap();
    std::fs::copy(manifest, changed.join(manifest.file_name().unwrap())).unwrap();
    let raw = changed.join(name);
    run_ok(Command::new("cp").arg("--sparse=always").arg(image).arg(&raw));
    let uki_path = m["secure_boot"]["uki"]["path"].as_str().unwrap();
    run_ok(
        Command::new("mcopy")
            .args(["-n", "-i"])
            .arg(format!("{}@@{esp_at}", raw.display()))
            .arg(format!("::{uki_path}"))
            .arg(d.join("uki.efi")),
    );
    let uki = std::fs::read(d.join("uki.efi")).unwrap();
    let h = kiln::formats::pe::Headers::read(&uki).unwrap();
    let linux = h.sections.iter().find(|s| s.name == ".linux").unwrap();
    let at_in_uki = linux.raw_offset + linux.raw_size / 2;
    let window = &uki[at_in_uki..at_in_uki + 4096];
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&raw).unwrap();
    let mut esp_bytes = vec![0; esp_len as usize];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut esp_bytes, esp_at).unwrap();
    let found = esp_bytes.windows(4096).position(|w| w == window).expect("the UKI's bytes on the ESP");
    let at = esp_at + found as u64;
    let mut byte = [0u8];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut byte, at).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[byte[0] ^ 1], at).unwrap();
    drop(f);
    refused(&raw, "a changed kernel");

    // The unsigned EC2 image, under the signed image's name beside its manifest: the same keys.
    let plain = d.join("plain");
    std::fs::create_dir(&plain).unwrap();
    std::fs::copy(manifest, plain.join(manifest.file_name().unwrap())).unwrap();
    run_ok(Command::new("cp").arg("--sparse=always").arg(unsigned).arg(plain.join(name)));
    refused(&plain.join(name), "an unsigned image");
}

/// `generate = true`: the first build makes PK, KEK and db keys beside the image (keys 0600,
/// certificates openssl accepts as self-signed and whose keys match), signs with them (sbverify
/// checks against the generated db certificate), and a rebuild into the same directory uses
/// them again and gives the same bytes; the keys appear in no output but their own files.
#[test]
fn generated_keys_are_made_once_kept_private_and_used_again() {
    let tools = ["openssl", "sbverify", "mcopy"];
    if tools.iter().any(|t| tool(t).is_none()) {
        return;
    }
    let t = tempdir();
    let d = t.path();
    let Some(_) = secure_boot_base(d) else { return };
    let recipe = d.join("gen.toml");
    std::fs::write(
        &recipe,
        "[image]\nname = \"gen\"\narch = \"x86_64\"\nboot = \"uefi\"\nbase = { tarball = \"base.tar\" }\n\n\
         [system]\nnetwork = \"none\"\n\n[secure_boot]\ngenerate = true\n",
    )
    .unwrap();
    let build = || -> (Value, String) {
        let o = build_json(&recipe, &d.join("out"), &d.join("cache"));
        let log = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        (serde_json::from_slice(&o.stdout).unwrap(), log)
    };
    let (first, log) = build();
    let keys = d.join("out/gen-x86_64.keys");
    assert!(log.contains("gen-x86_64.keys"), "the build says where the keys are:\n{log}");
    for n in ["PK", "KEK", "db"] {
        let key = keys.join(format!("{n}.key"));
        let crt = keys.join(format!("{n}.crt"));
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600, "{n}.key is readable by others");
        let subject = stdout_of(Command::new("openssl").args(["x509", "-noout", "-subject", "-in"]).arg(&crt));
        assert!(subject.contains(&format!("gen-x86_64 {n}")), "{subject}");
        let verify = stdout_of(Command::new("openssl").arg("verify").arg("-CAfile").arg(&crt).arg(&crt));
        assert!(verify.contains(": OK"), "{verify}");
        let from_key = stdout_of(Command::new("openssl").args(["pkey", "-pubout", "-in"]).arg(&key));
        let from_crt = stdout_of(Command::new("openssl").args(["x509", "-noout", "-pubkey", "-in"]).arg(&crt));
        assert_eq!(from_key, from_crt, "{n}.key is not the key of {n}.crt");
        let key_body = std::fs::read_to_string(&key).unwrap().lines().nth(1).unwrap().to_string();
        assert!(!log.contains(&key_body), "a key reached the build's output");
    }
    let before: Vec<Vec<u8>> = ["PK.key", "db.key"].iter().map(|f| std::fs::read(keys.join(f)).unwrap()).collect();

    let manifest: Value = serde_json::from_slice(&std::fs::read(first["manifest"].as_str().unwrap()).unwrap()).unwrap();
    let image = PathBuf::from(first["image"].as_str().unwrap());
    let esp = manifest["disk"]["partitions"].as_array().unwrap().iter().find(|p| p["filesystem"] == "vfat").unwrap();
    let uki = d.join("uki.efi");
    run_ok(
        Command::new("mcopy")
            .args(["-n", "-i"])
            .arg(format!("{}@@{}", image.display(), esp["offset_bytes"]))
            .arg(format!("::{}", manifest["secure_boot"]["uki"]["path"].as_str().unwrap()))
            .arg(&uki),
    );
    let o = Command::new("sbverify").arg("--cert").arg(keys.join("db.crt")).arg(&uki).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let (second, _) = build();
    assert_eq!(second["sha256"], first["sha256"], "a rebuild with the kept keys differs");
    let after: Vec<Vec<u8>> = ["PK.key", "db.key"].iter().map(|f| std::fs::read(keys.join(f)).unwrap()).collect();
    assert_eq!(before, after, "the keys were made again");

    // Half a hierarchy is not silently replaced.
    std::fs::remove_file(keys.join("KEK.crt")).unwrap();
    let o = kiln()
        .arg("build")
        .arg(&recipe)
        .arg("--out")
        .arg(d.join("out"))
        .env("KILN_CACHE_DIR", d.join("cache"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("KEK.key or KEK.crt is missing"), "{err}");
}
