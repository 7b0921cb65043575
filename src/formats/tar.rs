//! Reads a tar archive (ustar, GNU or PAX) straight into a [`Tree`], without unpacking it.
//!
//! Regular file contents stay in the archive: each file becomes a reference to its byte range,
//! so reading a 350 MB root costs one pass over the headers and metadata-sized memory. GNU
//! sparse members are the exception: their data is expanded once into a spool file next to the
//! tree (holes found while expanding stay holes).
//!
//! PAX records honoured: `path`, `linkpath`, `size` (through the `tar` crate), `uid`, `gid`,
//! `mtime`/`atime`/`ctime` with fractional seconds (also negative), and extended attributes
//! as `SCHILY.xattr.NAME` (GNU tar, mmdebstrap) or `LIBARCHIVE.xattr.NAME` (bsdtar).

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

use base64::Engine as _;

use super::tree::{Content, Data, Dir, Kind, Meta, OnExisting, Segment, SourceId, Timestamp, Tree, TreeError};

#[derive(Debug, thiserror::Error)]
pub enum TarError {
    /// The archive's first header is not a tar header: said in one line, without its bytes.
    #[error("{path} is not a tar archive: {what}")]
    NotTar { path: PathBuf, what: String },
    #[error("reading tar archive {path}")]
    Io { path: PathBuf, source: io::Error },
    #[error("tar archive {path}, entry {index} ({name:?})")]
    Tree { path: PathBuf, index: u64, name: String, source: TreeError },
    #[error("tar archive {path}, entry {index} ({name:?}): {what}")]
    Entry { path: PathBuf, index: u64, name: String, what: String },
}

/// Options for [`read_tar`].
#[derive(Debug, Clone, Default)]
pub struct TarOptions {
    /// Where expanded GNU sparse members are spooled; the system temp dir when `None`.
    pub spool_dir: Option<PathBuf>,
}

/// Reads the archive at `path` into a new tree. The archive must stay in place (unchanged)
/// for as long as the tree is used: file contents are read from it when the image is written.
pub fn read_tar(path: &Path, opts: &TarOptions) -> Result<Tree, TarError> {
    let mut tree = Tree::new(Meta::new(0o755, 0, 0, Timestamp::default()));
    read_into(&mut tree, path, opts, OnExisting::Error)?;
    Ok(tree)
}

/// Lays the archive at `path` over `tree`, as an overlay: each entry replaces what the tree has
/// at its path (a directory over a directory keeps its entries and takes the new metadata).
/// For a layer staged on top of a base whose tree was read from another archive; both must
/// stay in place while the tree is used.
pub fn overlay_tar(tree: &mut Tree, path: &Path, opts: &TarOptions) -> Result<(), TarError> {
    read_into(tree, path, opts, OnExisting::Replace)
}

fn read_into(tree: &mut Tree, path: &Path, opts: &TarOptions, on_existing: OnExisting) -> Result<(), TarError> {
    let io_err = |source: io::Error| TarError::Io { path: path.to_path_buf(), source };
    let source = tree.add_source(path).map_err(io_err)?;
    let file = open_archive(path)?;
    // Unbuffered on purpose: headers are read at their exact size and file contents are
    // skipped with a seek, so the archive is read once here (headers) and once more where the
    // image is written (contents), never refilled and thrown away. A buffer would be refilled
    // after every seek past a file's contents: 40 times the archive's size in copies.
    let mut archive = tar::Archive::new(file);
    let mut spool: Option<Spool> = None;
    let entries = archive.entries_with_seek().map_err(io_err)?;
    for (index, entry) in entries.enumerate() {
        let mut entry = entry.map_err(io_err)?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let at = At { path, index: index as u64, name };
        let mut reading = Reading { tree: &mut *tree, source, opts, spool: &mut spool, on_existing };
        reading.entry(&mut entry, &at)?;
    }
    Ok(())
}

/// Opens the archive, telling a file that is no tar archive at all so here, in one line: the
/// tar crate's own message would quote the header's bytes.
fn open_archive(path: &Path) -> Result<File, TarError> {
    let io_err = |source: io::Error| TarError::Io { path: path.to_path_buf(), source };
    let file = File::open(path).map_err(io_err)?;
    let mut first = [0u8; 512];
    let got = read_up_to(&file, &mut first).map_err(io_err)?;
    if let Some(what) = first_header_problem(&first[..got]) {
        return Err(TarError::NotTar { path: path.to_path_buf(), what });
    }
    Ok(file)
}

