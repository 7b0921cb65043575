//! Who built an image from what: an in-toto Statement with a SLSA Provenance v1 predicate,
//! whose subject is the image by its SHA-256 and whose resolved dependencies are the recipe
//! (by its hash, which covers every file it pulls in), each Debian suite the base was staged
//! from (by its InRelease digest) and each local package; signed as a DSSE envelope with the
//! user's Ed25519 or ECDSA P-256 key, unsigned without one. `kiln publish` adds a second
//! statement: the snapshot and the AMIs the image became. The key signs and goes nowhere
//! else; the key id is the SHA-256 of its public key's SubjectPublicKeyInfo.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use sha2::{Digest, Sha256};

use crate::formats::intoto::{Envelope, Statement, Subject, SLSA_PROVENANCE_V1, STATEMENT_TYPE};
use crate::manifest::Manifest;

#[derive(Debug, thiserror::Error)]
pub enum ProvenanceError {
    #[error("reading the signing key {}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the signing key {}: {why}", path.display())]
    Key { path: PathBuf, why: String },
}

/// The key provenance statements are signed with.
pub struct SigningKey {
    pair: Pair,
    keyid: String,
}

enum Pair {
    Ed25519(Ed25519KeyPair),
    P256(EcdsaKeyPair),
}

/// The DER prefixes that make a raw public key a SubjectPublicKeyInfo.
const ED25519_SPKI: &[u8] = &[0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
const P256_SPKI: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce,
    0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

impl SigningKey {
    /// A PKCS#8 PEM private key (`BEGIN PRIVATE KEY`): Ed25519 or ECDSA P-256.
    pub fn load(path: &Path) -> Result<SigningKey, ProvenanceError> {
        let bad = |why: &str| ProvenanceError::Key { path: path.to_path_buf(), why: why.into() };
        let text = std::fs::read_to_string(path)
            .map_err(|source| ProvenanceError::Read { path: path.to_path_buf(), source })?;
        if text.contains("-----BEGIN EC PRIVATE KEY-----") {
            return Err(bad(
                "is a SEC1 EC key; convert it to PKCS#8 with `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pk8`",
            ));
        }
        if text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
            return Err(bad("is encrypted; decrypt it first with `openssl pkey -in KEY -out KEY.pem`"));
        }
        let body: String = text
            .lines()
            .skip_while(|l| !l.starts_with("-----BEGIN PRIVATE KEY-----"))
            .skip(1)
            .take_while(|l| !l.starts_with("-----END"))
            .collect();
        if body.is_empty() {
            return Err(bad(
                "holds no PKCS#8 private key (BEGIN PRIVATE KEY); make one with `openssl genpkey -algorithm ed25519`",
            ));
        }
        let der = base64::engine::general_purpose::STANDARD.decode(body.trim()).map_err(|_| bad("is not valid PEM"))?;
        let (pair, spki) = if let Ok(k) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der) {
            let spki = [ED25519_SPKI, k.public_key().as_ref()].concat();
            (Pair::Ed25519(k), spki)
        } else if let Ok(k) =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &der, &ring::rand::SystemRandom::new())
        {
            let spki = [P256_SPKI, k.public_key().as_ref()].concat();
            (Pair::P256(k), spki)
        } else {
            return Err(bad("is neither an Ed25519 nor an ECDSA P-256 key; provenance is signed with one of those"));
        };
        Ok(SigningKey { pair, keyid: hex::encode(Sha256::digest(&spki)) })
    }

    pub fn keyid(&self) -> &str {
        &self.keyid
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        match &self.pair {
            Pair::Ed25519(k) => k.sign(message).as_ref().to_vec(),
            Pair::P256(k) => k
                .sign(&ring::rand::SystemRandom::new(), message)
                .map(|s| s.as_ref().to_vec())
                .expect("ECDSA signing with the system's randomness"),
        }
    }
}

