//! Instance-store bundles, judged by public tools only: openssl decrypts the wrapped key and IV
//! and the parts and verifies the signature, gunzip and GNU tar unpack, sha1sum checks digests.

use std::io::Write;

use base64::Engine as _;
use sha1::Digest as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kiln::formats::bundle::{self, BundleSpec, Credentials, Secrets};

use crate::common::{kiln, run_ok, tempdir, tool};
use crate::moto::{Mode, Moto, Proxy};

/// Throwaway RSA keys and self-signed certificates, generated per test (never committed).
pub fn keypair(dir: &Path, name: &str, pkcs1: bool) -> (PathBuf, PathBuf) {
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
    let data = crate::common::XorShift(0x9e37_79b9_7f4a_7c15).bytes(data_mib << 20);
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

/// A user key pair (PKCS#8), an EC2 certificate (its key PKCS#1) and the loaded credentials.
fn creds(d: &Path) -> (PathBuf, PathBuf, Credentials) {
    let (user_key, user_cert) = keypair(d, "user", false);
    let (_ec2_key, ec2_cert) = keypair(d, "ec2", true);
    let c = Credentials::load(&user_cert, &user_key, &ec2_cert).unwrap();
    (user_key, user_cert, c)
}

fn spec(name: &str, threads: usize) -> BundleSpec {
    BundleSpec {
        name: name.into(),
        member_name: format!("{name}.raw"),
        arch: "x86_64".into(),
        account: "123456789012".into(),
        mtime: 1_700_000_000,
        mappings: BundleSpec::default_mappings(),
        level: 6,
        threads,
    }
}

#[test]
fn round_trip_with_public_tools_only() {
    if !openssl_ok() {
        return;
    }
    let t = tempdir();
    let d = t.path();
    let (user_key, user_cert, creds) = creds(d);
    let img = d.join("disk.raw");
    let image = make_image(&img, 24);
    let spec = spec("disk", 0);
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

/// Fixed image, key, IV and mtime: everything but the RSA outputs (random padding) and the
/// version is pinned byte for byte, so a change in element order, quoting or digests shows.
#[test]
fn manifest_shape_is_pinned_against_a_fixed_key_and_iv() {
    if !openssl_ok() {
        return;
    }
    let t = tempdir();
    let d = t.path();
    let (_, _, creds) = creds(d);
    let img = d.join("golden.raw");
    make_image(&img, 14);
    let spec = spec("golden", 2);
    let secrets = Secrets { key: *b"0123456789abcdef", iv: *b"fedcba9876543210" };
    let out = d.join("out");
    let s = bundle::bundle(&img, &out, &spec, &creds, secrets, &mut rand::rng(), &kiln::progress::Silent).unwrap();
    let mut xml = std::fs::read_to_string(&s.manifest_path).unwrap();
    for (open, tag) in [
        ("<ec2_encrypted_key algorithm='AES-128-CBC'>", "@EC2_KEY@"),
        ("<user_encrypted_key algorithm='AES-128-CBC'>", "@USER_KEY@"),
        ("<ec2_encrypted_iv>", "@EC2_IV@"),
        ("<user_encrypted_iv>", "@USER_IV@"),
        ("<signature>", "@SIGNATURE@"),
        ("<bundler><name>kiln</name><version>", "@VERSION@"),
    ] {
        let value = between(&xml, open, "<").to_string();
        assert!(!value.is_empty(), "{open} is empty");
        xml = xml.replacen(&format!("{open}{value}<"), &format!("{open}{tag}<"), 1);
    }
    let golden_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/bundle/golden.manifest.xml");
    if std::env::var_os("KILN_BLESS").is_some() {
        std::fs::create_dir_all(golden_path.parent().unwrap()).unwrap();
        std::fs::write(&golden_path, &xml).unwrap();
    }
    let golden = std::fs::read_to_string(&golden_path).unwrap();
    assert_eq!(xml, golden.trim_end_matches('\n'), "manifest differs from {}", golden_path.display());
}

fn kiln_bundle(d: &Path, keys: &(PathBuf, PathBuf, PathBuf), image: &Path) -> Command {
    let mut c = kiln();
    c.arg("bundle")
        .arg(image)
        .arg("--user-key")
        .arg(&keys.0)
        .arg("--user-cert")
        .arg(&keys.1)
        .arg("--ec2-cert")
        .arg(&keys.2)
        .arg("-o")
        .arg(d.join("b"));
    c
}

fn keys(d: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (k, c) = keypair(d, "user", false);
    let (_e, ec2) = keypair(d, "ec2", true);
    (k, c, ec2)
}

fn failure(c: &mut Command) -> String {
    let o = c.output().unwrap();
    assert!(!o.status.success(), "{c:?} should have failed");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn bad_inputs_get_clear_errors_and_leave_nothing_behind() {
    if !openssl_ok() {
        return;
    }
    let t = tempdir();
    let d = t.path();
    let k = keys(d);
    let img = d.join("disk.raw");
    make_image(&img, 1);

    let err = failure(kiln_bundle(d, &k, &img).args(["--account", "12345"]));
    assert!(err.contains("\"12345\" is not a 12-digit AWS account number"), "{err}");
    let err = failure(kiln_bundle(d, &k, &img).args(["--account", "123456789012", "--arch", "arm64"]));
    assert!(err.contains("cannot be made for arm64"), "{err}");
    let err = failure(&mut kiln_bundle(d, &k, &img));
    assert!(err.contains("--account"), "{err}");

    // An EC key where an RSA key is needed, and a certificate that is not the key's.
    let ec = d.join("ec.pem");
    run_ok(
        Command::new("openssl")
            .args(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out"])
            .arg(&ec),
    );
    let bad = (ec.clone(), k.1.clone(), k.2.clone());
    let err = failure(kiln_bundle(d, &bad, &img).args(["--account", "123456789012"]));
    assert!(err.contains("not an RSA private key"), "{err}");
    let swapped = (k.0.clone(), k.2.clone(), k.2.clone());
    let err = failure(kiln_bundle(d, &swapped, &img).args(["--account", "123456789012"]));
    assert!(err.contains("do not belong together"), "{err}");
    assert!(!d.join("b").join("disk.manifest.xml").exists(), "a failed bundle must leave no manifest");

    // An image with no boot code in its MBR (UEFI only) is bundled, with a warning; one with
    // boot code draws none.
    let uefi = d.join("uefi.raw");
    std::fs::write(&uefi, [vec![0u8; 512], vec![7u8; 8192]].concat()).unwrap();
    let o = kiln_bundle(d, &k, &uefi).args(["--account", "123456789012"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("warning") && err.contains("cannot boot in BIOS mode"), "{err}");
    let o = kiln_bundle(d, &k, &img).args(["--account", "123456789012"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("warning"), "{err}");

    // Missing and damaged parts are refused by unbundle, naming the part.
    let manifest = d.join("b/disk.manifest.xml");
    let part0 = d.join("b/disk.part.0");
    let saved = std::fs::read(&part0).unwrap();
    std::fs::remove_file(&part0).unwrap();
    let unb = || {
        let mut c = kiln();
        c.arg("unbundle").arg(&manifest).arg("--user-key").arg(&k.0).arg("-o").arg(d.join("r.raw"));
        c
    };
    let err = failure(&mut unb());
    assert!(err.contains("part 0") && err.contains("missing"), "{err}");
    let mut damaged = saved.clone();
    damaged[7] ^= 0x40;
    std::fs::write(&part0, &damaged).unwrap();
    let err = failure(&mut unb());
    assert!(err.contains("part 0") && err.contains("damaged"), "{err}");
    // A manifest edited after signing (here: another architecture) fails the signature.
    std::fs::write(&part0, &saved).unwrap();
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replace("<architecture>x86_64<", "<architecture>i386<")).unwrap();
    let err = failure(&mut unb());
    assert!(err.contains("signature"), "{err}");
    // Another user's key cannot unwrap or verify.
    let (other, _) = keypair(d, "other", false);
    std::fs::write(&manifest, text).unwrap();
    let err = failure(
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("unbundle")
            .arg(&manifest)
            .arg("--user-key")
            .arg(&other)
            .arg("-o")
            .arg(d.join("r.raw")),
    );
    assert!(err.contains("signature"), "{err}");
    assert!(!d.join("r.raw").exists());
    // And the intact bundle restores.
    run_ok(&mut unb());
    assert!(std::fs::read(d.join("r.raw")).unwrap() == std::fs::read(&img).unwrap());
}

pub(crate) fn s3_client(url: &str) -> (tokio::runtime::Runtime, aws_sdk_s3::Client, aws_sdk_ec2::Client) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let conf = rt.block_on(
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .endpoint_url(url)
            .credentials_provider(aws_sdk_s3::config::Credentials::new("testing", "testing", None, None, "kiln-test"))
            .load(),
    );
    let s3 = aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&conf).force_path_style(true).build());
    (rt, s3, aws_sdk_ec2::Client::new(&conf))
}

/// An object's bytes as moto holds them.
pub(crate) fn get_object(rt: &tokio::runtime::Runtime, s3: &aws_sdk_s3::Client, bucket: &str, key: &str) -> Vec<u8> {
    rt.block_on(async {
        s3.get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .unwrap()
            .body
            .collect()
            .await
            .unwrap()
            .into_bytes()
            .to_vec()
    })
}

#[test]
fn upload_and_register_against_moto_send_what_ec2_needs() {
    if !openssl_ok() {
        return;
    }
    let Some(moto) = Moto::start() else { return };
    let proxy = Proxy::start(moto.port, Mode::Pass);
    let (rt, s3, ec2) = s3_client(&moto.url());
    rt.block_on(s3.create_bucket().bucket("kiln-bundles").send()).unwrap();
    let t = tempdir();
    let d = t.path();
    let k = keys(d);
    let img = d.join("web.raw");
    let image = make_image(&img, 22);
    let run = |extra: &[&str]| {
        let mut c = kiln_bundle(d, &k, &img);
        crate::moto::fake_aws_env(&mut c).args([
            "--account",
            "123456789012",
            "--json",
            "--register",
            "--endpoint-url",
            &proxy.url(),
        ]);
        c.args(["--upload", "s3://kiln-bundles/nightly/web/"]).args(extra);
        let o = c.output().unwrap();
        assert!(o.status.success(), "kiln bundle failed:\n{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let rec = run(&["--ami-name", "web-nightly", "--description", "instance-store web"]);
    let ami = rec["uploaded"]["image_id"].as_str().unwrap().to_string();
    assert!(ami.starts_with("ami-"), "{rec}");
    let parts: Vec<PathBuf> =
        rec["parts"].as_array().unwrap().iter().map(|p| PathBuf::from(p.as_str().unwrap())).collect();
    assert!(parts.len() >= 3);

    // What kiln sent, checked against the S3 and EC2 API references.
    let reqs = proxy.requests();
    let puts: Vec<_> = reqs.iter().filter(|r| r.method == "PUT").collect();
    assert_eq!(puts.len(), parts.len() + 1, "one PutObject per part plus the manifest");
    assert_eq!(
        puts.last().unwrap().path.split('?').next().unwrap(),
        "/kiln-bundles/nightly/web/web.manifest.xml",
        "the manifest goes last"
    );
    for r in &puts {
        assert_eq!(r.header("x-amz-acl"), Some("aws-exec-read"), "{}", r.path);
        let md5 = base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(&r.body));
        assert_eq!(r.header("content-md5"), Some(md5.as_str()), "{}", r.path);
        let file = r.path.split('?').next().unwrap().rsplit('/').next().unwrap();
        assert_eq!(r.body, std::fs::read(d.join("b").join(file)).unwrap(), "{} body", r.path);
    }
    let regs: Vec<_> = reqs.iter().filter(|r| r.action() == "RegisterImage").collect();
    assert_eq!(regs.len(), 1);
    let f = regs[0].form();
    assert_eq!(f.get("ImageLocation").map(String::as_str), Some("kiln-bundles/nightly/web/web.manifest.xml"));
    assert_eq!(f.get("Architecture").map(String::as_str), Some("x86_64"));
    assert_eq!(f.get("VirtualizationType").map(String::as_str), Some("hvm"));
    assert_eq!(f.get("Name").map(String::as_str), Some("web-nightly"));
    assert_eq!(f.get("Description").map(String::as_str), Some("instance-store web"));
    assert!(
        !f.keys().any(|k| k.starts_with("BlockDeviceMapping")),
        "instance-store AMIs take their mapping from the manifest"
    );

    // The bucket holds every part and the manifest, byte for byte.
    let listed = rt.block_on(s3.list_objects_v2().bucket("kiln-bundles").prefix("nightly/web/").send()).unwrap();
    let keys: Vec<&str> = listed.contents().iter().filter_map(|o| o.key()).collect();
    assert_eq!(keys.len(), parts.len() + 1, "{keys:?}");
    for p in parts.iter().chain([&d.join("b/web.manifest.xml")]) {
        let key = format!("nightly/web/{}", p.file_name().unwrap().to_str().unwrap());
        let got = get_object(&rt, &s3, "kiln-bundles", &key);
        assert!(got[..] == std::fs::read(p).unwrap()[..], "{key} differs in the bucket");
    }
    let imgs = rt.block_on(ec2.describe_images().image_ids(&ami).send()).unwrap();
    assert_eq!(imgs.images().len(), 1);

    // A re-run finds the AMI instead of registering a second one.
    proxy.clear();
    let again = run(&["--ami-name", "web-nightly"]);
    assert_eq!(again["uploaded"]["image_id"].as_str(), Some(ami.as_str()));
    assert_eq!(again["uploaded"]["reused"], true);
    assert!(proxy.requests().iter().all(|r| r.action() != "RegisterImage"));

    // A bucket with ACLs disabled gets advice, not just the code.
    proxy.set_mode(Mode::S3PutError {
        status: 400,
        code: "AccessControlListNotSupported",
        message: "The bucket does not allow ACLs",
    });
    let mut c = kiln_bundle(d, &k, &img);
    crate::moto::fake_aws_env(&mut c).args([
        "--account",
        "123456789012",
        "--endpoint-url",
        &proxy.url(),
        "--upload",
        "s3://kiln-bundles/x",
    ]);
    let err = failure(&mut c);
    assert!(err.contains("AccessControlListNotSupported") && err.contains("Bucket owner preferred"), "{err}");
    let _ = image;
}

#[test]
fn upload_survives_dropped_connections_and_server_errors() {
    if !openssl_ok() {
        return;
    }
    let Some(moto) = Moto::start() else { return };
    let proxy = Proxy::start(moto.port, Mode::Faults { seed: 11, percent: 35 });
    let (rt, s3, _) = s3_client(&moto.url());
    rt.block_on(s3.create_bucket().bucket("kiln-faults").send()).unwrap();
    let t = tempdir();
    let d = t.path();
    let k = keys(d);
    let img = d.join("f.raw");
    make_image(&img, 31);
    let mut c = kiln_bundle(d, &k, &img);
    crate::moto::fake_aws_env(&mut c).args([
        "--account",
        "123456789012",
        "--endpoint-url",
        &proxy.url(),
        "--upload",
        "s3://kiln-faults/p",
        "--register",
    ]);
    // The image's name `f` would be the AMI's, and EC2 refuses names under 3 characters:
    // refused before any work, naming the way out.
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("`f` is not an AMI name EC2 accepts") && err.contains("--ami-name"),
        "{err}"
    );
    assert!(proxy.requests().is_empty(), "requests sent before the name was checked");
    c.args(["--ami-name", "faults-test"]);
    let o = c.output().unwrap();
    assert!(o.status.success(), "kiln bundle failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let reqs = proxy.requests();
    assert!(reqs.iter().any(|r| r.faulted && r.method == "PUT"), "the proxy must have faulted some uploads");
    for p in std::fs::read_dir(d.join("b")).unwrap().flatten() {
        let name = p.file_name().into_string().unwrap();
        if !name.contains(".part.") && !name.ends_with(".manifest.xml") {
            continue;
        }
        let key = format!("p/{name}");
        let got = get_object(&rt, &s3, "kiln-faults", &key);
        assert!(got[..] == std::fs::read(p.path()).unwrap()[..], "{key} differs in the bucket");
    }
}
