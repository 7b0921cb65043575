//! Retention: per region, keep the newest N AMIs of an image family, and retire the older ones
//! that nothing still needs. The family is the `kiln:name` tag kiln puts on every AMI it
//! registers or copies (the image name, `debian-12-ec2-x86_64`), so an AMI kiln did not make
//! is never touched, whatever its name.
//!
//! Before an older AMI goes, retention asks whether it is still used: an AMI that a launch
//! template, an SSM parameter, an instance or an Image Builder recipe refers to
//! (DescribeImageReferences), or that was launched within `[ami] keep_if_launched_within`, stays
//! and the report says why; so does one with deregistration protection (`[ami] protect`),
//! unless `--unprotect` asks for it to go. With `[ami] disable_before_delete` an AMI is first
//! disabled (DisableImage: no new launches, undone by EnableImage) and deregistered only once
//! the grace period has passed since (the `kiln:disabled-at` tag). A snapshot still used by
//! any other AMI of the account is kept.
//!
//! What goes is decided by [`decide`] and [`judge`], pure functions of what EC2 answered; then
//! it is carried out in order: every AMI is deregistered before any snapshot is deleted, so a
//! failure half-way never leaves an AMI without its snapshot.

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_ec2::types::ImageState;
use serde::{Deserialize, Serialize};

use super::ami::{TAG_DISABLED_AT, TAG_NAME};
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
    /// EC2's `deregistrationProtection`: `enabled`, `enabled-with-cooldown`, `disabled-until
    /// TIME` (the cooldown still running), or `disabled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protection: Option<String>,
    /// Disabled (DisableImage): no new launches, still registered.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
    /// When kiln disabled it on its way out (`kiln:disabled-at`), RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_at: Option<String>,
    /// When an instance was last launched from it (EC2 reports it a day late), RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_launched: Option<String>,
}

impl Ami {
    /// DeregisterImage would fail: protection is on, or its cooldown still runs.
    pub fn protected(&self) -> bool {
        self.protection.as_deref().is_some_and(|p| p.starts_with("enabled") || p.starts_with("disabled-until"))
    }
}

/// An older AMI that stays, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stay {
    #[serde(flatten)]
    pub ami: Ami,
    pub why: String,
}

/// What retention does in one region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionPrune {
    pub region: String,
    /// The newest N, newest first.
    pub kept: Vec<Ami>,
    /// Older AMIs that stay: referenced, launched lately, protected, or disabled and waiting.
    #[serde(default)]
    pub stayed: Vec<Stay>,
    /// Disabled by this run; deregistered by a prune after the grace period.
    #[serde(default)]
    pub disabled: Vec<Ami>,
    /// Protection removed by this run (`--unprotect`).
    #[serde(default)]
    pub unprotected: Vec<String>,
    pub deregistered: Vec<Ami>,
    pub snapshots_deleted: Vec<String>,
    /// Snapshots of deregistered AMIs that another AMI still uses.
    pub snapshots_kept: Vec<String>,
}

/// How older AMIs are retired (the recipe's `[ami]` settings, and `kiln prune --unprotect`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retire {
    pub keep_if_launched_within_days: Option<u32>,
    pub disable_before_delete_days: Option<u32>,
    /// Remove deregistration protection from the AMIs that go.
    pub unprotect: bool,
}

impl Retire {
    pub fn from_settings(s: &crate::manifest::AmiSettings, unprotect: bool) -> Retire {
        Retire {
            keep_if_launched_within_days: s.keep_if_launched_within_days,
            disable_before_delete_days: s.disable_before_delete_days,
            unprotect,
        }
    }
}

/// The newest `keep` of the family (by creation date, then id, so the choice is the same on
/// every run), and the older ones, newest first.
pub fn decide(mut family: Vec<Ami>, keep: usize) -> (Vec<Ami>, Vec<Ami>) {
    family.sort_by(|a, b| b.creation_date.cmp(&a.creation_date).then_with(|| b.image_id.cmp(&a.image_id)));
    let older = family.split_off(keep.min(family.len()));
    (family, older)
}

/// What happens to each older AMI.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdicts {
    pub stay: Vec<Stay>,
    pub unprotect: Vec<Ami>,
    pub disable: Vec<Ami>,
    pub deregister: Vec<Ami>,
}

