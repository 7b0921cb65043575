//! The provenance statement every build writes, verified by the in-toto project's own
//! securesystemslib (`.ci/setup-intoto`) against the signer's public key, as openssl wrote it.

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use serde_json::Value;
use sha2::Digest;

use crate::common::{kiln, run_ok, stdout_of, tempdir, tool};

const VERIFY: &str = r#"
import json, sys
from cryptography.hazmat.primitives import serialization
from securesystemslib.dsse import Envelope
from securesystemslib.signer import SSlibKey
env = Envelope.from_dict(json.loads(open(sys.argv[1]).read()))
public = serialization.load_pem_public_key(open(sys.argv[2], "rb").read())
env.verify([SSlibKey.from_crypto(public, keyid=sys.argv[3])], 1)
print(json.loads(env.payload)["subject"][0]["digest"]["sha256"])
"#;

/// The Python of the venv with securesystemslib (.ci/setup-intoto).
fn python() -> Option<PathBuf> {
    crate::common::venv_program("intoto-venv", "python", "setup-intoto")
}

/// Builds the synthetic tarball recipe into `dir/out`, signing with `key` if given.
fn build(dir: &Path, key: Option<&Path>) -> std::process::Output {
    crate::build::synthetic_base(dir);
    let recipe = dir.join("p.toml");
    std::fs::write(
        &recipe,
        "[image]\nname = \"prov\"\narch = \"x86_64\"\nbase = { tarball = \"base.tar\" }\n\n[system]\nnetwork = \"none\"\n\n\
         [ami]\nregions = [\"us-east-1\"]\n",
    )
    .unwrap();
    let mut c = kiln();
    c.arg("build").arg(&recipe).arg("--out").arg(dir.join("out")).arg("--json");
    if let Some(k) = key {
        c.arg("--sign-key").arg(k);
    }
    c.env("KILN_CACHE_DIR", dir.join("cache")).env("SOURCE_DATE_EPOCH", "1700000000").output().unwrap()
}

