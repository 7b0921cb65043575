//! Retention: per region, keep the newest N AMIs of an image family and deregister the older
//! ones with their snapshots. The family is the `kiln:name` tag kiln puts on every AMI it
//! registers or copies (the image name, `debian-12-ec2-x86_64`), so an AMI kiln did not make
//! is never touched, whatever its name. A snapshot still used by any other AMI of the account
//! (a hand-made AMI registered from it, say) is kept.
//!
//! What goes is decided by [`decide`], a pure function of what DescribeImages returned; then
//! it is carried out in order: every AMI is deregistered before any snapshot is deleted, so a
//! failure half-way never leaves an AMI without its snapshot.

use std::collections::BTreeSet;

use aws_sdk_ec2::types::ImageState;
use serde::{Deserialize, Serialize};

use super::ami::TAG_NAME;
use super::{clients, PublishError, PublishOptions};
use crate::aws::with_retry;

/// An AMI as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ami {
    pub image_id: String,
    pub name: String,
    /// RFC 3339, as EC2 reports it: sorts by time.
    pub creation_date: String,
    pub snapshot_ids: Vec<String>,
}

/// What retention does in one region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionPrune {
    pub region: String,
    /// Newest first.
    pub kept: Vec<Ami>,
    pub deregistered: Vec<Ami>,
    pub snapshots_deleted: Vec<String>,
    /// Snapshots of deregistered AMIs that another AMI still uses.
    pub snapshots_kept: Vec<String>,
}

/// Which of the family's AMIs go (all but the `keep` newest: by creation date, then id, so
/// the choice is the same on every run) and which of their snapshots with them: those no
/// other AMI of the account uses.
pub fn decide(region: &str, mut family: Vec<Ami>, keep: usize, all: &[Ami]) -> RegionPrune {
    family.sort_by(|a, b| b.creation_date.cmp(&a.creation_date).then_with(|| b.image_id.cmp(&a.image_id)));
    let gone = family.split_off(keep.min(family.len()));
    let going: BTreeSet<&str> = gone.iter().map(|a| a.image_id.as_str()).collect();
    let in_use: BTreeSet<&str> = all
        .iter()
        .filter(|a| !going.contains(a.image_id.as_str()))
        .flat_map(|a| a.snapshot_ids.iter().map(String::as_str))
        .collect();
    let mut deleted = BTreeSet::new();
    let mut kept = BTreeSet::new();
    for s in gone.iter().flat_map(|a| &a.snapshot_ids) {
        if in_use.contains(s.as_str()) {
            kept.insert(s.clone());
        } else {
            deleted.insert(s.clone());
        }
    }
    RegionPrune {
        region: region.to_string(),
        kept: family,
        deregistered: gone,
        snapshots_deleted: deleted.into_iter().collect(),
        snapshots_kept: kept.into_iter().collect(),
    }
}

/// [`prune`] for the command line: synchronous, on a runtime of its own.
pub fn run(
    family: &str,
    keep: usize,
    regions: &[String],
    opts: &PublishOptions,
) -> Result<Vec<RegionPrune>, PublishError> {
    super::runtime()?.block_on(prune(family, keep, regions, opts))
}

