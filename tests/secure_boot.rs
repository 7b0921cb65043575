//! Secure Boot's formats, judged by independent tools: python-uefivars (the AWS project that
//! defines EC2's `UefiData` format) decodes kiln's variable store, efitools writes the
//! signature lists it must hold, and sbsigntool's `sbverify` checks kiln's Authenticode
//! signatures on real EFI binaries.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kiln::formats::authenticode::{self, Signer};
use kiln::formats::efi_vars::{self, SecureBootKeys};

use crate::common::{cache_dir, in_ci, run_ok, tempdir, tool};

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

/// python-uefivars from its venv (.ci/setup-uefi), or None locally when it is missing.
fn uefivars() -> Option<PathBuf> {
    let p = cache_dir().join("uefi-venv/bin/uefivars");
    if p.is_file() {
        return Some(p);
    }
    assert!(!in_ci(), "uefivars missing: .ci/setup-uefi should have installed it");
    eprintln!("SKIP: uefivars not installed (run .ci/setup-uefi)");
    None
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
