//! Staged bases in the cache: `bases/SUITE-ARCH-INPUTS-STATE.{tar,json,log,lock}`, one lock per
//! entry so builds of one base wait for one staging, older archive states removed.

use std::path::Path;

use super::{DebianBase, Origin, StageError, StagedBase};
use crate::manifest::BaseInfo;
use crate::progress::Progress;

/// Holds an exclusive flock on `path` until dropped, saying so when it has to wait.
pub(crate) fn lock_exclusive(path: &Path, progress: &dyn Progress) -> Result<std::fs::File, StageError> {
    use std::os::fd::AsRawFd;
    let io = |source| StageError::Io { what: "locking", path: path.to_path_buf(), source };
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path).map_err(io)?;
    // SAFETY: flock on a descriptor this function owns; no memory is involved.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        progress.note(&format!("waiting for another build staging the same base ({})", path.display()));
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io(std::io::Error::last_os_error()));
        }
    }
    Ok(f)
}

/// The cached tarball `STEM.tar` with its record `STEM.json`, or None when either is missing
/// or unreadable.
pub(super) fn load_cached(dir: &Path, stem: &str) -> Option<StagedBase> {
    let tar = dir.join(format!("{stem}.tar"));
    let info: BaseInfo = serde_json::from_slice(&std::fs::read(dir.join(format!("{stem}.json"))).ok()?).ok()?;
    let age_secs = std::fs::metadata(&tar).ok()?.modified().ok()?.elapsed().map(|d| d.as_secs()).unwrap_or(0);
    let why = format!(
        "staged {} from this state of the archive (key {}); in the local cache",
        info.staged_at,
        info.cache_key.get(..12).unwrap_or(&info.cache_key)
    );
    Some(StagedBase { tar, cached: true, info, age_secs, origin: Origin::Cache(why) })
}

/// Cached bases for these inputs, whatever archive state they came from.
fn cached_stems(base: &DebianBase, dir: &Path) -> Vec<String> {
    let prefix = base.file_prefix();
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".tar").filter(|s| s.starts_with(&prefix)).map(String::from))
        .collect();
    v.sort();
    v
}

/// The cached base for these inputs that resolved to `resolved`, by its stem.
pub(super) fn find_resolved(base: &DebianBase, dir: &Path, resolved: &str) -> Option<String> {
    cached_stems(base, dir)
        .into_iter()
        .find(|stem| load_cached(dir, stem).is_some_and(|b| b.info.resolved.as_deref() == Some(resolved)))
}

/// The cached base `from` under the name `to` as well (a hard link and a copy of its record),
/// so a build at the archive state `to` stands for finds it without asking apt again.
pub(super) fn alias_cached(dir: &Path, from: &str, to: &str) -> std::io::Result<StagedBase> {
    let (tar, record) = (dir.join(format!("{to}.tar")), dir.join(format!("{to}.json")));
    let _ = std::fs::remove_file(&tar);
    std::fs::hard_link(dir.join(format!("{from}.tar")), &tar)?;
    crate::formats::atomic::write(&record, &std::fs::read(dir.join(format!("{from}.json")))?)?;
    load_cached(dir, to).ok_or_else(|| std::io::Error::other(format!("{} is unreadable", record.display())))
}

pub(super) fn newest_cached(base: &DebianBase, dir: &Path) -> Option<StagedBase> {
    cached_stems(base, dir).into_iter().filter_map(|stem| load_cached(dir, &stem)).min_by_key(|b| b.age_secs)
}

/// Removes bases staged from older states of the archive: nothing would choose them again but
/// --offline, which prefers the newest. A build already reading one holds it open.
pub(super) fn remove_older(base: &DebianBase, dir: &Path, keep: &str) {
    for stem in cached_stems(base, dir) {
        if stem != keep {
            for ext in ["tar", "json", "log", "lock"] {
                let _ = std::fs::remove_file(dir.join(format!("{stem}.{ext}")));
            }
        }
    }
}
