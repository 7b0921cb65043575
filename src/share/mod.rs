//! What a fleet of CI runners shares through S3: staged bases ([`bases`]) and the publish
//! history with its lease ([`state`]). The CI system is the distributed engine, S3 the shared
//! memory: no scheduler, no server of kiln's own. The local cache and state directories stay in
//! front as a read-through cache.
//!
//! Objects under `s3://BUCKET/PREFIX/`:
//! - `bases/STEM.json`, the record of a staged base (its SHA-256, size and object), written
//!   after the object and only if absent (`If-None-Match: *`): first runner wins, and a record
//!   never names an object that is not whole;
//! - `bases/objects/SHA256.tar`, the base, content-addressed and uploaded in parts (a multipart
//!   upload is invisible until it completes, so a runner killed mid-upload leaves nothing under
//!   the key);
//! - `published/ENDPOINT/REGION/NAME.json`, what the last publish of an image name left (the
//!   same file as in the local state directory), replaced only as the version read
//!   (`If-Match: ETAG`), and `NAME.lease` beside it while a publish runs.
//!
//! Any S3-compatible endpoint works through the SDK's usual `AWS_ENDPOINT_URL` (or
//! `AWS_ENDPOINT_URL_S3`); the bucket's region comes from the usual chain (`AWS_REGION`).

pub mod bases;
pub mod state;

use std::io::Write;
use std::path::{Path, PathBuf};

use aws_sdk_s3::primitives::ByteStream;
use base64::Engine;
use md5::Md5;
use sha2::{Digest, Sha256};

use crate::aws::{with_retry, AwsError, RetryPolicy};
use crate::progress::{Progress, Unit};

/// `s3://BUCKET/PREFIX`, checked: a bucket name S3 accepts and a prefix with no empty,
/// `.` or `..` segment. The prefix has no leading or trailing `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareUrl {
    bucket: String,
    prefix: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{url:?} is not a shared location: {reason}; write s3://BUCKET/PREFIX (for example s3://ci-kiln/fleet)")]
pub struct BadShareUrl {
    pub url: String,
    pub reason: &'static str,
}

impl std::str::FromStr for ShareUrl {
    type Err = BadShareUrl;
    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let bad = |reason| BadShareUrl { url: url.to_string(), reason };
        let rest = url.strip_prefix("s3://").ok_or_else(|| bad("it does not start with s3://"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && bucket.as_bytes()[0].is_ascii_alphanumeric()
            && bucket.as_bytes()[bucket.len() - 1].is_ascii_alphanumeric();
        if !bucket_ok {
            return Err(bad("the bucket name is not one S3 accepts (3 to 63 lower-case letters, digits, '-' and '.')"));
        }
        let prefix = prefix.trim_end_matches('/');
        if !prefix.is_empty() && prefix.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
            return Err(bad("the prefix has an empty, '.' or '..' segment"));
        }
        Ok(ShareUrl { bucket: bucket.to_string(), prefix: prefix.to_string() })
    }
}

impl std::fmt::Display for ShareUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

impl ShareUrl {
    pub fn bucket(&self) -> &str {
        &self.bucket
    }
    /// The object key of `name` (a relative path such as `bases/x.json`) under the prefix.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.prefix)
        }
    }
    /// `s3://BUCKET/KEY` of `name`, for messages.
    pub fn show(&self, name: &str) -> String {
        format!("s3://{}/{}", self.bucket, self.key(name))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("{0}")]
    Aws(#[from] AwsError),
    #[error("{what} {path}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("reading s3://{bucket}/{key}: {detail}")]
    Body { bucket: String, key: String, detail: String },
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// What a conditional write requires of the object as it is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// It does not exist (`If-None-Match: *`).
    Absent,
    /// It is the version with this ETag (`If-Match`).
    Matches(String),
    /// Nothing: the write replaces whatever is there.
    Any,
}

/// An object's bytes and the ETag of that version.
#[derive(Debug, Clone)]
pub struct Versioned {
    pub bytes: Vec<u8>,
    pub etag: String,
}

