//! The Linux initramfs as the kernel reads it: `newc` cpio archives one after another, each
//! stored or compressed (gzip, zstd), padded with zeros between them. Read-only: kiln looks into
//! the initramfs a staging made, it never writes one (initramfs-tools does).

use std::io::Read;

#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("the initramfs is compressed with {0}, which kiln cannot read (gzip and zstd it can)")]
    Compression(&'static str),
    #[error("a {0} stream in the initramfs is damaged: {1}")]
    Decompress(&'static str, String),
    #[error("a cpio header at byte {0} of the initramfs is not `newc`")]
    Header(usize),
    #[error("the initramfs ends inside an archive, at byte {0}")]
    Truncated(usize),
}

/// One file of the initramfs, as its archive holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    /// The path in the archive, as stored (`usr/bin/kmod`, no leading slash).
    pub name: &'a str,
    pub mode: u32,
    pub data: &'a [u8],
}

const NEWC: &[u8; 6] = b"070701";
const HEADER: usize = 110;
const TRAILER: &str = "TRAILER!!!";

/// Calls `visit` with every entry of every archive in `image`, in order.
pub fn for_each_entry(image: &[u8], mut visit: impl FnMut(&Entry)) -> Result<(), InitramfsError> {
    let stored = read_archives(image, &mut visit)?;
    if stored < image.len() {
        // A compressed archive runs to the end: the kernel reads it as one stream too, and
        // what it holds is archives again, to its end.
        let inner = decompress(&image[stored..])?;
        let end = read_archives(&inner, &mut visit)?;
        if end < inner.len() {
            return Err(InitramfsError::Header(stored + end));
        }
    }
    Ok(())
}

/// Reads the stored archives at the start of `buf`, with the zero padding between them; returns
/// where something else (a compressed stream) starts, or `buf.len()`.
fn read_archives(buf: &[u8], visit: &mut impl FnMut(&Entry)) -> Result<usize, InitramfsError> {
    let mut pos = 0;
    while pos < buf.len() {
        if buf[pos] == 0 {
            pos += 1;
        } else if buf[pos..].starts_with(NEWC) {
            pos += read_archive(buf, pos, visit)?;
        } else {
            break;
        }
    }
    Ok(pos)
}

fn decompress(bytes: &[u8]) -> Result<Vec<u8>, InitramfsError> {
    let mut out = Vec::new();
    match bytes {
        [0x1f, 0x8b, ..] => flate2::read::MultiGzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map_err(|e| InitramfsError::Decompress("gzip", e.to_string()))?,
        [0x28, 0xb5, 0x2f, 0xfd, ..] => ruzstd::decoding::StreamingDecoder::new(bytes)
            .map_err(|e| InitramfsError::Decompress("zstd", e.to_string()))?
            .read_to_end(&mut out)
            .map_err(|e| InitramfsError::Decompress("zstd", e.to_string()))?,
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => return Err(InitramfsError::Compression("xz")),
        [0x02, 0x21, 0x4c, 0x18, ..] => return Err(InitramfsError::Compression("lz4")),
        [b'B', b'Z', b'h', ..] => return Err(InitramfsError::Compression("bzip2")),
        [0x5d, 0, 0, ..] => return Err(InitramfsError::Compression("lzma")),
        [0x89, b'L', b'Z', b'O', ..] => return Err(InitramfsError::Compression("lzo")),
        _ => return Err(InitramfsError::Compression("an unknown format")),
    };
    Ok(out)
}