/// Which entry of which archive is being read, for errors.
struct At<'a> {
    path: &'a Path,
    index: u64,
    name: String,
}

impl At<'_> {
    fn entry(&self, what: String) -> TarError {
        TarError::Entry { path: self.path.to_path_buf(), index: self.index, name: self.name.clone(), what }
    }
    fn tree(&self, source: TreeError) -> TarError {
        TarError::Tree { path: self.path.to_path_buf(), index: self.index, name: self.name.clone(), source }
    }
    fn io(&self, source: io::Error) -> TarError {
        TarError::Io { path: self.path.to_path_buf(), source }
    }
}

/// What reading one archive into a tree carries from entry to entry.
struct Reading<'a> {
    tree: &'a mut Tree,
    source: SourceId,
    opts: &'a TarOptions,
    /// Where GNU sparse members are expanded, made at the first one.
    spool: &'a mut Option<Spool>,
    on_existing: OnExisting,
}

type Entry<'a> = tar::Entry<'a, File>;

impl Reading<'_> {
    /// One archive entry into the tree: its metadata (header, then PAX records), then what it
    /// is, then its place (parents made as needed).
    fn entry(&mut self, entry: &mut Entry<'_>, at: &At<'_>) -> Result<(), TarError> {
        let name_bytes = entry.path_bytes().into_owned();
        let header = entry.header().clone();
        let mut meta = header_meta(&header, at)?;
        let mut sparse = PaxSparse::default();
        if let Some(pax) = entry.pax_extensions().map_err(|e| at.io(e))? {
            let (mut have_atime, mut have_ctime) = (false, false);
            for ext in pax {
                let ext = ext.map_err(|e| at.io(e))?;
                match apply_pax(&mut meta, &mut sparse, ext.key_bytes(), ext.value_bytes(), at)? {
                    PaxTime::Atime => have_atime = true,
                    PaxTime::Ctime => have_ctime = true,
                    PaxTime::Neither => {}
                }
            }
            if !have_atime {
                meta.atime = meta.mtime;
            }
            if !have_ctime {
                meta.ctime = meta.mtime;
            }
        }

        // PAX sparse members (GNU tar's --sparse with --format=pax) name a placeholder path in
        // the header and carry the real name and map in PAX records (0.x) or at the start of
        // the data (1.0).
        let name_bytes = match &sparse.name {
            Some(n) if sparse.is_sparse() => n.clone(),
            _ => name_bytes,
        };
        let etype = header.entry_type();
        let kind = match etype {
            tar::EntryType::Regular | tar::EntryType::Continuous if sparse.is_sparse() => {
                Kind::File(pax_sparse_content(entry, &mut sparse, self.source, at)?)
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                Kind::File(Content::from_source(self.source, entry.raw_file_position(), entry.size()))
            }
            tar::EntryType::GNUSparse => {
                let sp = match self.spool {
                    Some(s) => s,
                    None => self
                        .spool
                        .insert(Spool::create(self.opts.spool_dir.as_deref(), self.tree).map_err(|e| at.io(e))?),
                };
                Kind::File(sp.expand(entry).map_err(|e| at.io(e))?)
            }
            tar::EntryType::Directory => Kind::Dir(Dir::default()),
            tar::EntryType::Symlink => {
                let target = entry.link_name_bytes().ok_or_else(|| at.entry("symlink without a target".into()))?;
                if target.is_empty() {
                    return Err(at.entry("symlink with an empty target".into()));
                }
                Kind::Symlink(target.into_owned())
            }
            tar::EntryType::Link => {
                let target = entry.link_name_bytes().ok_or_else(|| at.entry("hard link without a target".into()))?;
                self.tree.link(&name_bytes, &target, self.on_existing).map_err(|e| at.tree(e))?;
                return Ok(());
            }
            tar::EntryType::Char | tar::EntryType::Block => device(&header, at)?,
            tar::EntryType::Fifo => Kind::Fifo,
            // Global PAX headers and GNU long-name records are consumed by the tar crate; other
            // kinds (GNU volume labels, multi-volume continuations) carry nothing for a root tree.
            tar::EntryType::XGlobalHeader | tar::EntryType::GNULongName | tar::EntryType::GNULongLink => return Ok(()),
            other => return Err(at.entry(format!("unsupported tar entry type {:?}", other.as_byte() as char))),
        };
        // Archives made without explicit parent directories are common (`tar -cf x.tar a/b/c`).
        let parent_meta = Meta::new(0o755, 0, 0, meta.mtime);
        self.tree.create_parents(&name_bytes, &parent_meta).map_err(|e| at.tree(e))?;
        self.tree.insert(&name_bytes, kind, meta, self.on_existing).map_err(|e| at.tree(e))?;
        Ok(())
    }
}

