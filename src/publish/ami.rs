//! EC2 side of publishing: find an existing AMI, RegisterImage, launch and create-volume
//! permissions, tags, CopyImage to other regions, and cleanup after a failed registration.

use std::time::Duration;

use aws_sdk_ec2::types::{
    ArchitectureValues, BlockDeviceMapping, BootModeValues, CreateVolumePermission,
    CreateVolumePermissionModifications, EbsBlockDevice, Filter, ImageState, ImdsSupportValues, LaunchPermission,
    LaunchPermissionModifications, PermissionGroup, ResourceType, Tag, TagSpecification, TpmSupportValues, VolumeType,
};

use super::PublishError;
use crate::aws::{with_retry, RetryPolicy};
use crate::manifest::{AmiSettings, Manifest};
use crate::progress::{Progress, Unit};

/// Tag keys kiln puts on images and snapshots; `find_existing` matches on the first.
pub const TAG_IMAGE_SHA: &str = "kiln:image-sha256";
pub const TAG_RECIPE_SHA: &str = "kiln:recipe-sha256";
pub const TAG_NAME: &str = "kiln:name";
/// The build's SOURCE_DATE_EPOCH: which of two builds of an image is the newer one.
pub const TAG_SOURCE_DATE_EPOCH: &str = "kiln:source-date-epoch";
/// Lineage RegisterImage cannot record (it leaves `SourceImageId` empty): the kiln that built
/// the image, and the snapshot an incremental upload was made on.
pub const TAG_VERSION: &str = "kiln:version";
pub const TAG_PARENT_SNAPSHOT: &str = "kiln:parent-snapshot";
/// When `kiln prune` disabled an AMI on its way out (RFC 3339): it is deregistered once
/// `[ami] disable_before_delete` has passed since.
pub const TAG_DISABLED_AT: &str = "kiln:disabled-at";

/// Expands `{date}`, `{arch}`, `{name}` and `{sha}` in the AMI name. The date is
/// SOURCE_DATE_EPOCH's UTC day, never the wall clock, so a rebuild names the AMI the same.
pub fn expand_name(template: &str, m: &Manifest) -> String {
    let date = time::OffsetDateTime::from_unix_timestamp(m.source_date_epoch)
        .map(|t| format!("{:04}{:02}{:02}", t.year(), u8::from(t.month()), t.day()))
        .unwrap_or_else(|_| "00000000".into());
    let sha = m.image.sha256.get(..12).unwrap_or(&m.image.sha256);
    template
        .replace("{date}", &date)
        .replace("{arch}", m.arch.as_str())
        .replace("{name}", &m.name)
        .replace("{sha}", sha)
}

/// Every tag kiln puts on the image and the snapshot: the recipe's, then kiln's own.
pub fn all_tags(s: &AmiSettings, m: &Manifest, parent_snapshot: Option<&str>) -> Vec<(String, String)> {
    let mut t: Vec<(String, String)> = s.tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    t.push((TAG_IMAGE_SHA.into(), m.image.sha256.clone()));
    t.push((TAG_RECIPE_SHA.into(), m.recipe.sha256.clone()));
    t.push((TAG_NAME.into(), m.name.clone()));
    t.push((TAG_SOURCE_DATE_EPOCH.into(), m.source_date_epoch.to_string()));
    t.push((TAG_VERSION.into(), m.kiln_version.clone()));
    if let Some(p) = parent_snapshot {
        t.push((TAG_PARENT_SNAPSHOT.into(), p.to_string()));
    }
    t
}

fn ec2_tags(tags: &[(String, String)]) -> Vec<Tag> {
    tags.iter().map(|(k, v)| Tag::builder().key(k).value(v).build()).collect()
}

/// An AMI of this name whose image SHA-256 tag matches, owned by this account.
pub async fn find_existing(
    ec2: &aws_sdk_ec2::Client,
    policy: &RetryPolicy,
    name: &str,
    image_sha256: &str,
) -> Result<Option<(String, Option<String>)>, PublishError> {
    find_image(ec2, policy, name, Some(image_sha256)).await
}

