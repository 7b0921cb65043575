//! Execution: carrying out a [`Plan`] in order. Upload the snapshot (or reuse one), register
//! the AMI (deleting a snapshot this run made if registration fails), share it, copy it to the
//! other regions in parallel while the regions that take their own upload get it the same
//! way, write the publish record with every region's outcome, and remember each snapshot in
//! [`history`] for the next publish of the same image name. A region that fails does not undo
//! the others: the record says which failed, and running again finishes them.

use std::path::Path;

use sha2::{Digest, Sha256};

use super::discover::Ctx;
use super::{
    ami, clients, ebs, history, record, Clients, Deadline, Plan, PublishError, PublishOptions, PublishRecord,
    RegionImage,
};
use crate::ec2::Delivery;
use crate::manifest::EBS_BLOCK_SIZE;
use crate::message::render_error;
use crate::progress::Progress;

/// What publishing to a region with its own upload came to.
struct Site {
    image: RegionImage,
    blocks_sent: u64,
    /// This run made the snapshot (not an existing one reused).
    created_snapshot: bool,
}

pub(super) async fn publish_async(
    manifest_path: &Path,
    opts: &PublishOptions,
    progress: &dyn Progress,
) -> Result<PublishRecord, PublishError> {
    let Some(url) = &opts.state_url else { return publish_held(manifest_path, opts, None, progress).await };
    // In a shared state, one publish of an image name at a time: what it reads of the
    // history is still true when it writes it.
    let store = crate::share::Store::connect(url.clone()).await;
    let name = crate::manifest::Manifest::load(manifest_path)?.name;
    let lease_name = history::lease(opts.endpoint_url.as_deref(), &name);
    let lease = crate::share::state::Lease::acquire(&store, &lease_name, opts.lease_wait, progress).await?;
    let published = publish_held(manifest_path, opts, Some(&lease), progress).await;
    if let Err(e) = lease.release().await {
        progress.note(&format!(
            "the lease {} was not released ({e}); it runs out by itself",
            store.url().show(&lease_name)
        ));
    }
    published
}

async fn publish_held(
    manifest_path: &Path,
    opts: &PublishOptions,
    lease: Option<&crate::share::state::Lease>,
    progress: &dyn Progress,
) -> Result<PublishRecord, PublishError> {
    let ctx = Ctx::load(manifest_path, opts).await?;
    let plan = ctx.plan().await?;
    for n in &plan.notes {
        progress.note(n);
    }
    if opts.dry_run {
        return Err(PublishError::Refused("dry run: use publish::plan()".into()));
    }
    check_image_size(&ctx)?;
    if ctx.settings.launch_permissions.public {
        check_public_sharing(&ctx, &plan, progress).await?;
    }
    let (direct, unplanned) = plan_direct_uploads(&ctx, &plan, progress).await;
    let results = publish_everywhere(&ctx, &plan, &direct, progress).await?;
    let outcome = Outcome::gather(&ctx, &plan, results, &direct, unplanned, progress);

    let mut notes = plan.notes.clone();
    notes.extend(direct.iter().flat_map(|(c, p)| p.notes.iter().map(move |n| format!("{}: {n}", c.regions[0]))));
    // A parameter that could not be set leaves the publish incomplete, but recorded.
    let mut problems: Vec<String> = outcome.failed.iter().map(|f| format!("{}: {}", f.region, f.error)).collect();
    let parameters = set_parameters(&ctx, &outcome.amis, progress, &mut notes, &mut problems).await;
    let pruned = retention(&ctx, &outcome.amis, progress, &mut notes).await;
    let rec = outcome.record(&ctx, &plan, notes, parameters, pruned);
    let path = record::record_path(manifest_path);
    record::write_json_atomic(&path, &rec).map_err(|source| PublishError::WriteFile { path, source })?;
    // Remembered last: the next publish of this name may take a snapshot as its parent only
    // once everything above succeeded in its region.
    remember(&outcome.remember, lease.is_none_or(|l| !l.lost())).await?;
    if !problems.is_empty() {
        return Err(PublishError::Incomplete { problems, record: record::record_path(manifest_path) });
    }
    Ok(rec)
}