/// A whole file as uploaded or downloaded: its SHA-256 (hex) and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDigest {
    pub sha256: String,
    pub size: u64,
}

/// Part size of a base's multipart upload: 16 MiB parts address 160 GB (S3 allows 10,000
/// parts), each fits the 60 s a request may take down to ~2.5 Mbit/s per part in flight, and
/// four in flight hold 64 MiB of memory at most.
const PART_SIZE: usize = 16 << 20;
const PARTS_IN_FLIGHT: usize = 4;

/// The shared location and an S3 client for it.
#[derive(Clone)]
pub struct Store {
    s3: aws_sdk_s3::Client,
    url: ShareUrl,
    policy: RetryPolicy,
}

impl Store {
    /// A client with the SDK's usual chain for credentials, region and endpoint. With an
    /// endpoint set (an S3-compatible store, a stand-in) buckets are addressed by path, which
    /// every such store accepts.
    pub async fn connect(url: ShareUrl) -> Store {
        let conf = aws_config::defaults(aws_config::BehaviorVersion::latest()).load().await;
        let path_style = ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"].iter().any(|v| std::env::var_os(v).is_some());
        let mut b = aws_sdk_s3::config::Builder::from(&conf)
            .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
            .force_path_style(path_style)
            // kiln checks what it reads against its own SHA-256 and sends Content-MD5 with
            // each part; the SDK's extra trailing checksums are not needed.
            .request_checksum_calculation(aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired);
        if conf.region().is_none() {
            b = b.region(aws_config::Region::new(crate::launch::request::DEFAULT_REGION));
        }
        Store { s3: aws_sdk_s3::Client::from_conf(b.build()), url, policy: RetryPolicy::default() }
    }

    /// A store with a client made elsewhere (a test's, pointed at a stand-in).
    pub fn with_client(s3: aws_sdk_s3::Client, url: ShareUrl) -> Store {
        Store { s3, url, policy: RetryPolicy::default() }
    }

    pub fn url(&self) -> &ShareUrl {
        &self.url
    }

    /// The object `name` with its ETag; None when there is none.
    pub async fn get(&self, name: &str) -> Result<Option<Versioned>, ShareError> {
        let key = self.url.key(name);
        let Some(resp) = self.open(name).await? else { return Ok(None) };
        let etag = resp.e_tag().unwrap_or_default().to_string();
        let bytes = resp.body.collect().await.map_err(|e| self.body_error(&key, e))?.into_bytes().to_vec();
        Ok(Some(Versioned { bytes, etag }))
    }

    /// GetObject of `name`, its body unread; None when there is no such object.
    async fn open(&self, name: &str) -> Result<Option<aws_sdk_s3::operation::get_object::GetObjectOutput>, ShareError> {
        let key = self.url.key(name);
        let got = with_retry(&self.policy, &format!("GetObject {}", self.url.show(name)), || {
            self.s3.get_object().bucket(&self.url.bucket).key(&key).send()
        })
        .await;
        match got {
            Err(e) if e.code() == Some("NoSuchKey") || e.last.status == Some(404) => Ok(None),
            r => Ok(Some(r?)),
        }
    }

    /// The size of the object `name`; None when there is none.
    pub async fn size_of(&self, name: &str) -> Result<Option<u64>, ShareError> {
        let key = self.url.key(name);
        let head = with_retry(&self.policy, &format!("HeadObject {}", self.url.show(name)), || {
            self.s3.head_object().bucket(&self.url.bucket).key(&key).send()
        })
        .await;
        match head {
            Err(e) if e.code() == Some("NotFound") || e.last.status == Some(404) => Ok(None),
            r => Ok(Some(r?.content_length().and_then(|n| u64::try_from(n).ok()).unwrap_or(0))),
        }
    }

