//! Instance-store bundles, judged by public tools only: openssl decrypts the wrapped key and IV
//! and the parts and verifies the signature, gunzip and GNU tar unpack, sha1sum checks digests.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kiln::formats::bundle::{self, BundleSpec, Credentials, Secrets};

use crate::common::{run_ok, tempdir, tool};

/// Throwaway RSA keys and self-signed certificates, generated per test (never committed).
fn keypair(dir: &Path, name: &str, pkcs1: bool) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}-pk.pem"));
    let cert = dir.join(format!("{name}-cert.pem"));
    run_ok(Command::new("openssl").args(["genrsa", "-out"]).arg(&key).arg("2048").stderr(Stdio::null()));
    if pkcs1 {
        run_ok(Command::new("openssl").args(["rsa", "-traditional", "-in"]).arg(&key).arg("-out").arg(&key));
    }
    run_ok(
        Command::new("openssl")
            .args(["req", "-new", "-x509", "-days", "2", "-subj", "/CN=kiln-test-only", "-key"])
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    );
    (key, cert)
}

/// A sparse image: incompressible data from a fixed seed (so it spans several parts), holes,
/// and a hole at the end.
fn make_image(path: &Path, data_mib: usize) -> Vec<u8> {
    let size = (data_mib as u64 + 8) << 20;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut data = vec![0u8; data_mib << 20];
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"boot sector", 0).unwrap();
    f.write_all_at(&data, 3 << 20).unwrap();
    std::fs::read(path).unwrap()
}

fn openssl_ok() -> bool {
    tool("openssl").is_some() && tool("tar").is_some() && tool("gunzip").is_some()
}

fn decrypt_hex(key: &Path, hex_text: &str, dir: &Path) -> String {
    let ct = dir.join("ct.bin");
    std::fs::write(&ct, hex::decode(hex_text).unwrap()).unwrap();
    let out = run_ok(Command::new("openssl").args(["pkeyutl", "-decrypt", "-inkey"]).arg(key).arg("-in").arg(&ct));
    String::from_utf8(out.stdout).unwrap()
}

fn between<'a>(text: &'a str, open: &str, close: &str) -> &'a str {
    let a = text.find(open).unwrap() + open.len();
    let b = text[a..].find(close).unwrap() + a;
    &text[a..b]
}