/// The image must be the one the manifest describes; its size is checked before anything is
/// uploaded (each block's digest as it is read).
fn check_image_size(ctx: &Ctx) -> Result<(), PublishError> {
    let image_path = ctx.image_path();
    let found = std::fs::metadata(&image_path)
        .map_err(|source| PublishError::ReadImage { path: image_path.clone(), source })?
        .len();
    if found != ctx.manifest.image.size_bytes {
        return Err(PublishError::ImageSize { path: image_path, expected: ctx.manifest.image.size_bytes, found });
    }
    Ok(())
}

/// The context and plan of each region with its own upload. A region that cannot even be
/// planned (not enabled for the account, say) is that region's failure, not the publish's.
async fn plan_direct_uploads(
    ctx: &Ctx,
    plan: &Plan,
    progress: &dyn Progress,
) -> (Vec<(Ctx, Plan)>, Vec<(String, PublishError)>) {
    let mut direct = Vec::new();
    let mut unplanned = Vec::new();
    for region in &plan.upload_regions {
        match Ctx::plan_region(&ctx.manifest_path, &ctx.opts, region, ctx).await {
            Ok((c, p)) => {
                for n in &p.notes {
                    progress.note(&format!("{region}: {n}"));
                }
                direct.push((c, p));
            }
            Err(e) => unplanned.push((region.clone(), e)),
        }
    }
    (direct, unplanned)
}

/// The first region, then its copies; beside them, the regions with their own upload. Only
/// the first region's failure fails the publish; the others are outcomes to record.
async fn publish_everywhere(
    ctx: &Ctx,
    plan: &Plan,
    direct: &[(Ctx, Plan)],
    progress: &dyn Progress,
) -> Result<Results, PublishError> {
    let quiet: Vec<Regional> =
        direct.iter().map(|(c, _)| Regional { region: &c.regions[0], inner: progress }).collect();
    let first = async {
        let site = publish_site(ctx, plan, progress).await?;
        let copies = plan.copy_regions.iter().map(|r| copy_to(ctx, plan, &site.image, r, progress));
        let copies = futures_util::future::join_all(copies).await;
        Ok::<_, PublishError>((site, copies))
    };
    let uploads = futures_util::future::join_all(direct.iter().zip(&quiet).map(|((c, p), q)| publish_site(c, p, q)));
    let (first, uploads) = futures_util::future::join(first, uploads).await;
    match first {
        Ok((site, copies)) => Ok(Results { site, copies, uploads }),
        Err(e) => {
            // Regions that took their own upload keep their AMIs (a re-run finds them): say so.
            for ((c, _), up) in direct.iter().zip(&uploads) {
                match up {
                    Ok(s) => progress.note(&format!("{}: {} published; kept", c.regions[0], s.image.image_id)),
                    Err(e) => progress.note(&format!("{} failed too: {}", c.regions[0], render_error(e))),
                }
            }
            Err(e)
        }
    }
}

/// What each region's publish came to, when the first region's succeeded.
struct Results {
    site: Site,
    /// In `plan.copy_regions` order.
    copies: Vec<Result<RegionImage, PublishError>>,
    /// In the order of the direct uploads.
    uploads: Vec<Result<Site, PublishError>>,
}

/// What the regions came to once the first region published: the AMIs in the recipe's region
/// order, the regions that failed, and the snapshots to remember for the next publish.
struct Outcome<'a> {
    site: Site,
    amis: Vec<RegionImage>,
    failed: Vec<record::RegionFailure>,
    remember: Vec<(&'a Ctx, String)>,
}