/// The AMI of this name this account owns, with its root snapshot; with `image_sha256`, only
/// one tagged with it.
async fn find_image(
    ec2: &aws_sdk_ec2::Client,
    policy: &RetryPolicy,
    name: &str,
    image_sha256: Option<&str>,
) -> Result<Option<(String, Option<String>)>, PublishError> {
    let out = with_retry(policy, "DescribeImages", || {
        let mut req = ec2.describe_images().owners("self").filters(Filter::builder().name("name").values(name).build());
        if let Some(sha) = image_sha256 {
            req = req.filters(Filter::builder().name(format!("tag:{TAG_IMAGE_SHA}")).values(sha).build());
        }
        req.send()
    })
    .await?;
    Ok(out.images().iter().find(|i| i.state() != Some(&ImageState::Deregistered)).map(|i| {
        let snap =
            i.block_device_mappings().iter().find_map(|b| b.ebs().and_then(|e| e.snapshot_id())).map(str::to_string);
        (i.image_id().unwrap_or_default().to_string(), snap)
    }))
}

/// A completed snapshot this account owns with the image SHA-256 tag (a re-run after a failed
/// registration can register it without uploading again).
pub async fn find_snapshot(
    ec2: &aws_sdk_ec2::Client,
    policy: &RetryPolicy,
    image_sha256: &str,
    encrypted: bool,
) -> Result<Option<String>, PublishError> {
    let out = with_retry(policy, "DescribeSnapshots", || {
        ec2.describe_snapshots()
            .owner_ids("self")
            .filters(Filter::builder().name(format!("tag:{TAG_IMAGE_SHA}")).values(image_sha256).build())
            .filters(Filter::builder().name("status").values("completed").build())
            .send()
    })
    .await?;
    let mut snaps: Vec<_> = out.snapshots().iter().filter(|s| s.encrypted().unwrap_or(false) == encrypted).collect();
    // Several matches can exist after interrupted runs; pick one deterministically.
    snaps.sort_by_key(|s| s.snapshot_id().unwrap_or_default().to_string());
    Ok(snaps.first().and_then(|s| s.snapshot_id()).map(str::to_string))
}

/// What a call that makes an AMI came back with.
enum Created<T> {
    Answered(T),
    /// The AMI an attempt made whose answer was lost.
    Found(String),
}

/// Runs a call that makes a named AMI (RegisterImage, CopyImage) so that a lost answer never
/// leaves a second AMI. RegisterImage takes no client token, and a stand-in may ignore
/// CopyImage's. AMI names are unique in an account and region: an AMI of this name that was
/// not there before the first attempt and is there before a retry is the one an attempt
/// made, and is the answer (its tags are not consulted: CreateTags sets them afterwards).
async fn create_named<T, E, F, Fut>(
    ec2: &aws_sdk_ec2::Client,
    policy: &RetryPolicy,
    name: &str,
    operation: &str,
    mut send: F,
) -> Result<Created<T>, PublishError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<
        Output = Result<T, aws_sdk_ec2::error::SdkError<E, aws_sdk_ec2::config::http::HttpResponse>>,
    >,
    E: aws_sdk_ec2::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    let taken_before = find_image(ec2, policy, name, None).await?.is_some();
    let once = RetryPolicy { max_attempts: 1, ..*policy };
    let mut attempt = 0;
    loop {
        if attempt > 0 {
            tokio::time::sleep(crate::aws::retry::backoff(policy, attempt - 1, &mut rand::rng())).await;
            if !taken_before {
                if let Some((id, _)) = find_image(ec2, policy, name, None).await? {
                    return Ok(Created::Found(id));
                }
            }
        }
        attempt += 1;
        match with_retry(&once, operation, &mut send).await {
            Ok(out) => return Ok(Created::Answered(out)),
            Err(e) if e.last.retryable && attempt < policy.max_attempts => continue,
            Err(mut e) => {
                e.attempts = attempt;
                return Err(e.into());
            }
        }
    }
}

