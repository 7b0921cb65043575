//! Authenticode for UEFI: the SHA-256 image digest of a PE/COFF file (what UEFI firmware checks
//! a boot loader's signature against, and what it measures into the TPM's PCR 4), and the
//! signature itself: a PKCS#7 SignedData over that digest in a `WIN_CERTIFICATE` appended to
//! the file, as `sbsign` writes it (Microsoft's "Windows Authenticode Portable Executable
//! Signature Format"). RSA PKCS#1 v1.5 signatures are deterministic, so the same image and key
//! give the same signed bytes.

use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs1v15::SigningKey;
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};
use rsa::signature::{SignatureEncoding, Signer as _};
use rsa::traits::PublicKeyParts;
use sha2::{Digest, Sha256};
use x509_cert::der::{Decode, DecodePem, Encode};

use super::pe::Headers;
pub use super::pe::PeError;

/// The Authenticode SHA-256 digest of `pe`: the headers without the checksum and the
/// certificate table's directory entry, each section's raw data by file offset, and what
/// follows the sections but the certificate table.
pub fn image_digest(pe: &[u8]) -> Result<[u8; 32], PeError> {
    let h = Headers::read(pe)?;
    Ok(digest_with(pe, &h))
}

fn digest_with(pe: &[u8], l: &Headers) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(&pe[..l.checksum]);
    h.update(&pe[l.checksum + 4..l.cert_dir]);
    h.update(&pe[l.cert_dir + 8..l.size_of_headers]);
    let mut hashed = l.size_of_headers;
    let mut sections: Vec<_> = l.sections.iter().filter(|s| s.raw_size > 0).collect();
    sections.sort_by_key(|s| s.raw_offset);
    for s in sections {
        h.update(&pe[s.raw_offset..s.raw_offset + s.raw_size]);
        hashed += s.raw_size;
    }
    let end = pe.len().saturating_sub(l.cert_table.1);
    if end > hashed {
        h.update(&pe[hashed..end]);
    }
    h.finalize().into()
}

/// A db key and its certificate.
pub struct Signer {
    key: rsa::PrivateKey,
    certificate: x509_cert::Certificate,
}

impl Signer {
    /// From PEM text: an RSA private key (PKCS#8 or PKCS#1) and the X.509 certificate of its
    /// public key.
    pub fn from_pem(key: &str, certificate: &str) -> Result<Signer, SignerError> {
        Signer::new(key, &certificate_der(certificate)?)
    }

    /// From an RSA private key in PEM and the DER of its certificate.
    pub fn new(key: &str, certificate_der: &[u8]) -> Result<Signer, SignerError> {
        let key = if key.contains("-----BEGIN RSA PRIVATE KEY-----") {
            rsa::PrivateKey::from_pkcs1_pem(key).map_err(|e| SignerError::Key(e.to_string()))?
        } else {
            rsa::PrivateKey::from_pkcs8_pem(key).map_err(|e| SignerError::Key(e.to_string()))?
        };
        let certificate =
            x509_cert::Certificate::from_der(certificate_der).map_err(|e| SignerError::Certificate(e.to_string()))?;
        let spki = certificate
            .tbs_certificate()
            .subject_public_key_info()
            .to_der()
            .map_err(|e| SignerError::Certificate(e.to_string()))?;
        let public = rsa::PublicKey::from_public_key_der(&spki)
            .map_err(|e| SignerError::Certificate(format!("its key is not an RSA key ({e})")))?;
        if public.n() != key.n() || public.e() != key.e() {
            return Err(SignerError::Mismatch);
        }
        Ok(Signer { key, certificate })
    }

    /// The certificate's DER.
    pub fn certificate_der(&self) -> Vec<u8> {
        self.certificate.to_der().expect("a parsed certificate encodes")
    }
}

/// The DER of the X.509 certificate in PEM text (the first, if it holds several).
pub fn certificate_der(pem: &str) -> Result<Vec<u8>, SignerError> {
    let cert = x509_cert::Certificate::from_pem(pem.as_bytes()).map_err(|e| SignerError::Certificate(e.to_string()))?;
    cert.to_der().map_err(|e| SignerError::Certificate(e.to_string()))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignerError {
    #[error("is not an RSA private key in PEM (PKCS#8 BEGIN PRIVATE KEY or PKCS#1 BEGIN RSA PRIVATE KEY): {0}")]
    Key(String),
    #[error("is not a PEM X.509 certificate: {0}")]
    Certificate(String),
    #[error("the private key is not the key of the certificate")]
    Mismatch,
}

/// `pe` signed by `signer`: any signature it had is replaced, the image is padded to eight
/// bytes, and the signature appended with the certificate table's directory entry naming it.
pub fn sign(pe: &[u8], signer: &Signer) -> Result<Vec<u8>, PeError> {
    let l = Headers::read(pe)?;
    let mut out = pe.to_vec();
    if l.cert_table.1 > 0 {
        if l.cert_table.0 + l.cert_table.1 != pe.len() {
            return Err(PeError::CertificateTableInside);
        }
        out.truncate(l.cert_table.0);
    }
    out[l.cert_dir..l.cert_dir + 8].fill(0);
    out.resize(out.len().next_multiple_of(8), 0);
    let digest = digest_with(&out, &Headers { cert_table: (0, 0), ..l.clone() });
    let signed_data = signed_data(&digest, signer)?;

    // WIN_CERTIFICATE: length, revision 2.0, type PKCS_SIGNED_DATA, the DER, padded to 8.
    let length = 8 + signed_data.len();
    let mut cert = Vec::with_capacity(length.next_multiple_of(8));
    cert.extend_from_slice(&(length as u32).to_le_bytes());
    cert.extend_from_slice(&0x0200u16.to_le_bytes());
    cert.extend_from_slice(&0x0002u16.to_le_bytes());
    cert.extend_from_slice(&signed_data);
    cert.resize(length.next_multiple_of(8), 0);

    let at = out.len();
    out[l.cert_dir..l.cert_dir + 4].copy_from_slice(&(at as u32).to_le_bytes());
    out[l.cert_dir + 4..l.cert_dir + 8].copy_from_slice(&(cert.len() as u32).to_le_bytes());
    out.extend_from_slice(&cert);
    Ok(out)
}

use super::der::{oid, seq, set_of, tlv, NULL};

// Object identifiers' contents octets.
/// 1.2.840.113549.1.7.2 signedData
const OID_SIGNED_DATA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x02];
/// 1.3.6.1.4.1.311.2.1.4 SPC_INDIRECT_DATA_OBJID
const OID_SPC_INDIRECT_DATA: &[u8] = &[0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37, 0x02, 0x01, 0x04];
/// 1.3.6.1.4.1.311.2.1.15 SPC_PE_IMAGE_DATAOBJ
const OID_SPC_PE_IMAGE_DATA: &[u8] = &[0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37, 0x02, 0x01, 0x0f];
/// 1.3.6.1.4.1.311.2.1.12 SPC_SP_OPUS_INFO_OBJID
const OID_SPC_SP_OPUS_INFO: &[u8] = &[0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37, 0x02, 0x01, 0x0c];
/// 2.16.840.1.101.3.4.2.1 sha256
const OID_SHA256: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01];
/// 1.2.840.113549.1.1.1 rsaEncryption
const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
/// 1.2.840.113549.1.9.3 contentType
const OID_CONTENT_TYPE: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x03];
/// 1.2.840.113549.1.9.4 messageDigest
const OID_MESSAGE_DIGEST: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x04];