/// Keeps the newest `keep` AMIs of `family` in each region and removes the rest (with
/// `opts.dry_run`, only says what would go). Regions are done one after the other; a region
/// that fails stops the run with its error, and a re-run finishes the job.
pub async fn prune(
    family: &str,
    keep: usize,
    regions: &[String],
    opts: &PublishOptions,
) -> Result<Vec<RegionPrune>, PublishError> {
    let mut out = Vec::new();
    for region in regions {
        let ec2 = clients(opts, region).await.ec2;
        // One listing serves both: the family is the AMIs carrying its tag, and every AMI's
        // snapshots count as in use.
        let listed = describe(&ec2, opts).await?;
        let ours = listed.iter().filter(|(_, f)| f.as_deref() == Some(family)).map(|(a, _)| a.clone()).collect();
        let all: Vec<Ami> = listed.into_iter().map(|(a, _)| a).collect();
        let plan = decide(region, ours, keep, &all);
        if !opts.dry_run {
            for a in &plan.deregistered {
                with_retry(&opts.retry, "DeregisterImage", || ec2.deregister_image().image_id(&a.image_id).send())
                    .await?;
            }
            for s in &plan.snapshots_deleted {
                match with_retry(&opts.retry, "DeleteSnapshot", || ec2.delete_snapshot().snapshot_id(s).send()).await {
                    Ok(_) => {}
                    // Gone already (a re-run after a failure, or removed by hand): the goal.
                    Err(e) if e.code() == Some("InvalidSnapshot.NotFound") => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        out.push(plan);
    }
    Ok(out)
}

/// The account's own AMIs in this region, each with the kiln family its `kiln:name` tag names.
async fn describe(
    ec2: &aws_sdk_ec2::Client,
    opts: &PublishOptions,
) -> Result<Vec<(Ami, Option<String>)>, PublishError> {
    let mut amis = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = with_retry(&opts.retry, "DescribeImages", || {
            ec2.describe_images().owners("self").set_next_token(token.clone()).send()
        })
        .await?;
        for i in page.images() {
            if i.state() == Some(&ImageState::Deregistered) {
                continue;
            }
            let family =
                i.tags().iter().find(|t| t.key() == Some(TAG_NAME)).and_then(|t| t.value()).map(str::to_string);
            let ami = Ami {
                image_id: i.image_id().unwrap_or_default().to_string(),
                name: i.name().unwrap_or_default().to_string(),
                creation_date: i.creation_date().unwrap_or_default().to_string(),
                snapshot_ids: i
                    .block_device_mappings()
                    .iter()
                    .filter_map(|b| b.ebs().and_then(|e| e.snapshot_id()))
                    .map(str::to_string)
                    .collect(),
            };
            amis.push((ami, family));
        }
        token = page.next_token().filter(|t| !t.is_empty()).map(str::to_string);
        if token.is_none() {
            return Ok(amis);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ami(id: &str, date: &str, snaps: &[&str]) -> Ami {
        Ami {
            image_id: id.into(),
            name: format!("web-{id}"),
            creation_date: date.into(),
            snapshot_ids: snaps.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn the_newest_are_kept_and_only_unshared_snapshots_go() {
        let family = vec![
            ami("ami-1", "2026-12-01T00:00:00.000Z", &["snap-1"]),
            ami("ami-3", "2026-12-03T00:00:00.000Z", &["snap-3"]),
            ami("ami-2", "2026-12-02T00:00:00.000Z", &["snap-2", "snap-shared"]),
            ami("ami-4", "2026-12-04T00:00:00.000Z", &["snap-4"]),
        ];
        // A hand-made AMI (no kiln tag, not in the family) registered from snap-shared.
        let mut all = family.clone();
        all.push(ami("ami-manual", "2026-11-01T00:00:00.000Z", &["snap-shared"]));
        let p = decide("us-east-1", family, 2, &all);
        let ids = |v: &[Ami]| v.iter().map(|a| a.image_id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&p.kept), ["ami-4", "ami-3"]);
        assert_eq!(ids(&p.deregistered), ["ami-2", "ami-1"]);
        assert_eq!(p.snapshots_deleted, ["snap-1", "snap-2"]);
        assert_eq!(p.snapshots_kept, ["snap-shared"]);
    }

    #[test]
    fn nothing_goes_when_the_family_is_small_and_ties_are_stable() {
        let family = vec![ami("ami-a", "2026-12-01T00:00:00.000Z", &["snap-a"])];
        let p = decide("r", family.clone(), 3, &family);
        assert!(p.deregistered.is_empty() && p.snapshots_deleted.is_empty());
        let same = vec![ami("ami-a", "2026-12-01T00:00:00.000Z", &[]), ami("ami-b", "2026-12-01T00:00:00.000Z", &[])];
        let p = decide("r", same.clone(), 1, &same);
        assert_eq!(p.kept[0].image_id, "ami-b");
        let q = decide("r", same.into_iter().rev().collect(), 1, &[]);
        assert_eq!(q.kept[0].image_id, "ami-b");
    }

    #[test]
    fn a_snapshot_two_going_amis_share_is_deleted_once() {
        let family = vec![
            ami("ami-1", "2026-12-01T00:00:00.000Z", &["snap-x"]),
            ami("ami-2", "2026-12-02T00:00:00.000Z", &["snap-x"]),
            ami("ami-3", "2026-12-03T00:00:00.000Z", &["snap-3"]),
        ];
        let p = decide("r", family.clone(), 1, &family);
        assert_eq!(p.snapshots_deleted, ["snap-x"]);
        assert!(p.snapshots_kept.is_empty());
    }
}