/// Mode, owner and mtime from the header; atime and ctime are the mtime unless PAX says
/// otherwise. Numbers too large for the tree (GNU base-256 fields hold 64 bits) are refused.
fn header_meta(header: &tar::Header, at: &At<'_>) -> Result<Meta, TarError> {
    let mode = header.mode().map_err(|e| at.entry(format!("bad mode: {e}")))?;
    let uid = header.uid().map_err(|e| at.entry(format!("bad uid: {e}")))?;
    let gid = header.gid().map_err(|e| at.entry(format!("bad gid: {e}")))?;
    let mtime = header.mtime().map_err(|e| at.entry(format!("bad mtime: {e}")))?;
    let uid = u32::try_from(uid).map_err(|_| at.entry(format!("uid {uid} does not fit 32 bits")))?;
    let gid = u32::try_from(gid).map_err(|_| at.entry(format!("gid {gid} does not fit 32 bits")))?;
    let mtime = i64::try_from(mtime).map_err(|_| at.entry(format!("mtime {mtime} does not fit 64 signed bits")))?;
    // The permission bits, set-id and sticky bits: 12 bits, which fit a u16.
    let perm = u16::try_from(mode & 0o7777).expect("12 bits");
    Ok(Meta::new(perm, uid, gid, Timestamp::new(mtime, 0)))
}

/// Which of the times a PAX record set (so the header's mtime does not stand in for it).
enum PaxTime {
    Atime,
    Ctime,
    Neither,
}

/// One PAX record: ids, times, GNU sparse information, extended attributes; others ignored.
fn apply_pax(
    meta: &mut Meta,
    sparse: &mut PaxSparse,
    key: &[u8],
    value: &[u8],
    at: &At<'_>,
) -> Result<PaxTime, TarError> {
    match key {
        b"uid" => meta.uid = parse_id(value).ok_or_else(|| at.entry(format!("bad PAX uid {value:?}")))?,
        b"gid" => meta.gid = parse_id(value).ok_or_else(|| at.entry(format!("bad PAX gid {value:?}")))?,
        b"mtime" => meta.mtime = parse_time(value).ok_or_else(|| at.entry("bad PAX mtime".into()))?,
        b"atime" => {
            meta.atime = parse_time(value).ok_or_else(|| at.entry("bad PAX atime".into()))?;
            return Ok(PaxTime::Atime);
        }
        b"ctime" => {
            meta.ctime = parse_time(value).ok_or_else(|| at.entry("bad PAX ctime".into()))?;
            return Ok(PaxTime::Ctime);
        }
        b"GNU.sparse.major" => sparse.major = parse_u64(value),
        b"GNU.sparse.minor" => sparse.minor = parse_u64(value),
        b"GNU.sparse.name" => sparse.name = Some(value.to_vec()),
        b"GNU.sparse.realsize" | b"GNU.sparse.size" => sparse.realsize = parse_u64(value),
        b"GNU.sparse.map" => sparse.map = Some(parse_map(value).ok_or_else(|| at.entry("bad GNU.sparse.map".into()))?),
        b"GNU.sparse.offset" | b"GNU.sparse.numbytes" => sparse.pairs_00.push(parse_u64(value).unwrap_or(u64::MAX)),
        _ => {
            if let Some(xname) = key.strip_prefix(b"SCHILY.xattr.") {
                meta.xattrs.insert(xname.to_vec(), value.to_vec());
            } else if let Some(xname) = key.strip_prefix(b"LIBARCHIVE.xattr.") {
                let xname = percent_decode(xname);
                let v = base64::engine::general_purpose::STANDARD_NO_PAD
                    .decode(value.trim_ascii_end().trim_end_matches_eq(b'='))
                    .map_err(|e| at.entry(format!("bad LIBARCHIVE xattr value: {e}")))?;
                meta.xattrs.insert(xname, v);
            }
        }
    }
    Ok(PaxTime::Neither)
}