/// RegisterImage with every field the recipe sets.
pub async fn register(
    ec2: &aws_sdk_ec2::Client,
    policy: &RetryPolicy,
    s: &AmiSettings,
    m: &Manifest,
    name: &str,
    snapshot_id: &str,
    tags: &[(String, String)],
) -> Result<String, PublishError> {
    // EC2 takes these as i32; validated settings always fit, and one that does not is an
    // error, never a clamped value.
    let int = |n: u32, what: &str| {
        i32::try_from(n).map_err(|_| PublishError::Refused(format!("{what} {n} is more than EC2 accepts")))
    };
    let mut root = EbsBlockDevice::builder()
        .snapshot_id(snapshot_id)
        .set_volume_size(s.root_volume.size_gib.map(|g| int(g, "root volume size")).transpose()?)
        .volume_type(VolumeType::from(s.root_volume.volume_type.as_str()))
        .delete_on_termination(s.root_volume.delete_on_termination);
    if let Some(i) = s.root_volume.iops {
        root = root.iops(int(i, "root volume iops")?);
    }
    if let Some(t) = s.root_volume.throughput {
        root = root.throughput(int(t, "root volume throughput")?);
    }
    let mut mappings = vec![BlockDeviceMapping::builder().device_name(&s.root_volume.device).ebs(root.build()).build()];
    for v in &s.volumes {
        let mut e = EbsBlockDevice::builder()
            .volume_size(int(v.size_gib, "volume size")?)
            .volume_type(VolumeType::from(v.volume_type.as_str()))
            .delete_on_termination(v.delete_on_termination)
            .encrypted(v.encrypted)
            .set_kms_key_id(v.kms_key_id.clone());
        if let Some(i) = v.iops {
            e = e.iops(int(i, "volume iops")?);
        }
        if let Some(t) = v.throughput {
            e = e.throughput(int(t, "volume throughput")?);
        }
        mappings.push(BlockDeviceMapping::builder().device_name(&v.device).ebs(e.build()).build());
    }
    // The snapshot got its tags at StartSnapshot; RegisterImage's snapshot TagSpecification
    // only applies to snapshots RegisterImage itself creates, so only the image is tagged here.
    let tag_spec =
        TagSpecification::builder().resource_type(ResourceType::Image).set_tags(Some(ec2_tags(tags))).build();
    let send = || {
        let mut req = ec2
            .register_image()
            .name(name)
            .architecture(ArchitectureValues::from(m.arch.as_str()))
            .root_device_name(&s.root_volume.device)
            .virtualization_type("hvm")
            .boot_mode(BootModeValues::from(s.boot_mode.as_str()))
            .ena_support(s.ena)
            .set_block_device_mappings(Some(mappings.clone()))
            .tag_specifications(tag_spec.clone())
            .set_description(s.description.clone());
        if s.sriov {
            // "simple" is the only value EC2 accepts: Intel 82599 VF networking.
            req = req.sriov_net_support("simple");
        }
        if s.tpm {
            req = req.tpm_support(TpmSupportValues::V20);
        }
        if let Some(sb) = &m.secure_boot {
            // The firmware's Secure Boot keys; validation made sure the AMI boots UEFI only.
            req = req.uefi_data(&sb.uefi_data);
        }
        if s.imds == Some(crate::ec2::ImdsSupport::V2) {
            req = req.imds_support(ImdsSupportValues::V20);
        }
        req.send()
    };
    let out = match create_named(ec2, policy, name, "RegisterImage", send).await? {
        Created::Answered(out) => out,
        Created::Found(id) => return Ok(id),
    };
    out.image_id()
        .map(str::to_string)
        .ok_or_else(|| PublishError::Protocol("RegisterImage returned no image id".into()))
}

/// Launch permission on the AMI and create-volume permission on its snapshot, for the same
/// accounts. Organizations cannot be granted create-volume permission by EC2; a launch
/// permission through an organization is enough to launch.
pub async fn share(
    ec2: &aws_sdk_ec2::Client,
    policy: &RetryPolicy,
    s: &AmiSettings,
    image_id: &str,
    snapshot_id: &str,
) -> Result<(), PublishError> {
    let lp = &s.launch_permissions;
    let mut adds: Vec<LaunchPermission> =
        lp.accounts.iter().map(|a| LaunchPermission::builder().user_id(a).build()).collect();
    adds.extend(lp.organizations.iter().map(|o| LaunchPermission::builder().organization_arn(o).build()));
    adds.extend(lp.organizational_units.iter().map(|o| LaunchPermission::builder().organizational_unit_arn(o).build()));
    if lp.public {
        adds.push(LaunchPermission::builder().group(PermissionGroup::All).build());
    }
    if adds.is_empty() {
        return Ok(());
    }
    let mods = LaunchPermissionModifications::builder().set_add(Some(adds)).build();
    with_retry(policy, "ModifyImageAttribute", || {
        ec2.modify_image_attribute().image_id(image_id).launch_permission(mods.clone()).send()
    })
    .await?;
    let mut cv: Vec<CreateVolumePermission> =
        lp.accounts.iter().map(|a| CreateVolumePermission::builder().user_id(a).build()).collect();
    if lp.public {
        cv.push(CreateVolumePermission::builder().group(PermissionGroup::All).build());
    }
    if !cv.is_empty() {
        let mods = CreateVolumePermissionModifications::builder().set_add(Some(cv)).build();
        with_retry(policy, "ModifySnapshotAttribute", || {
            ec2.modify_snapshot_attribute()
                .snapshot_id(snapshot_id)
                .attribute(aws_sdk_ec2::types::SnapshotAttributeName::CreateVolumePermission)
                .create_volume_permission(mods.clone())
                .send()
        })
        .await?;
    }
    Ok(())
}

