//! Discovery: what a publish starts from and what already exists, changing nothing. The
//! manifest and its settings, the regions, the parent snapshot (named by flags, or remembered
//! in [`history`] and checked with EC2), AMIs and snapshots of this image that exist, an
//! interrupted upload to resume; from these, the [`Plan`] that `--dry-run` prints and
//! [`run`](super::run) carries out.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{ami, blocks, clients, ebs, history, record, Existing, Plan, PublishError, PublishOptions, GIB};
use crate::ec2::Delivery;
use crate::manifest::{AmiSettings, Manifest, EBS_BLOCK_SIZE};

/// Everything a publish works from: the manifest and its settings, where to publish, and the
/// parent snapshot, decided before anything is changed.
pub(super) struct Ctx {
    pub(super) manifest_path: PathBuf,
    pub(super) manifest: Manifest,
    pub(super) settings: AmiSettings,
    pub(super) opts: PublishOptions,
    /// Where the AMI goes; the first receives this context's upload. The context of a region
    /// that gets its own upload ([`Ctx::plan_region`]) has that region alone.
    pub(super) regions: Vec<String>,
    pub(super) parent: Option<(Manifest, String)>,
    /// Where this publish is remembered, in the upload region, and what was read there.
    pub(super) history: Option<(history::Place, history::Recalled)>,
    /// The resume state of this context's upload.
    pub(super) state_path: PathBuf,
    /// What a person should know about this publish (a remembered parent that could not be
    /// used); printed as it is decided, and kept in the record.
    pub(super) notes: Vec<String>,
    pub(super) name: String,
    pub(super) tags: Vec<(String, String)>,
    /// When the AMIs are deprecated (Unix seconds), decided once so every region gets the same.
    pub(super) deprecate_at: Option<i64>,
}

/// The snapshot kiln last published for this image name in the upload region, as the parent
/// of this one, when it can be: see [`history`]. Each reason it cannot is a note, and the
/// upload a full one.
async fn remembered_parent(
    prev: Option<history::Published>,
    manifest: &Manifest,
    settings: &AmiSettings,
    opts: &PublishOptions,
    region: &str,
    notes: &mut Vec<String>,
) -> Result<Option<(Manifest, String)>, PublishError> {
    let Some(prev) = prev else { return Ok(None) };
    if let Some(why) = history::unusable(&prev, manifest, settings) {
        if prev.manifest.image.sha256 != manifest.image.sha256 {
            notes.push(format!("full upload: {why}"));
        }
        return Ok(None);
    }
    let ec2 = clients(opts, region).await.ec2;
    if let Err(why) = ebs::usable_parent(&ec2, &prev.snapshot_id, &opts.retry).await? {
        notes.push(format!("full upload: the last published snapshot {} {why}", prev.snapshot_id));
        return Ok(None);
    }
    Ok(Some((prev.manifest, prev.snapshot_id)))
}

impl Ctx {
    /// The publish as a whole: the upload to the first region, and what the others get.
    pub(super) async fn load(manifest_path: &Path, opts: &PublishOptions) -> Result<Ctx, PublishError> {
        Ctx::load_for(manifest_path, opts, None).await
    }

    /// A region (after the first) that gets its own upload of the same blocks, and its plan:
    /// its key, its remembered parent, its resume state. A parent named on the command line is
    /// a snapshot of the first region and is not used here. The deprecation time is `main`'s,
    /// so every region gets the same.
    pub(super) async fn plan_region(
        manifest_path: &Path,
        opts: &PublishOptions,
        region: &str,
        main: &Ctx,
    ) -> Result<(Ctx, Plan), PublishError> {
        let mut c = Ctx::load_for(manifest_path, opts, Some(region)).await?;
        c.deprecate_at = main.deprecate_at;
        let p = c.plan().await?;
        Ok((c, p))
    }