/// A PAX sparse member's content: its data segments are stored back to back in the archive,
/// so they stay references.
fn pax_sparse_content(
    entry: &mut Entry<'_>,
    sparse: &mut PaxSparse,
    source: SourceId,
    at: &At<'_>,
) -> Result<Content, TarError> {
    let mut data_pos = entry.raw_file_position();
    let map = match sparse.map.take() {
        Some(m) => m,
        None if sparse.major == Some(1) => {
            let (m, used) = read_map_1_0(entry).map_err(|e| at.entry(format!("bad sparse map: {e}")))?;
            data_pos = data_pos.checked_add(used).ok_or_else(|| at.entry("sparse map past any archive".into()))?;
            m
        }
        None => pairs(&sparse.pairs_00).ok_or_else(|| at.entry("bad GNU.sparse 0.0 map".into()))?,
    };
    let realsize = sparse.realsize.ok_or_else(|| at.entry("sparse member without a real size".into()))?;
    let content =
        sparse_content(&map, realsize, source, data_pos).map_err(|e| at.entry(format!("bad sparse map: {e}")))?;
    Ok(content)
}

/// The content a sparse map describes, its data stored back to back from `data_pos`; the
/// map comes from the archive, so its sums are checked.
fn sparse_content(
    map: &[(u64, u64)],
    realsize: u64,
    source: SourceId,
    mut data_pos: u64,
) -> Result<Content, TreeError> {
    let mut content = Content { size: realsize, segments: Vec::with_capacity(map.len()) };
    for &(offset, len) in map {
        if len > 0 {
            content.segments.push(Segment { offset, len, data: Data::Source { source, offset: data_pos } });
        }
        data_pos = data_pos.checked_add(len).ok_or(TreeError::BadContent("sparse data runs past 2^64 bytes"))?;
    }
    content.validate()?;
    Ok(content)
}

/// A device node's numbers.
fn device(header: &tar::Header, at: &At<'_>) -> Result<Kind, TarError> {
    let major = header.device_major().map_err(|e| at.entry(format!("bad device major: {e}")))?.unwrap_or(0);
    let minor = header.device_minor().map_err(|e| at.entry(format!("bad device minor: {e}")))?.unwrap_or(0);
    Ok(if header.entry_type() == tar::EntryType::Char {
        Kind::CharDev { major, minor }
    } else {
        Kind::BlockDev { major, minor }
    })
}

/// GNU sparse information gathered from PAX records.
#[derive(Default)]
struct PaxSparse {
    major: Option<u64>,
    minor: Option<u64>,
    name: Option<Vec<u8>>,
    realsize: Option<u64>,
    map: Option<Vec<(u64, u64)>>,
    pairs_00: Vec<u64>,
}

impl PaxSparse {
    fn is_sparse(&self) -> bool {
        self.major.is_some() || self.map.is_some() || !self.pairs_00.is_empty()
    }
}

