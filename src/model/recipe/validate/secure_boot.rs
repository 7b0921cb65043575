//! `[secure_boot]`: the key hierarchy, read and checked now, so a build never stops halfway
//! on a certificate it cannot use, and the db key that signs the boot chain, which must be the
//! key of one of db's certificates.

use kiln_formats::authenticode::{self, Signer};
use kiln_formats::efi_vars::SignatureList;

use super::*;
use crate::ec2::Ec2BootMode;
use crate::manifest::AmiSettings;
use crate::recipe::raw::{LocList, RawSecureBoot};
use crate::recipe::{KeySource, SecureBoot};

pub(super) fn check_secure_boot(
    v: &mut V,
    s: &Loc<RawSecureBoot>,
    boot: BootMode,
    ami: Option<&AmiSettings>,
    ami_boot_mode: Option<Span>,
) -> Option<SecureBoot> {
    let r = &s.value;
    let before = v.diags.len();
    let top = header(s.span);
    if boot != BootMode::Uefi {
        v.err(
            top,
            "secure_boot",
            format!("Secure Boot needs a UEFI-only image, but [image].boot is \"{boot}\""),
            Some("set boot = \"uefi\" under [image]: a BIOS boot path is not signed, and EC2 keeps UefiData only for AMIs that boot UEFI".into()),
        );
    }
    if let Some(a) = ami {
        if a.boot_mode != Ec2BootMode::Uefi {
            v.err(
                ami_boot_mode.unwrap_or(top),
                "ami.boot_mode",
                format!("Secure Boot needs boot_mode = \"uefi\", but this AMI would be registered as \"{}\"", a.boot_mode),
                Some("EC2 applies an AMI's UEFI variable store (its Secure Boot keys) only when the AMI boots UEFI; remove boot_mode or set it to \"uefi\"".into()),
            );
        }
    }
    let dbx = r.dbx.as_ref().and_then(|d| check_dbx(v, d));
    if r.generate.as_ref().is_some_and(|g| g.value) {
        for (key, given) in [
            ("pk", r.pk.as_ref().map(|p| p.span)),
            ("kek", r.kek.as_ref().map(|k| k.span)),
            ("key", r.key.as_ref().map(|k| k.span)),
        ] {
            if let Some(span) = given {
                v.err(
                    span,
                    format!("secure_boot.{key}"),
                    format!("`{key}` cannot be combined with `generate = true`"),
                    Some("generate makes PK, KEK and the db key for the build; remove one of the two (db may still list further certificates to trust)".into()),
                );
            }
        }
        let db: Vec<Vec<u8>> =
            r.db.iter().flat_map(|l| l.value.iter()).filter_map(|p| certificate(v, p, "secure_boot.db")).collect();
        return (v.diags.len() == before).then_some(SecureBoot { keys: KeySource::Generate { db }, dbx });
    }
    let missing = |v: &mut V, key: &str, what: &str| {
        v.err(top, format!("secure_boot.{key}"), format!("missing `{key}` in [secure_boot]"), Some(what.into()))
    };
    let pk = match &r.pk {
        Some(p) => certificate(v, p, "secure_boot.pk"),
        None => {
            missing(v, "pk", "the platform key's certificate, like pk = \"keys/PK.crt\" (PEM), or generate = true to have kiln make the key hierarchy");
            None
        }
    };
    let list = |v: &mut V, l: &Option<LocList<String>>, key: &str, what: &str| -> Vec<(Loc<String>, Vec<u8>)> {
        match l {
            Some(l) if !l.value.is_empty() => {
                l.value.iter().filter_map(|p| certificate(v, p, key).map(|der| (p.clone(), der))).collect()
            }
            Some(l) => {
                v.err(l.span, key, format!("`{key}` is empty"), Some(what.into()));
                Vec::new()
            }
            None => {
                missing(v, key.trim_start_matches("secure_boot."), what);
                Vec::new()
            }
        }
    };
    let kek =
        list(v, &r.kek, "secure_boot.kek", "key exchange keys' certificates, like kek = [\"keys/KEK.crt\"] (PEM)");
    let db = list(
        v,
        &r.db,
        "secure_boot.db",
        "the certificates the firmware trusts to sign boot loaders, like db = [\"keys/db.crt\"] (PEM); the first whose key is `key` signs",
    );
    let signer = match &r.key {
        None => {
            missing(v, "key", "the db private key that signs the boot loader and kernel, like key = \"keys/db.key\" (PEM; it stays out of the image), or generate = true to have kiln make the keys");
            None
        }
        Some(k) => signing_key(v, k, &db),
    };
    if v.diags.len() != before {
        return None;
    }
    Some(SecureBoot {
        keys: KeySource::Files {
            pk: pk?,
            kek: kek.into_iter().map(|(_, d)| d).collect(),
            db: db.into_iter().map(|(_, d)| d).collect(),
            key: v.resolve(r.key.as_ref()?),
            signer: signer?,
        },
        dbx,
    })
}

