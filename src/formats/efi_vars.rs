//! UEFI Secure Boot's variables as data: EFI signature lists (UEFI 2.10 §32.4.1) of X.509
//! certificates and SHA-256 digests, the PK, KEK, db and dbx variables made of them, and a
//! variable store in the format EC2's RegisterImage takes as `UefiData`: version 0 of the one
//! python-uefivars writes with `-o aws` (base64 of `AMZNUEFI`, a CRC32C, a version and a zlib
//! stream of the variables).
//!
//! The zlib stream is written without the preset dictionary python-uefivars compresses with:
//! the dictionary only makes the blob smaller, and a stream that does not set zlib's FDICT flag
//! is read by every inflater without one (python-uefivars itself passes its dictionary only for
//! streams that ask for it). Reading, kiln accepts only such streams.

use std::io::{Read, Write};

use base64::Engine as _;
use uuid::Uuid;

/// `EFI_GLOBAL_VARIABLE`: the vendor of PK, KEK and SecureBoot.
pub const GLOBAL_VARIABLE: Uuid = Uuid::from_u128(0x8be4df61_93ca_11d2_aa0d_00e098032b8c);
/// `EFI_IMAGE_SECURITY_DATABASE_GUID`: the vendor of db and dbx.
pub const IMAGE_SECURITY_DATABASE: Uuid = Uuid::from_u128(0xd719b2cb_3d3a_4596_a3bc_dad00e67656f);
/// `EFI_CERT_X509_GUID`: a list whose signatures are DER certificates.
pub const CERT_X509: Uuid = Uuid::from_u128(0xa5c059a1_94e4_4aa7_87b5_ab155c2bf072);
/// `EFI_CERT_SHA256_GUID`: a list whose signatures are SHA-256 digests (of PE images, in dbx).
pub const CERT_SHA256: Uuid = Uuid::from_u128(0xc1c41626_504c_4092_aca9_41f936934328);

/// The owner GUID kiln writes with the certificates it enrols: the ASCII of
/// `kiln-secure-boot`, so a store's entries say where they came from, and the same in every
/// build.
pub const KILN_OWNER: Uuid = Uuid::from_u128(0x6b696c6e_2d73_6563_7572_652d626f6f74);

/// Non-volatile, boot- and runtime-readable, written only with a time-based authenticated
/// write: the attributes UEFI requires of PK, KEK, db and dbx.
pub const AUTHENTICATED_ATTRIBUTES: u32 = NON_VOLATILE | BOOTSERVICE_ACCESS | RUNTIME_ACCESS | TIME_BASED_AUTH;
const NON_VOLATILE: u32 = 0x1;
const BOOTSERVICE_ACCESS: u32 = 0x2;
const RUNTIME_ACCESS: u32 = 0x4;
const TIME_BASED_AUTH: u32 = 0x20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EfiVarsError {
    #[error("not base64: {0}")]
    Base64(String),
    #[error("does not start with AMZNUEFI, so it is not an EC2 UEFI variable store")]
    Magic,
    #[error("its checksum does not match its contents (CRC32C {stored:08x} stored, {computed:08x} computed): it was cut short or changed")]
    Checksum { stored: u32, computed: u32 },
    #[error("is version {0} of EC2's variable store format; kiln reads version 0")]
    Version(u32),
    #[error("is compressed with a preset dictionary, which kiln does not carry (stores kiln writes use none)")]
    Dictionary,
    #[error("its zlib stream is damaged: {0}")]
    Inflate(String),
    #[error("ends at byte {0}, inside {1}")]
    Truncated(usize, &'static str),
    #[error("variable name is not UTF-8")]
    Name,
    #[error("an EFI signature list at byte {at} is malformed: {why}")]
    SignatureList { at: usize, why: &'static str },
}

/// One UEFI variable: its name, its vendor's GUID, its attributes and its bytes. Time-based
/// authenticated variables carry no timestamp here: kiln writes their first value, which the
/// firmware takes without one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    pub name: String,
    pub vendor: Uuid,
    pub attributes: u32,
    pub data: Vec<u8>,
}

/// `EFI_SIGNATURE_LIST`: signatures of one type and one size, each with its owner's GUID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureList {
    pub kind: Uuid,
    pub signatures: Vec<Signature>,
}

/// `EFI_SIGNATURE_DATA`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub owner: Uuid,
    pub data: Vec<u8>,
}

/// The bytes of a signature list's fixed header: type, list size, header size, signature size.
const LIST_HEADER: usize = 16 + 4 + 4 + 4;

impl SignatureList {
    /// One list per certificate: signatures in a list share one size, and certificates' differ.
    pub fn x509(owner: Uuid, certificates: &[Vec<u8>]) -> Vec<SignatureList> {
        certificates
            .iter()
            .map(|c| SignatureList { kind: CERT_X509, signatures: vec![Signature { owner, data: c.clone() }] })
            .collect()
    }