fn parse_u64(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

fn pairs(nums: &[u64]) -> Option<Vec<(u64, u64)>> {
    if nums.len() % 2 != 0 || nums.contains(&u64::MAX) {
        return None;
    }
    Some(nums.chunks(2).map(|c| (c[0], c[1])).collect())
}

/// `GNU.sparse.map`: "offset,size,offset,size,...".
fn parse_map(v: &[u8]) -> Option<Vec<(u64, u64)>> {
    let nums: Option<Vec<u64>> = std::str::from_utf8(v).ok()?.split(',').map(|n| n.trim().parse().ok()).collect();
    pairs(&nums?)
}

/// Sparse format 1.0: decimal lines at the start of the data (count, then offset/size pairs),
/// padded to a 512-byte boundary. Returns the map and the bytes it occupies.
fn read_map_1_0<R: Read>(r: &mut R) -> io::Result<(Vec<(u64, u64)>, u64)> {
    let mut used = 0u64;
    let mut byte = [0u8; 1];
    let mut next_number = |r: &mut R| -> io::Result<u64> {
        let mut n: u64 = 0;
        let mut digits = 0;
        loop {
            r.read_exact(&mut byte)?;
            used += 1;
            match byte[0] {
                b'\n' if digits > 0 => return Ok(n),
                b'0'..=b'9' if digits < 20 => {
                    n = n
                        .checked_mul(10)
                        .and_then(|n| n.checked_add(u64::from(byte[0] - b'0')))
                        .ok_or_else(|| io::Error::other("number overflows"))?;
                    digits += 1;
                }
                _ => return Err(io::Error::other("not a decimal line")),
            }
        }
    };
    let count = next_number(r)?;
    // A map longer than the archive could hold is corrupt; 1<<24 entries is far past any real file.
    if count > 1 << 24 {
        return Err(io::Error::other(format!("{count} map entries")));
    }
    let mut nums = Vec::with_capacity(count as usize * 2);
    for _ in 0..count * 2 {
        nums.push(next_number(r)?);
    }
    let used = used.div_ceil(512) * 512;
    Ok((pairs(&nums).ok_or_else(|| io::Error::other("odd map"))?, used))
}

fn parse_id(v: &[u8]) -> Option<u32> {
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

/// Parses a PAX time: `[-]SECONDS[.FRACTION]`.
fn parse_time(v: &[u8]) -> Option<Timestamp> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = int.parse().ok()?;
    let mut nanos: u32 = 0;
    for (i, c) in frac.chars().take(9).enumerate() {
        let d = c.to_digit(10)?;
        nanos += d * 10u32.pow(8 - i as u32);
    }
    if !frac.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some(if !neg {
        Timestamp::new(secs, nanos)
    } else if nanos == 0 {
        Timestamp::new(-secs, 0)
    } else {
        // -1.25 s is 1.75 s after -3 s... i.e. secs = -2, nanos = 0.75e9.
        Timestamp::new(-secs - 1, 1_000_000_000 - nanos)
    })
}

fn percent_decode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' && i + 2 < s.len() {
            if let Ok(b) = u8::from_str_radix(std::str::from_utf8(&s[i + 1..i + 3]).unwrap_or("zz"), 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

trait TrimEq {
    fn trim_end_matches_eq(&self, b: u8) -> &[u8];
}
impl TrimEq for [u8] {
    fn trim_end_matches_eq(&self, b: u8) -> &[u8] {
        let mut end = self.len();
        while end > 0 && self[end - 1] == b {
            end -= 1;
        }
        &self[..end]
    }
}

/// A spool file for expanded sparse members; registered as a tree source.
struct Spool {
    file: File,
    source: super::tree::SourceId,
    len: u64,
}

impl Spool {
    fn create(dir: Option<&Path>, tree: &mut Tree) -> io::Result<Spool> {
        let tmp = match dir {
            Some(d) => tempfile::NamedTempFile::new_in(d)?,
            None => tempfile::NamedTempFile::new()?,
        };
        // Keep the file after this process is done with the handle only as long as the tree
        // needs it: the path is unlinked now and the tree's open handle keeps the data alive.
        let source = tree.add_source(tmp.path())?;
        let (file, path) = tmp.into_parts();
        drop(path);
        Ok(Spool { file, source, len: 0 })
    }

    /// Copies a member's expanded bytes into the spool, leaving 4 KiB zero blocks out as holes.
    fn expand<R: Read>(&mut self, r: &mut R) -> io::Result<Content> {
        const CHUNK: usize = 4096;
        let mut buf = vec![0u8; CHUNK];
        let mut content = Content::empty();
        let mut pos = 0u64;
        self.file.seek(io::SeekFrom::Start(self.len))?;
        loop {
            let mut filled = 0;
            while filled < CHUNK {
                let n = r.read(&mut buf[filled..])?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                break;
            }
            if buf[..filled].iter().any(|&b| b != 0) {
                self.file.write_all(&buf[..filled])?;
                match content.segments.last_mut() {
                    Some(Segment { offset, len, data: Data::Source { offset: so, .. } })
                        if *offset + *len == pos && *so + *len == self.len =>
                    {
                        *len += filled as u64
                    }
                    _ => content.segments.push(Segment {
                        offset: pos,
                        len: filled as u64,
                        data: Data::Source { source: self.source, offset: self.len },
                    }),
                }
                self.len += filled as u64;
            }
            pos += filled as u64;
            if filled < CHUNK {
                break;
            }
        }
        content.size = pos;
        Ok(content)
    }
}

/// Reads from the start of `file` until `buf` is full or the file ends.
fn read_up_to(file: &File, buf: &mut [u8]) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], got as u64)? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