pub async fn create_tags(
    ec2: &aws_sdk_ec2::Client,
    policy: &RetryPolicy,
    ids: &[&str],
    tags: &[(String, String)],
) -> Result<(), PublishError> {
    let t = ec2_tags(tags);
    with_retry(policy, "CreateTags", || {
        ec2.create_tags()
            .set_resources(Some(ids.iter().map(|s| s.to_string()).collect()))
            .set_tags(Some(t.clone()))
            .send()
    })
    .await?;
    Ok(())
}

/// What CopyImage makes in its destination region.
pub struct CopyRequest<'a> {
    pub destination: &'a str,
    pub source_region: &'a str,
    pub source_image: &'a str,
    pub name: &'a str,
    pub description: Option<&'a str>,
    /// Derived from the source image and region, so a retried call after a lost answer does
    /// not start a second copy.
    pub client_token: &'a str,
    /// Encrypt the copy's snapshots; with the destination region's key, or its default key.
    /// The source region's key is never sent: a KMS key works only in its own region.
    pub encrypted: bool,
    pub kms_key_id: Option<&'a str>,
    /// On the new AMI and its snapshots from the start: a re-run finds a copy that is still
    /// pending by its image SHA-256 tag instead of starting another.
    pub tags: &'a [(String, String)],
    /// A time-based copy: EC2 completes the snapshot copy within this many minutes.
    pub completion_minutes: Option<u32>,
}

/// EC2's error when the destination region already runs as many AMI copies as it allows.
const COPY_LIMIT: &str = "ResourceLimitExceeded";

/// CopyImage into this client's region. At EC2's concurrent-copy limit the copy waits its
/// turn, retried until `deadline` (which the wait does not extend) passes.
pub async fn copy(
    ec2: &aws_sdk_ec2::Client,
    policy: &RetryPolicy,
    c: &CopyRequest<'_>,
    deadline: &super::Deadline,
    progress: &dyn Progress,
) -> Result<String, PublishError> {
    let specs: Vec<TagSpecification> = [ResourceType::Image, ResourceType::Snapshot]
        .into_iter()
        .map(|kind| TagSpecification::builder().resource_type(kind).set_tags(Some(ec2_tags(c.tags))).build())
        .collect();
    let send = || {
        let mut req = ec2
            .copy_image()
            .set_tag_specifications(Some(specs.clone()))
            .source_region(c.source_region)
            .source_image_id(c.source_image)
            .name(c.name)
            .set_description(c.description.map(str::to_string))
            .client_token(c.client_token)
            .set_snapshot_copy_completion_duration_minutes(c.completion_minutes.map(i64::from));
        if c.encrypted {
            req = req.encrypted(true).set_kms_key_id(c.kms_key_id.map(str::to_string));
        }
        req.send()
    };
    // A copy slot frees up when a whole copy finishes: minutes, not seconds.
    let mut backoff = super::Backoff::new(Duration::from_secs(5), Duration::from_secs(60));
    let mut queued = false;
    let out = loop {
        match create_named(ec2, policy, c.name, "CopyImage", send).await {
            Ok(Created::Answered(out)) => break out,
            Ok(Created::Found(id)) => return Ok(id),
            Err(PublishError::Aws(e)) if e.last.code.as_deref() == Some(COPY_LIMIT) => {
                if !queued {
                    progress.note(&format!(
                        "copy of {} to {}: the region is at EC2's concurrent-copy limit; queued until a copy finishes",
                        c.source_image, c.destination
                    ));
                    queued = true;
                }
                backoff.pause(deadline, || format!("a free copy slot in {}", c.destination)).await?;
            }
            Err(e) => return Err(e),
        }
    };
    out.image_id().map(str::to_string).ok_or_else(|| PublishError::Protocol("CopyImage returned no image id".into()))
}

