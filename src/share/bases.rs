//! Staged bases in the shared cache: `bases/STEM.json` records `bases/objects/SHA256.tar`.
//! A base has two names, its archive state's and its resolution's (see
//! `crate::stage::debian`), and one object.
//!
//! The object is content-addressed and uploaded first; the record is written after it, only
//! if absent. So a record always names a whole object, two runners that stage the same base
//! at once never overwrite each other's record (the first wins), and a reader checks the bytes
//! it downloaded against the record before using them.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::{BlockingStore, Condition, ShareError, ShareUrl};
use crate::manifest::BaseInfo;
use crate::progress::Progress;
use crate::stage::debian::{Fetched, SharedBases};

/// Bumped when the record's meaning changes; a record of another version is treated as absent.
const RECORD_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    version: u32,
    /// The object's name under the prefix (`bases/objects/SHA256.tar`).
    object: String,
    sha256: String,
    size: u64,
    info: BaseInfo,
}

/// The shared cache of staged bases, for [`crate::stage::debian::stage`].
pub struct SharedCache {
    store: BlockingStore,
    /// ETags of records whose objects did not verify: the next share replaces exactly them.
    corrupt: Mutex<HashMap<String, String>>,
}

impl SharedCache {
    pub fn connect(url: ShareUrl) -> Result<SharedCache, ShareError> {
        Ok(SharedCache { store: BlockingStore::connect(url)?, corrupt: Mutex::new(HashMap::new()) })
    }
}

fn record_name(stem: &str) -> String {
    format!("bases/{stem}.json")
}

fn object_name(sha256: &str) -> String {
    format!("bases/objects/{sha256}.tar")
}

impl SharedBases for SharedCache {
    fn location(&self) -> String {
        self.store.store().url().to_string()
    }

    fn fetch(&self, stem: &str, dest: &Path, progress: &dyn Progress) -> Result<Fetched, String> {
        let s = self.store.store();
        let Some(got) = self.store.block_on(s.get(&record_name(stem))).map_err(|e| e.to_string())? else {
            return Ok(Fetched::Absent);
        };
        let record = match serde_json::from_slice::<Record>(&got.bytes) {
            Ok(r) if r.version == RECORD_VERSION => r,
            _ => return Ok(Fetched::Absent),
        };
        let corrupt = |why: String| {
            self.corrupt.lock().unwrap_or_else(|p| p.into_inner()).insert(stem.to_string(), got.etag.clone());
            Ok(Fetched::Corrupt(why))
        };
        if record.object != object_name(&record.sha256) || record.info.cache_key.is_empty() {
            return corrupt(format!("its record names {}", record.object));
        }
        match self.store.block_on(s.download(&record.object, dest, progress)).map_err(|e| e.to_string())? {
            None => corrupt(format!("{} is missing", s.url().show(&record.object))),
            Some(d) if d.sha256 != record.sha256 || d.size != record.size => corrupt(format!(
                "{} has SHA-256 {} and {} bytes, its record says {} and {}",
                s.url().show(&record.object),
                d.sha256,
                d.size,
                record.sha256,
                record.size
            )),
            Some(_) => Ok(Fetched::Found(record.info)),
        }
    }

    fn record(&self, stem: &str) -> Result<Option<BaseInfo>, String> {
        let got = self.store.block_on(self.store.store().get(&record_name(stem))).map_err(|e| e.to_string())?;
        let record = got.and_then(|g| serde_json::from_slice::<Record>(&g.bytes).ok());
        Ok(record.filter(|r| r.version == RECORD_VERSION).map(|r| r.info))
    }

    fn share(&self, stem: &str, tar: &Path, info: &BaseInfo, progress: &dyn Progress) -> Result<(), String> {
        let s = self.store.store();
        // The object is named by its digest, so the file is hashed first (a local read is
        // far faster than the upload); the upload hashes what it sends again, which catches a
        // file that changed in between.
        let digest = crate::share::file_sha256(tar).map_err(|e| format!("reading {}: {e}", tar.display()))?;
        let object = object_name(&digest);
        let replace = self.corrupt.lock().unwrap_or_else(|p| p.into_inner()).remove(stem);
        // A base shared under its other name already has its object, unless that object is
        // the one found corrupt.
        let size = match self.store.block_on(s.size_of(&object)).map_err(|e| e.to_string())? {
            Some(size) if replace.is_none() => size,
            _ => {
                let sent = self.store.block_on(s.upload(&object, tar, progress)).map_err(|e| e.to_string())?;
                if sent.sha256 != digest {
                    return Err(format!("{} changed while it was uploaded", tar.display()));
                }
                sent.size
            }
        };
        let record =
            Record { version: RECORD_VERSION, object: object.clone(), sha256: digest, size, info: info.clone() };
        let body = serde_json::to_vec_pretty(&record).map_err(|e| e.to_string())?;
        let cond = replace.map_or(Condition::Absent, Condition::Matches);
        match self.store.block_on(s.put(&record_name(stem), body, cond)).map_err(|e| e.to_string())? {
            Some(_) => Ok(()),
            None => {
                // Another runner shared this base first: its record stands. This object stays:
                // the base's other name may record it.
                progress.note(&format!("another runner shared this base to {} first; kept theirs", self.location()));
                Ok(())
            }
        }
    }
}