/// Reads the archive starting at `start` through its trailer; returns its length.
fn read_archive(buf: &[u8], start: usize, visit: &mut impl FnMut(&Entry)) -> Result<usize, InitramfsError> {
    let mut pos = start;
    loop {
        let header = buf.get(pos..pos + HEADER).ok_or(InitramfsError::Truncated(pos))?;
        if !header.starts_with(NEWC) {
            return Err(InitramfsError::Header(pos));
        }
        // Eight hex digits a field after the magic: ino, mode, uid, gid, nlink, mtime,
        // filesize, devmajor, devminor, rdevmajor, rdevminor, namesize, check.
        let field = |i: usize| {
            std::str::from_utf8(&header[6 + 8 * i..14 + 8 * i])
                .ok()
                .and_then(|s| u32::from_str_radix(s, 16).ok())
                .ok_or(InitramfsError::Header(pos))
        };
        let (mode, size, namesize) = (field(1)?, field(6)? as usize, field(11)? as usize);
        let name_end = pos + HEADER + namesize;
        let name = buf.get(pos + HEADER..name_end).ok_or(InitramfsError::Truncated(pos))?;
        let name =
            std::str::from_utf8(name.strip_suffix(&[0]).unwrap_or(name)).map_err(|_| InitramfsError::Header(pos))?;
        let data_start = align4(name_end);
        let data = buf.get(data_start..data_start + size).ok_or(InitramfsError::Truncated(data_start))?;
        pos = align4(data_start + size);
        if name == TRAILER {
            return Ok(pos.min(buf.len()) - start);
        }
        visit(&Entry { name, mode, data });
    }
}

fn align4(n: usize) -> usize {
    n.div_ceil(4) * 4
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn newc(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut add = |name: &str, mode: u32, data: &[u8]| {
            let header = format!(
                "070701{:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
                1,
                0,
                0,
                1,
                0,
                data.len(),
                0,
                0,
                0,
                0,
                name.len() + 1,
                0
            );
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(name.as_bytes());
            out.push(0);
            out.resize(align4(out.len()), 0);
            out.extend_from_slice(data);
            out.resize(align4(out.len()), 0);
        };
        for (n, m, d) in files {
            add(n, *m, d);
        }
        add(TRAILER, 0, b"");
        out
    }

    fn entries(image: &[u8]) -> Result<Vec<(String, u32, Vec<u8>)>, InitramfsError> {
        let mut v = Vec::new();
        for_each_entry(image, |e| v.push((e.name.to_string(), e.mode, e.data.to_vec())))?;
        Ok(v)
    }

    #[test]
    fn reads_a_stored_archive_then_a_gzip_one_as_the_kernel_does() {
        let early = newc(&[("kernel/x86/microcode/GenuineIntel.bin", 0o100644, b"ucode")]);
        let main = newc(&[("usr", 0o40755, b""), ("usr/bin/kmod", 0o100755, b"\x7fELF-ish, odd length")]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&main).unwrap();
        let mut image = early.clone();
        image.extend_from_slice(&[0; 512]);
        image.extend_from_slice(&gz.finish().unwrap());
        let got = entries(&image).unwrap();
        let names: Vec<&str> = got.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["kernel/x86/microcode/GenuineIntel.bin", "usr", "usr/bin/kmod"]);
        assert_eq!(got[2].2, b"\x7fELF-ish, odd length");
        assert_eq!(got[2].1, 0o100755);
        // GNU cpio, the reference: it lists the same stored archive.
        if let Ok(mut child) = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        {
            child.stdin.take().unwrap().write_all(&main).unwrap();
            let out = child.wait_with_output().unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), "usr\nusr/bin/kmod\n");
        }
    }

    #[test]
    fn unknown_compression_and_damage_are_errors_not_an_empty_listing() {
        assert!(matches!(entries(b"\xfd7zXZ\0rest"), Err(InitramfsError::Compression("xz"))));
        assert!(matches!(entries(b"garbage"), Err(InitramfsError::Compression(_))));
        let whole = newc(&[("a", 0o100644, b"0123456789")]);
        assert!(matches!(entries(&whole[..whole.len() - 40]), Err(InitramfsError::Truncated(_))));
        let mut bad = whole.clone();
        bad[14] = b'z';
        assert!(matches!(entries(&bad), Err(InitramfsError::Header(0))));
    }
}
