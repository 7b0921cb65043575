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
    /// Why the store failed, once it has: the rest of the build does without it rather than
    /// waiting out every request's retries again.
    down: Mutex<Option<String>>,
}

impl SharedCache {
    pub fn connect(url: ShareUrl) -> Result<SharedCache, ShareError> {
        Ok(SharedCache {
            store: BlockingStore::connect(url)?,
            corrupt: Mutex::new(HashMap::new()),
            down: Mutex::new(None),
        })
    }

    /// Runs `f` on the store unless it failed before; a failure marks it down.
    fn call<T>(&self, f: impl std::future::Future<Output = Result<T, ShareError>>) -> Result<T, String> {
        if let Some(why) = self.down.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Err(format!("not used after an earlier failure: {why}"));
        }
        self.store.block_on(f).map_err(|e| {
            let why = e.to_string();
            if !matches!(e, ShareError::Io { .. }) {
                *self.down.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.clone());
            }
            why
        })
    }

    /// The record `stem`, when there is one of this version that kiln can trust to name things
    /// (64-digit keys: they become file names and are cut short in messages).
    fn read_record(&self, stem: &str) -> Result<Option<(Record, String)>, String> {
        let Some(got) = self.call(self.store.store().get(&record_name(stem)))? else { return Ok(None) };
        let hex64 = |h: &str| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit());
        Ok(serde_json::from_slice::<Record>(&got.bytes)
            .ok()
            .filter(|r| r.version == RECORD_VERSION && hex64(&r.sha256) && hex64(&r.info.cache_key))
            .filter(|r| r.info.resolved.as_deref().is_none_or(hex64))
            .map(|r| (r, got.etag)))
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
        let Some((record, etag)) = self.read_record(stem)? else { return Ok(Fetched::Absent) };
        let corrupt = |why: String| {
            self.corrupt.lock().unwrap_or_else(|p| p.into_inner()).insert(stem.to_string(), etag.clone());
            Ok(Fetched::Corrupt(why))
        };
        if record.object != object_name(&record.sha256) {
            return corrupt(format!("its record names {}", record.object));
        }
        match self.call(s.download(&record.object, dest, progress))? {
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
        Ok(self.read_record(stem)?.map(|(r, _)| r.info))
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
        let size = match self.call(s.size_of(&object))? {
            Some(size) if replace.is_none() => size,
            _ => self.call(s.upload(&object, tar, Some(&digest), progress))?.size,
        };
        let record =
            Record { version: RECORD_VERSION, object: object.clone(), sha256: digest, size, info: info.clone() };
        let body = serde_json::to_vec_pretty(&record).map_err(|e| e.to_string())?;
        let cond = replace.map_or(Condition::Absent, Condition::Matches);
        match self.call(s.put(&record_name(stem), body, cond))? {
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
