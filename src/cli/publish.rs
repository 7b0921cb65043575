//! `kiln publish`: a built image becomes an EBS snapshot and a registered AMI.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use kiln::aws::RetryPolicy;
use kiln::publish::{self, PublishOptions};

/// Upload a built image as an EBS snapshot and register it as an AMI (no build instance).
///
/// Reads NAME.manifest.json and the raw image beside it, sends exactly the 512 KiB blocks the
/// manifest lists as holding data with the EBS direct APIs, registers the AMI with the
/// recipe's [ami] settings, shares it, copies it to the other regions, and writes
/// NAME.publish.json beside the manifest. Re-running for the same image finds the existing
/// AMI instead of making a duplicate. A region that fails does not undo the others: the record
/// lists it under "failed", and running again finishes it.
///
/// Incremental by default: kiln remembers, in its state directory, the snapshot it last
/// published for each image name and region; publishing a new build of the same name sends
/// only the blocks that changed, on top of that snapshot (--full sends everything). A
/// remembered snapshot that is gone, belongs to another account, or was made with other
/// encryption settings is not used: the upload is then a full one, with a note saying why.
///
/// Credentials and region come from the standard AWS chain (environment, profile, SSO,
/// instance role).
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
kiln publish out/debian-12-minimal-x86_64.manifest.json\n  \
kiln publish --dry-run out/debian-12-minimal-x86_64.manifest.json\n  \
kiln publish --region eu-west-1 --region us-east-1 out/web.manifest.json\n  \
kiln publish out/web.manifest.json   # tomorrow's build: only the changed blocks are sent\n  \
kiln publish --full out/web.manifest.json\n  \
kiln publish --parent-manifest old/web.manifest.json --parent-snapshot snap-0123456789abcdef0 out/web.manifest.json\n  \
kiln publish out/web.manifest.json   # again after a failure or a kill: continues the upload\n  \
kiln publish out/web.manifest.json   # again after a region failed: finishes that region only\n  \
kiln publish --endpoint-url http://127.0.0.1:5000 out/web.manifest.json   # a local stand-in (moto)\n\n\
See docs/publish.md for encryption, incremental uploads and the IAM permissions needed.")]
pub struct Args {
    /// The build manifest (out/NAME.manifest.json); the image is found beside it.
    pub manifest: PathBuf,
    /// Send requests here instead of AWS (also read from AWS_ENDPOINT_URL).
    #[arg(long, value_name = "URL")]
    pub endpoint_url: Option<String>,
    /// Regions to publish to, replacing the recipe's; the first receives the upload, the
    /// others a CopyImage (or their own upload, as the recipe's [ami] regions entry says).
    /// Repeat the flag for more than one.
    #[arg(long = "region", value_name = "REGION")]
    pub regions: Vec<String>,
    /// PutSnapshotBlock requests in flight.
    #[arg(long, value_name = "N", default_value_t = publish::DEFAULT_CONCURRENCY as u16, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrency: u16,
    /// Print what would be sent and created, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Upload every block, even when the last snapshot published for this image name could be
    /// the parent (by default only the blocks that changed since then are sent).
    #[arg(long, conflicts_with = "parent_manifest")]
    pub full: bool,
    /// Overwrite [ami.ssm] parameters even where they name a newer build of this image.
    #[arg(long)]
    pub force: bool,
    /// Where kiln remembers what it published, for incremental uploads
    /// [default: $KILN_STATE_DIR, else $XDG_STATE_HOME/kiln, else ~/.local/state/kiln].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Share what kiln remembers with other runners through S3 (s3://BUCKET/PREFIX): tonight's
    /// publish on any runner builds on last night's snapshot from any other. One publish of an
    /// image name runs at a time (a lease in the bucket); the state directory keeps a copy.
    #[arg(long, env = "KILN_STATE_URL", value_name = "s3://BUCKET/PREFIX")]
    pub state_url: Option<kiln::share::ShareUrl>,
    /// With --state-url: seconds to wait for another runner's publish of the same image name
    /// before giving up.
    #[arg(long, value_name = "SECS", default_value_t = publish::DEFAULT_LEASE_WAIT.as_secs())]
    pub lease_wait: u64,
    /// Incremental upload: the manifest of the image PREV was published from (needs --parent-snapshot).
    #[arg(long, value_name = "PREV.manifest.json", requires = "parent_snapshot")]
    pub parent_manifest: Option<PathBuf>,
    /// Incremental upload: the snapshot published from --parent-manifest; only changed blocks are sent.
    #[arg(long, value_name = "snap-…", requires = "parent_manifest")]
    pub parent_snapshot: Option<String>,
    /// Continue an interrupted upload (NAME.publish-state.json) without resending acknowledged
    /// blocks. This is what every run does when it finds that state; the flag only adds a note
    /// when there is nothing to resume.
    #[arg(long)]
    pub resume: bool,
    /// Keep the uploaded snapshot if registering the AMI fails (default: delete it).
    #[arg(long)]
    pub keep_snapshot: bool,
    /// Minutes the snapshot accepts blocks (and `--resume` works); AWS allows 10 to 4320.
    #[arg(long, value_name = "MIN", default_value_t = publish::DEFAULT_SNAPSHOT_TIMEOUT_MINUTES, value_parser = clap::value_parser!(i32).range(10..=4320))]
    pub snapshot_timeout: i32,
    /// Seconds a region's waits (the snapshot completing, each AMI becoming available, a copy
    /// queued at EC2's concurrent-copy limit) may go on without EC2 reporting progress; each
    /// new state or percentage starts the count again.
    #[arg(long, value_name = "SECS", default_value_t = publish::DEFAULT_WAIT_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    pub wait_timeout: u64,
    /// Seconds each AWS request may take before it is abandoned and retried (the answer is
    /// then taken as lost: retries never make a second snapshot or AMI).
    #[arg(long, value_name = "SECS", default_value_t = kiln::aws::DEFAULT_ATTEMPT_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..=600))]
    pub request_timeout: u64,
    /// Sign the publish statement added to NAME.intoto.jsonl (the snapshot and AMI ids) with
    /// this key: PKCS#8 PEM, Ed25519 or ECDSA P-256, as `kiln build --sign-key` takes.
    #[arg(long, env = "KILN_SIGN_KEY", value_name = "PEM")]
    pub sign_key: Option<PathBuf>,
    /// Print the publish record (or with --dry-run, the plan) as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Also add this publish to a Packer manifest (the manifest post-processor's JSON:
    /// `builds[].artifact_id` = `region:ami-…,…`, `last_run_uuid`), made if missing, so
    /// pipelines that read Packer's output read kiln's.
    #[arg(long, value_name = "FILE")]
    pub packer_manifest: Option<PathBuf>,
}