/// Why the first 512 bytes of a file are not a tar header, if they are not: too short, or a
/// checksum field (bytes 148–155, octal) that is not one or does not match the header. A header
/// of zeros is the end of an empty archive, which is fine.
fn first_header_problem(header: &[u8]) -> Option<String> {
    if header.is_empty() {
        return Some("it is empty (a tar archive holds at least one 512-byte header)".into());
    }
    if header.len() < 512 {
        return Some(format!("it is {} bytes long, shorter than one 512-byte tar header", header.len()));
    }
    if header.iter().all(|b| *b == 0) {
        return None;
    }
    let field = &header[148..156];
    let digits: &[u8] = field.trim_ascii_start();
    let end = digits.iter().position(|b| !(b'0'..=b'7').contains(b)).unwrap_or(digits.len());
    let recorded = std::str::from_utf8(&digits[..end]).ok().and_then(|d| u32::from_str_radix(d, 8).ok());
    let computed: u32 =
        header.iter().enumerate().map(|(i, b)| if (148..156).contains(&i) { 32 } else { u32::from(*b) }).sum();
    match recorded {
        None => {
            Some("the header at offset 0 has no octal checksum in bytes 148-155, where every tar header has one".into())
        }
        Some(r) if r != computed => {
            Some(format!("the header at offset 0 records checksum {r:o} (octal) but its bytes sum to {computed:o}"))
        }
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times_parse_with_fractions_and_signs() {
        assert_eq!(parse_time(b"1700000000.5"), Some(Timestamp::new(1700000000, 500_000_000)));
        assert_eq!(parse_time(b"-1.25"), Some(Timestamp::new(-2, 750_000_000)));
        assert_eq!(parse_time(b"-7"), Some(Timestamp::new(-7, 0)));
        assert_eq!(parse_time(b"12.x"), None);
    }

    #[test]
    fn a_file_that_is_no_tar_archive_is_told_in_one_line() {
        let mut h = tar::Header::new_ustar();
        h.set_path("etc/motd").unwrap();
        h.set_size(3);
        h.set_cksum();
        assert_eq!(first_header_problem(h.as_bytes()), None);
        assert_eq!(first_header_problem(&[0u8; 1024][..512]), None);
        let mut bad = h.as_bytes().to_vec();
        bad[0] ^= 1;
        let what = first_header_problem(&bad).unwrap();
        assert!(what.starts_with("the header at offset 0 records checksum"), "{what}");
        let mut junk: Vec<u8> = (0..512u32).map(|i| (i * 7 + 3) as u8).collect();
        junk[148..156].copy_from_slice(b"\x1b[2J\x07zzz");
        let what = first_header_problem(&junk).unwrap();
        assert!(what.contains("no octal checksum") && what.chars().all(|c| !c.is_control()), "{what}");
        assert_eq!(first_header_problem(b"short").unwrap(), "it is 5 bytes long, shorter than one 512-byte tar header");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode(b"user.a%3Db"), b"user.a=b");
        assert_eq!(percent_decode(b"user.%"), b"user.%");
    }

    fn at() -> At<'static> {
        At { path: Path::new("hostile.tar"), index: 3, name: "x".into() }
    }

    /// A GNU header with every number set, as tar writes one.
    fn header() -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_mtime(1_700_000_000);
        h
    }

    #[test]
    fn header_numbers_too_large_for_the_tree_are_refused_not_truncated() {
        // GNU base-256 fields carry 64-bit numbers; a uid of 2^40 used to become 0.
        let mut h = header();
        h.set_uid(1 << 40);
        let err = header_meta(&h, &at()).unwrap_err().to_string();
        assert!(err.contains("uid 1099511627776 does not fit 32 bits"), "{err}");
        let mut h = header();
        h.set_gid(1 << 33);
        assert!(header_meta(&h, &at()).unwrap_err().to_string().contains("gid 8589934592"));
        let mut h = header();
        h.set_mtime(u64::MAX);
        assert!(header_meta(&h, &at()).unwrap_err().to_string().contains("mtime"));
        let m = header_meta(&header(), &at()).unwrap();
        assert_eq!((m.uid, m.gid, m.perm, m.mtime), (1000, 1000, 0o644, Timestamp::new(1_700_000_000, 0)));
    }

    #[test]
    fn a_sparse_map_whose_data_runs_past_2_pow_64_is_refused() {
        let map = [(0, 10), (10, u64::MAX - 20)];
        let err = sparse_content(&map, u64::MAX, SourceId(0), 512).unwrap_err();
        assert!(err.to_string().contains("2^64"), "{err}");
        let ok = sparse_content(&[(0, 10), (100, 5)], 105, SourceId(0), 512).unwrap();
        assert_eq!(ok.segments[1].data, Data::Source { source: SourceId(0), offset: 522 });
    }
}