/// The PKCS#7 SignedData (DER) of an Authenticode signature over `digest`.
fn signed_data(digest: &[u8; 32], signer: &Signer) -> Result<Vec<u8>, PeError> {
    let sha256 = seq(&[&oid(OID_SHA256), NULL]);
    // SpcPeImageData: no flags, and the file link every signer writes, "<<<Obsolete>>>" as a
    // BMPString ([0] EXPLICIT SpcLink, its [2] EXPLICIT SpcString, its [0] IMPLICIT BMPString).
    let obsolete: Vec<u8> = "<<<Obsolete>>>".encode_utf16().flat_map(|c| c.to_be_bytes()).collect();
    let pe_image_data = seq(&[&tlv(0x03, &[0]), &tlv(0xa0, &tlv(0xa2, &tlv(0x80, &obsolete)))]);
    let indirect = seq(&[&seq(&[&oid(OID_SPC_PE_IMAGE_DATA), &pe_image_data]), &seq(&[&sha256, &tlv(0x04, digest)])]);
    // The signed attributes' messageDigest is over the content without its own tag and length.
    let header = indirect.len() - super::der::content_len(&indirect);
    let content_digest: [u8; 32] = Sha256::digest(&indirect[header..]).into();

    let attributes = vec![
        seq(&[&oid(OID_CONTENT_TYPE), &set_of(vec![oid(OID_SPC_INDIRECT_DATA)])]),
        seq(&[&oid(OID_MESSAGE_DIGEST), &set_of(vec![tlv(0x04, &content_digest)])]),
        seq(&[&oid(OID_SPC_SP_OPUS_INFO), &set_of(vec![seq(&[])])]),
    ];
    // Signed as a SET OF; stored with the tag [0] IMPLICIT.
    let signed_attrs = set_of(attributes);
    let signature = SigningKey::<Sha256>::new(signer.key.clone())
        .try_sign(&signed_attrs)
        .map_err(|e| PeError::Sign(e.to_string()))?
        .to_vec();

    let tbs = signer.certificate.tbs_certificate();
    let issuer = der(tbs.issuer())?;
    let serial = der(tbs.serial_number())?;
    let certificate = der(&signer.certificate)?;

    let mut implicit_attrs = signed_attrs.clone();
    implicit_attrs[0] = 0xa0;
    let signer_info = seq(&[
        &tlv(0x02, &[1]),
        &seq(&[&issuer, &serial]),
        &sha256,
        &implicit_attrs,
        &seq(&[&oid(OID_RSA), NULL]),
        &tlv(0x04, &signature),
    ]);
    let signed = seq(&[
        &tlv(0x02, &[1]),
        &set_of(vec![sha256.clone()]),
        &seq(&[&oid(OID_SPC_INDIRECT_DATA), &tlv(0xa0, &indirect)]),
        &tlv(0xa0, &certificate),
        &set_of(vec![signer_info]),
    ]);
    Ok(seq(&[&oid(OID_SIGNED_DATA), &tlv(0xa0, &signed)]))
}

fn der(value: &impl Encode) -> Result<Vec<u8>, PeError> {
    value.to_der().map_err(|e| PeError::Sign(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pe::tests::tiny_pe;

    #[test]
    fn the_digest_leaves_out_the_checksum_and_the_signature_and_covers_the_rest() {
        let pe = tiny_pe();
        let d = image_digest(&pe).unwrap();
        let mut changed = pe.clone();
        changed[0x84 + 20 + 64] ^= 0xff; // the checksum
        assert_eq!(image_digest(&changed).unwrap(), d);
        for at in [0x10, 0x84 + 20 + 4, 0x250, 0x450, 0x5ff] {
            let mut changed = pe.clone();
            changed[at] ^= 1;
            assert_ne!(image_digest(&changed).unwrap(), d, "byte {at:#x} is not covered");
        }
        let mut appended = pe.clone();
        appended.extend_from_slice(b"trailing");
        assert_ne!(image_digest(&appended).unwrap(), d, "data after the sections is covered");
    }
}