impl<'a> Outcome<'a> {
    fn gather(
        ctx: &'a Ctx,
        plan: &Plan,
        Results { site, copies, uploads }: Results,
        direct: &'a [(Ctx, Plan)],
        unplanned: Vec<(String, PublishError)>,
        progress: &dyn Progress,
    ) -> Outcome<'a> {
        let mut outcomes: std::collections::BTreeMap<String, Result<RegionImage, PublishError>> =
            plan.copy_regions.iter().cloned().zip(copies).collect();
        let mut remember = vec![(ctx, site.image.snapshot_id.clone())];
        for ((c, _), up) in direct.iter().zip(uploads) {
            if let Ok(s) = &up {
                remember.push((c, s.image.snapshot_id.clone()));
            }
            outcomes.insert(c.regions[0].clone(), up.map(|s| s.image));
        }
        outcomes.extend(unplanned.into_iter().map(|(r, e)| (r, Err(e))));
        let mut amis = vec![site.image.clone()];
        let mut failed = Vec::new();
        for region in &ctx.regions[1..] {
            match outcomes.remove(region) {
                Some(Ok(img)) => amis.push(img),
                Some(Err(e)) => {
                    let why = render_error(&e);
                    progress.note(&format!("{region} failed: {why}"));
                    failed.push(record::RegionFailure { region: region.clone(), error: why });
                }
                None => {}
            }
        }
        Outcome { site, amis, failed, remember }
    }

    fn record(
        &self,
        ctx: &Ctx,
        plan: &Plan,
        notes: Vec<String>,
        parameters: Vec<super::ssm::Parameter>,
        pruned: Vec<super::prune::RegionPrune>,
    ) -> PublishRecord {
        let Site { image, blocks_sent, created_snapshot } = &self.site;
        PublishRecord {
            name: ctx.manifest.name.clone(),
            image_sha256: ctx.manifest.image.sha256.clone(),
            recipe_sha256: ctx.manifest.recipe.sha256.clone(),
            source_region: image.region.clone(),
            snapshot_id: image.snapshot_id.clone(),
            parent_snapshot_id: ctx.parent.as_ref().filter(|_| *created_snapshot).map(|p| p.1.clone()),
            blocks_sent: *blocks_sent,
            bytes_sent: blocks_sent * EBS_BLOCK_SIZE,
            blocks_inherited: if *created_snapshot { plan.blocks_inherited } else { 0 },
            deprecate_at: ctx.deprecate_at.and_then(|t| {
                time::OffsetDateTime::from_unix_timestamp(t)
                    .ok()?
                    .format(&time::format_description::well_known::Rfc3339)
                    .ok()
            }),
            notes,
            parameters,
            pruned,
            ami_name: ctx.name.clone(),
            amis: self.amis.clone(),
            failed: self.failed.clone(),
        }
    }
}

/// The SSM parameters, once every AMI is available. One that could not be set is a problem
/// (the publish is incomplete) and a note, never a reason to undo the AMIs.
async fn set_parameters(
    ctx: &Ctx,
    amis: &[RegionImage],
    progress: &dyn Progress,
    notes: &mut Vec<String>,
    problems: &mut Vec<String>,
) -> Vec<super::ssm::Parameter> {
    if ctx.settings.ssm_parameters.is_empty() {
        return Vec::new();
    }
    let opts = &ctx.opts;
    let set = super::ssm::set_parameters(
        &ctx.settings.ssm_parameters,
        &ctx.manifest,
        amis,
        opts,
        opts.force,
        progress,
        notes,
    )
    .await;
    set.unwrap_or_else(|e| {
        let why = format!("SSM parameters: {}", render_error(&e));
        progress.note(&why);
        notes.push(why.clone());
        problems.push(why);
        Vec::new()
    })
}