/// Signed with an Ed25519 key and with an ECDSA P-256 key: securesystemslib verifies each
/// envelope against the public key, the statement's subject is the image's SHA-256, the key id
/// is the SHA-256 of the public key's DER; one changed character of the digest or of the
/// statement breaks the verification; no private key reaches any output.
#[test]
fn provenance_verifies_with_securesystemslib_and_breaks_when_changed() {
    let (Some(py), Some(_)) = (python(), tool("openssl")) else { return };
    for (alg, gen) in [
        ("ed25519", &["-algorithm", "ed25519"][..]),
        ("p256", &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"][..]),
    ] {
        let t = tempdir();
        let d = t.path();
        let key = d.join("sign.pem");
        let public = d.join("sign.pub.pem");
        run_ok(Command::new("openssl").arg("genpkey").args(gen).arg("-out").arg(&key));
        run_ok(Command::new("openssl").args(["pkey", "-pubout", "-in"]).arg(&key).arg("-out").arg(&public));
        let spki =
            run_ok(Command::new("openssl").args(["pkey", "-pubin", "-outform", "der", "-in"]).arg(&public)).stdout;

        let o = build(d, Some(&key));
        assert!(o.status.success(), "{alg}: {}", String::from_utf8_lossy(&o.stderr));
        let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
        let prov = d.join("out/prov-x86_64.intoto.jsonl");
        let line = std::fs::read_to_string(&prov).unwrap();
        let env: Value = serde_json::from_str(&line).unwrap();
        let keyid = env["signatures"][0]["keyid"].as_str().unwrap().to_string();
        assert_eq!(keyid, hex::encode(sha2::Sha256::digest(&spki)), "{alg}: the key id");
        let verify =
            |file: &Path| Command::new(&py).arg("-c").arg(VERIFY).arg(file).arg(&public).arg(&keyid).output().unwrap();
        let ok = verify(&prov);
        assert!(ok.status.success(), "{alg}: securesystemslib refuses: {}", String::from_utf8_lossy(&ok.stderr));
        assert_eq!(
            String::from_utf8_lossy(&ok.stdout).trim(),
            summary["sha256"].as_str().unwrap(),
            "{alg}: the subject"
        );

        // One character of the image's digest, then one of the statement, changed.
        let b64 = base64::engine::general_purpose::STANDARD;
        let payload = String::from_utf8(b64.decode(env["payload"].as_str().unwrap()).unwrap()).unwrap();
        let sha = summary["sha256"].as_str().unwrap();
        let flipped = if sha.starts_with('0') { sha.replacen('0', "1", 1) } else { format!("0{}", &sha[1..]) };
        for changed in [payload.replace(sha, &flipped), payload.replacen("kiln", "kilm", 1)] {
            assert_ne!(changed, payload);
            let mut e = env.clone();
            e["payload"] = b64.encode(changed).into();
            let f = d.join("changed.jsonl");
            std::fs::write(&f, serde_json::to_string(&e).unwrap()).unwrap();
            assert!(!verify(&f).status.success(), "{alg}: a changed statement verified");
        }

        let secret = std::fs::read_to_string(&key).unwrap().lines().nth(1).unwrap().to_string();
        let out = format!("{}{}{line}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(!out.contains(&secret), "{alg}: the private key reached an output");
    }
}

/// Without a key the statement is written unsigned; a key kiln cannot sign with stops the
/// build before it starts, saying how to convert it.
#[test]
fn unsigned_without_a_key_and_a_clear_error_for_a_key_it_cannot_use() {
    if tool("openssl").is_none() {
        return;
    }
    let t = tempdir();
    let o = build(t.path(), None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let env: Value =
        serde_json::from_str(&std::fs::read_to_string(t.path().join("out/prov-x86_64.intoto.jsonl")).unwrap()).unwrap();
    assert_eq!(env["signatures"], serde_json::json!([]));
    assert_eq!(env["payloadType"], "application/vnd.in-toto+json");

    let sec1 = t.path().join("ec.pem");
    let text = stdout_of(Command::new("openssl").args(["ecparam", "-name", "prime256v1", "-genkey", "-noout"]));
    std::fs::write(&sec1, text).unwrap();
    let u = tempdir();
    let o = build(u.path(), Some(&sec1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("openssl pkcs8 -topk8"), "{err}");
    assert!(!u.path().join("out").exists(), "a build that cannot sign wrote outputs");
}

/// `kiln publish --sign-key` keeps the build's statement and adds a second one, signed, whose
/// predicate names the snapshot and the AMI the publish record names; securesystemslib
/// verifies both.
#[test]
fn publish_adds_a_signed_statement_of_the_snapshot_and_the_amis() {
    let (Some(py), Some(_)) = (python(), tool("openssl")) else { return };
    let Some(moto) = crate::moto::Moto::start() else { return };
    let proxy = crate::moto::Proxy::start(moto.port, crate::moto::Mode::Pass);
    let t = tempdir();
    let d = t.path();
    let (key, public) = (d.join("sign.pem"), d.join("sign.pub.pem"));
    run_ok(Command::new("openssl").args(["genpkey", "-algorithm", "ed25519", "-out"]).arg(&key));
    run_ok(Command::new("openssl").args(["pkey", "-pubout", "-in"]).arg(&key).arg("-out").arg(&public));
    let o = build(d, Some(&key));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let prov = d.join("out/prov-x86_64.intoto.jsonl");
    let built = std::fs::read_to_string(&prov).unwrap();

    let o = crate::publish::publish_cmd(&proxy, &d.join("out/prov-x86_64.manifest.json"))
        .arg("--sign-key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rec: Value = serde_json::from_slice(&o.stdout).unwrap();
    let text = std::fs::read_to_string(&prov).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0], built.trim_end(), "the build's statement was changed");
    let b64 = base64::engine::general_purpose::STANDARD;
    for (i, line) in lines.iter().enumerate() {
        let env: Value = serde_json::from_str(line).unwrap();
        let f = d.join(format!("line-{i}.json"));
        std::fs::write(&f, line).unwrap();
        let keyid = env["signatures"][0]["keyid"].as_str().unwrap();
        let v = Command::new(&py).arg("-c").arg(VERIFY).arg(&f).arg(&public).arg(keyid).output().unwrap();
        assert!(v.status.success(), "statement {i}: {}", String::from_utf8_lossy(&v.stderr));
    }
    let env: Value = serde_json::from_str(lines[1]).unwrap();
    let st: Value = serde_json::from_slice(&b64.decode(env["payload"].as_str().unwrap()).unwrap()).unwrap();
    assert_eq!(st["predicateType"], "urn:kiln:publish:v1");
    assert_eq!(st["predicate"]["snapshot_id"], rec["snapshot_id"]);
    assert_eq!(st["predicate"]["amis"][0]["image_id"], rec["amis"][0]["image_id"]);
    assert_eq!(st["subject"][0]["digest"]["sha256"], rec["image_sha256"]);
}
