//! The build's [`FileDigests`]: SHA-256 of the files a recipe names (`[[files]] source`, a
//! tarball base), remembered on disk by what `fstat` says of the file, so a rebuild does not read a 300 MB tarball twice: once to
//! hash it for the recipe hash and once to assemble the image.
//!
//! A remembered digest is used only while the file's device, inode, size, mtime and ctime all
//! match, as git's index and ccache's direct mode do. ctime cannot be set from user space, so
//! any write through the file system shows. File times have the kernel's coarse clock
//! granularity (a few ms), so a file changed within that window of being hashed could keep
//! its times: such a "racy" digest is not remembered (the file is read again next time).

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::recipe::{digest_of, FileDigest, FileDigests};

/// A digest is remembered only for files last changed at least this long before hashing.
const RACY_SECS: i64 = 2;

/// Where remembered digests live.
#[derive(Debug, Clone)]
pub struct DigestCache {
    dir: PathBuf,
}

/// What was true of the file when its digest was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    path: PathBuf,
    stamp: Stamp,
    sha256: String,
}

impl DigestCache {
    /// Remembers digests under `dir` (created when first needed).
    pub fn at(dir: impl Into<PathBuf>) -> DigestCache {
        DigestCache { dir: dir.into() }
    }

    /// [`FileDigests::digest`] with the clock given (nanoseconds since the epoch).
    fn digest_as_of(&self, path: &Path, now_ns: i128) -> io::Result<FileDigest> {
        let mut f = std::fs::File::open(path)?;
        let before = Stamp::of(&f.metadata()?);
        let slot = self.slot(path);
        if let Some(d) = slot.as_ref().and_then(|s| lookup(s, &before)) {
            return Ok(d);
        }
        let d = digest_of(&mut f)?;
        let after = Stamp::of(&f.metadata()?);
        if d.len != before.len || after != before {
            return Err(io::Error::other(format!(
                "it changed while being read ({} bytes, then {})",
                before.len, d.len
            )));
        }
        if let Some(slot) = slot {
            let settled = now_ns - before.mtime_ns.max(before.ctime_ns) >= i128::from(RACY_SECS) * 1_000_000_000;
            if settled {
                // Remembering is an optimisation: a cache that cannot be written costs a read
                // next time, never the build.
                let entry = Entry { path: path.to_path_buf(), stamp: before, sha256: hex::encode(d.sha256) };
                let _ = store(&slot, &entry);
            }
        }
        Ok(d)
    }

    /// The cache file for `path`: named by the SHA-256 of its absolute form, so a relative
    /// path from another directory does not alias it.
    fn slot(&self, path: &Path) -> Option<PathBuf> {
        let abs = std::path::absolute(path).ok()?;
        let key = Sha256::digest(abs.as_os_str().as_encoded_bytes());
        Some(self.dir.join(format!("{}.json", hex::encode(&key[..16]))))
    }
}

impl FileDigests for DigestCache {
    /// The length and SHA-256 of the file at `path`. The stamp is taken from the open file, so
    /// the digest read from the cache is the one of the file that was opened.
    fn digest(&self, path: &Path) -> io::Result<FileDigest> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|t| i128::try_from(t.as_nanos()).unwrap_or(i128::MAX))
            .unwrap_or(0);
        self.digest_as_of(path, now)
    }
}

fn lookup(slot: &Path, now: &Stamp) -> Option<FileDigest> {
    let text = std::fs::read(slot).ok()?;
    let e: Entry = serde_json::from_slice(&text).ok()?;
    if &e.stamp != now {
        return None;
    }
    let mut sha256 = [0u8; 32];
    hex::decode_to_slice(&e.sha256, &mut sha256).ok()?;
    Some(FileDigest { len: e.stamp.len, sha256 })
}

fn store(slot: &Path, e: &Entry) -> io::Result<()> {
    std::fs::create_dir_all(slot.parent().expect("slot is inside the cache dir"))?;
    crate::formats::atomic::write(slot, &serde_json::to_vec(e).map_err(io::Error::other)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn age(path: &Path, secs: u64) {
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(secs)).unwrap();
    }

    #[test]
    fn a_remembered_digest_is_used_only_while_the_file_is_unchanged() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("root.tar");
        std::fs::write(&file, b"first").unwrap();
        age(&file, 60);
        let cache = DigestCache::at(d.path().join("digests"));
        // ctime is now (set_modified changes it), so the first digest is racy and not kept.
        let first = cache.digest(&file).unwrap();
        assert_eq!(first.sha256, <[u8; 32]>::from(Sha256::digest(b"first")));
        assert_eq!(std::fs::read_dir(d.path().join("digests")).map(|r| r.count()).unwrap_or(0), 0);

        // Once settled it is kept and served without reading: prove it by planting a wrong
        // digest under the file's current stamp.
        let slot = cache.slot(&file).unwrap();
        let stamp = Stamp::of(&std::fs::metadata(&file).unwrap());
        let planted = Entry { path: file.clone(), stamp: stamp.clone(), sha256: hex::encode([7u8; 32]) };
        store(&slot, &planted).unwrap();
        assert_eq!(cache.digest(&file).unwrap().sha256, [7u8; 32]);

        // Same length, new content: the stamp (mtime, ctime) differs, so the file is read.
        std::fs::write(&file, b"other").unwrap();
        assert_eq!(cache.digest(&file).unwrap().sha256, <[u8; 32]>::from(Sha256::digest(b"other")));

        // Replaced by another file (new inode) with the planted times: read again.
        std::fs::remove_file(&file).unwrap();
        std::fs::write(&file, b"third").unwrap();
        assert_eq!(cache.digest(&file).unwrap().sha256, <[u8; 32]>::from(Sha256::digest(b"third")));
    }

    #[test]
    fn a_settled_file_is_remembered_and_a_corrupt_entry_is_ignored() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("src");
        std::fs::write(&file, b"payload").unwrap();
        let cache = DigestCache::at(d.path().join("digests"));
        let slot = cache.slot(&file).unwrap();
        let later = i128::from(RACY_SECS + 1) * 1_000_000_000
            + i128::try_from(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos()).unwrap();
        let want = FileDigest { len: 7, sha256: Sha256::digest(b"payload").into() };
        assert_eq!(cache.digest_as_of(&file, later).unwrap(), want);
        let stamp = Stamp::of(&std::fs::metadata(&file).unwrap());
        assert_eq!(lookup(&slot, &stamp), Some(want), "a settled file's digest is kept");

        std::fs::write(&slot, b"{ not json").unwrap();
        assert_eq!(cache.digest_as_of(&file, later).unwrap(), want);
        assert_eq!(lookup(&slot, &stamp), Some(want), "a corrupt entry is replaced");
        assert_eq!(crate::recipe::ReadEach.digest(&file).unwrap(), want);
    }
}