    /// Writes `name` if `cond` holds; the new ETag, or None when the condition failed (HTTP
    /// 412: another runner wrote first).
    pub async fn put(&self, name: &str, body: Vec<u8>, cond: Condition) -> Result<Option<String>, ShareError> {
        let key = self.url.key(name);
        let md5 = base64::engine::general_purpose::STANDARD.encode(Md5::digest(&body));
        let body = bytes::Bytes::from(body);
        let put = with_retry(&self.policy, &format!("PutObject {}", self.url.show(name)), || {
            let mut req = self
                .s3
                .put_object()
                .bucket(&self.url.bucket)
                .key(&key)
                .content_md5(&md5)
                .body(ByteStream::from(body.clone()));
            req = match &cond {
                Condition::Absent => req.if_none_match("*"),
                Condition::Matches(etag) => req.if_match(etag),
                Condition::Any => req,
            };
            req.send()
        })
        .await;
        match put {
            // A retried write whose first attempt landed (its answer lost) fails its own
            // condition: the object holding exactly these bytes is this write's.
            Err(e) if is_precondition_failed(&e) => match self.get(name).await? {
                Some(now) if now.bytes == body.as_ref() => Ok(Some(now.etag)),
                _ => Ok(None),
            },
            r => Ok(Some(r?.e_tag().unwrap_or_default().to_string())),
        }
    }

    /// The same store, its requests tried by `policy` (a lease's renewals must give up well
    /// within the lease's lifetime).
    pub fn with_policy(&self, policy: RetryPolicy) -> Store {
        Store { policy, ..self.clone() }
    }

    /// Deletes `name`, only as the version `etag` when given; true when it was deleted (or
    /// already gone), false when another version is there now.
    pub async fn delete(&self, name: &str, etag: Option<&str>) -> Result<bool, ShareError> {
        let key = self.url.key(name);
        let del = with_retry(&self.policy, &format!("DeleteObject {}", self.url.show(name)), || {
            self.s3.delete_object().bucket(&self.url.bucket).key(&key).set_if_match(etag.map(str::to_string)).send()
        })
        .await;
        match del {
            Err(e) if is_precondition_failed(&e) => Ok(false),
            Err(e) if e.code() == Some("NoSuchKey") => Ok(true),
            r => r.map(|_| true).map_err(Into::into),
        }
    }

