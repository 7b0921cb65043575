//! The key hierarchy a Secure Boot build signs with: the recipe's certificates and db key, or
//! keys kiln makes on the first build into `NAME.keys/` beside the image and reads there on
//! every later one (so a rebuild signs with the same key and gives the same bytes). Private
//! keys are written 0600, read when signing, and go nowhere else.

use std::path::{Path, PathBuf};

use crate::formats::authenticode::{Signer, SignerError};
use crate::formats::efi_vars::{SecureBootKeys, KILN_OWNER};
use crate::formats::x509;
use crate::recipe::{KeySource, SecureBoot};

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("{what} {}", path.display())]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("the Secure Boot key {}", path.display())]
    Key { path: PathBuf, source: SignerError },
    #[error("making the Secure Boot keys")]
    Generate(#[source] x509::X509Error),
    #[error("{} holds only some of the generated keys ({missing} is missing); remove the directory to make a new hierarchy, or restore the file", dir.display())]
    Incomplete { dir: PathBuf, missing: String },
}

/// The hierarchy as the firmware gets it, and the key that signs.
pub struct Keys {
    pub keys: SecureBootKeys,
    /// Which of `keys.db` signs.
    pub signer_index: usize,
    pub signer: Signer,
    /// Where generated keys are kept (None: the recipe's own files).
    pub generated_in: Option<PathBuf>,
}

/// The names of the generated keys, in enrolment order.
const GENERATED: [&str; 3] = ["PK", "KEK", "db"];

/// The keys of `sb`; generated ones are made in `keys_dir` when it holds none yet, named after
/// `name`, valid from `epoch`.
pub fn resolve(sb: &SecureBoot, keys_dir: &Path, name: &str, epoch: i64) -> Result<Keys, KeysError> {
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| KeysError::Io { what, path, source }
    };
    match &sb.keys {
        KeySource::Files { pk, kek, db, key, signer } => {
            let pem = std::fs::read_to_string(key).map_err(io("reading the Secure Boot key", key))?;
            let s = Signer::new(&pem, &db[*signer]).map_err(|source| KeysError::Key { path: key.clone(), source })?;
            Ok(Keys {
                keys: SecureBootKeys {
                    owner: KILN_OWNER,
                    pk: pk.clone(),
                    kek: kek.clone(),
                    db: db.clone(),
                    dbx: sb.dbx.clone(),
                },
                signer_index: *signer,
                signer: s,
                generated_in: None,
            })
        }
        KeySource::Generate { db: extra } => {
            let files = |n: &str| (keys_dir.join(format!("{n}.key")), keys_dir.join(format!("{n}.crt")));
            let present: Vec<bool> = GENERATED.iter().map(|n| files(n).0.is_file() && files(n).1.is_file()).collect();
            if present.iter().all(|p| !p) {
                std::fs::create_dir_all(keys_dir).map_err(io("creating", keys_dir))?;
                let mut rng = rand::rng();
                for n in GENERATED {
                    let g = x509::self_signed(&mut rng, &format!("{name} {n}"), epoch).map_err(KeysError::Generate)?;
                    let (key, crt) = files(n);
                    crate::formats::atomic::write_private(&key, g.key_pem.as_bytes()).map_err(io("writing", &key))?;
                    crate::formats::atomic::write(&crt, g.certificate_pem.as_bytes()).map_err(io("writing", &crt))?;
                }
            } else if let Some(i) = present.iter().position(|p| !p) {
                let missing = GENERATED[i];
                return Err(KeysError::Incomplete {
                    dir: keys_dir.to_path_buf(),
                    missing: format!("{missing}.key or {missing}.crt"),
                });
            }
            let mut certs = Vec::new();
            for n in GENERATED {
                let crt = files(n).1;
                let pem = std::fs::read_to_string(&crt).map_err(io("reading", &crt))?;
                let der = crate::formats::authenticode::certificate_der(&pem)
                    .map_err(|source| KeysError::Key { path: crt.clone(), source })?;
                certs.push(der);
            }
            let (db_key, _) = files("db");
            let pem = std::fs::read_to_string(&db_key).map_err(io("reading the Secure Boot key", &db_key))?;
            let signer = Signer::new(&pem, &certs[2]).map_err(|source| KeysError::Key { path: db_key, source })?;
            let [pk, kek, db] = <[Vec<u8>; 3]>::try_from(certs).expect("three generated certificates");
            let mut all_db = vec![db];
            all_db.extend(extra.iter().cloned());
            Ok(Keys {
                keys: SecureBootKeys { owner: KILN_OWNER, pk, kek: vec![kek], db: all_db, dbx: sb.dbx.clone() },
                signer_index: 0,
                signer,
                generated_in: Some(keys_dir.to_path_buf()),
            })
        }
    }
}