/// Retention, where the new AMI exists. A failure here does not undo the publish: it is a
/// note, and `kiln prune` finishes the job.
async fn retention(
    ctx: &Ctx,
    amis: &[RegionImage],
    progress: &dyn Progress,
    notes: &mut Vec<String>,
) -> Vec<super::prune::RegionPrune> {
    let Some(keep) = ctx.settings.keep else { return Vec::new() };
    let published: Vec<String> = amis.iter().map(|a| a.region.clone()).collect();
    let retire = super::prune::Retire::from_settings(&ctx.settings, false);
    match super::prune::prune(&ctx.manifest.name, keep as usize, &published, &retire, &ctx.opts).await {
        Ok(p) => p,
        Err(e) => {
            let note = format!("retention (keep = {keep}) failed: {e}; run `kiln prune` to finish it");
            progress.note(&note);
            notes.push(note);
            Vec::new()
        }
    }
}

/// Each region's new snapshot, in [`history`], for the next publish of the same image name.
/// `held`: the lease on the image name is still this publish's (always so without a shared
/// state); when it is not, nothing is written, for a newer publish may have read the history.
/// Every region is tried; the first that could not be remembered is the error.
async fn remember(snapshots: &[(&Ctx, String)], held: bool) -> Result<(), PublishError> {
    let mut first_conflict = None;
    for (c, snapshot_id) in snapshots {
        if let (Some((place, recalled)), false) = (&c.history, snapshot_id.is_empty()) {
            let entry = history::Published::new(snapshot_id.clone(), &c.settings, c.manifest.clone());
            let won = held
                && place
                    .remember(&entry, recalled)
                    .await
                    .map_err(|source| PublishError::WriteFile { path: place.show().into(), source })?;
            if !won && first_conflict.is_none() {
                first_conflict =
                    Some(PublishError::HistoryConflict { record: place.show(), snapshot_id: snapshot_id.clone() });
            }
        }
    }
    first_conflict.map_or(Ok(()), Err)
}

