//! Writing a bundle in one streaming pass:
//!
//! ```text
//! reader (this thread): sparse map → tar bytes in 1 MiB chunks → SHA-1 + CRC-32 of the tar
//!   └─▶ N deflate workers (chunks in parallel)
//!         └─▶ writer thread (chunks in order): AES-CBC → 10 MiB parts with SHA-1 each
//! ```
//! Memory is bounded by the number of chunks in flight (`2 × workers + 2`, 1 MiB each).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use rand::CryptoRng;
use rsa::pkcs1v15::SigningKey;
use rsa::signature::{SignatureEncoding, Signer};
use rsa::Pkcs1v15Encrypt;
use sha1::{Digest, Sha1};

use super::aes_cbc::Encryptor;
use super::keys::Credentials;
use super::manifest::{BundleManifest, PartEntry};
use super::{gzip, io_err, tar, BundleError, Result, PART_SIZE};
use crate::progress::{Progress, Unit};

/// Tar stream chunk handed to one deflate job: large enough that the per-chunk sync flush and
/// the lost cross-chunk dictionary cost well under 1 % of the output.
const CHUNK: usize = 1 << 20;

/// What to bundle and how to describe it.
#[derive(Debug, Clone)]
pub struct BundleSpec {
    /// Bundle name: files are `NAME.part.N` and `NAME.manifest.xml`.
    pub name: String,
    /// The tar member's name (the image's file name, as ec2-bundle-image stores it).
    pub member_name: String,
    /// EC2 architecture name (`x86_64`).
    pub arch: String,
    /// 12-digit AWS account id.
    pub account: String,
    /// The tar member's mtime (seconds since the epoch).
    pub mtime: u64,
    /// Block device mapping: (virtual, device) pairs.
    pub mappings: Vec<(String, String)>,
    /// gzip level 1–9.
    pub level: u32,
    /// Deflate threads; 0 means one per core.
    pub threads: usize,
}

impl BundleSpec {
    /// ec2-bundle-image's default mapping for a root on the first instance-store disk.
    pub fn default_mappings() -> Vec<(String, String)> {
        vec![("ami".into(), "sda1".into()), ("root".into(), "/dev/sda1".into())]
    }
}

/// The AES key and IV of one bundle.
#[derive(Clone, Copy)]
pub struct Secrets {
    pub key: [u8; 16],
    pub iv: [u8; 16],
}

impl Secrets {
    pub fn random<R: CryptoRng + ?Sized>(rng: &mut R) -> Secrets {
        let mut s = Secrets { key: [0; 16], iv: [0; 16] };
        rng.fill_bytes(&mut s.key);
        rng.fill_bytes(&mut s.iv);
        s
    }
}

#[derive(Debug, Clone)]
pub struct BundleSummary {
    pub manifest_path: PathBuf,
    pub manifest: BundleManifest,
    pub part_paths: Vec<PathBuf>,
    /// Bytes of the tar stream (what was compressed).
    pub tar_bytes: u64,
}

fn check_spec(spec: &BundleSpec) -> Result<()> {
    if spec.account.len() != 12 || !spec.account.bytes().all(|b| b.is_ascii_digit()) {
        return Err(BundleError::Account(spec.account.clone()));
    }
    for n in [&spec.name, &spec.member_name] {
        if n.is_empty() || n.contains('/') || n.contains('\0') || n == "." || n == ".." {
            return Err(BundleError::Name(n.clone()));
        }
    }
    Ok(())
}

