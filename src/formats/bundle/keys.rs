//! PEM certificates and RSA private keys, as the EC2 AMI tools take them.

use std::path::Path;

use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};
use rsa::traits::PublicKeyParts;
use rsa::{PrivateKey, PublicKey};
use x509_cert::der::{DecodePem, Encode};

use super::{io_err, BundleError, Result};

/// The three keys a bundle needs, checked to fit together.
pub struct Credentials {
    /// Signs the manifest and decrypts `user_encrypted_*` on unbundle.
    pub user_key: PrivateKey,
    /// From the user's certificate; wraps the key and IV for the user.
    pub user_public: PublicKey,
    /// From EC2's certificate (`cert-ec2.pem` of the AMI tools); wraps them for EC2.
    pub ec2_public: PublicKey,
}

impl Credentials {
    pub fn load(user_cert: &Path, user_key: &Path, ec2_cert: &Path) -> Result<Credentials> {
        let user_key = load_private_key(user_key)?;
        let user_public = load_certificate_key(user_cert)?;
        if user_public.n() != user_key.n() || user_public.e() != user_key.e() {
            return Err(BundleError::KeyMismatch);
        }
        let ec2_public = load_certificate_key(ec2_cert)?;
        Ok(Credentials { user_key, user_public, ec2_public })
    }
}

fn read_pem(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(io_err("reading", path))?;
    String::from_utf8(bytes).map_err(|_| BundleError::Key {
        path: path.into(),
        message: "is not a PEM file (it is not text; DER files must be converted with `openssl x509 -inform der`)"
            .into(),
    })
}

/// An RSA private key in PEM: PKCS#8 (`BEGIN PRIVATE KEY`) or PKCS#1 (`BEGIN RSA PRIVATE KEY`).
pub fn load_private_key(path: &Path) -> Result<PrivateKey> {
    let pem = read_pem(path)?;
    let key_err = |message: String| BundleError::Key { path: path.into(), message };
    if pem.contains("-----BEGIN RSA PRIVATE KEY-----") {
        return PrivateKey::from_pkcs1_pem(&pem)
            .map_err(|e| key_err(format!("not a valid PKCS#1 RSA private key: {e}")));
    }
    if pem.contains("-----BEGIN PRIVATE KEY-----") {
        return PrivateKey::from_pkcs8_pem(&pem).map_err(|e| {
            key_err(format!("not an RSA private key ({e}); EC2 bundles need the RSA key of your signing certificate"))
        });
    }
    if pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(key_err("is a certificate, not a private key (swap --user-cert and --user-key?)".into()));
    }
    if pem.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
        return Err(key_err(
            "is an encrypted private key; decrypt it first with `openssl pkey -in KEY -out pk.pem`".into(),
        ));
    }
    if let Some(kind) = pem.lines().find_map(|l| l.strip_prefix("-----BEGIN ").and_then(|r| r.strip_suffix("-----"))) {
        return Err(key_err(format!(
            "holds a {kind}, but an RSA private key is needed (BEGIN PRIVATE KEY or BEGIN RSA PRIVATE KEY)"
        )));
    }
    Err(key_err("is not a PEM private key (no BEGIN PRIVATE KEY or BEGIN RSA PRIVATE KEY line)".into()))
}

/// The RSA public key of a PEM X.509 certificate.
pub fn load_certificate_key(path: &Path) -> Result<PublicKey> {
    let pem = read_pem(path)?;
    let key_err = |message: String| BundleError::Key { path: path.into(), message };
    if pem.contains("PRIVATE KEY-----") && !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(key_err("is a private key, not a certificate (swap --user-cert and --user-key?)".into()));
    }
    let cert = x509_cert::Certificate::from_pem(pem.as_bytes())
        .map_err(|e| key_err(format!("not a PEM X.509 certificate: {e}")))?;
    let spki = cert
        .tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .map_err(|e| key_err(format!("unreadable public key: {e}")))?;
    PublicKey::from_public_key_der(&spki)
        .map_err(|e| key_err(format!("the certificate's key is not an RSA key ({e}); EC2 bundles need RSA")))
}