    /// `lists` as a variable's data, one after another.
    pub fn encode_all(lists: &[SignatureList]) -> Vec<u8> {
        let mut out = Vec::new();
        for l in lists {
            let size = l.signatures.first().map_or(0, |s| s.data.len()) + 16;
            debug_assert!(l.signatures.iter().all(|s| s.data.len() + 16 == size), "one size per list");
            out.extend_from_slice(&l.kind.to_bytes_le());
            put_u32(&mut out, (LIST_HEADER + size * l.signatures.len()) as u32);
            put_u32(&mut out, 0);
            put_u32(&mut out, size as u32);
            for s in &l.signatures {
                out.extend_from_slice(&s.owner.to_bytes_le());
                out.extend_from_slice(&s.data);
            }
        }
        out
    }

    /// The lists a variable's data holds; signature-list headers (which no type kiln knows has)
    /// are skipped.
    pub fn decode_all(mut bytes: &[u8]) -> Result<Vec<SignatureList>, EfiVarsError> {
        let mut lists = Vec::new();
        let mut at = 0;
        while !bytes.is_empty() {
            let bad = |why| EfiVarsError::SignatureList { at, why };
            if bytes.len() < LIST_HEADER {
                return Err(bad("shorter than its header"));
            }
            let kind = Uuid::from_bytes_le(bytes[..16].try_into().expect("16 bytes"));
            let list_size = u32_at(bytes, 16) as usize;
            let header_size = u32_at(bytes, 20) as usize;
            let sig_size = u32_at(bytes, 24) as usize;
            if list_size > bytes.len() || list_size < LIST_HEADER + header_size {
                return Err(bad("its size runs past the variable"));
            }
            if sig_size < 16 || (list_size - LIST_HEADER - header_size) % sig_size != 0 {
                return Err(bad("its signature size does not divide its contents"));
            }
            let signatures = bytes[LIST_HEADER + header_size..list_size]
                .chunks(sig_size)
                .map(|c| Signature {
                    owner: Uuid::from_bytes_le(c[..16].try_into().expect("16 bytes")),
                    data: c[16..].to_vec(),
                })
                .collect();
            lists.push(SignatureList { kind, signatures });
            bytes = &bytes[list_size..];
            at += list_size;
        }
        Ok(lists)
    }
}

/// The Secure Boot key hierarchy of an image, as certificates (DER).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecureBootKeys {
    /// The owner GUID written with every certificate.
    pub owner: Uuid,
    pub pk: Vec<u8>,
    pub kek: Vec<Vec<u8>>,
    pub db: Vec<Vec<u8>>,
    /// dbx's signature lists as given (revoked certificates and image digests), if any.
    pub dbx: Option<Vec<u8>>,
}

impl SecureBootKeys {
    /// PK, KEK, db and dbx, in the order the firmware's own enrolment writes them.
    pub fn variables(&self) -> Vec<Variable> {
        let var = |name: &str, vendor, data| Variable {
            name: name.into(),
            vendor,
            attributes: AUTHENTICATED_ATTRIBUTES,
            data,
        };
        let x509 = |certs: &[Vec<u8>]| SignatureList::encode_all(&SignatureList::x509(self.owner, certs));
        let mut vars = vec![
            var("PK", GLOBAL_VARIABLE, x509(std::slice::from_ref(&self.pk))),
            var("KEK", GLOBAL_VARIABLE, x509(&self.kek)),
            var("db", IMAGE_SECURITY_DATABASE, x509(&self.db)),
        ];
        if let Some(dbx) = &self.dbx {
            vars.push(var("dbx", IMAGE_SECURITY_DATABASE, dbx.clone()));
        }
        vars
    }
}

const AMZNUEFI: &[u8; 8] = b"AMZNUEFI";
const AWS_VERSION: u32 = 0;
/// zlib's header flag for a preset dictionary (RFC 1950 §2.2).
const FDICT: u8 = 0x20;