/// Bundles `image` into `out_dir`. Parts are written under temporary names and renamed, with
/// the manifest last, once everything is complete; an earlier bundle of the same name there is
/// replaced.
pub fn bundle<R: CryptoRng + ?Sized>(
    image: &Path,
    out_dir: &Path,
    spec: &BundleSpec,
    creds: &Credentials,
    secrets: Secrets,
    rng: &mut R,
    progress: &dyn Progress,
) -> Result<BundleSummary> {
    check_spec(spec)?;
    let file = File::open(image).map_err(io_err("opening", image))?;
    let size = file.metadata().map_err(io_err("reading", image))?.len();
    progress.begin("scanning for holes", None, Unit::Bytes);
    let regions = tar::scan_regions(&file, size).map_err(io_err("reading", image))?;
    let data_bytes: u64 = regions.iter().map(|r| r.len).sum();
    progress.end(&format!("{data_bytes} of {size} bytes hold data"));

    std::fs::create_dir_all(out_dir).map_err(io_err("creating", out_dir))?;
    let work = tempfile::Builder::new()
        .prefix(&format!(".{}.bundle-", spec.name))
        .tempdir_in(out_dir)
        .map_err(io_err("creating a work directory in", out_dir))?;

    let threads = if spec.threads == 0 {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    } else {
        spec.threads
    };
    let level = spec.level.clamp(1, 9);
    progress.begin("bundling", Some(data_bytes), Unit::Bytes);

    let (jobs_tx, jobs_rx) = sync_channel::<(Vec<u8>, SyncSender<std::io::Result<Vec<u8>>>)>(threads);
    let jobs_rx = Arc::new(Mutex::new(jobs_rx));
    let (order_tx, order_rx) = sync_channel::<Receiver<std::io::Result<Vec<u8>>>>(threads + 2);
    let work_path = work.path().to_path_buf();

    let (tar_sha1, tar_len, parts) = std::thread::scope(|s| -> Result<_> {
        for _ in 0..threads {
            let rx = Arc::clone(&jobs_rx);
            s.spawn(move || loop {
                let job = rx.lock().map(|r| r.recv());
                let Ok(Ok((chunk, reply))) = job else { return };
                let _ = reply.send(gzip::deflate_chunk(&chunk, level));
            });
        }
        let writer = s.spawn(move || write_parts(&work_path, secrets, order_rx));

        let produced = produce_tar(&file, image, spec, size, &regions, progress, |chunk| {
            let (tx, rx) = sync_channel(1);
            // A closed channel means the writer stopped; its error is reported below.
            order_tx.send(rx).map_err(|_| BundleError::Worker)?;
            jobs_tx.send((chunk, tx)).map_err(|_| BundleError::Worker)?;
            Ok(())
        });
        drop(order_tx);
        drop(jobs_tx);
        let written = writer.join().map_err(|_| BundleError::Worker)?;
        let (sha1, crc, len) = produced?;
        let mut pw = written?;
        pw.finish(crc, len)?;
        Ok((sha1, len, pw.parts))
    })?;
    progress.end("compressed and encrypted");

    // Name the parts now that their count is known.
    let digits = parts.len().to_string().len();
    let mut entries = Vec::new();
    let mut final_parts = Vec::new();
    for (i, (_, _, sha)) in parts.iter().enumerate() {
        let filename = format!("{}.part.{:0digits$}", spec.name, i);
        final_parts.push(out_dir.join(&filename));
        entries.push(PartEntry { filename, sha1: sha.clone() });
    }
    let bundled_size: u64 = parts.iter().map(|p| p.1).sum();

    let wrap = |key: &rsa::PublicKey, secret: &[u8; 16], rng: &mut R| -> Result<String> {
        // The AMI tools wrap the hex text of the secret, not its raw bytes.
        let text = hex::encode(secret);
        key.encrypt(rng, Pkcs1v15Encrypt, text.as_bytes()).map(hex::encode).map_err(|e| BundleError::Rsa(e.to_string()))
    };
    let manifest = BundleManifest {
        bundler_name: "kiln".into(),
        bundler_version: env!("CARGO_PKG_VERSION").into(),
        bundler_release: "0".into(),
        arch: spec.arch.clone(),
        mappings: spec.mappings.clone(),
        name: spec.name.clone(),
        user: spec.account.clone(),
        tar_sha1,
        size,
        bundled_size,
        ec2_encrypted_key: wrap(&creds.ec2_public, &secrets.key, rng)?,
        user_encrypted_key: wrap(&creds.user_public, &secrets.key, rng)?,
        ec2_encrypted_iv: wrap(&creds.ec2_public, &secrets.iv, rng)?,
        user_encrypted_iv: wrap(&creds.user_public, &secrets.iv, rng)?,
        parts: entries,
    };
    let signer = SigningKey::<Sha1>::new(creds.user_key.clone());
    let signature = signer.try_sign(manifest.signed_text().as_bytes()).map_err(|e| BundleError::Rsa(e.to_string()))?;
    let xml = manifest.to_xml(&hex::encode(signature.to_bytes()));
    let tmp_manifest = work.path().join("manifest.xml");
    std::fs::write(&tmp_manifest, xml.as_bytes()).map_err(io_err("writing", &tmp_manifest))?;

    // Publish: first retire an earlier manifest of this name (so none points at mixed parts),
    // then earlier parts, then move the new parts and finally the new manifest into place.
    let manifest_path = out_dir.join(format!("{}.manifest.xml", spec.name));
    remove_if_exists(&manifest_path)?;
    remove_old_parts(out_dir, &spec.name)?;
    for ((tmp, _, _), dst) in parts.iter().zip(&final_parts) {
        std::fs::rename(tmp, dst).map_err(io_err("renaming into", dst))?;
    }
    std::fs::rename(&tmp_manifest, &manifest_path).map_err(io_err("renaming into", &manifest_path))?;
    Ok(BundleSummary { manifest_path, manifest, part_paths: final_parts, tar_bytes: tar_len })
}

fn remove_if_exists(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("removing", p)(e)),
        _ => Ok(()),
    }
}

