//! The one-member GNU tar stream of a bundle: the image as an old-GNU sparse member (typeflag
//! `S`, what `tar --format=gnu -S` writes and what GNU tar, and so `ec2-unbundle`, extracts),
//! or a plain member when the image has no holes.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

/// tar block size.
pub const BLOCK: u64 = 512;
/// GNU tar pads the archive to whole records of 20 blocks (its default blocking factor).
pub const RECORD: u64 = 20 * BLOCK;
/// Zero runs shorter than this stay data: a 4 KiB granule matches filesystem blocks, so holes
/// a filesystem reports and zero blocks found by scanning give the same map.
pub const GRANULE: u64 = 4096;

/// One stored data region of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub offset: u64,
    pub len: u64,
}

/// The data regions of `file` (size `size`): holes the filesystem reports are skipped without
/// reading, and all-zero 4 KiB granules inside data are treated as holes too, so the map (and
/// the tar digest) depends on the image's bytes, not on how the filesystem stored them.
pub fn scan_regions(file: &File, size: u64) -> std::io::Result<Vec<Region>> {
    let mut out: Vec<Region> = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    for (start, end) in fs_data_ranges(file, size)? {
        // Align scanning to granules so the result does not depend on where a range starts.
        let mut pos = start / GRANULE * GRANULE;
        let stop = end.next_multiple_of(GRANULE).min(size);
        while pos < stop {
            let n = (buf.len() as u64).min(stop - pos) as usize;
            file.read_exact_at(&mut buf[..n], pos)?;
            for (i, g) in buf[..n].chunks(GRANULE as usize).enumerate() {
                if g.iter().all(|&b| b == 0) {
                    continue;
                }
                let off = pos + i as u64 * GRANULE;
                let len = g.len() as u64;
                match out.last_mut() {
                    Some(r) if r.offset + r.len == off => r.len += len,
                    Some(r) if r.offset + r.len > off => {} // granule already covered
                    _ => out.push(Region { offset: off, len }),
                }
            }
            pos += n as u64;
        }
    }
    Ok(out)
}

/// Data ranges by SEEK_DATA/SEEK_HOLE; the whole file where the filesystem cannot tell.
fn fs_data_ranges(file: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut ranges = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        // SAFETY: lseek on a valid, open descriptor; errors are returned, not UB.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENXIO) => break, // no data after pos
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => return Ok(vec![(0, size)]),
                _ => return Err(e),
            }
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (d, h) = (data as u64, (hole as u64).min(size));
        if d >= size {
            break;
        }
        ranges.push((d, h));
        pos = h;
    }
    Ok(ranges)
}

/// Writes a tar numeric field: octal with a trailing NUL when it fits, else GNU base-256
/// (high bit of the first byte set, big-endian value), as GNU tar does for large sizes.
fn put_num(field: &mut [u8], v: u64) {
    let digits = field.len() - 1;
    if digits >= 22 || v < (1u64 << (3 * digits)) {
        let s = format!("{v:0digits$o}");
        field[..digits].copy_from_slice(s.as_bytes());
        field[digits] = 0;
    } else {
        field.fill(0);
        let bytes = v.to_be_bytes();
        let n = field.len();
        field[n - 8..].copy_from_slice(&bytes);
        field[0] = 0x80;
    }
}

fn put_str(field: &mut [u8], s: &[u8]) {
    let n = s.len().min(field.len());
    field[..n].copy_from_slice(&s[..n]);
}

fn checksum(h: &mut [u8; 512]) {
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    // GNU tar: six octal digits, NUL, space.
    let s = format!("{sum:06o}");
    h[148..154].copy_from_slice(s.as_bytes());
    h[154] = 0;
    h[155] = b' ';
}

fn base_header(name: &[u8], size: u64, mtime: u64, typeflag: u8, mode: u32) -> [u8; 512] {
    let mut h = [0u8; 512];
    put_str(&mut h[0..100], name);
    put_num(&mut h[100..108], u64::from(mode));
    put_num(&mut h[108..116], 0);
    put_num(&mut h[116..124], 0);
    put_num(&mut h[124..136], size);
    put_num(&mut h[136..148], mtime);
    h[156] = typeflag;
    // Old GNU magic: "ustar " then version " \0".
    h[257..265].copy_from_slice(b"ustar  \0");
    put_str(&mut h[265..297], b"root");
    put_str(&mut h[297..329], b"root");
    h
}