    /// Downloads `name` to `dest` (created or truncated) and returns its digest; None when
    /// there is no such object. A connection cut mid-body starts the download over.
    pub async fn download(
        &self,
        name: &str,
        dest: &Path,
        progress: &dyn Progress,
    ) -> Result<Option<FileDigest>, ShareError> {
        let key = self.url.key(name);
        let mut tries = 0;
        loop {
            tries += 1;
            let Some(resp) = self.open(name).await? else { return Ok(None) };
            let total = resp.content_length().and_then(|n| u64::try_from(n).ok());
            progress.begin(&format!("downloading {}", self.url.show(name)), total, Unit::Bytes);
            match self.stream_to(resp.body, &key, dest, progress).await {
                Ok(d) => return Ok(Some(d)),
                Err(ShareError::Body { detail, .. }) if tries < 3 => {
                    progress.note(&format!("download of {} was cut ({detail}); starting over", self.url.show(name)));
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn stream_to(
        &self,
        mut body: ByteStream,
        key: &str,
        dest: &Path,
        progress: &dyn Progress,
    ) -> Result<FileDigest, ShareError> {
        let io = |what| move |source| ShareError::Io { what, path: dest.to_path_buf(), source };
        let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(dest).map_err(io("creating"))?);
        let (mut h, mut size) = (Sha256::new(), 0u64);
        while let Some(chunk) = body.try_next().await.map_err(|e| self.body_error(key, e))? {
            crate::interrupt::check().map_err(|e| io("downloading to")(std::io::Error::other(e)))?;
            h.update(&chunk);
            f.write_all(&chunk).map_err(io("writing"))?;
            size += chunk.len() as u64;
            progress.advance(chunk.len() as u64);
        }
        f.into_inner().map_err(|e| io("writing")(e.into_error()))?.sync_all().map_err(io("writing"))?;
        progress.end(&crate::build::human_bytes(size));
        Ok(FileDigest { sha256: hex::encode(h.finalize()), size })
    }

    /// Uploads the file at `src` to `name` in parts, each with its Content-MD5 (S3 checks it);
    /// the object appears whole when the upload completes, or not at all. Returns the file's
    /// digest, taken from the bytes as they were sent.
    /// With `expected`, the upload is abandoned (never completed, so never visible) when the
    /// bytes sent have another SHA-256: the file changed after it was hashed.
    pub async fn upload(
        &self,
        name: &str,
        src: &Path,
        expected: Option<&str>,
        progress: &dyn Progress,
    ) -> Result<FileDigest, ShareError> {
        let key = self.url.key(name);
        let what = self.url.show(name);
        let created = with_retry(&self.policy, &format!("CreateMultipartUpload {what}"), || {
            self.s3.create_multipart_upload().bucket(&self.url.bucket).key(&key).send()
        })
        .await?;
        let upload_id = created.upload_id().unwrap_or_default().to_string();
        let sent = self.send_parts(&key, &upload_id, src, progress).await;
        let sent = match sent {
            Ok((_, digest)) if expected.is_some_and(|e| e != digest.sha256) => Err(ShareError::Io {
                what: "uploading (it changed while it was read)",
                path: src.to_path_buf(),
                source: std::io::Error::other(format!(
                    "SHA-256 {} instead of {}",
                    digest.sha256,
                    expected.unwrap_or("")
                )),
            }),
            other => other,
        };
        let completed = match sent {
            Ok((parts, digest)) => {
                let done = aws_sdk_s3::types::CompletedMultipartUpload::builder().set_parts(Some(parts)).build();
                with_retry(&self.policy, &format!("CompleteMultipartUpload {what}"), || {
                    self.s3
                        .complete_multipart_upload()
                        .bucket(&self.url.bucket)
                        .key(&key)
                        .upload_id(&upload_id)
                        .multipart_upload(done.clone())
                        .send()
                })
                .await
                .map(|_| digest)
                .map_err(ShareError::from)
            }
            Err(e) => Err(e),
        };
        if completed.is_err() {
            // Best effort: a bucket lifecycle rule (AbortIncompleteMultipartUpload) removes
            // what a killed runner leaves; the parts were never visible either way.
            let _ =
                self.s3.abort_multipart_upload().bucket(&self.url.bucket).key(&key).upload_id(&upload_id).send().await;
        }
        completed
    }

    async fn send_parts(
        &self,
        key: &str,
        upload_id: &str,
        src: &Path,
        progress: &dyn Progress,
    ) -> Result<(Vec<aws_sdk_s3::types::CompletedPart>, FileDigest), ShareError> {
        use std::io::Read;
        let io = |what| move |source| ShareError::Io { what, path: src.to_path_buf(), source };
        let mut f = std::fs::File::open(src).map_err(io("opening"))?;
        let total = f.metadata().map_err(io("reading"))?.len();
        progress.begin(
            &format!("uploading to {}", self.url.show(key.rsplit('/').next().unwrap_or(key))),
            Some(total),
            Unit::Bytes,
        );
        let (mut h, mut size) = (Sha256::new(), 0u64);
        let mut in_flight = tokio::task::JoinSet::new();
        let mut parts = Vec::new();
        let mut number = 0i32;
        loop {
            number += 1;
            crate::interrupt::check().map_err(|e| io("uploading")(std::io::Error::other(e)))?;
            let mut buf = Vec::with_capacity(PART_SIZE);
            (&mut f).take(PART_SIZE as u64).read_to_end(&mut buf).map_err(io("reading"))?;
            // S3 takes one empty part for an empty object, and no empty part after others.
            if buf.is_empty() && number > 1 {
                break;
            }
            let last = buf.len() < PART_SIZE;
            h.update(&buf);
            size += buf.len() as u64;
            while in_flight.len() >= PARTS_IN_FLIGHT {
                parts.push(joined(in_flight.join_next().await, progress)?);
            }
            let (s3, bucket, key, id, policy) =
                (self.s3.clone(), self.url.bucket.clone(), key.to_string(), upload_id.to_string(), self.policy);
            in_flight.spawn(async move {
                let len = buf.len() as u64;
                let md5 = base64::engine::general_purpose::STANDARD.encode(Md5::digest(&buf));
                let body = bytes::Bytes::from(buf);
                let part = with_retry(&policy, &format!("UploadPart {number} s3://{bucket}/{key}"), || {
                    s3.upload_part()
                        .bucket(&bucket)
                        .key(&key)
                        .upload_id(&id)
                        .part_number(number)
                        .content_md5(&md5)
                        .body(ByteStream::from(body.clone()))
                        .send()
                })
                .await?;
                let done = aws_sdk_s3::types::CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(part.e_tag().map(str::to_string))
                    .build();
                Ok::<_, AwsError>((done, len))
            });
            if last {
                break;
            }
        }
        while let Some(r) = in_flight.join_next().await {
            parts.push(joined(Some(r), progress)?);
        }
        parts.sort_by_key(|p| p.part_number());
        progress.end(&crate::build::human_bytes(size));
        Ok((parts, FileDigest { sha256: hex::encode(h.finalize()), size }))
    }

    fn body_error(&self, key: &str, e: impl std::fmt::Display) -> ShareError {
        ShareError::Body { bucket: self.url.bucket.clone(), key: key.to_string(), detail: e.to_string() }
    }
}

/// A part's upload as its task ends: the part and its length, or why it failed.
type PartTask = Result<Result<(aws_sdk_s3::types::CompletedPart, u64), AwsError>, tokio::task::JoinError>;

fn joined(r: Option<PartTask>, progress: &dyn Progress) -> Result<aws_sdk_s3::types::CompletedPart, ShareError> {
    match r {
        Some(Ok(Ok((part, len)))) => {
            progress.advance(len);
            Ok(part)
        }
        Some(Ok(Err(e))) => Err(e.into()),
        Some(Err(e)) => Err(ShareError::Runtime(std::io::Error::other(e))),
        None => Err(ShareError::Runtime(std::io::Error::other("no part in flight"))),
    }
}

/// Hex SHA-256 of a file.
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let (mut h, mut f, mut buf) = (Sha256::new(), std::fs::File::open(path)?, vec![0u8; 1 << 20]);
    loop {
        match f.read(&mut buf)? {
            0 => return Ok(hex::encode(h.finalize())),
            n => h.update(&buf[..n]),
        }
    }
}

fn is_precondition_failed(e: &AwsError) -> bool {
    e.code() == Some("PreconditionFailed") || e.last.status == Some(412)
}

/// A [`Store`] for synchronous callers (staging), with its own runtime.
pub struct BlockingStore {
    rt: tokio::runtime::Runtime,
    store: Store,
}

impl BlockingStore {
    pub fn connect(url: ShareUrl) -> Result<BlockingStore, ShareError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(ShareError::Runtime)?;
        let store = rt.block_on(Store::connect(url));
        Ok(BlockingStore { rt, store })
    }
    pub fn store(&self) -> &Store {
        &self.store
    }
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_urls_are_checked() {
        let u: ShareUrl = "s3://ci-kiln/fleet/nightly/".parse().unwrap();
        assert_eq!((u.bucket(), u.key("bases/a.json")), ("ci-kiln", "fleet/nightly/bases/a.json".to_string()));
        assert_eq!(u.to_string(), "s3://ci-kiln/fleet/nightly");
        let bare: ShareUrl = "s3://ci-kiln".parse().unwrap();
        assert_eq!(bare.key("bases/a.json"), "bases/a.json");
        for bad in [
            "ci-kiln/fleet",
            "https://ci-kiln/x",
            "s3://Ci_Kiln/x",
            "s3://ab/x",
            "s3://ci-kiln/a//b",
            "s3://ci-kiln/../x",
            "s3://-ci/x",
        ] {
            let e = bad.parse::<ShareUrl>().unwrap_err();
            assert!(e.to_string().contains("s3://BUCKET/PREFIX"), "{bad}: {e}");
        }
    }
}
