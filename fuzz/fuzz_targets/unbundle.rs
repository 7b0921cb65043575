//! Fuzzes `kiln unbundle` on hostile parts: the input is the tar stream inside the bundle, which
//! the harness gzips, encrypts and signs as a bundle writer with the user's key would, so every
//! check passes and the restore itself (the GNU sparse map, member sizes and offsets, padding)
//! sees arbitrary bytes. Any input must restore an image or give a typed error, never a panic,
//! an overflow or an unbounded write.
#![no_main]

use std::io::Write;
use std::sync::OnceLock;

use kiln_formats::bundle::{BundleManifest, Encryptor, PartEntry};
use libfuzzer_sys::fuzz_target;
use rsa::pkcs1v15::SigningKey;
use rsa::signature::{SignatureEncoding, Signer};
use rsa::Pkcs1v15Encrypt;
use sha1::{Digest, Sha1};

/// The user's key and the bundle's wrapped AES secrets, made once per process (RSA key
/// generation is far slower than one input).
struct Keys {
    user: rsa::PrivateKey,
    secret: [u8; 16],
    iv: [u8; 16],
    wrapped_secret: String,
    wrapped_iv: String,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let mut rng = rand::rng();
        let user = rsa::PrivateKey::new(&mut rng, 1024).expect("RSA key");
        let (secret, iv) = ([7u8; 16], [9u8; 16]);
        let wrap = |b: &[u8; 16]| {
            let public = user.to_public_key();
            hex::encode(public.encrypt(&mut rand::rng(), Pkcs1v15Encrypt, hex::encode(b).as_bytes()).expect("wrap"))
        };
        let (wrapped_secret, wrapped_iv) = (wrap(&secret), wrap(&iv));
        Keys { user, secret, iv, wrapped_secret, wrapped_iv }
    })
}

fuzz_target!(|tar_stream: &[u8]| {
    let k = keys();
    let manifest_path = kiln_fuzz::input_file("unbundle", b"");
    let dir = manifest_path.parent().expect("input has a directory").to_path_buf();

    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(tar_stream).expect("gzip");
    let gz = gz.finish().expect("gzip");
    let mut part = Vec::with_capacity(gz.len() + 16);
    let mut enc = Encryptor::new(&k.secret, &k.iv);
    enc.update(&gz, &mut part);
    enc.finish(&mut part);
    std::fs::write(dir.join("fuzz.part.0"), &part).expect("write part");

    let manifest = BundleManifest {
        bundler_name: "kiln".into(),
        bundler_version: "0".into(),
        bundler_release: "0".into(),
        arch: "x86_64".into(),
        mappings: vec![("ami".into(), "sda1".into()), ("root".into(), "/dev/sda1".into())],
        name: "fuzz".into(),
        user: "123456789012".into(),
        tar_sha1: hex::encode(Sha1::digest(tar_stream)),
        size: tar_stream.len() as u64,
        bundled_size: part.len() as u64,
        ec2_encrypted_key: k.wrapped_secret.clone(),
        user_encrypted_key: k.wrapped_secret.clone(),
        ec2_encrypted_iv: k.wrapped_iv.clone(),
        user_encrypted_iv: k.wrapped_iv.clone(),
        parts: vec![PartEntry { filename: "fuzz.part.0".into(), sha1: hex::encode(Sha1::digest(&part)) }],
    };
    let signature = SigningKey::<Sha1>::new(k.user.clone()).sign(manifest.signed_text().as_bytes());
    std::fs::write(&manifest_path, manifest.to_xml(&hex::encode(signature.to_bytes()))).expect("write manifest");

    let out = dir.join("restored.raw");
    let _ = kiln_formats::bundle::unbundle(&manifest_path, &k.user, &out, &kiln_formats::progress::Silent);
    let _ = std::fs::remove_file(&out);
});