    async fn load_for(manifest_path: &Path, opts: &PublishOptions, site: Option<&str>) -> Result<Ctx, PublishError> {
        let manifest = Manifest::load(manifest_path)?;
        // Loading judged the settings by `kiln check`'s rules: a manifest EC2 would refuse
        // never gets this far.
        let mut settings =
            manifest.ami.clone().ok_or_else(|| PublishError::NoAmiSettings { path: manifest_path.into() })?;
        let all = if opts.regions.is_empty() { settings.regions.clone() } else { opts.regions.clone() };
        let Some(source) = all.first().cloned() else { return Err(PublishError::NoRegion) };
        if let Some((i, r)) = all.iter().enumerate().find(|(i, r)| all[..*i].contains(r)) {
            return Err(PublishError::Refused(format!(
                "region {r} is named twice (position {} and {}); name each region once",
                all.iter().position(|x| x == r).unwrap_or(0) + 1,
                i + 1
            )));
        }
        // This context uploads to one region, with that region's key (found by its name, so
        // `--region` may reorder the recipe's regions); the recipe's check tied each key to its
        // region, but a region named only on the command line has none of its own.
        let target = site.unwrap_or(&source).to_string();
        settings.kms_key_arn = settings.region(&target, &source).1.map(str::to_string);
        if let Some(k) = &settings.kms_key_arn {
            crate::ec2::check_kms_key(k, Some(&target), Delivery::Upload, settings.encrypted)
                .map_err(|p| PublishError::Refused(format!("the KMS key for {target}: {}", p.message)))?;
        }
        let (regions, state_path) = match site {
            None => (all, record::state_path(manifest_path, None)),
            Some(r) => (vec![r.to_string()], record::state_path(manifest_path, Some(r))),
        };
        let flags = if site.is_some() { (&None, &None) } else { (&opts.parent_manifest, &opts.parent_snapshot) };
        let parent = match flags {
            (Some(p), Some(s)) => {
                let pm = Manifest::load(p)?;
                if pm.blocks.block_size != EBS_BLOCK_SIZE {
                    return Err(PublishError::Parent { path: p.clone(), reason: format!("block size {} is not {EBS_BLOCK_SIZE}", pm.blocks.block_size) });
                }
                Some((pm, s.clone()))
            }
            (None, None) => None,
            (Some(p), None) => {
                return Err(PublishError::Parent { path: p.clone(), reason: "--parent-manifest needs --parent-snapshot snap-… (the snapshot published from it)".into() })
            }
            (None, Some(_)) => {
                return Err(PublishError::Refused("--parent-snapshot needs --parent-manifest: kiln must know the parent's blocks to send only the differences".into()))
            }
        };
        let place = history::Place {
            local: opts
                .state_dir
                .as_deref()
                .map(|d| history::path(d, opts.endpoint_url.as_deref(), &regions[0], &manifest.name)),
            shared: match &opts.state_url {
                Some(url) => Some((
                    crate::share::Store::connect(url.clone()).await,
                    history::relative(opts.endpoint_url.as_deref(), &regions[0], &manifest.name),
                )),
                None => None,
            },
        };
        let history = match (&place.local, &place.shared) {
            (None, None) => None,
            _ => {
                let recalled = place.recall().await?;
                Some((place, recalled))
            }
        };
        let mut notes = Vec::new();
        let parent = match (parent, &history) {
            (Some(p), _) => Some(p),
            (None, Some((_, h))) if !opts.full => {
                remembered_parent(h.published.clone(), &manifest, &settings, opts, &regions[0], &mut notes).await?
            }
            (None, _) => None,
        };
        let name = ami::expand_name(&settings.name, &manifest);
        let tags = ami::all_tags(&settings, &manifest, parent.as_ref().map(|p| p.1.as_str()));
        // A fixed time may have passed since the recipe was checked: judged against the clock
        // now, before anything is uploaded.
        let deprecate_at = match &settings.deprecate_after {
            None => None,
            Some(d) => {
                let now = crate::aws::now();
                let at = d
                    .when
                    .at(now, settings.launch_permissions.public)
                    .map_err(|why| PublishError::Refused(format!("ami.deprecate_after = \"{d}\": {why}")))?;
                Some(at)
            }
        };
        Ok(Ctx {
            manifest_path: manifest_path.into(),
            manifest,
            settings,
            opts: opts.clone(),
            regions,
            parent,
            history,
            state_path,
            notes,
            name,
            tags,
            deprecate_at,
        })
    }