/// `vars` as EC2's `UefiData`: base64 text, the same bytes for the same variables.
pub fn encode_aws(vars: &[Variable]) -> String {
    let mut raw = Vec::new();
    put_u64(&mut raw, vars.len() as u64);
    for v in vars {
        put_data(&mut raw, v.name.as_bytes());
        put_data(&mut raw, &v.data);
        raw.extend_from_slice(&v.vendor.to_bytes_le());
        put_u32(&mut raw, v.attributes);
        if v.attributes & TIME_BASED_AUTH != 0 {
            // No timestamp and no certificate digest: both all zeros.
            raw.extend_from_slice(&[0; 16]);
            put_data(&mut raw, &[0; 32]);
        }
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(&raw).expect("writing to memory");
    let zdata = z.finish().expect("writing to memory");

    let mut body = AWS_VERSION.to_le_bytes().to_vec();
    body.extend_from_slice(&zdata);
    let mut out = AMZNUEFI.to_vec();
    put_u32(&mut out, crc32c::crc32c(&body));
    out.extend_from_slice(&body);
    base64::engine::general_purpose::STANDARD.encode(out)
}

/// The variables of an EC2 `UefiData` blob that kiln can read (see the module's note).
pub fn decode_aws(text: &str) -> Result<Vec<Variable>, EfiVarsError> {
    let bin = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| EfiVarsError::Base64(e.to_string()))?;
    if bin.len() < 16 || &bin[..8] != AMZNUEFI {
        return Err(EfiVarsError::Magic);
    }
    let stored = u32_at(&bin, 8);
    let computed = crc32c::crc32c(&bin[12..]);
    if stored != computed {
        return Err(EfiVarsError::Checksum { stored, computed });
    }
    let version = u32_at(&bin, 12);
    if version != AWS_VERSION {
        return Err(EfiVarsError::Version(version));
    }
    let zdata = &bin[16..];
    if zdata.len() > 1 && zdata[1] & FDICT != 0 {
        return Err(EfiVarsError::Dictionary);
    }
    let mut raw = Vec::new();
    flate2::read::ZlibDecoder::new(zdata).read_to_end(&mut raw).map_err(|e| EfiVarsError::Inflate(e.to_string()))?;

    let mut r = Reader { buf: &raw, pos: 0 };
    let count = r.u64("the variable count")?;
    let mut vars = Vec::new();
    for _ in 0..count {
        let name = String::from_utf8(r.data("a variable name")?.to_vec()).map_err(|_| EfiVarsError::Name)?;
        let data = r.data("a variable's data")?.to_vec();
        let vendor = Uuid::from_bytes_le(r.take(16, "a vendor GUID")?.try_into().expect("16 bytes"));
        let attributes = r.u32("attributes")?;
        if attributes & TIME_BASED_AUTH != 0 {
            r.take(16, "a timestamp")?;
            r.data("a certificate digest")?;
        }
        vars.push(Variable { name, vendor, attributes, data });
    }
    Ok(vars)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], EfiVarsError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or(EfiVarsError::Truncated(self.buf.len(), what))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, EfiVarsError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, EfiVarsError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("8 bytes")))
    }
    fn data(&mut self, what: &'static str) -> Result<&'a [u8], EfiVarsError> {
        let n = self.u64(what)?;
        self.take(usize::try_from(n).unwrap_or(usize::MAX), what)
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_data(out: &mut Vec<u8>, data: &[u8]) {
    put_u64(out, data.len() as u64);
    out.extend_from_slice(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> SecureBootKeys {
        SecureBootKeys {
            owner: Uuid::from_u128(0x1234),
            pk: vec![0x30, 1, 2, 3],
            kek: vec![vec![0x30; 7]],
            db: vec![vec![0x30; 9], vec![0x31; 12]],
            dbx: None,
        }
    }

    #[test]
    fn a_store_reads_back_as_written() {
        let vars = keys().variables();
        let text = encode_aws(&vars);
        assert_eq!(decode_aws(&text).unwrap(), vars);
        assert_eq!(encode_aws(&vars), text, "the same variables give the same bytes");
    }

    #[test]
    fn x509_lists_are_laid_out_as_uefi_says() {
        let db = &keys().variables()[2];
        assert_eq!((db.name.as_str(), db.vendor, db.attributes), ("db", IMAGE_SECURITY_DATABASE, 0x27));
        // The first list: type, size 28 + 16 + 9, no header, signature size 16 + 9.
        assert_eq!(
            &db.data[..16],
            &[0xa1, 0x59, 0xc0, 0xa5, 0xe4, 0x94, 0xa7, 0x4a, 0x87, 0xb5, 0xab, 0x15, 0x5c, 0x2b, 0xf0, 0x72]
        );
        assert_eq!(u32_at(&db.data, 16), 53);
        assert_eq!(u32_at(&db.data, 20), 0);
        assert_eq!(u32_at(&db.data, 24), 25);
        assert_eq!(db.data.len(), 53 + 28 + 16 + 12);
        let lists = SignatureList::decode_all(&db.data).unwrap();
        assert_eq!(lists.iter().map(|l| l.signatures[0].data.len()).collect::<Vec<_>>(), [9, 12]);
        assert!(lists.iter().all(|l| l.kind == CERT_X509 && l.signatures[0].owner == Uuid::from_u128(0x1234)));
    }

    #[test]
    fn damage_is_named() {
        let text = encode_aws(&keys().variables());
        let mut bin = base64::engine::general_purpose::STANDARD.decode(&text).unwrap();
        let last = bin.len() - 1;
        bin[last] ^= 1;
        let flipped = base64::engine::general_purpose::STANDARD.encode(&bin);
        assert!(matches!(decode_aws(&flipped), Err(EfiVarsError::Checksum { .. })));
        bin[0] = b'X';
        let renamed = base64::engine::general_purpose::STANDARD.encode(&bin);
        assert_eq!(decode_aws(&renamed), Err(EfiVarsError::Magic));
        assert!(matches!(SignatureList::decode_all(&[0; 27]), Err(EfiVarsError::SignatureList { at: 0, .. })));
        let mut list = SignatureList::encode_all(&SignatureList::x509(Uuid::nil(), &[vec![1; 5]]));
        list[24] = 15; // a signature size smaller than its owner GUID
        assert!(SignatureList::decode_all(&list).is_err());
    }
}