const DAY: i64 = 86_400;

fn rfc3339(s: &str) -> Option<i64> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok().map(|t| t.unix_timestamp())
}

fn day_of(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .map(|t| format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day()))
        .unwrap_or_default()
}

/// Whether each older AMI stays (and why) or goes, and how: a pure function of what EC2 said
/// (`references`: image id → what refers to it) and the time `now`. What production may still
/// use is asked first, protection next, the grace period last.
pub fn judge(older: Vec<Ami>, references: &BTreeMap<String, Vec<String>>, r: &Retire, now: i64) -> Verdicts {
    let mut v = Verdicts::default();
    for ami in older {
        if let Some(refs) = references.get(&ami.image_id).filter(|x| !x.is_empty()) {
            let more = if refs.len() > 3 { format!(" and {} more", refs.len() - 3) } else { String::new() };
            let why = format!("still referenced by {}{more}", refs[..refs.len().min(3)].join(", "));
            v.stay.push(Stay { ami, why });
            continue;
        }
        if let (Some(days), Some(at)) = (r.keep_if_launched_within_days, ami.last_launched.as_deref().and_then(rfc3339))
        {
            if now - at < i64::from(days) * DAY {
                let why = format!("launched on {} (keep_if_launched_within = \"{days}d\")", day_of(at));
                v.stay.push(Stay { ami, why });
                continue;
            }
        }
        if ami.protected() {
            let cooling = ami.protection.as_deref().is_some_and(|p| p.starts_with("disabled-until"));
            if cooling || !r.unprotect {
                let why = if cooling {
                    format!("deregistration protection is cooling down ({})", ami.protection.as_deref().unwrap_or(""))
                } else {
                    "deregistration protection is on (`kiln prune --unprotect` removes it)".to_string()
                };
                v.stay.push(Stay { ami, why });
                continue;
            }
            v.unprotect.push(ami.clone());
            // Protection with a cooldown lasts a day after it is removed: the next prune
            // deregisters. Without one, this run can.
            if ami.protection.as_deref() == Some("enabled-with-cooldown") {
                let why = "deregistration protection removed; its 24-hour cooldown runs first".to_string();
                v.stay.push(Stay { ami, why });
                continue;
            }
        }
        match r.disable_before_delete_days {
            None => v.deregister.push(ami),
            Some(days) => match ami.disabled_at.as_deref().and_then(rfc3339).filter(|_| ami.disabled) {
                Some(at) if now - at >= i64::from(days) * DAY => v.deregister.push(ami),
                Some(at) => {
                    let why = format!(
                        "disabled on {}; deregistered after {} (disable_before_delete = \"{days}d\")",
                        day_of(at),
                        day_of(at + i64::from(days) * DAY)
                    );
                    v.stay.push(Stay { ami, why });
                }
                None => v.disable.push(ami),
            },
        }
    }
    v
}

/// Which snapshots of the deregistered AMIs go: those no other AMI of the account uses.
fn snapshots(deregister: &[Ami], all: &[Ami]) -> (Vec<String>, Vec<String>) {
    let going: BTreeSet<&str> = deregister.iter().map(|a| a.image_id.as_str()).collect();
    let in_use: BTreeSet<&str> = all
        .iter()
        .filter(|a| !going.contains(a.image_id.as_str()))
        .flat_map(|a| a.snapshot_ids.iter().map(String::as_str))
        .collect();
    let (mut deleted, mut kept) = (BTreeSet::new(), BTreeSet::new());
    for s in deregister.iter().flat_map(|a| &a.snapshot_ids) {
        if in_use.contains(s.as_str()) {
            kept.insert(s.clone());
        } else {
            deleted.insert(s.clone());
        }
    }
    (deleted.into_iter().collect(), kept.into_iter().collect())
}

/// [`prune`] for the command line: synchronous, on a runtime of its own.
pub fn run(
    family: &str,
    keep: usize,
    regions: &[String],
    retire: &Retire,
    opts: &PublishOptions,
) -> Result<Vec<RegionPrune>, PublishError> {
    super::runtime()?.block_on(prune(family, keep, regions, retire, opts))
}