fn remove_old_parts(dir: &Path, name: &str) -> Result<()> {
    let prefix = format!("{name}.part.");
    let rd = std::fs::read_dir(dir).map_err(io_err("listing", dir))?;
    for e in rd.flatten() {
        let f = e.file_name();
        let f = f.to_string_lossy();
        if let Some(n) = f.strip_prefix(&prefix) {
            if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) {
                remove_if_exists(&e.path())?;
            }
        }
    }
    Ok(())
}

/// Emits the tar stream in CHUNK-sized pieces; returns its SHA-1 (hex), CRC-32 and length.
fn produce_tar(
    file: &File,
    image: &Path,
    spec: &BundleSpec,
    size: u64,
    regions: &[tar::Region],
    progress: &dyn Progress,
    mut emit: impl FnMut(Vec<u8>) -> Result<()>,
) -> Result<(String, u32, u64)> {
    let mut sha = Sha1::new();
    let mut crc = crc32fast::Hasher::new();
    let mut len: u64 = 0;
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK);
    let mut flush = |buf: &mut Vec<u8>, len: &mut u64| -> Result<()> {
        sha.update(&buf[..]);
        crc.update(&buf[..]);
        *len += buf.len() as u64;
        emit(std::mem::replace(buf, Vec::with_capacity(CHUNK)))
    };
    let (header, stored) = tar::member_header(&spec.member_name, size, spec.mtime, regions);
    buf.extend_from_slice(&header);
    let mut sent: u64 = 0;
    for r in regions {
        let mut pos = r.offset;
        let end = r.offset + r.len;
        while pos < end {
            if buf.len() == CHUNK {
                flush(&mut buf, &mut len)?;
            }
            let n = ((CHUNK - buf.len()) as u64).min(end - pos) as usize;
            let at = buf.len();
            buf.resize(at + n, 0);
            file.read_exact_at(&mut buf[at..], pos).map_err(io_err("reading", image))?;
            pos += n as u64;
            sent += n as u64;
            progress.advance(n as u64);
        }
    }
    debug_assert_eq!(sent, stored);
    let so_far = len + buf.len() as u64;
    let pad = tar::trailer_len(so_far) as usize;
    buf.resize(buf.len() + pad, 0);
    flush(&mut buf, &mut len)?;
    Ok((hex::encode(sha.finalize()), crc.finalize(), len))
}

/// The ordered end of the pipeline: gzip framing, encryption and part files.
struct PartWriter {
    dir: PathBuf,
    enc: Option<Encryptor>,
    cur: Option<(File, PathBuf, u64, Sha1)>,
    /// (temporary path, size, SHA-1 hex) of each finished part.
    parts: Vec<(PathBuf, u64, String)>,
    cipher_buf: Vec<u8>,
}

fn write_parts(
    dir: &Path,
    secrets: Secrets,
    order: Receiver<Receiver<std::io::Result<Vec<u8>>>>,
) -> Result<PartWriter> {
    let mut pw = PartWriter {
        dir: dir.to_path_buf(),
        enc: Some(Encryptor::new(&secrets.key, &secrets.iv)),
        cur: None,
        parts: Vec::new(),
        cipher_buf: Vec::with_capacity(CHUNK + 32),
    };
    pw.plain(&gzip::HEADER)?;
    for rx in order {
        let chunk = rx.recv().map_err(|_| BundleError::Worker)?.map_err(|e| BundleError::Corrupt(e.to_string()))?;
        pw.plain(&chunk)?;
    }
    Ok(pw)
}

impl PartWriter {
    fn plain(&mut self, data: &[u8]) -> Result<()> {
        let mut out = std::mem::take(&mut self.cipher_buf);
        out.clear();
        self.enc.as_mut().expect("encryptor lives until finish").update(data, &mut out);
        self.cipher(&out)?;
        self.cipher_buf = out;
        Ok(())
    }

    fn cipher(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            if self.cur.is_none() {
                let p = self.dir.join(format!("part.{}", self.parts.len()));
                let f = File::create(&p).map_err(io_err("creating", &p))?;
                self.cur = Some((f, p, 0, Sha1::new()));
            }
            let (f, p, n, sha) = self.cur.as_mut().expect("just set");
            let take = ((PART_SIZE - *n) as usize).min(data.len());
            f.write_all(&data[..take]).map_err(io_err("writing", p.clone()))?;
            sha.update(&data[..take]);
            *n += take as u64;
            data = &data[take..];
            if *n == PART_SIZE {
                self.close_part()?;
            }
        }
        Ok(())
    }

    fn close_part(&mut self) -> Result<()> {
        if let Some((f, p, n, sha)) = self.cur.take() {
            f.sync_all().map_err(io_err("writing", &p))?;
            self.parts.push((p, n, hex::encode(sha.finalize())));
        }
        Ok(())
    }

    fn finish(&mut self, crc: u32, len: u64) -> Result<()> {
        self.plain(&gzip::trailer(crc, len))?;
        let mut out = Vec::new();
        self.enc.take().expect("finish once").finish(&mut out);
        self.cipher(&out)?;
        self.close_part()
    }
}
