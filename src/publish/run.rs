//! Execution: carrying out a [`Plan`] in order. Upload the snapshot (or reuse one), register
//! the AMI (deleting a snapshot this run made if registration fails), share it, copy it to the
//! other regions in parallel, write the publish record, and remember the snapshot in
//! [`history`] for the next publish of the same image name.

use std::path::Path;

use sha2::{Digest, Sha256};

use super::discover::Ctx;
use super::{ami, clients, ebs, history, record, PublishError, PublishOptions, PublishRecord, RegionImage};
use crate::manifest::EBS_BLOCK_SIZE;
use crate::progress::Progress;

pub(super) async fn publish_async(
    manifest_path: &Path,
    opts: &PublishOptions,
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
    let image_path = ctx.image_path();
    let found = std::fs::metadata(&image_path)
        .map_err(|source| PublishError::ReadImage { path: image_path.clone(), source })?
        .len();
    if found != ctx.manifest.image.size_bytes {
        return Err(PublishError::ImageSize { path: image_path, expected: ctx.manifest.image.size_bytes, found });
    }
    let src = ctx.regions[0].clone();
    let (ebs_c, ec2) = clients(opts, &src).await;
    let policy = opts.retry;

    // 1. The snapshot: reuse, or upload.
    let mut blocks_sent = 0;
    let mut created_snapshot = false;
    let (image_id, snapshot_id, reused) = if let Some(id) = plan.existing.amis.get(&src) {
        progress.note(&format!("{id} in {src} already has this name and image SHA-256; reusing it"));
        let snap = ami::find_existing(&ec2, &policy, &ctx.name, &ctx.manifest.image.sha256)
            .await?
            .and_then(|x| x.1)
            .unwrap_or_default();
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
                wait_timeout: opts.wait_timeout,
                state_path: record::state_path(manifest_path),
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
            ami::wait_available(&ec2, &policy, &id, opts.wait_timeout, progress).await?;
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
    let mut amis =
        vec![RegionImage { region: src.clone(), image_id: image_id.clone(), snapshot_id: snapshot_id.clone(), reused }];

    // 3. Other regions, in parallel.
    let copies = ctx.regions[1..].iter().map(|region| {
        let ctx = &ctx;
        let image_id = image_id.clone();
        let src = src.clone();
        let existing = plan.existing.amis.get(region).cloned();
        async move {
            let (_, ec2r) = clients(&ctx.opts, region).await;
            let (id, reused) = match existing {
                Some(id) => (id, true),
                None => {
                    let token = format!(
                        "kiln-{}",
                        &hex::encode(Sha256::digest(format!("{image_id}\0{region}\0{}", ctx.name)))[..48]
                    );
                    (
                        ami::copy(
                            &ec2r,
                            &policy,
                            &src,
                            &image_id,
                            &ctx.name,
                            ctx.settings.description.as_deref(),
                            &token,
                        )
                        .await?,
                        false,
                    )
                }
            };
            let snap =
                ami::wait_available(&ec2r, &policy, &id, ctx.opts.wait_timeout, progress).await?.unwrap_or_default();
            let mut ids = vec![id.as_str()];
            if !snap.is_empty() {
                ids.push(&snap);
            }
            ami::create_tags(&ec2r, &policy, &ids, &ctx.tags).await?;
            ami::share(&ec2r, &policy, &ctx.settings, &id, &snap).await?;
            if let Some(at) = ctx.deprecate_at {
                ami::deprecate(&ec2r, &policy, &id, at).await?;
            }
            Ok::<RegionImage, PublishError>(RegionImage {
                region: region.clone(),
                image_id: id.clone(),
                snapshot_id: snap,
                reused,
            })
        }
    });
    for r in futures_util::future::join_all(copies).await {
        amis.push(r?);
    }

    // Parameters, once every AMI is available.
    let mut notes = plan.notes.clone();
    let parameters = if ctx.settings.ssm_parameters.is_empty() {
        Vec::new()
    } else {
        super::ssm::set_parameters(
            &ctx.settings.ssm_parameters,
            &ctx.manifest,
            &amis,
            opts,
            opts.force,
            progress,
            &mut notes,
        )
        .await?
    };

    // Retention, once the new AMIs exist everywhere. A failure here does not undo the
    // publish: it is a note, and `kiln prune` finishes the job.
    let pruned = match ctx.settings.keep {
        Some(keep) => match super::prune::prune(&ctx.manifest.name, keep as usize, &ctx.regions, opts).await {
            Ok(p) => p,
            Err(e) => {
                let note = format!("retention (keep = {keep}) failed: {e}; run `kiln prune` to finish it");
                progress.note(&note);
                notes.push(note);
                Vec::new()
            }
        },
        None => Vec::new(),
    };
    let rec = PublishRecord {
        name: ctx.manifest.name.clone(),
        image_sha256: ctx.manifest.image.sha256.clone(),
        recipe_sha256: ctx.manifest.recipe.sha256.clone(),
        source_region: src,
        snapshot_id,
        parent_snapshot_id: ctx.parent.as_ref().filter(|_| created_snapshot).map(|p| p.1.clone()),
        blocks_sent,
        bytes_sent: blocks_sent * EBS_BLOCK_SIZE,
        blocks_inherited: if created_snapshot { plan.blocks_inherited } else { 0 },
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
        amis,
    };
    let path = record::record_path(manifest_path);
    record::write_json_atomic(&path, &rec).map_err(|source| PublishError::WriteFile { path, source })?;
    // Remembered last: the next publish of this name may take the snapshot as its parent
    // only once everything above succeeded.
    if let (Some(h), false) = (&ctx.history, rec.snapshot_id.is_empty()) {
        let entry = history::Published::new(rec.snapshot_id.clone(), &ctx.settings, ctx.manifest.clone());
        history::save(h, &entry).map_err(|source| PublishError::WriteFile { path: h.clone(), source })?;
    }
    Ok(rec)
}