/// Keeps the newest `keep` AMIs of `family` in each region and retires the rest as `retire`
/// says (with `opts.dry_run`, only says what would happen). Regions are done one after the
/// other; a region that fails stops the run with its error, and a re-run finishes the job.
pub async fn prune(
    family: &str,
    keep: usize,
    regions: &[String],
    retire: &Retire,
    opts: &PublishOptions,
) -> Result<Vec<RegionPrune>, PublishError> {
    let mut out = Vec::new();
    for region in regions {
        let ec2 = clients(opts, region).await.ec2;
        // One listing serves both: the family is the AMIs carrying its tag, and every AMI's
        // snapshots (disabled ones too) count as in use.
        let listed = describe(&ec2, opts).await?;
        let ours = listed.iter().filter(|(_, f)| f.as_deref() == Some(family)).map(|(a, _)| a.clone()).collect();
        let all: Vec<Ami> = listed.into_iter().map(|(a, _)| a).collect();
        let (kept, older) = decide(ours, keep);
        let references = references(&ec2, opts, &older).await?;
        let now = crate::aws::now();
        let v = judge(older, &references, retire, now);
        let (snapshots_deleted, snapshots_kept) = snapshots(&v.deregister, &all);
        if !opts.dry_run {
            carry_out(&ec2, opts, &v, &snapshots_deleted, now).await?;
        }
        out.push(RegionPrune {
            region: region.clone(),
            kept,
            stayed: v.stay,
            disabled: v.disable,
            unprotected: v.unprotect.into_iter().map(|a| a.image_id).collect(),
            deregistered: v.deregister,
            snapshots_deleted,
            snapshots_kept,
        });
    }
    Ok(out)
}

/// Ignores the error that says the work is already done (a retry after a lost answer, a re-run
/// after a failure, or a change by hand).
fn done_already<T>(r: Result<T, crate::aws::AwsError>, codes: &[&str]) -> Result<(), PublishError> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if e.code().is_some_and(|c| codes.contains(&c)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn carry_out(
    ec2: &aws_sdk_ec2::Client,
    opts: &PublishOptions,
    v: &Verdicts,
    snapshots_deleted: &[String],
    now: i64,
) -> Result<(), PublishError> {
    let p = &opts.retry;
    for a in &v.unprotect {
        let r = with_retry(p, "DisableImageDeregistrationProtection", || {
            ec2.disable_image_deregistration_protection().image_id(&a.image_id).send()
        })
        .await;
        done_already(r, &["InvalidAMIID.NotFound"])?;
    }
    let stamp = time::OffsetDateTime::from_unix_timestamp(now)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default();
    for a in &v.disable {
        // The stamp first: an AMI found disabled without one is stamped on the next run, so
        // the grace period never starts before the AMI was really disabled.
        let tag = aws_sdk_ec2::types::Tag::builder().key(TAG_DISABLED_AT).value(&stamp).build();
        with_retry(p, "CreateTags", || ec2.create_tags().resources(&a.image_id).tags(tag.clone()).send()).await?;
        if !a.disabled {
            let r = with_retry(p, "DisableImage", || ec2.disable_image().image_id(&a.image_id).send()).await;
            done_already(r, &["InvalidAMIID.Disabled"])?;
        }
    }
    for a in &v.deregister {
        let r = with_retry(p, "DeregisterImage", || ec2.deregister_image().image_id(&a.image_id).send()).await;
        done_already(r, &["InvalidAMIID.NotFound", "InvalidAMIID.Unavailable"])?;
    }
    for s in snapshots_deleted {
        let r = with_retry(p, "DeleteSnapshot", || ec2.delete_snapshot().snapshot_id(s).send()).await;
        done_already(r, &["InvalidSnapshot.NotFound"])?;
    }
    Ok(())
}

/// What refers to each of `amis` (launch templates, SSM parameters, instances, Image Builder
/// recipes), as `TYPE ARN`.
async fn references(
    ec2: &aws_sdk_ec2::Client,
    opts: &PublishOptions,
    amis: &[Ami],
) -> Result<BTreeMap<String, Vec<String>>, PublishError> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // Asked in small groups: the call takes a list, and a short one keeps each answer small.
    for chunk in amis.chunks(20) {
        let ids: Vec<String> = chunk.iter().map(|a| a.image_id.clone()).collect();
        let mut token: Option<String> = None;
        loop {
            let page = with_retry(&opts.retry, "DescribeImageReferences", || {
                ec2.describe_image_references()
                    .set_image_ids(Some(ids.clone()))
                    .include_all_resource_types(true)
                    .set_next_token(token.clone())
                    .send()
            })
            .await?;
            for r in page.image_references() {
                if let Some(id) = r.image_id() {
                    let what = r.resource_type().map(|t| t.as_str().to_string()).unwrap_or_default();
                    out.entry(id.to_string()).or_default().push(format!("{what} {}", r.arn().unwrap_or("")));
                }
            }
            token = page.next_token().filter(|t| !t.is_empty()).map(str::to_string);
            if token.is_none() {
                break;
            }
        }
    }
    Ok(out)
}