/// The build's provenance: the image by SHA-256, and what it was built from.
pub fn statement(manifest: &Manifest) -> Statement {
    let sha = |hex: &str| [("sha256".to_string(), hex.to_string())].into();
    let mut deps = vec![serde_json::json!({
        "uri": format!("kiln-recipe:{}", manifest.recipe.path),
        "digest": { "sha256": manifest.recipe.sha256 },
    })];
    for s in manifest.base.iter().flat_map(|b| &b.archive) {
        deps.push(serde_json::json!({
            "uri": format!("{}/dists/{}/InRelease", s.uri.trim_end_matches('/'), s.suite),
            "digest": { "sha256": s.sha256 },
            "annotations": { "date": s.date },
        }));
    }
    for p in manifest.packages.iter().filter(|p| p.origin.is_some()) {
        deps.push(serde_json::json!({
            "name": format!("{}_{}_{}", p.name, p.version, p.arch),
            "annotations": { "origin": p.origin },
        }));
    }
    Statement {
        kind: STATEMENT_TYPE.into(),
        subject: vec![Subject { name: manifest.image.file.clone(), digest: sha(&manifest.image.sha256) }],
        predicate_type: SLSA_PROVENANCE_V1.into(),
        predicate: serde_json::json!({
            "buildDefinition": {
                "buildType": "urn:kiln:build:v1",
                "externalParameters": {
                    "recipe": manifest.recipe.path,
                    "arch": manifest.arch,
                    "source_date_epoch": manifest.source_date_epoch,
                },
                "resolvedDependencies": deps,
            },
            "runDetails": {
                "builder": { "id": "urn:kiln", "version": { "kiln": manifest.kiln_version } },
                "metadata": { "invocationId": manifest.name },
            },
        }),
    }
}

/// The build's statement in a DSSE envelope, signed by `key` when there is one; one JSON line.
pub fn envelope_line(manifest: &Manifest, key: Option<&SigningKey>) -> String {
    line_of(&statement(manifest), key)
}

fn line_of(statement: &Statement, key: Option<&SigningKey>) -> String {
    let sign = key.map(|k| move |pae: &[u8]| (k.keyid.clone(), k.sign(pae)));
    let env = Envelope::of(statement, sign.as_ref().map(|f| f as crate::formats::intoto::Sign));
    let mut line = serde_json::to_string(&env).expect("an envelope serializes");
    line.push('\n');
    line
}

/// The predicate type of the statement `kiln publish` adds: where the image went.
pub const PUBLISH_PREDICATE: &str = "urn:kiln:publish:v1";

/// What `kiln publish` made of the image: its snapshot and its AMI in every region.
pub fn publish_statement(manifest: &Manifest, rec: &crate::publish::record::PublishRecord) -> Statement {
    Statement {
        kind: STATEMENT_TYPE.into(),
        subject: vec![Subject {
            name: manifest.image.file.clone(),
            digest: [("sha256".to_string(), manifest.image.sha256.clone())].into(),
        }],
        predicate_type: PUBLISH_PREDICATE.into(),
        predicate: serde_json::json!({
            "ami_name": rec.ami_name,
            "source_region": rec.source_region,
            "snapshot_id": rec.snapshot_id,
            "amis": rec.amis.iter().map(|a| serde_json::json!({
                "region": a.region, "image_id": a.image_id, "snapshot_id": a.snapshot_id,
            })).collect::<Vec<_>>(),
        }),
    }
}

/// `NAME.intoto.jsonl` after a publish: the build's statement as the build wrote it (made
/// again, signed by `key`, if it is missing) and one publish statement, this publish's.
pub fn record_publish(
    manifest_path: &Path,
    manifest: &Manifest,
    rec: &crate::publish::record::PublishRecord,
    key: Option<&SigningKey>,
) -> std::io::Result<()> {
    let path = crate::outputs::Outputs::of(manifest_path).provenance();
    let build = match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => format!("{}\n", text.lines().next().unwrap_or_default()),
        _ => envelope_line(manifest, key),
    };
    let publish = line_of(&publish_statement(manifest, rec), key);
    crate::formats::atomic::write(&path, format!("{build}{publish}").as_bytes())
}
