//! Self-signed X.509 certificates with RSA keys: a Secure Boot key hierarchy made for a build
//! when the recipe asks kiln to make one. Version 3 without extensions, SHA-256 with RSA,
//! valid for 30 years from the build's epoch (UEFI firmware has no trusted clock and ignores
//! the dates; verifiers such as sbverify still read them).

use base64::Engine as _;
use rsa::pkcs1v15::SigningKey;
use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use rsa::signature::{SignatureEncoding, Signer as _};
use sha2::{Digest, Sha256};

use super::der::{oid, seq, set_of, tlv, uint, NULL};

#[derive(Debug, thiserror::Error)]
pub enum X509Error {
    #[error("making an RSA key: {0}")]
    Key(String),
    #[error("encoding the key: {0}")]
    Encode(String),
}

/// A private key and its certificate, both PEM.
pub struct Generated {
    pub key_pem: String,
    pub certificate_pem: String,
}

/// 1.2.840.113549.1.1.11 sha256WithRSAEncryption
const OID_SHA256_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b];
/// 2.5.4.3 commonName
const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
const YEARS_VALID: i32 = 30;

/// A new RSA-2048 key and a self-signed certificate for it, named `common_name`, valid from
/// `not_before` (Unix seconds).
pub fn self_signed<R: rand::CryptoRng + ?Sized>(
    rng: &mut R,
    common_name: &str,
    not_before: i64,
) -> Result<Generated, X509Error> {
    let key = rsa::PrivateKey::new(rng, 2048).map_err(|e| X509Error::Key(e.to_string()))?;
    let spki = key.to_public_key().to_public_key_der().map_err(|e| X509Error::Encode(e.to_string()))?;
    let spki = spki.as_bytes();
    // The serial number: 16 bytes of the public key's digest, positive.
    let mut serial: [u8; 16] = Sha256::digest(spki)[..16].try_into().expect("16 bytes");
    serial[0] &= 0x7f;
    let algorithm = seq(&[&oid(OID_SHA256_RSA), NULL]);
    let name = seq(&[&set_of(vec![seq(&[&oid(OID_CN), &tlv(0x0c, common_name.as_bytes())])])]);
    let from = time::OffsetDateTime::from_unix_timestamp(not_before).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let until = from.replace_year(from.year() + YEARS_VALID).unwrap_or(from);
    let tbs = seq(&[
        &tlv(0xa0, &uint(&[2])),
        &uint(&serial),
        &algorithm,
        &name,
        &seq(&[&der_time(from), &der_time(until)]),
        &name,
        spki,
    ]);
    let signature =
        SigningKey::<Sha256>::new(key.clone()).try_sign(&tbs).map_err(|e| X509Error::Key(e.to_string()))?.to_vec();
    let mut bits = vec![0u8];
    bits.extend_from_slice(&signature);
    let certificate = seq(&[&tbs, &algorithm, &tlv(0x03, &bits)]);
    let key_pem = key.to_pkcs8_pem(LineEnding::LF).map_err(|e| X509Error::Encode(e.to_string()))?.to_string();
    Ok(Generated { key_pem, certificate_pem: pem("CERTIFICATE", &certificate) })
}

/// UTCTime before 2050, GeneralizedTime from then on (RFC 5280 §4.1.2.5).
fn der_time(t: time::OffsetDateTime) -> Vec<u8> {
    let (y, mo, d, h, mi, s) = (t.year(), u8::from(t.month()), t.day(), t.hour(), t.minute(), t.second());
    if y < 2050 {
        tlv(0x17, format!("{:02}{mo:02}{d:02}{h:02}{mi:02}{s:02}Z", y % 100).as_bytes())
    } else {
        tlv(0x18, format!("{y:04}{mo:02}{d:02}{h:02}{mi:02}{s:02}Z").as_bytes())
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_switch_to_generalized_in_2050() {
        let t = |unix| der_time(time::OffsetDateTime::from_unix_timestamp(unix).unwrap());
        assert_eq!(t(1_700_000_000), tlv(0x17, b"231114221320Z"));
        assert_eq!(t(2_556_144_000), tlv(0x18, b"20510101000000Z"));
    }
}
