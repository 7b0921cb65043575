//! Uploading a bundle to S3 and registering it as an instance-store AMI.
//!
//! Parts go first, several at once, then the manifest, so a manifest in the bucket never points
//! at missing parts. Every object is sent with the canned ACL `aws-exec-read` (EC2 reads the
//! bundle with its own identity) and a Content-MD5, which S3 checks against what it received.
//! RegisterImage then names the manifest as `ImageLocation`.

use std::path::PathBuf;
use std::sync::Arc;

use aws_sdk_ec2::types::{ArchitectureValues, Filter, ResourceType, Tag, TagSpecification};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::ObjectCannedAcl;
use base64::Engine as _;
use md5::{Digest, Md5};
use serde::Serialize;

use crate::aws::Endpoint;
use crate::aws::{with_retry, AwsError, RetryPolicy};
pub use crate::ec2::S3Location;
use crate::formats::bundle::BundleSummary;
use crate::progress::{Progress, Unit};

/// Tags on a registered bundle AMI: where its manifest is (which finds it again on a re-run)
/// and the SHA-1 of the image's tar stream.
pub const TAG_LOCATION: &str = "kiln:bundle-location";
pub const TAG_TAR_SHA1: &str = "kiln:bundle-tar-sha1";

#[derive(Debug, Clone)]
pub struct Register {
    pub name: String,
    pub description: Option<String>,
    pub arch: String,
}

#[derive(Debug, Clone)]
pub struct UploadOptions {
    pub location: S3Location,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    pub concurrency: usize,
    pub register: Option<Register>,
}

#[derive(Debug, Clone, Serialize)]
pub struct UploadRecord {
    pub bucket: String,
    pub manifest_key: String,
    pub part_keys: Vec<String>,
    /// `bucket/key` of the manifest: what RegisterImage was given.
    pub image_location: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    /// The AMI already existed for this manifest location and was reused.
    pub reused: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(transparent)]
    Location(#[from] crate::ec2::BadS3Location),
    #[error("reading {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{message}{}", advice.as_deref().map(|a| format!("\n  {a}")).unwrap_or_default())]
    Call { message: String, advice: Option<String> },
    #[error("an AMI named {name:?} already exists ({id}) for another bundle ({location}); pass another --ami-name, or deregister the old AMI")]
    NameTaken { name: String, id: String, location: String },
    #[error("could not start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// Turns a failed call into a message that says what to do about it.
fn call_error(e: AwsError, bucket: &str) -> UploadError {
    let message = e.to_string();
    let advice = match e.code().unwrap_or("") {
        "AccessControlListNotSupported" => Some(format!(
            "bucket {bucket} has ACLs disabled (Object Ownership \"Bucket owner enforced\"), but EC2 reads bundles through the aws-exec-read ACL: set its Object Ownership to \"Bucket owner preferred\" (aws s3api put-bucket-ownership-controls --bucket {bucket} --ownership-controls 'Rules=[{{ObjectOwnership=BucketOwnerPreferred}}]') or use another bucket"
        )),
        "NoSuchBucket" => Some(format!("create the bucket first (aws s3 mb s3://{bucket}), or check its name")),
        "AccessDenied" | "AllAccessDisabled" => Some(format!(
            "the credentials need s3:PutObject and s3:PutObjectAcl on arn:aws:s3:::{bucket}/*, and ec2:RegisterImage and ec2:DescribeImages to register"
        )),
        "PermanentRedirect" | "AuthorizationHeaderMalformed" | "IllegalLocationConstraintException" => {
            Some(format!("bucket {bucket} is in another region: pass --region with the bucket's region"))
        }
        "InvalidManifest" => Some("EC2 could not read the manifest: check that the parts and manifest are readable with the aws-exec-read ACL and that the bundle was made with EC2's certificate for this region (--ec2-cert)".into()),
        _ => None,
    };
    UploadError::Call { message, advice }
}

/// Uploads parts then manifest, and registers the AMI if asked.
pub fn upload(s: &BundleSummary, o: &UploadOptions, progress: &dyn Progress) -> Result<UploadRecord, UploadError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(UploadError::Runtime)?;
    rt.block_on(upload_async(s, o, progress))
}

