//! The EFI system partition as FAT32, through the `fatfs` crate, built in a sparse in-memory
//! device and emitted in order. Volume id, label and every timestamp are fixed by the caller,
//! so the same files give the same bytes.

use std::io::Write;

use super::image::SparseMem;

#[derive(Debug, thiserror::Error)]
pub enum FatError {
    #[error("formatting the FAT32 file system: {0}")]
    Format(std::io::Error),
    #[error("writing {path} into the FAT file system")]
    Write { path: String, source: std::io::Error },
    #[error("the ESP needs at least {need_bytes} bytes for its files; it has {have_bytes} (raise the ESP size)")]
    TooSmall { need_bytes: u64, have_bytes: u64 },
    #[error("FAT32 needs at least 33 MiB; the ESP was given {0} bytes")]
    Fat32TooSmall(u64),
}

/// One file to put on the ESP; parent directories are created as needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FatFile {
    /// Path with `/` separators, no leading slash (`EFI/BOOT/BOOTX64.EFI`).
    pub path: String,
    pub bytes: Vec<u8>,
}

/// A fixed clock for fatfs: every entry gets this date and time.
#[derive(Debug)]
struct FixedTime(fatfs::DateTime);

impl fatfs::TimeProvider for FixedTime {
    fn get_current_date(&self) -> fatfs::Date {
        self.0.date
    }
    fn get_current_date_time(&self) -> fatfs::DateTime {
        self.0
    }
}

/// A DOS date-time for a Unix time; FAT cannot go before 1980 or past 2107.
pub fn dos_time(unix_secs: i64) -> fatfs::DateTime {
    let secs = unix_secs.clamp(315_532_800, 4_354_819_199);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    fatfs::DateTime {
        date: fatfs::Date { year: y as u16, month: m as u16, day: d as u16 },
        time: fatfs::Time {
            hour: (rem / 3600) as u16,
            min: (rem % 3600 / 60) as u16,
            sec: (rem % 60) as u16,
            millis: 0,
        },
    }
}

/// Formats `size_bytes` as FAT32 and copies `files` in (sorted by path, so directory order
/// repeats).
pub fn build(
    size_bytes: u64,
    volume_id: u32,
    label: &str,
    files: &[FatFile],
    unix_time: i64,
) -> Result<SparseMem, FatError> {
    if size_bytes < 33 << 20 {
        return Err(FatError::Fat32TooSmall(size_bytes));
    }
    let need: u64 = files.iter().map(|f| f.bytes.len() as u64 + 4096).sum::<u64>() + (4 << 20);
    if need > size_bytes {
        return Err(FatError::TooSmall { need_bytes: need, have_bytes: size_bytes });
    }
    let mut dev = SparseMem::new(size_bytes);
    let mut lbl = [b' '; 11];
    for (d, s) in lbl.iter_mut().zip(label.bytes().map(|b| b.to_ascii_uppercase())) {
        *d = s;
    }
    let opts = fatfs::FormatVolumeOptions::new().fat_type(fatfs::FatType::Fat32).volume_id(volume_id).volume_label(lbl);
    fatfs::format_volume(&mut dev, opts).map_err(FatError::Format)?;
    {
        use std::io::Seek;
        dev.seek(std::io::SeekFrom::Start(0)).map_err(FatError::Format)?;
    }
    // fatfs wants a 'static provider; one small leak per image built.
    let clock: &'static FixedTime = Box::leak(Box::new(FixedTime(dos_time(unix_time))));
    let fs = fatfs::FileSystem::new(&mut dev, fatfs::FsOptions::new().time_provider(clock).update_accessed_date(false))
        .map_err(FatError::Format)?;
    let mut sorted: Vec<&FatFile> = files.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    for f in sorted {
        let err = |source| FatError::Write { path: f.path.clone(), source };
        let parts: Vec<&str> = f.path.split('/').filter(|p| !p.is_empty()).collect();
        let (name, dirs) = parts.split_last().ok_or_else(|| err(std::io::Error::other("empty path")))?;
        let mut dir = fs.root_dir();
        for d in dirs {
            dir = match dir.open_dir(d) {
                Ok(x) => x,
                Err(_) => dir.create_dir(d).map_err(err)?,
            };
        }
        let mut file = dir.create_file(name).map_err(err)?;
        file.truncate().map_err(err)?;
        file.write_all(&f.bytes).map_err(err)?;
        file.flush().map_err(err)?;
    }
    fs.unmount().map_err(FatError::Format)?;
    fix_dot_entries(&mut dev).map_err(FatError::Format)?;
    Ok(dev)
}

fn le16(b: &[u8], at: usize) -> u64 {
    u64::from(u16::from_le_bytes([b[at], b[at + 1]]))
}
fn le32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes")))
}

