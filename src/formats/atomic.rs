//! The one way kiln puts a file in place: write a temporary file beside the destination,
//! fsync it, rename it over the destination, fsync the directory. A reader sees the old file
//! or the whole new one, a crash leaves no half-written file at the destination, and the file
//! survives a power cut once this returns.
//!
//! Files are created with mode 0666 less the process umask (0644 under the usual umask), as
//! `open(2)` does, so other users of a build server can read images and manifests; the
//! temporary name starts with a dot and ends in `.partial`, so leftovers of a killed process
//! are recognisable.

use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tempfile::NamedTempFile;

/// A temporary file beside `dest`, named `.NAME.XXXXXX.partial`, mode 0666 less the umask.
/// It is flock'ed while open, so [`remove_stale`] can tell a live writer's file from one a
/// killed process left behind.
pub fn temp_beside(dest: &Path) -> io::Result<NamedTempFile> {
    temp_with_mode(dest, 0o666)
}

fn temp_with_mode(dest: &Path, mode: u32) -> io::Result<NamedTempFile> {
    let tmp = tempfile::Builder::new()
        .prefix(&temp_prefix(dest))
        .suffix(TEMP_SUFFIX)
        .permissions(std::fs::Permissions::from_mode(mode))
        .tempfile_in(dir_of(dest))?;
    lock(tmp.as_file(), libc::LOCK_EX)?;
    Ok(tmp)
}

const TEMP_SUFFIX: &str = ".partial";
/// Leftovers younger than this are left alone: a writer flocks its file right after creating
/// it, and this covers the moment between the two.
const STALE_AFTER_SECS: u64 = 10;

fn temp_prefix(dest: &Path) -> String {
    format!(".{}.", dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
}

fn lock(f: &std::fs::File, how: libc::c_int) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: the descriptor is open for the duration of the call.
    if unsafe { libc::flock(f.as_raw_fd(), how) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Removes the temporary files of `dest` that a killed process left behind (SIGKILL, power
/// loss): those no process holds a lock on, older than a few seconds. Returns how many.
pub fn remove_stale(dest: &Path) -> io::Result<usize> {
    let prefix = temp_prefix(dest);
    let mut removed = 0;
    let entries = match std::fs::read_dir(dir_of(dest)) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for e in entries {
        let e = e?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with(&prefix) && name.ends_with(TEMP_SUFFIX)) {
            continue;
        }
        let path = e.path();
        let Ok(f) = std::fs::File::open(&path) else { continue };
        let old = f
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age.as_secs() >= STALE_AFTER_SECS);
        if old && lock(&f, libc::LOCK_EX | libc::LOCK_NB).is_ok() {
            std::fs::remove_file(&path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Puts a finished temporary file at `dest`: fsync, rename, fsync the directory.
pub fn persist(tmp: NamedTempFile, dest: &Path) -> io::Result<()> {
    tmp.as_file().sync_all()?;
    tmp.persist(dest).map_err(|e| e.error)?;
    sync_dir(dir_of(dest))
}

/// Writes `bytes` to `dest` atomically and durably.
pub fn write(dest: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = temp_beside(dest)?;
    tmp.write_all(bytes)?;
    persist(tmp, dest)
}

/// [`write`] for a secret (a private key): the file is 0600 from the moment it exists.
pub fn write_private(dest: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = temp_with_mode(dest, 0o600)?;
    tmp.write_all(bytes)?;
    persist(tmp, dest)
}

/// Makes renames in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn dir_of(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_files_with_the_umask_applied_and_leaves_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("out.json");
        write(&dest, b"first").unwrap();
        write(&dest, b"second").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"second");
        // The umask of a test process is whatever started it; read it back from the kernel.
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let umask = status
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .map(|u| u32::from_str_radix(u.trim(), 8).unwrap())
            .unwrap();
        assert_eq!(std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777, 0o666 & !umask);
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["out.json"], "a temporary file was left behind");
        // A temporary that is dropped unpersisted goes away and leaves the destination alone.
        let mut t = temp_beside(&dest).unwrap();
        t.write_all(b"never").unwrap();
        assert!(t.path().file_name().unwrap().to_string_lossy().starts_with(".out.json."));
        drop(t);
        assert_eq!(std::fs::read(&dest).unwrap(), b"second");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn only_unowned_old_leftovers_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("img.raw");
        let age = |p: &Path, secs: u64| {
            let f = std::fs::File::options().write(true).open(p).unwrap();
            f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(secs)).unwrap();
        };
        // A killed writer's file: no lock, old.
        let dead = d.path().join(".img.raw.abc123.partial");
        std::fs::write(&dead, b"half").unwrap();
        age(&dead, 60);
        // A killed writer's file seconds ago: maybe not yet locked by a live one, kept.
        let fresh = d.path().join(".img.raw.def456.partial");
        std::fs::write(&fresh, b"half").unwrap();
        // A live writer's file, old but locked.
        let live = temp_beside(&dest).unwrap();
        age(live.path(), 60);
        // Another output's leftover is not this one's business.
        let other = d.path().join(".other.raw.abc123.partial");
        std::fs::write(&other, b"x").unwrap();
        age(&other, 60);

        assert_eq!(remove_stale(&dest).unwrap(), 1);
        assert!(!dead.exists() && fresh.exists() && live.path().exists() && other.exists());
    }
}