async fn upload_async(
    s: &BundleSummary,
    o: &UploadOptions,
    progress: &dyn Progress,
) -> Result<UploadRecord, UploadError> {
    let conf =
        crate::aws::sdk_config(&Endpoint { region: o.region.clone(), endpoint_url: o.endpoint_url.clone() }).await;
    let s3conf = aws_sdk_s3::config::Builder::from(&conf)
        .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
        // A local endpoint is an address, not a domain that bucket names can prefix.
        .force_path_style(o.endpoint_url.is_some())
        // Content-MD5 is the integrity check EC2's own tools use; no extra trailing checksums.
        .request_checksum_calculation(aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired)
        .build();
    let s3 = aws_sdk_s3::Client::from_conf(s3conf);
    let policy = RetryPolicy::default();
    let loc = &o.location;

    let total: u64 = s.manifest.bundled_size + std::fs::metadata(&s.manifest_path).map(|m| m.len()).unwrap_or(0);
    progress.begin(&format!("uploading to s3://{}/{}", loc.bucket, loc.prefix), Some(total), Unit::Bytes);
    let sem = Arc::new(tokio::sync::Semaphore::new(o.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut part_keys = Vec::new();
    for path in &s.part_paths {
        let file = path.file_name().expect("part paths have file names").to_string_lossy().into_owned();
        let key = loc.key(&file);
        part_keys.push(key.clone());
        let (s3, sem, path, bucket) = (s3.clone(), sem.clone(), path.clone(), loc.bucket.clone());
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore stays open");
            put_object(&s3, &policy, &bucket, &key, &path).await
        });
    }
    while let Some(done) = tasks.join_next().await {
        let n = done.expect("upload task does not panic")?;
        progress.advance(n);
    }
    let manifest_file = s.manifest_path.file_name().expect("manifest has a file name").to_string_lossy().into_owned();
    let manifest_key = loc.key(&manifest_file);
    let n = put_object(&s3, &policy, &loc.bucket, &manifest_key, &s.manifest_path).await?;
    progress.advance(n);
    progress.end(&format!("{} parts and the manifest uploaded", s.part_paths.len()));

    let image_location = format!("{}/{}", loc.bucket, manifest_key);
    let mut rec = UploadRecord {
        bucket: loc.bucket.clone(),
        manifest_key,
        part_keys,
        image_location: image_location.clone(),
        region: conf.region().map(|r| r.to_string()),
        image_id: None,
        reused: false,
    };
    let Some(reg) = &o.register else { return Ok(rec) };
    let ec2 = crate::aws::ec2_client(&conf);
    progress.note(&format!("registering {} from {image_location}", reg.name));
    let existing = with_retry(&policy, "DescribeImages", || {
        ec2.describe_images().owners("self").filters(Filter::builder().name("name").values(&reg.name).build()).send()
    })
    .await
    .map_err(|e| call_error(e, &loc.bucket))?;
    if let Some(img) = existing.images().first() {
        let id = img.image_id().unwrap_or_default().to_string();
        let at = img.image_location().unwrap_or_default();
        let tagged = img.tags().iter().any(|t| t.key() == Some(TAG_LOCATION) && t.value() == Some(&image_location));
        // EC2 reports the location of instance-store AMIs as given; a match means a re-run.
        if tagged || at == image_location || at.ends_with(&format!("/{image_location}")) {
            rec.image_id = Some(id);
            rec.reused = true;
            return Ok(rec);
        }
        return Err(UploadError::NameTaken { name: reg.name.clone(), id, location: at.to_string() });
    }
    let tags = vec![
        Tag::builder().key(TAG_LOCATION).value(&image_location).build(),
        Tag::builder().key(TAG_TAR_SHA1).value(&s.manifest.tar_sha1).build(),
        Tag::builder().key(crate::publish::ami::TAG_NAME).value(&reg.name).build(),
    ];
    let out = with_retry(&policy, "RegisterImage", || {
        ec2.register_image()
            .name(&reg.name)
            .set_description(reg.description.clone())
            .image_location(&image_location)
            .architecture(ArchitectureValues::from(reg.arch.as_str()))
            .virtualization_type("hvm")
            .tag_specifications(
                TagSpecification::builder().resource_type(ResourceType::Image).set_tags(Some(tags.clone())).build(),
            )
            .send()
    })
    .await
    .map_err(|e| call_error(e, &loc.bucket))?;
    let id = out.image_id().unwrap_or_default().to_string();
    // Tagged again on their own: some EC2 stand-ins drop TagSpecifications on RegisterImage,
    // and the location tag is what finds this AMI on a re-run.
    with_retry(&policy, "CreateTags", || ec2.create_tags().resources(&id).set_tags(Some(tags.clone())).send())
        .await
        .map_err(|e| call_error(e, &loc.bucket))?;
    rec.image_id = Some(id);
    Ok(rec)
}

/// One object with `aws-exec-read` and Content-MD5; returns its size. The file is read whole
/// (a part is 10 MiB) because the MD5 must be known before the request is sent.
async fn put_object(
    s3: &aws_sdk_s3::Client,
    policy: &RetryPolicy,
    bucket: &str,
    key: &str,
    path: &std::path::Path,
) -> Result<u64, UploadError> {
    let body = tokio::fs::read(path).await.map_err(|source| UploadError::Read { path: path.into(), source })?;
    let md5 = base64::engine::general_purpose::STANDARD.encode(Md5::digest(&body));
    let len = body.len() as u64;
    let body = bytes::Bytes::from(body);
    with_retry(policy, &format!("PutObject s3://{bucket}/{key}"), || {
        s3.put_object()
            .bucket(bucket)
            .key(key)
            .acl(ObjectCannedAcl::AwsExecRead)
            .content_md5(&md5)
            .content_length(len as i64)
            .body(ByteStream::from(body.clone()))
            .send()
    })
    .await
    .map_err(|e| call_error(e, bucket))?;
    Ok(len)
}