/// fatfs 0.3.6 writes a long-name entry in front of every `.` and `..` entry and points `..`
/// of the root's children at the root's cluster; fsck.fat rejects both (the FAT spec wants
/// bare 8.3 dot entries, and `..` = 0 for the root). Fix the directories up in place: drop
/// the long-name entries before dot entries and zero `..` below the root.
fn fix_dot_entries(dev: &mut SparseMem) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    let mut bs = [0u8; 512];
    dev.read_at(0, &mut bs);
    let (bps, spc) = (le16(&bs, 11), u64::from(bs[13]));
    let (rsv, fats, fat_size, root) = (le16(&bs, 14), u64::from(bs[16]), le32(&bs, 36), le32(&bs, 44));
    let data_start = (rsv + fats * fat_size) * bps;
    let cluster_bytes = (bps * spc) as usize;
    let fat_entry = |dev: &SparseMem, c: u64| {
        let mut e = [0u8; 4];
        dev.read_at(rsv * bps + c * 4, &mut e);
        u32::from_le_bytes(e) & 0x0FFF_FFFF
    };
    let mut todo = vec![(root, true)];
    while let Some((cluster, is_root)) = todo.pop() {
        if fat_entry(dev, cluster) < 0x0FFF_FFF8 {
            return Err(std::io::Error::other("an ESP directory spans more than one cluster"));
        }
        let at = data_start + (cluster - 2) * cluster_bytes as u64;
        let mut buf = vec![0u8; cluster_bytes];
        dev.read_at(at, &mut buf);
        let mut out: Vec<u8> = Vec::with_capacity(cluster_bytes);
        let mut pending: Vec<u8> = Vec::new();
        for e in buf.chunks(32) {
            if e[0] == 0 {
                break;
            }
            if e[11] == 0x0F {
                pending.extend_from_slice(e);
                continue;
            }
            let name = &e[..11];
            let mut e = e.to_vec();
            if name == b".          " || name == b"..         " {
                pending.clear();
                if name == b"..         " && !is_root && dotdot_names_root(&e, root) {
                    e[20..22].fill(0);
                    e[26..28].fill(0);
                }
            } else if e[11] & 0x10 != 0 && e[0] != 0xE5 {
                let child = (le16(&e, 20) << 16) | le16(&e, 26);
                todo.push((child, false));
            }
            out.append(&mut pending);
            out.extend_from_slice(&e);
        }
        out.resize(cluster_bytes, 0);
        if out != buf {
            dev.seek(SeekFrom::Start(at))?;
            std::io::Write::write_all(dev, &out)?;
        }
    }
    Ok(())
}

/// Whether a `..` entry names the root directory's cluster.
fn dotdot_names_root(e: &[u8], root: u64) -> bool {
    ((le16(e, 20) << 16) | le16(e, 26)) == root
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dos_time_of_known_dates() {
        let t = dos_time(1_700_000_000); // 2023-11-14 22:13:20 UTC
        assert_eq!((t.date.year, t.date.month, t.date.day), (2023, 11, 14));
        assert_eq!((t.time.hour, t.time.min, t.time.sec), (22, 13, 20));
        let t = dos_time(0);
        assert_eq!((t.date.year, t.date.month, t.date.day), (1980, 1, 1));
    }
}

#[cfg(test)]
mod fsck_tests {
    use super::*;

    #[test]
    fn esp_is_clean_for_fsck_fat() {
        let files = vec![
            FatFile { path: "EFI/BOOT/BOOTX64.EFI".into(), bytes: vec![1; 100_000] },
            FatFile { path: "loader/loader.conf".into(), bytes: b"timeout 0\n".to_vec() },
            FatFile { path: "vmlinuz".into(), bytes: vec![2; 5_000_000] },
        ];
        let mem = build(256 << 20, 0x1234_5678, "ESP", &files, 1_700_000_000).unwrap();
        let mut v = crate::image::VecSink::default();
        mem.emit(0, &mut v).unwrap();
        crate::image::Sink::finish(&mut v, 256 << 20).unwrap();
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("esp.img");
        std::fs::write(&p, &v.bytes).unwrap();
        let fsck = std::path::Path::new("/usr/sbin/fsck.fat");
        if !fsck.exists() {
            // The judge is missing: a skip locally, a failure in CI (where setup-host installs it).
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(!ci, "fsck.fat is not installed; .ci/setup-host should have installed it");
            eprintln!("SKIP: fsck.fat is not installed (run .ci/setup-host)");
            return;
        }
        let out = std::process::Command::new(fsck).arg("-n").arg(&p).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    }
}

/// What `kiln inspect` shows of a FAT file system: label, volume id and the files (four
/// directory levels deep), read through fatfs from a window of the image file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FatSummary {
    pub label: String,
    /// `XXXX-XXXX`, as `blkid` prints it.
    pub volume_id: String,
    /// `/EFI/BOOT/BOOTX64.EFI (123 bytes)`, in directory order.
    pub files: Vec<String>,
}

/// The FAT file system in `len` bytes at `offset` of `dev`; None when there is none that fatfs
/// can read.
pub fn summary(dev: std::sync::Arc<dyn crate::device::Device>, offset: u64, len: u64) -> Option<FatSummary> {
    // fatfs 0.3.6 subtracts 2 from a directory's cluster number unchecked: a hostile entry or
    // FAT chain naming cluster 0 or 1 panics (with overflow checks on) where it should fail.
    // Found by the `inspect` fuzz target; until fatfs checks it, such a file system is unreadable.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read_summary(dev, offset, len))).ok().flatten()
}

fn read_summary(dev: std::sync::Arc<dyn crate::device::Device>, offset: u64, len: u64) -> Option<FatSummary> {
    let fs = fatfs::FileSystem::new(crate::device::Window::new(dev, offset, len), fatfs::FsOptions::new()).ok()?;
    fn walk<T: fatfs::ReadWriteSeek>(dir: fatfs::Dir<T>, prefix: &str, out: &mut Vec<String>, depth: u32) {
        for e in dir.iter().map_while(Result::ok) {
            let name = e.file_name();
            if name == "." || name == ".." {
                continue;
            }
            let p = format!("{prefix}/{name}");
            if e.is_dir() && depth < 4 {
                walk(e.to_dir(), &p, out, depth + 1);
            } else if !e.is_dir() {
                out.push(format!("{p} ({} bytes)", e.len()));
            }
        }
    }
    let mut files = Vec::new();
    walk(fs.root_dir(), "", &mut files, 0);
    let id = fs.volume_id();
    Some(FatSummary {
        label: fs.volume_label().trim_end().to_string(),
        volume_id: format!("{:04X}-{:04X}", id >> 16, id & 0xffff),
        files,
    })
}