    /// How `region` gets the AMI, and with which key (see [`AmiSettings::region`]).
    pub(super) fn delivery<'a>(&'a self, region: &str) -> (Delivery, Option<&'a str>) {
        // The manifest's settings: this context's own have its upload key in `kms_key_arn`.
        self.manifest.ami.as_ref().unwrap_or(&self.settings).region(region, &self.regions[0])
    }

    /// The regions after the first that get the AMI this way.
    pub(super) fn regions_via(&self, via: Delivery) -> Vec<String> {
        self.regions[1..].iter().filter(|r| self.delivery(r).0 == via).cloned().collect()
    }

    pub(super) fn image_path(&self) -> PathBuf {
        self.manifest.image_path(&self.manifest_path)
    }

    /// Which blocks to send, and where their bytes come from ([`blocks`]).
    fn jobs(&self) -> Result<Vec<blocks::BlockJob>, PublishError> {
        let target = match &self.parent {
            Some((pm, _)) => blocks::Target::Child { parent: &pm.blocks },
            None if self.settings.encrypted => blocks::Target::Encrypted,
            None => blocks::Target::New,
        };
        Ok(blocks::blocks_to_send(&self.manifest.blocks, self.manifest.image.size_bytes, target)?)
    }

    /// Data blocks of the image a child snapshot takes from its parent: those not sent.
    fn inherited(&self, jobs: &[blocks::BlockJob]) -> u64 {
        if self.parent.is_none() {
            return 0;
        }
        let sent = jobs.iter().filter(|j| matches!(j.source, blocks::Source::Image(_))).count();
        (self.manifest.blocks.data_blocks.len() - sent) as u64
    }

    pub(super) fn volume_gib(&self) -> i64 {
        // At least 1 GiB: EBS has no smaller volume.
        self.manifest.image.size_bytes.div_ceil(GIB).max(1) as i64
    }

    /// Derived from everything that determines the snapshot's content, so a retried
    /// StartSnapshot returns the same snapshot instead of a second one. An upload that starts
    /// over after its snapshot expired names the expired one, so EBS does not answer the new
    /// StartSnapshot with the dead snapshot its token already stands for.
    pub(super) fn client_token(&self, replaces: Option<&str>) -> String {
        let mut h = Sha256::new();
        if let Some(old) = replaces {
            h.update(old.as_bytes());
            h.update([0]);
        }
        h.update(self.manifest.image.sha256.as_bytes());
        h.update([0]);
        h.update(self.parent.as_ref().map(|p| p.1.as_str()).unwrap_or("").as_bytes());
        h.update([0]);
        h.update(if self.settings.encrypted { b"enc" } else { b"raw" });
        h.update(self.settings.kms_key_arn.as_deref().unwrap_or("").as_bytes());
        super::client_token(&h.finalize())
    }

    pub(super) fn resume_state(&self) -> Result<Option<record::UploadState>, PublishError> {
        let path = self.state_path.clone();
        let st = record::read_state(&path)
            .map_err(|e| PublishError::Resume { path: path.clone(), reason: e.to_string() })?;
        match st {
            Some(st) if st.image_sha256 != self.manifest.image.sha256 => Err(PublishError::Resume {
                path,
                reason: format!(
                    "it belongs to image {}, not {}; delete it to start over",
                    st.image_sha256, self.manifest.image.sha256
                ),
            }),
            Some(st) if st.parent_snapshot_id != self.parent.as_ref().map(|p| p.1.clone()) => {
                Err(PublishError::Resume {
                    path,
                    reason:
                        "it was started with a different parent snapshot; pass the same --parent-snapshot, or delete it"
                            .into(),
                })
            }
            other => Ok(other),
        }
    }

    pub(super) async fn plan(&self) -> Result<Plan, PublishError> {
        let jobs = self.jobs()?;
        let ec2 = clients(&self.opts, &self.regions[0]).await.ec2;
        let mut existing = Existing::default();
        for region in &self.regions {
            let ec2r = clients(&self.opts, region).await.ec2;
            if let Some((id, _)) =
                ami::find_existing(&ec2r, &self.opts.retry, &self.name, &self.manifest.image.sha256).await?
            {
                existing.amis.insert(region.clone(), id);
            }
        }
        let resume = self.resume_state()?;
        existing.resumable_snapshot_id = resume.as_ref().map(|s| s.snapshot_id.clone());
        // The snapshot of an interrupted upload is never reused as if complete (a stand-in
        // may already report it `completed`); `--resume` finishes it instead.
        existing.snapshot_id =
            ami::find_snapshot(&ec2, &self.opts.retry, &self.manifest.image.sha256, self.settings.encrypted)
                .await?
                .filter(|s| Some(s) != existing.resumable_snapshot_id.as_ref());
        let acked: std::collections::BTreeSet<u64> = resume.map(|s| s.acked.into_iter().collect()).unwrap_or_default();
        let already = jobs.iter().filter(|j| acked.contains(&j.index)).count() as u64;
        let zero = jobs.iter().filter(|j| j.source == blocks::Source::Zero).count() as u64;
        let need_upload = !existing.amis.contains_key(&self.regions[0]) && existing.snapshot_id.is_none();
        let to_send = if need_upload { jobs.len() as u64 - already } else { 0 };
        let mut calls = Vec::new();
        if need_upload {
            if existing.resumable_snapshot_id.is_some() {
                calls.push(format!("resume snapshot {}", existing.resumable_snapshot_id.as_deref().unwrap_or("")));
            } else {
                calls.push(format!(
                    "ebs:StartSnapshot VolumeSize={} GiB{}",
                    self.volume_gib(),
                    self.parent.as_ref().map(|p| format!(" ParentSnapshotId={}", p.1)).unwrap_or_default()
                ));
            }
            calls.push(format!("ebs:PutSnapshotBlock ×{to_send} (524288 bytes each, SHA-256 per block)"));
            calls.push(format!("ebs:CompleteSnapshot ChangedBlocksCount={} (LINEAR checksum)", jobs.len()));
            calls.push("ec2:DescribeSnapshots until completed".into());
        }
        if !existing.amis.contains_key(&self.regions[0]) {
            calls.push(format!("ec2:RegisterImage {} in {}", self.name, self.regions[0]));
            calls.push(
                "ec2:ModifyImageAttribute launchPermission + ec2:ModifySnapshotAttribute createVolumePermission".into(),
            );
        }
        for r in &self.regions[1..] {
            if existing.amis.contains_key(r) {
                continue;
            }
            match self.delivery(r) {
                (Delivery::Upload, _) => calls.push(format!("its own upload to {r} (see direct_uploads)")),
                (Delivery::Copy, key) => calls.push(format!(
                    "ec2:CopyImage to {r}{}, wait until available, CreateTags, share",
                    match (self.settings.encrypted, key) {
                        (false, _) => String::new(),
                        (true, Some(k)) => format!(" Encrypted KmsKeyId={k}"),
                        (true, None) => " Encrypted (the region's default key)".into(),
                    }
                )),
            }
        }
        Ok(Plan {
            manifest: self.manifest_path.clone(),
            image: self.image_path(),
            ami_name: self.name.clone(),
            source_region: self.regions[0].clone(),
            copy_regions: self.regions_via(Delivery::Copy),
            upload_regions: self.regions_via(Delivery::Upload),
            direct_uploads: Vec::new(),
            volume_gib: self.volume_gib(),
            encrypted: self.settings.encrypted,
            parent_snapshot_id: self.parent.as_ref().map(|p| p.1.clone()),
            data_blocks: self.manifest.blocks.data_blocks.len() as u64,
            blocks_to_send: to_send,
            zero_blocks_to_send: if need_upload { zero } else { 0 },
            bytes_to_send: to_send * EBS_BLOCK_SIZE,
            already_acknowledged: already,
            blocks_inherited: if need_upload { self.inherited(&jobs) } else { 0 },
            notes: self.notes.clone(),
            existing,
            api_calls: calls,
            jobs,
        })
    }
}