/// Waits until the AMI is `available`; returns its root snapshot id. Each poll that shows
/// progress (the image's state, its root snapshot's percentage) extends `deadline`.
pub async fn wait_available(
    ec2: &aws_sdk_ec2::Client,
    policy: &RetryPolicy,
    image_id: &str,
    deadline: &super::Deadline,
    progress: &dyn Progress,
) -> Result<Option<String>, PublishError> {
    let mut backoff = super::Backoff::new(Duration::from_millis(500), Duration::from_secs(15));
    progress.begin(&format!("waiting for {image_id}"), None, Unit::Items);
    loop {
        let out = with_retry(policy, "DescribeImages", || ec2.describe_images().image_ids(image_id).send()).await?;
        let img = out.images().first();
        let root = img
            .and_then(|i| i.block_device_mappings().iter().find_map(|b| b.ebs().and_then(|e| e.snapshot_id())))
            .map(str::to_string);
        match img.and_then(|i| i.state()) {
            Some(ImageState::Available) => {
                progress.end(&format!("{image_id} available"));
                return Ok(root);
            }
            Some(s) if failed(s) => {
                return Err(PublishError::ImageFailed {
                    image_id: image_id.into(),
                    reason: img.and_then(|i| i.state_reason()).and_then(|r| r.message()).unwrap_or("").into(),
                })
            }
            state => {
                // A copy reports its progress only on its snapshot.
                let pct = match &root {
                    Some(snap) => {
                        with_retry(policy, "DescribeSnapshots", || ec2.describe_snapshots().snapshot_ids(snap).send())
                            .await
                            .ok()
                            .and_then(|o| o.snapshots().first().and_then(|s| s.progress()).map(str::to_string))
                            .unwrap_or_default()
                    }
                    None => String::new(),
                };
                deadline.saw(&format!("{image_id} {} {pct}", state.map(|s| s.as_str()).unwrap_or("unknown")));
            }
        }
        backoff.pause(deadline, || format!("{image_id} to become available")).await?;
    }
}

/// The region's image block public access state (`unblocked`, or `block-new-sharing`, which
/// refuses making any AMI public).
pub async fn block_public_access(ec2: &aws_sdk_ec2::Client, policy: &RetryPolicy) -> Result<String, PublishError> {
    let out = with_retry(policy, "GetImageBlockPublicAccessState", || ec2.get_image_block_public_access_state().send())
        .await?;
    Ok(out.image_block_public_access_state().unwrap_or("unblocked").to_string())
}

/// True when the AMI is `failed`, `error` or `invalid`: it will never become available.
pub async fn has_failed(ec2: &aws_sdk_ec2::Client, policy: &RetryPolicy, image_id: &str) -> Result<bool, PublishError> {
    let out = with_retry(policy, "DescribeImages", || ec2.describe_images().image_ids(image_id).send()).await?;
    Ok(out.images().first().and_then(|i| i.state()).is_some_and(failed))
}

/// An AMI in a state it never leaves but by deregistration.
fn failed(state: &ImageState) -> bool {
    matches!(state, ImageState::Failed | ImageState::Error | ImageState::Invalid)
}

pub async fn deregister(ec2: &aws_sdk_ec2::Client, policy: &RetryPolicy, image_id: &str) -> Result<(), PublishError> {
    with_retry(policy, "DeregisterImage", || ec2.deregister_image().image_id(image_id).send()).await?;
    Ok(())
}

pub async fn delete_snapshot(
    ec2: &aws_sdk_ec2::Client,
    policy: &RetryPolicy,
    snapshot_id: &str,
) -> Result<(), PublishError> {
    with_retry(policy, "DeleteSnapshot", || ec2.delete_snapshot().snapshot_id(snapshot_id).send()).await?;
    Ok(())
}

/// EnableImageDeprecation: the AMI is marked deprecated at `at` (Unix seconds).
/// EnableImageDeregistrationProtection: DeregisterImage fails until it is disabled again
/// (and, with the cooldown, for 24 hours after).
pub async fn protect(
    ec2: &aws_sdk_ec2::Client,
    policy: &RetryPolicy,
    image_id: &str,
    p: crate::ec2::Protection,
) -> Result<(), PublishError> {
    with_retry(policy, "EnableImageDeregistrationProtection", || {
        ec2.enable_image_deregistration_protection().image_id(image_id).with_cooldown(p.with_cooldown()).send()
    })
    .await?;
    Ok(())
}

pub async fn deprecate(
    ec2: &aws_sdk_ec2::Client,
    policy: &RetryPolicy,
    image_id: &str,
    at: i64,
) -> Result<(), PublishError> {
    with_retry(policy, "EnableImageDeprecation", || {
        ec2.enable_image_deprecation().image_id(image_id).deprecate_at(aws_smithy_types::DateTime::from_secs(at)).send()
    })
    .await?;
    Ok(())
}