/// The snapshot (reused or uploaded), the AMI registered from it (or the existing one), its
/// tags, sharing and deprecation, in the one region a context uploads to.
async fn publish_site(ctx: &Ctx, plan: &Plan, progress: &dyn Progress) -> Result<Site, PublishError> {
    let opts = &ctx.opts;
    let src = ctx.regions[0].clone();
    let Clients { ebs: ebs_c, ec2, .. } = clients(opts, &src).await;
    let policy = opts.retry;
    let deadline = Deadline::new(opts.wait_timeout);
    let image_path = ctx.image_path();

    // 1. The snapshot: reuse, or upload.
    let mut blocks_sent = 0;
    let mut created_snapshot = false;
    let (image_id, snapshot_id, reused) = if let Some(id) = plan.existing.amis.get(&src) {
        progress.note(&format!("{id} in {src} already has this name and image SHA-256; reusing it"));
        // An earlier run may have stopped waiting for it; the answer names its root snapshot.
        let snap = ami::wait_available(&ec2, &policy, id, &deadline, progress).await?.unwrap_or_default();
        (id.clone(), snap, true)
    } else {
        let snapshot_id = if let Some(s) = &plan.existing.snapshot_id {
            progress.note(&format!("snapshot {s} already holds this image; registering it"));
            s.clone()
        } else {
            // An interrupted upload of this image is resumed whenever its state is found (a
            // re-run after a kill must not start a second snapshot), unless its pending
            // snapshot expired: then the upload starts over.
            let mut replaces = None;
            let resume = match ctx.resume_state()? {
                Some(st) => match ebs::still_pending(&ec2, &st.snapshot_id, &policy).await? {
                    Ok(()) => Some(st),
                    Err(why) => {
                        progress.note(&format!(
                            "the interrupted upload's snapshot {} cannot be resumed: {why}; starting over",
                            st.snapshot_id
                        ));
                        replaces = Some(st.snapshot_id);
                        None
                    }
                },
                None => {
                    if opts.resume {
                        progress.note("nothing to resume; starting a new upload");
                    }
                    None
                }
            };
            let up = ebs::Upload {
                ebs: ebs_c.clone(),
                ec2: ec2.clone(),
                image_path: image_path.clone(),
                image_size_bytes: ctx.manifest.image.size_bytes,
                image_sha256: ctx.manifest.image.sha256.clone(),
                volume_gib: ctx.volume_gib(),
                description: format!("kiln {} image {}", ctx.manifest.name, ctx.manifest.image.sha256),
                tags: ctx.tags.clone(),
                client_token: ctx.client_token(replaces.as_deref()),
                encrypted: ctx.settings.encrypted,
                kms_key_arn: ctx.settings.kms_key_arn.clone(),
                parent_snapshot_id: ctx.parent.as_ref().map(|p| p.1.clone()),
                jobs: plan.jobs.clone(),
                concurrency: opts.concurrency,
                policy,
                snapshot_timeout_minutes: opts.snapshot_timeout_minutes,
                deadline: &deadline,
                state_path: ctx.state_path.clone(),
                resume,
                progress,
            };
            let done = up.run().await?;
            blocks_sent = done.blocks_sent;
            created_snapshot = true;
            done.snapshot_id
        };
        // 2. Register; on failure, delete a snapshot this run created unless told to keep it.
        let registered = async {
            let id =
                ami::register(&ec2, &policy, &ctx.settings, &ctx.manifest, &ctx.name, &snapshot_id, &ctx.tags).await?;
            ami::wait_available(&ec2, &policy, &id, &deadline, progress).await?;
            Ok::<String, PublishError>(id)
        }
        .await;
        match registered {
            Ok(id) => (id, snapshot_id, false),
            Err(e) => {
                let cleanup = if !created_snapshot || opts.keep_snapshot_on_failure {
                    "was kept".to_string()
                } else {
                    match ami::delete_snapshot(&ec2, &policy, &snapshot_id).await {
                        Ok(()) => "was deleted".into(),
                        Err(d) => format!("could not be deleted ({d}); delete it by hand"),
                    }
                };
                return Err(PublishError::RegisterFailed { cause: Box::new(e), snapshot_id, cleanup });
            }
        }
    };
    if !reused {
        // RegisterImage's TagSpecifications already tag the image; tagging again costs one
        // call and covers endpoints that ignore TagSpecifications, so `find_existing` (which
        // matches on the tag) always finds this AMI on a re-run.
        ami::create_tags(&ec2, &policy, &[image_id.as_str(), snapshot_id.as_str()], &ctx.tags).await?;
    }
    ami::share(&ec2, &policy, &ctx.settings, &image_id, &snapshot_id).await?;
    if let Some(at) = ctx.deprecate_at {
        ami::deprecate(&ec2, &policy, &image_id, at).await?;
    }
    if let Some(p) = ctx.settings.protect {
        ami::protect(&ec2, &policy, &image_id, p).await?;
    }
    Ok(Site {
        image: RegionImage { region: src, image_id, snapshot_id, reused, via: Delivery::Upload },
        blocks_sent,
        created_snapshot,
    })
}