/// dbx's signature lists, read and parsed.
fn check_dbx(v: &mut V, d: &Loc<String>) -> Option<Vec<u8>> {
    let path = v.resolve(d);
    check_source_file(v, d, "secure_boot.dbx", &path)?;
    let bytes = std::fs::read(&path).ok()?;
    match SignatureList::decode_all(&bytes) {
        Ok(_) => Some(bytes),
        Err(e) => {
            v.err(
                d.span,
                "secure_boot.dbx",
                format!("`{}` is not a file of EFI signature lists: {e}", d.value),
                Some("dbx takes the revocation list as firmware updates ship it (an .esl file, as efitools' cert-to-efi-sig-list or sbsiglist write)".into()),
            );
            None
        }
    }
}

/// The DER of the PEM certificate `at` names, or a diagnostic.
fn certificate(v: &mut V, at: &Loc<String>, key: &str) -> Option<Vec<u8>> {
    let path = v.resolve(at);
    check_source_file(v, at, key, &path)?;
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    if text.contains("PRIVATE KEY-----") {
        v.err(
            at.span,
            key,
            format!("`{}` holds a private key; {key} takes a certificate", at.value),
            Some(
                "only the certificates go into the image's variable store; the db private key is [secure_boot].key"
                    .into(),
            ),
        );
        return None;
    }
    match authenticode::certificate_der(&text) {
        Ok(der) => Some(der),
        Err(e) => {
            v.err(
                at.span,
                key,
                format!("`{}` {e}", at.value),
                Some("give a PEM certificate (BEGIN CERTIFICATE); convert DER with `openssl x509 -inform der -in CERT -out CERT.pem`".into()),
            );
            None
        }
    }
}

/// Which of `db` is the certificate of the private key `at` names.
fn signing_key(v: &mut V, at: &Loc<String>, db: &[(Loc<String>, Vec<u8>)]) -> Option<usize> {
    let path = v.resolve(at);
    check_source_file(v, at, "secure_boot.key", &path)?;
    let key = std::fs::read_to_string(&path).unwrap_or_default();
    if key.contains("-----BEGIN CERTIFICATE-----") && !key.contains("PRIVATE KEY-----") {
        v.err(
            at.span,
            "secure_boot.key",
            format!("`{}` is a certificate, not a private key", at.value),
            Some(
                "key takes the db certificate's private key (BEGIN PRIVATE KEY); the certificate itself goes in db"
                    .into(),
            ),
        );
        return None;
    }
    let mut last_error = None;
    for (i, (cert_at, _)) in db.iter().enumerate() {
        let cert = std::fs::read_to_string(v.resolve(cert_at)).unwrap_or_default();
        match Signer::from_pem(&key, &cert) {
            Ok(_) => return Some(i),
            Err(e) => last_error = Some(e),
        }
    }
    if let Some(e) = last_error {
        let (message, help) = match e {
            authenticode::SignerError::Mismatch => (
                format!("`{}` is not the key of any certificate in db", at.value),
                "the boot chain is signed with this key, and the firmware accepts it only if its certificate is in db; add the certificate to db or name its key",
            ),
            other => (format!("`{}` {other}", at.value), "give the db certificate's RSA private key in PEM, unencrypted"),
        };
        v.err(at.span, "secure_boot.key", message, Some(help.into()));
    }
    None
}