/// Adds a finished publish to the Packer manifest at `path`.
pub fn write_packer_manifest(path: &std::path::Path, rec: &publish::record::PublishRecord) -> anyhow::Result<()> {
    let b = publish::packer::build(rec, env!("CARGO_PKG_VERSION"), kiln::aws::now());
    publish::packer::append(path, b)?;
    Ok(())
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let opts = PublishOptions {
        endpoint_url: a.endpoint_url,
        regions: a.regions,
        concurrency: usize::from(a.concurrency),
        dry_run: a.dry_run,
        parent_manifest: a.parent_manifest,
        parent_snapshot: a.parent_snapshot,
        state_dir: Some(a.state_dir.unwrap_or_else(publish::history::default_state_dir)),
        state_url: a.state_url,
        lease_wait: Duration::from_secs(a.lease_wait),
        full: a.full,
        force: a.force,
        resume: a.resume,
        keep_snapshot_on_failure: a.keep_snapshot,
        sign_key: a.sign_key.clone(),
        snapshot_timeout_minutes: a.snapshot_timeout,
        wait_timeout: Duration::from_secs(a.wait_timeout),
        retry: RetryPolicy { attempt_timeout: Duration::from_secs(a.request_timeout), ..RetryPolicy::default() },
    };
    let what = || format!("publishing {}", a.manifest.display());
    if a.dry_run {
        let plan = publish::plan(&a.manifest, &opts).with_context(what)?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&plan)?);
            return Ok(());
        }
        println!("plan for {} (dry run: nothing is changed)", plan.manifest.display());
        println!("  image          {}", plan.image.display());
        println!("  AMI name       {}", plan.ami_name);
        println!("  upload region  {}", plan.source_region);
        if !plan.copy_regions.is_empty() {
            println!("  copy to        {}", plan.copy_regions.join(", "));
        }
        for d in &plan.direct_uploads {
            println!(
                "  upload also to {} ({} blocks, {:.1} MiB{})",
                d.source_region,
                d.blocks_to_send,
                d.bytes_to_send as f64 / 1048576.0,
                d.parent_snapshot_id.as_ref().map(|p| format!(", parent {p}")).unwrap_or_default()
            );
        }
        println!(
            "  snapshot       {} GiB{}{}",
            plan.volume_gib,
            if plan.encrypted { ", encrypted" } else { "" },
            plan.parent_snapshot_id.as_ref().map(|p| format!(", parent {p}")).unwrap_or_default()
        );
        println!("  data blocks    {}", plan.data_blocks);
        println!(
            "  to send        {} blocks ({} of them zeros), {:.1} MiB",
            plan.blocks_to_send,
            plan.zero_blocks_to_send,
            plan.bytes_to_send as f64 / 1048576.0
        );
        if plan.blocks_inherited > 0 {
            println!("  inherited      {} blocks unchanged since the parent", plan.blocks_inherited);
        }
        for n in &plan.notes {
            println!("  note           {n}");
        }
        if plan.already_acknowledged > 0 {
            println!("  acknowledged   {} blocks by an interrupted run (skipped)", plan.already_acknowledged);
        }
        for (r, id) in &plan.existing.amis {
            println!("  exists         {id} in {r} (same name and image SHA-256; reused)");
        }
        if let Some(s) = &plan.existing.snapshot_id {
            println!("  exists         snapshot {s} of this image (reused, nothing uploaded)");
        }
        println!("  API calls:");
        for c in &plan.api_calls {
            println!("    {c}");
        }
        return Ok(());
    }
    let progress = super::progress::TermProgress::new(a.json);
    let rec = match publish::publish(&a.manifest, &opts, &progress) {
        Ok(rec) => rec,
        Err(e @ publish::PublishError::Incomplete { .. }) => {
            // The record of what did get published, for pipelines, before the error.
            if a.json {
                if let Ok(text) = std::fs::read_to_string(publish::record::record_path(&a.manifest)) {
                    print!("{text}");
                }
            }
            return Err(e).with_context(what);
        }
        Err(e) => return Err(e).with_context(what),
    };
    if let Some(p) = &a.packer_manifest {
        write_packer_manifest(p, &rec)?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rec)?);
    } else {
        println!(
            "snapshot {} ({} blocks sent, {:.1} MiB{})",
            rec.snapshot_id,
            rec.blocks_sent,
            rec.bytes_sent as f64 / 1048576.0,
            rec.parent_snapshot_id
                .as_ref()
                .map(|p| format!("; {} blocks inherited from {p}", rec.blocks_inherited))
                .unwrap_or_default()
        );
        for r in &rec.amis {
            let how = match (r.reused, r.via, r.region == rec.source_region) {
                (true, _, _) => "  (existing)",
                (false, kiln::ec2::Delivery::Upload, false) => "  (its own upload)",
                _ => "",
            };
            println!("{}  {}{how}", r.region, r.image_id);
        }
        println!("record: {}", publish::record::record_path(&a.manifest).display());
    }
    Ok(())
}