/// CopyImage of the first region's AMI into `region`, encrypted with the region's own key
/// when the image is encrypted; then tags, sharing and deprecation there.
async fn copy_to(
    ctx: &Ctx,
    plan: &Plan,
    source: &RegionImage,
    region: &str,
    progress: &dyn Progress,
) -> Result<RegionImage, PublishError> {
    let policy = ctx.opts.retry;
    let deadline = Deadline::new(ctx.opts.wait_timeout);
    let ec2r = clients(&ctx.opts, region).await.ec2;
    let (encrypted, key) = (ctx.settings.encrypted, ctx.delivery(region).1);
    // A copy an earlier run left failed (a key it could not use, say) holds the name: it goes,
    // and the new copy gets a token of its own, or EC2 would answer with the failed one.
    let mut replaces = None;
    let existing = match plan.existing.amis.get(region) {
        Some(id) if ami::has_failed(&ec2r, &policy, id).await? => {
            progress
                .note(&format!("{id} in {region} is an earlier copy that failed; deregistering it and copying again"));
            ami::deregister(&ec2r, &policy, id).await?;
            replaces = Some(id.clone());
            None
        }
        other => other.cloned(),
    };
    let (id, reused) = match existing {
        Some(id) => (id, true),
        None => {
            let seed = format!(
                "{}\0{region}\0{}\0{encrypted}\0{}\0{}",
                source.image_id,
                ctx.name,
                key.unwrap_or(""),
                replaces.as_deref().unwrap_or("")
            );
            let token = super::client_token(&Sha256::digest(seed));
            let req = ami::CopyRequest {
                destination: region,
                source_region: &source.region,
                source_image: &source.image_id,
                name: &ctx.name,
                description: ctx.settings.description.as_deref(),
                client_token: &token,
                encrypted,
                kms_key_id: key,
                tags: &ctx.tags,
                completion_minutes: ctx.settings.copy_within_minutes,
            };
            (ami::copy(&ec2r, &policy, &req, &deadline, progress).await?, false)
        }
    };
    let snap = ami::wait_available(&ec2r, &policy, &id, &deadline, progress).await?.unwrap_or_default();
    let mut ids = vec![id.as_str()];
    if !snap.is_empty() {
        ids.push(&snap);
    }
    ami::create_tags(&ec2r, &policy, &ids, &ctx.tags).await?;
    ami::share(&ec2r, &policy, &ctx.settings, &id, &snap).await?;
    if let Some(at) = ctx.deprecate_at {
        ami::deprecate(&ec2r, &policy, &id, at).await?;
    }
    if let Some(p) = ctx.settings.protect {
        ami::protect(&ec2r, &policy, &id, p).await?;
    }
    Ok(RegionImage { region: region.into(), image_id: id, snapshot_id: snap, reused, via: Delivery::Copy })
}

/// Making an AMI public is refused by a region whose image block public access is on: found
/// out before anything is uploaded, with what to do, rather than from EC2's error afterwards.
/// Regions where the AMI exists already are not asked (the block leaves existing sharing
/// alone), nor is a region whose answer kiln may not read: EC2 still has the last word there.
async fn check_public_sharing(ctx: &Ctx, plan: &Plan, progress: &dyn Progress) -> Result<(), PublishError> {
    let mut blocked = Vec::new();
    for region in ctx.regions.iter().filter(|r| !plan.existing.amis.contains_key(*r)) {
        let ec2 = clients(&ctx.opts, region).await.ec2;
        match ami::block_public_access(&ec2, &ctx.opts.retry).await {
            Ok(state) if state == "unblocked" => {}
            Ok(state) => blocked.push(format!("{region} ({state})")),
            Err(PublishError::Aws(e))
                if matches!(
                    e.last.code.as_deref(),
                    Some("UnauthorizedOperation" | "InvalidAction" | "AccessDenied")
                ) =>
            {
                progress.note(&format!(
                    "could not read image block public access in {region} ({}); if it is on, sharing the AMI publicly will fail there",
                    e.last
                ));
            }
            Err(e) => return Err(e),
        }
    }
    if blocked.is_empty() {
        return Ok(());
    }
    Err(PublishError::Refused(format!(
        "the recipe makes the AMI public (launch_permissions.public = true), but image block public access \
         is on in {}: EC2 would refuse to share it. Turn it off where public AMIs are intended \
         (`aws ec2 disable-image-block-public-access --region REGION`; it takes effect within minutes), \
         or set `public = false` and share with accounts or organizations instead",
        blocked.join(", ")
    )))
}

/// What a region with its own upload reports, beside the first region's bars: its notes and
/// each phase's summary, named by region (one terminal has one bar).
struct Regional<'a> {
    region: &'a str,
    inner: &'a dyn Progress,
}

impl Progress for Regional<'_> {
    fn end(&self, summary: &str) {
        self.inner.note(&format!("{}: {summary}", self.region));
    }
    fn note(&self, line: &str) {
        self.inner.note(&format!("{}: {line}", self.region));
    }
}