/// The header blocks of the member (long-name block, header, sparse extension blocks) and the
/// number of data bytes that follow them (the sum of the region lengths).
pub fn member_header(name: &str, size: u64, mtime: u64, regions: &[Region]) -> (Vec<u8>, u64) {
    let mut out = Vec::new();
    let name = name.as_bytes();
    if name.len() >= 100 {
        // GNU long name: a pseudo-member "././@LongLink" of type L whose data is the name.
        let mut long = name.to_vec();
        long.push(0);
        let mut h = base_header(b"././@LongLink", long.len() as u64, 0, b'L', 0o644);
        checksum(&mut h);
        out.extend_from_slice(&h);
        out.extend_from_slice(&long);
        out.resize(out.len().next_multiple_of(BLOCK as usize), 0);
    }
    let sparse = !(regions.len() == 1 && regions[0] == Region { offset: 0, len: size }) && size > 0;
    if !sparse {
        let mut h = base_header(name, size, mtime, b'0', 0o644);
        checksum(&mut h);
        out.extend_from_slice(&h);
        return (out, size);
    }
    // A map ending in a hole closes with a zero-length entry at the end of the file, so the
    // extractor truncates to the right size (GNU tar does the same).
    let mut map: Vec<Region> = regions.to_vec();
    if map.last().is_none_or(|r| r.offset + r.len < size) {
        map.push(Region { offset: size, len: 0 });
    }
    let stored: u64 = regions.iter().map(|r| r.len).sum();
    let mut h = base_header(name, stored, mtime, b'S', 0o644);
    // Four map entries fit the header (offset 386, 24 bytes each); the rest go to extension
    // blocks of 21 entries, each flagged by the "isextended" byte before it.
    for (i, r) in map.iter().take(4).enumerate() {
        let at = 386 + i * 24;
        put_num(&mut h[at..at + 12], r.offset);
        put_num(&mut h[at + 12..at + 24], r.len);
    }
    h[482] = u8::from(map.len() > 4);
    put_num(&mut h[483..495], size);
    checksum(&mut h);
    out.extend_from_slice(&h);
    let rest = &map[map.len().min(4)..];
    let nchunks = rest.chunks(21).count();
    for (ci, chunk) in rest.chunks(21).enumerate() {
        let mut e = [0u8; 512];
        for (i, r) in chunk.iter().enumerate() {
            let at = i * 24;
            put_num(&mut e[at..at + 12], r.offset);
            put_num(&mut e[at + 12..at + 24], r.len);
        }
        e[504] = u8::from(ci + 1 < nchunks);
        out.extend_from_slice(&e);
    }
    (out, stored)
}

/// Bytes after the member data: padding to a block, two zero blocks, padding to a record.
pub fn trailer_len(stream_len_so_far: u64) -> u64 {
    let padded = stream_len_so_far.next_multiple_of(BLOCK) + 2 * BLOCK;
    padded.next_multiple_of(RECORD) - stream_len_so_far
}

/// What the reader found in a member header.
pub struct Member {
    pub name: String,
    pub size: u64,
    /// Regions in stream order; a plain member is one region covering the file.
    pub map: Vec<Region>,
}

fn get_num(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|&b| b & 0x80 != 0) {
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let s: String = field.iter().take_while(|&&b| b != 0).map(|&b| b as char).collect();
    let s = s.trim();
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

fn verify_checksum(h: &[u8; 512]) -> bool {
    let want = get_num(&h[148..156]);
    let mut c = *h;
    c[148..156].fill(b' ');
    let sum: u64 = c.iter().map(|&b| u64::from(b)).sum();
    want == Some(sum)
}

/// Reads the header(s) of the first member from `r`.
pub fn read_member<R: std::io::Read>(r: &mut R) -> Result<Member, String> {
    let mut long_name: Option<String> = None;
    loop {
        let mut h = [0u8; 512];
        r.read_exact(&mut h).map_err(|e| format!("tar header: {e}"))?;
        if h.iter().all(|&b| b == 0) {
            return Err("the tar stream holds no file".into());
        }
        if !verify_checksum(&h) {
            return Err("tar header checksum mismatch".into());
        }
        let size = get_num(&h[124..136]).ok_or("bad size field in tar header")?;
        let name =
            long_name.take().unwrap_or_else(|| String::from_utf8_lossy(&h[..100]).trim_end_matches('\0').to_string());
        match h[156] {
            b'L' => {
                let mut buf =
                    vec![0u8; usize::try_from(size.next_multiple_of(BLOCK)).map_err(|_| "long name too long")?];
                r.read_exact(&mut buf).map_err(|e| format!("tar long name: {e}"))?;
                buf.truncate(size as usize);
                long_name = Some(String::from_utf8_lossy(&buf).trim_end_matches('\0').to_string());
            }
            b'0' | 0 => return Ok(Member { name, size, map: vec![Region { offset: 0, len: size }] }),
            b'S' => {
                let real = get_num(&h[483..495]).ok_or("bad realsize in sparse header")?;
                let mut map = Vec::new();
                let mut push = |f: &[u8]| -> Result<(), String> {
                    let off = get_num(&f[..12]).ok_or("bad sparse offset")?;
                    let len = get_num(&f[12..24]).ok_or("bad sparse length")?;
                    if f[..12].iter().all(|&b| b == 0) && f[12..24].iter().all(|&b| b == 0) {
                        return Ok(());
                    }
                    map.push(Region { offset: off, len });
                    Ok(())
                };
                for i in 0..4 {
                    push(&h[386 + i * 24..386 + (i + 1) * 24])?;
                }
                let mut ext = h[482] != 0;
                while ext {
                    let mut e = [0u8; 512];
                    r.read_exact(&mut e).map_err(|e| format!("tar sparse extension: {e}"))?;
                    for i in 0..21 {
                        push(&e[i * 24..(i + 1) * 24])?;
                    }
                    ext = e[504] != 0;
                }
                let stored: u64 = map.iter().map(|m| m.len).sum();
                if stored != size {
                    return Err(format!("sparse map covers {stored} bytes, the header says {size}"));
                }
                if map.iter().any(|m| m.offset.checked_add(m.len).is_none_or(|e| e > real)) {
                    return Err(format!("sparse map reaches beyond the file size {real}"));
                }
                return Ok(Member { name, size: real, map });
            }
            t => return Err(format!("tar member type {:?} is not a regular file", t as char)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_switch_to_base256_past_octal_range() {
        let mut f = [0u8; 12];
        put_num(&mut f, 0o77_777_777_777);
        assert_eq!(&f[..11], b"77777777777");
        put_num(&mut f, 1 << 33);
        assert_eq!(f[0], 0x80);
        assert_eq!(get_num(&f), Some(1 << 33));
    }

    #[test]
    fn trailer_pads_to_a_record() {
        assert_eq!(trailer_len(512) + 512, RECORD);
        assert_eq!((1000 + trailer_len(1000)) % RECORD, 0);
    }
}