/// The account's own AMIs in this region (disabled ones included), each with the kiln family
/// its `kiln:name` tag names.
async fn describe(
    ec2: &aws_sdk_ec2::Client,
    opts: &PublishOptions,
) -> Result<Vec<(Ami, Option<String>)>, PublishError> {
    let mut amis = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = with_retry(&opts.retry, "DescribeImages", || {
            ec2.describe_images().owners("self").include_disabled(true).set_next_token(token.clone()).send()
        })
        .await?;
        for i in page.images() {
            if i.state() == Some(&ImageState::Deregistered) {
                continue;
            }
            let tag =
                |k: &str| i.tags().iter().find(|t| t.key() == Some(k)).and_then(|t| t.value()).map(str::to_string);
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
                protection: i.deregistration_protection().map(str::to_string),
                disabled: i.state() == Some(&ImageState::Disabled),
                disabled_at: tag(TAG_DISABLED_AT),
                last_launched: i.last_launched_time().map(str::to_string),
            };
            amis.push((ami, tag(TAG_NAME)));
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
            protection: None,
            disabled: false,
            disabled_at: None,
            last_launched: None,
        }
    }

    fn ids(v: &[Ami]) -> Vec<String> {
        v.iter().map(|a| a.image_id.clone()).collect()
    }

    const NOW: i64 = 1_796_601_600; // 2026-12-07T00:00:00Z

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
        let (kept, older) = decide(family, 2);
        assert_eq!(ids(&kept), ["ami-4", "ami-3"]);
        let v = judge(older, &BTreeMap::new(), &Retire::default(), NOW);
        assert_eq!(ids(&v.deregister), ["ami-2", "ami-1"]);
        assert_eq!(
            snapshots(&v.deregister, &all),
            (vec!["snap-1".into(), "snap-2".into()], vec!["snap-shared".into()])
        );
    }

    #[test]
    fn nothing_goes_when_the_family_is_small_and_ties_are_stable() {
        let family = vec![ami("ami-a", "2026-12-01T00:00:00.000Z", &["snap-a"])];
        assert!(decide(family, 3).1.is_empty());
        let same = vec![ami("ami-a", "2026-12-01T00:00:00.000Z", &[]), ami("ami-b", "2026-12-01T00:00:00.000Z", &[])];
        assert_eq!(decide(same.clone(), 1).0[0].image_id, "ami-b");
        assert_eq!(decide(same.into_iter().rev().collect(), 1).0[0].image_id, "ami-b");
    }

    #[test]
    fn a_snapshot_two_going_amis_share_is_deleted_once() {
        let family = vec![
            ami("ami-1", "2026-12-01T00:00:00.000Z", &["snap-x"]),
            ami("ami-2", "2026-12-02T00:00:00.000Z", &["snap-x"]),
        ];
        assert_eq!(snapshots(&family, &family), (vec!["snap-x".into()], vec![]));
    }

    /// The three: one a launch template uses, one launched two days ago, one unused;
    /// and one protected. Only the unused one goes, and each other says why.
    #[test]
    fn referenced_recently_launched_and_protected_amis_stay_and_say_why() {
        let referenced = ami("ami-ref", "2026-11-01T00:00:00Z", &[]);
        let mut launched = ami("ami-launched", "2026-11-02T00:00:00Z", &[]);
        launched.last_launched = Some("2026-12-05T10:00:00Z".into());
        let mut long_ago = ami("ami-old-launch", "2026-11-03T00:00:00Z", &[]);
        long_ago.last_launched = Some("2026-09-01T00:00:00Z".into());
        let mut protected = ami("ami-protected", "2026-11-04T00:00:00Z", &[]);
        protected.protection = Some("enabled".into());
        let unused = ami("ami-unused", "2026-11-05T00:00:00Z", &[]);
        let refs = BTreeMap::from([(
            "ami-ref".to_string(),
            vec!["ec2:LaunchTemplate arn:aws:ec2:us-east-1:123456789012:launch-template/lt-0abc".to_string()],
        )]);
        let r = Retire { keep_if_launched_within_days: Some(30), ..Retire::default() };
        let older = vec![referenced, launched, long_ago, protected.clone(), unused];
        let v = judge(older.clone(), &refs, &r, NOW);
        assert_eq!(ids(&v.deregister), ["ami-old-launch", "ami-unused"]);
        let why: BTreeMap<&str, &str> = v.stay.iter().map(|s| (s.ami.image_id.as_str(), s.why.as_str())).collect();
        assert!(why["ami-ref"].contains("launch-template/lt-0abc"), "{why:?}");
        assert!(why["ami-launched"].contains("2026-12-05") && why["ami-launched"].contains("30d"), "{why:?}");
        assert!(why["ami-protected"].contains("--unprotect"), "{why:?}");
        // --unprotect lets the protected one go; with a cooldown it waits for the next run.
        let un = Retire { unprotect: true, ..r.clone() };
        let v = judge(vec![protected.clone()], &refs, &un, NOW);
        assert_eq!(
            (ids(&v.unprotect), ids(&v.deregister)),
            (vec!["ami-protected".to_string()], vec!["ami-protected".to_string()])
        );
        let mut cool = protected.clone();
        cool.protection = Some("enabled-with-cooldown".into());
        let v = judge(vec![cool.clone()], &refs, &un, NOW);
        assert!(v.deregister.is_empty() && v.unprotect.len() == 1 && v.stay.len() == 1);
        cool.protection = Some("disabled-until 2026-12-08T00:00:00Z".into());
        let v = judge(vec![cool], &refs, &un, NOW);
        assert!(v.deregister.is_empty() && v.unprotect.is_empty() && v.stay[0].why.contains("cooling down"));
        // Without a window, a recent launch does not keep an AMI.
        let v = judge(older, &refs, &Retire::default(), NOW);
        assert_eq!(ids(&v.deregister), ["ami-launched", "ami-old-launch", "ami-unused"]);
    }

    #[test]
    fn with_a_grace_period_an_ami_is_disabled_first_and_deregistered_once_it_has_passed() {
        let r = Retire { disable_before_delete_days: Some(7), ..Retire::default() };
        let fresh = ami("ami-1", "2026-11-01T00:00:00Z", &["snap-1"]);
        let v = judge(vec![fresh.clone()], &BTreeMap::new(), &r, NOW);
        assert_eq!((ids(&v.disable), v.deregister.len()), (vec!["ami-1".to_string()], 0));
        let mut waiting = fresh.clone();
        waiting.disabled = true;
        waiting.disabled_at = Some("2026-12-03T00:00:00Z".into());
        let v = judge(vec![waiting.clone()], &BTreeMap::new(), &r, NOW);
        assert!(v.disable.is_empty() && v.deregister.is_empty());
        assert!(v.stay[0].why.contains("2026-12-03") && v.stay[0].why.contains("2026-12-10"), "{:?}", v.stay);
        waiting.disabled_at = Some("2026-11-30T00:00:00Z".into());
        assert_eq!(ids(&judge(vec![waiting.clone()], &BTreeMap::new(), &r, NOW).deregister), ["ami-1"]);
        // Disabled by someone else, without kiln's stamp: stamped now, not deregistered.
        waiting.disabled_at = None;
        assert_eq!(ids(&judge(vec![waiting], &BTreeMap::new(), &r, NOW).disable), ["ami-1"]);
        // A stamp on an AMI that was enabled again (the mistake undone) starts over.
        let mut enabled = fresh;
        enabled.disabled_at = Some("2026-11-01T00:00:00Z".into());
        assert_eq!(ids(&judge(vec![enabled], &BTreeMap::new(), &r, NOW).disable), ["ami-1"]);
    }
}
