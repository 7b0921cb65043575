//! Restoring the image of a bundle: signature, part digests, decryption, gunzip, tar digest,
//! sparse extraction to a temporary file renamed into place only when every check passed.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rsa::pkcs1v15::{Signature, VerifyingKey};
use rsa::signature::Verifier;
use rsa::{Pkcs1v15Encrypt, PrivateKey};
use sha1::{Digest, Sha1};

use super::aes_cbc::DecryptReader;
use super::manifest::BundleManifest;
use super::{io_err, tar, BundleError, Result};
use crate::progress::{Progress, Unit};

#[derive(Debug)]
pub struct UnbundleSummary {
    pub manifest: BundleManifest,
    pub output: PathBuf,
    /// The image's name inside the tar stream.
    pub member_name: String,
}

/// Reads the parts in order as one stream, hashing each to re-check it as it goes by.
struct PartsReader {
    paths: Vec<PathBuf>,
    next: usize,
    cur: Option<File>,
}

impl Read for PartsReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.cur.is_none() {
                let Some(p) = self.paths.get(self.next) else { return Ok(0) };
                self.cur = Some(File::open(p)?);
                self.next += 1;
            }
            let n = self.cur.as_mut().expect("open").read(buf)?;
            if n > 0 {
                return Ok(n);
            }
            self.cur = None;
        }
    }
}

/// SHA-1 of everything read through it.
struct HashReader<R> {
    inner: R,
    sha: Sha1,
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha.update(&buf[..n]);
        Ok(n)
    }
}

fn decrypt_hex(key: &PrivateKey, hex_text: &str, what: &str, path: &Path) -> Result<[u8; 16]> {
    let bad = |message: String| BundleError::Manifest { path: path.into(), message };
    let ct = hex::decode(hex_text).map_err(|_| bad(format!("{what} is not hex")))?;
    let pt = key
        .decrypt(Pkcs1v15Encrypt, &ct)
        .map_err(|_| bad(format!("{what} does not decrypt with the given user key (a bundle for another key?)")))?;
    let text = std::str::from_utf8(&pt).map_err(|_| bad(format!("{what} is not hex text once decrypted")))?;
    let raw = hex::decode(text.trim()).map_err(|_| bad(format!("{what} is not hex text once decrypted")))?;
    raw.try_into().map_err(|v: Vec<u8>| bad(format!("{what} has {} bytes, AES-128 needs 16", v.len())))
}

/// Checks and restores the bundle described by `manifest_path` (parts beside it) to `output`.
pub fn unbundle(
    manifest_path: &Path,
    user_key: &PrivateKey,
    output: &Path,
    progress: &dyn Progress,
) -> Result<UnbundleSummary> {
    let text = std::fs::read_to_string(manifest_path).map_err(io_err("reading", manifest_path))?;
    let (m, signed, sig_hex) = BundleManifest::parse(manifest_path, &text)?;

    let sig_bytes = hex::decode(sig_hex.trim()).map_err(|_| BundleError::Signature)?;
    let sig = Signature::try_from(&sig_bytes[..]).map_err(|_| BundleError::Signature)?;
    VerifyingKey::<Sha1>::new(user_key.to_public_key())
        .verify(signed.as_bytes(), &sig)
        .map_err(|_| BundleError::Signature)?;

    let dir = manifest_path.parent().unwrap_or(Path::new("."));
    let mut paths = Vec::new();
    let total: u64 = m.bundled_size;
    progress.begin("checking parts", Some(total), Unit::Bytes);
    for (index, p) in m.parts.iter().enumerate() {
        if p.filename.contains('/') {
            return Err(BundleError::Manifest {
                path: manifest_path.into(),
                message: format!("part file name {:?} has a '/'", p.filename),
            });
        }
        let path = dir.join(&p.filename);
        let mut f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BundleError::MissingPart { index, count: m.parts.len(), path })
            }
            Err(e) => return Err(io_err("opening", &path)(e)),
        };
        let mut sha = Sha1::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(io_err("reading", &path))?;
            if n == 0 {
                break;
            }
            sha.update(&buf[..n]);
            progress.advance(n as u64);
        }
        let actual = hex::encode(sha.finalize());
        if actual != p.sha1 {
            return Err(BundleError::PartDigest { index, path, expected: p.sha1.clone(), actual });
        }
        paths.push(path);
    }
    progress.end("parts intact");

    let key = decrypt_hex(user_key, &m.user_encrypted_key, "user_encrypted_key", manifest_path)?;
    let iv = decrypt_hex(user_key, &m.user_encrypted_iv, "user_encrypted_iv", manifest_path)?;
    let parts = PartsReader { paths, next: 0, cur: None };
    let gz = flate2::read::MultiGzDecoder::new(std::io::BufReader::with_capacity(
        1 << 20,
        DecryptReader::new(parts, &key, &iv),
    ));
    let mut tar_in = HashReader { inner: std::io::BufReader::with_capacity(1 << 20, gz), sha: Sha1::new() };
    let corrupt = |e: std::io::Error| BundleError::Corrupt(e.to_string());

    let member = tar::read_member(&mut tar_in).map_err(BundleError::Corrupt)?;
    let out_dir = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = crate::atomic::temp_beside(output).map_err(io_err("creating a temporary file in", out_dir))?;
    let out = tmp.as_file();
    progress.begin("restoring", Some(member.map.iter().map(|r| r.len).sum()), Unit::Bytes);
    let mut buf = vec![0u8; 1 << 20];
    for r in &member.map {
        let mut pos = r.offset;
        let end = r.offset + r.len;
        while pos < end {
            let n = ((end - pos) as usize).min(buf.len());
            tar_in.read_exact(&mut buf[..n]).map_err(corrupt)?;
            // Leave all-zero 4 KiB blocks as holes so the restored image stays sparse.
            for (i, g) in buf[..n].chunks(tar::GRANULE as usize).enumerate() {
                if g.iter().any(|&b| b != 0) {
                    out.write_all_at(g, pos + (i as u64) * tar::GRANULE).map_err(io_err("writing", output))?;
                }
            }
            pos += n as u64;
            progress.advance(n as u64);
        }
    }
    out.set_len(member.size).map_err(io_err("writing", output))?;
    // The rest of the stream (padding, end blocks) belongs to the digest too.
    std::io::copy(&mut tar_in, &mut std::io::sink()).map_err(corrupt)?;
    let actual = hex::encode(tar_in.sha.finalize());
    if actual != m.tar_sha1 {
        return Err(BundleError::TarDigest { expected: m.tar_sha1.clone(), actual });
    }
    if member.size != m.size {
        return Err(BundleError::Corrupt(format!(
            "the image in the tar stream has {} bytes, the manifest says {}",
            member.size, m.size
        )));
    }
    crate::atomic::persist(tmp, output).map_err(io_err("writing", output))?;
    progress.end("restored");
    Ok(UnbundleSummary { manifest: m, output: output.to_path_buf(), member_name: member.name })
}