#[test]
fn round_trip_with_public_tools_only() {
    if !openssl_ok() {
        return;
    }
    let t = tempdir();
    let d = t.path();
    let (user_key, user_cert) = keypair(d, "user", false);
    let (_ec2_key, ec2_cert) = keypair(d, "ec2", true);
    let img = d.join("disk.raw");
    let image = make_image(&img, 24);
    let creds = Credentials::load(&user_cert, &user_key, &ec2_cert).unwrap();
    let spec = BundleSpec {
        name: "disk".into(),
        member_name: "disk.raw".into(),
        arch: "x86_64".into(),
        account: "123456789012".into(),
        mtime: 1_700_000_000,
        mappings: BundleSpec::default_mappings(),
        level: 6,
        threads: 0,
    };
    let mut rng = rand::rng();
    let secrets = Secrets::random(&mut rng);
    let out = d.join("out");
    let s = bundle::bundle(&img, &out, &spec, &creds, secrets, &mut rng, &kiln::progress::Silent).unwrap();
    assert!(s.part_paths.len() >= 3, "24 MiB of random data must span several 10 MiB parts");

    let xml = std::fs::read_to_string(&s.manifest_path).unwrap();
    assert!(xml.starts_with("<?xml version='1.0'?><manifest><version>2007-10-10</version>"));
    assert!(!xml.contains('\n'));

    // openssl recovers key and IV from the user-wrapped copies.
    let key_hex = decrypt_hex(&user_key, between(&xml, "<user_encrypted_key algorithm='AES-128-CBC'>", "<"), d);
    let iv_hex = decrypt_hex(&user_key, between(&xml, "<user_encrypted_iv>", "<"), d);
    assert_eq!(key_hex, hex::encode(secrets.key));
    assert_eq!(iv_hex, hex::encode(secrets.iv));

    // Each part's sha1sum matches the manifest, and parts are 10 MiB but the last.
    for (i, p) in s.part_paths.iter().enumerate() {
        let sum = crate::common::stdout_of(Command::new("sha1sum").arg(p));
        let name = p.file_name().unwrap().to_str().unwrap();
        let want = between(&xml, &format!("<filename>{name}</filename><digest algorithm='SHA1'>"), "<");
        assert_eq!(&sum[..40], want, "part {i}");
        let len = std::fs::metadata(p).unwrap().len();
        if i + 1 < s.part_paths.len() {
            assert_eq!(len, 10_485_760);
        }
    }

    // cat parts | openssl enc -d | gunzip → a tar whose SHA-1 is the manifest digest.
    let mut cat = Vec::new();
    for p in &s.part_paths {
        cat.extend(std::fs::read(p).unwrap());
    }
    let mut dec = Command::new("openssl")
        .args(["enc", "-d", "-aes-128-cbc", "-K", &key_hex, "-iv", &iv_hex])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = dec.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&cat).unwrap());
    let gz = dec.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(gz.status.success());
    let tar_path = d.join("image.tar");
    let mut gunzip = Command::new("gunzip").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdin = gunzip.stdin.take().unwrap();
    let w = std::thread::spawn(move || stdin.write_all(&gz.stdout).unwrap());
    let tar_bytes = gunzip.wait_with_output().unwrap();
    w.join().unwrap();
    assert!(tar_bytes.status.success());
    std::fs::write(&tar_path, &tar_bytes.stdout).unwrap();
    let sum = crate::common::stdout_of(Command::new("sha1sum").arg(&tar_path));
    assert_eq!(&sum[..40], between(&xml, "<digest algorithm='SHA1'>", "<"));

    // GNU tar extracts a byte-identical image.
    let x = d.join("x");
    std::fs::create_dir(&x).unwrap();
    run_ok(Command::new("tar").arg("-xSf").arg(&tar_path).arg("-C").arg(&x));
    assert!(std::fs::read(x.join("disk.raw")).unwrap() == image, "tar -x differs from the image");

    // openssl verifies the signature over the two elements as written.
    let signed = format!(
        "<machine_configuration>{}</machine_configuration><image>{}</image>",
        between(&xml, "<machine_configuration>", "</machine_configuration>"),
        between(&xml, "<image>", "</image>")
    );
    std::fs::write(d.join("signed.txt"), signed).unwrap();
    std::fs::write(d.join("sig.bin"), hex::decode(between(&xml, "<signature>", "<")).unwrap()).unwrap();
    let pubkey = run_ok(Command::new("openssl").args(["x509", "-pubkey", "-noout", "-in"]).arg(&user_cert)).stdout;
    std::fs::write(d.join("pub.pem"), pubkey).unwrap();
    run_ok(
        Command::new("openssl")
            .args(["dgst", "-sha1", "-verify"])
            .arg(d.join("pub.pem"))
            .arg("-signature")
            .arg(d.join("sig.bin"))
            .arg(d.join("signed.txt")),
    );

    // kiln's own reader restores it too, and refuses a tampered part.
    let restored = d.join("restored.raw");
    let key = bundle::load_private_key(&user_key).unwrap();
    bundle::unbundle(&s.manifest_path, &key, &restored, &kiln::progress::Silent).unwrap();
    assert!(std::fs::read(&restored).unwrap() == image);
    let mut part = std::fs::read(&s.part_paths[1]).unwrap();
    part[100] ^= 1;
    std::fs::write(&s.part_paths[1], part).unwrap();
    let err = bundle::unbundle(&s.manifest_path, &key, &d.join("r2.raw"), &kiln::progress::Silent).unwrap_err();
    assert!(err.to_string().contains("part 1"), "{err}");
    assert!(!d.join("r2.raw").exists());
}

#[test]
fn mismatched_cert_and_key_and_bad_account_are_refused() {
    if !openssl_ok() {
        return;
    }
    let t = tempdir();
    let d = t.path();
    let (user_key, _user_cert) = keypair(d, "user", false);
    let (_k2, other_cert) = keypair(d, "other", false);
    let err = Credentials::load(&other_cert, &user_key, &other_cert).err().unwrap();
    assert!(err.to_string().contains("do not belong together"), "{err}");
    let err = bundle::load_private_key(&other_cert).err().unwrap();
    assert!(err.to_string().contains("is a certificate"), "{err}");
}
