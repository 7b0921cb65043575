//! Promotion and rollback of the SSM pointers consumers launch from (`[ami.ssm] promote`,
//! `/golden/{name}/{arch}/latest`). A publish never moves them; `kiln promote` does, once the
//! build's AMI exists and is available in every region of the recipe (and, when asked, once
//! `kiln test` of the same image passed, as its manifest records). `kiln rollback` moves each
//! pointer back to the AMI it named before the last promotion, read from the parameter's own
//! history (GetParameterHistory), so no state outside SSM is needed and any runner can roll
//! back.
//!
//! Each write says what it was in the parameter's description (`kiln promote NAME` or `kiln
//! rollback`), and the history is read as a stack: a promotion pushes, a rollback pops. Rolling
//! back twice goes back two promotions, not back and forth.

use serde::{Deserialize, Serialize};

use super::ami::TAG_IMAGE_SHA;
use super::record::PublishRecord;
use super::ssm::{newer_build, parameter_name};
use super::{clients, Clients, PublishError, PublishOptions};
use crate::aws::with_retry;
use crate::manifest::Manifest;

/// One pointer in one region, as a promote or rollback left it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub region: String,
    pub name: String,
    /// What it named before; None when it did not exist.
    pub from: Option<String>,
    pub to: String,
    /// False when it already named `to`.
    pub written: bool,
}

const PROMOTE: &str = "kiln promote";
const ROLLBACK: &str = "kiln rollback";

/// The build a promotion moves the pointers to.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub ami_name: String,
    pub image_sha256: String,
    pub source_date_epoch: i64,
    /// Region → AMI id, where the build is known to be.
    pub amis: std::collections::BTreeMap<String, String>,
    /// What its manifest records of `kiln test`; None when it is not known (an AMI named by id
    /// whose manifest is not at hand).
    pub test_passed: Option<bool>,
}

/// A published build, named by its manifest or publish record: the manifest (which names the
/// pointers) and the build as its record says.
pub fn load(target: &std::path::Path) -> Result<(Manifest, Candidate), PublishError> {
    let files = crate::outputs::Outputs::of(target);
    let manifest = Manifest::load(&files.manifest())?;
    let path = files.publish_record();
    let text = std::fs::read(&path).map_err(|e| {
        PublishError::Refused(format!(
            "{}: {e}; `kiln publish {}` first: only a published build can be promoted",
            path.display(),
            files.manifest().display()
        ))
    })?;
    let record: PublishRecord = serde_json::from_slice(&text)
        .map_err(|e| PublishError::Refused(format!("{}: not a publish record: {e}", path.display())))?;
    if record.image_sha256 != manifest.image.sha256 {
        return Err(PublishError::Refused(format!(
            "{} describes another image than {} (image SHA-256 {} vs {})",
            path.display(),
            files.manifest().display(),
            record.image_sha256,
            manifest.image.sha256
        )));
    }
    let candidate = Candidate {
        ami_name: record.ami_name.clone(),
        image_sha256: manifest.image.sha256.clone(),
        source_date_epoch: manifest.source_date_epoch,
        amis: record.amis.iter().map(|a| (a.region.clone(), a.image_id.clone())).collect(),
        test_passed: Some(manifest.test_result.as_ref().is_some_and(|t| t.passed)),
    };
    Ok((manifest, candidate))
}

/// A build named by its AMI id in `region`, which must be a build of `manifest`'s image (its
/// `kiln:name` tag); its copies elsewhere are found by name and image SHA-256, as a publish
/// finds them.
pub async fn candidate_of_ami(
    manifest: &Manifest,
    image_id: &str,
    regions: &[String],
    opts: &PublishOptions,
) -> Result<Candidate, PublishError> {
    let first = regions.first().ok_or_else(|| PublishError::Refused("no region".into()))?;
    let ec2 = clients(opts, first).await.ec2;
    let out = with_retry(&opts.retry, "DescribeImages", || ec2.describe_images().image_ids(image_id).send())
        .await
        .map_err(|e| PublishError::Refused(format!("{image_id} in {first}: {e}")))?;
    let image = out.images().first().ok_or_else(|| PublishError::Refused(format!("{image_id} is not in {first}")))?;
    let tag = |k: &str| image.tags().iter().find(|t| t.key() == Some(k)).and_then(|t| t.value()).map(str::to_string);
    if tag(super::ami::TAG_NAME).as_deref() != Some(manifest.name.as_str()) {
        return Err(PublishError::Refused(format!(
            "{image_id} is not a build of {} (its kiln:name tag is {:?}); nothing was promoted",
            manifest.name,
            tag(super::ami::TAG_NAME)
        )));
    }
    let sha =
        tag(TAG_IMAGE_SHA).ok_or_else(|| PublishError::Refused(format!("{image_id} has no {TAG_IMAGE_SHA} tag")))?;
    let epoch = tag(super::ami::TAG_SOURCE_DATE_EPOCH).and_then(|e| e.parse().ok()).unwrap_or(0);
    let ami_name = image.name().unwrap_or_default().to_string();
    let mut amis = std::collections::BTreeMap::from([(first.clone(), image_id.to_string())]);
    for region in &regions[1..] {
        let ec2 = clients(opts, region).await.ec2;
        if let Some((id, _)) = super::ami::find_existing(&ec2, &opts.retry, &ami_name, &sha).await? {
            amis.insert(region.clone(), id);
        }
    }
    let test_passed = (manifest.image.sha256 == sha).then(|| manifest.test_result.as_ref().is_some_and(|t| t.passed));
    Ok(Candidate { ami_name, image_sha256: sha, source_date_epoch: epoch, amis, test_passed })
}

fn pointers(manifest: &Manifest) -> Result<(&[String], Vec<String>), PublishError> {
    let ami =
        manifest.ami.as_ref().ok_or_else(|| PublishError::Refused("the manifest has no [ami] settings".into()))?;
    if ami.ssm_promote.is_empty() {
        return Err(PublishError::Refused(
            "nothing to promote: the recipe's [ami.ssm] has no `promote` pointers (like \"/golden/{name}/{arch}/latest\")"
                .into(),
        ));
    }
    Ok((&ami.ssm_promote, ami.regions.clone()))
}

/// What `kiln promote` names: a published build (its manifest or record), or an AMI id with
/// a manifest of the same image.
#[derive(Debug, Clone)]
pub enum Target {
    Build(std::path::PathBuf),
    Ami { image_id: String, manifest: std::path::PathBuf },
}

pub fn promote_sync(target: &Target, opts: &PublishOptions, require_test: bool) -> Result<Vec<Move>, PublishError> {
    super::runtime()?.block_on(async {
        let (manifest, candidate) = match target {
            Target::Build(p) => load(p)?,
            Target::Ami { image_id, manifest } => {
                let m = Manifest::load(manifest)?;
                let regions = if opts.regions.is_empty() { pointers(&m)?.1 } else { opts.regions.clone() };
                let c = candidate_of_ami(&m, image_id, &regions, opts).await?;
                (m, c)
            }
        };
        promote(&manifest, &candidate, opts, require_test).await
    })
}

pub fn rollback_sync(target: &std::path::Path, opts: &PublishOptions) -> Result<Vec<Move>, PublishError> {
    super::runtime()?.block_on(rollback(target, opts))
}

/// Moves every pointer of `manifest`'s image in every region of the recipe (or
/// `opts.regions`) to the candidate's AMI there. Everything is checked before anything is
/// written: each region's AMI exists, is `available` and carries the candidate's SHA-256; the
/// test passed when `require_test`; no pointer names a newer build of the image (unless
/// `opts.force`).
pub async fn promote(
    manifest: &Manifest,
    candidate: &Candidate,
    opts: &PublishOptions,
    require_test: bool,
) -> Result<Vec<Move>, PublishError> {
    let (templates, recipe_regions) = pointers(manifest)?;
    let regions = if opts.regions.is_empty() { recipe_regions } else { opts.regions.clone() };
    if require_test && candidate.test_passed != Some(true) {
        return Err(PublishError::Refused(format!(
            "--require-test: {} has no passed `kiln test` on record (run `kiln build --test`, or `kiln test` on the image, and promote its manifest)",
            candidate.ami_name
        )));
    }
    let mut plan = Vec::new();
    for region in &regions {
        let Some(image_id) = candidate.amis.get(region) else {
            return Err(PublishError::Refused(format!(
                "{} is not in {region}: the publish did not reach it (run `kiln publish` again to finish it); nothing was promoted",
                candidate.ami_name
            )));
        };
        let Clients { ec2, ssm, .. } = clients(opts, region).await;
        let out = match with_retry(&opts.retry, "DescribeImages", || ec2.describe_images().image_ids(image_id).send())
            .await
        {
            Ok(o) => o,
            Err(e) if e.code().is_some_and(|c| c.starts_with("InvalidAMIID")) => {
                return Err(PublishError::Refused(format!(
                    "{image_id} no longer exists in {region}; nothing was promoted"
                )))
            }
            Err(e) => return Err(e.into()),
        };
        let image = out.images().first();
        let state = image.and_then(|i| i.state()).map(|s| s.as_str().to_string());
        if state.as_deref() != Some("available") {
            return Err(PublishError::Refused(format!(
                "{image_id} in {region} is {}, not available; nothing was promoted",
                state.as_deref().unwrap_or("missing")
            )));
        }
        let sha = image.and_then(|i| i.tags().iter().find(|t| t.key() == Some(TAG_IMAGE_SHA))).and_then(|t| t.value());
        if sha != Some(candidate.image_sha256.as_str()) {
            return Err(PublishError::Refused(format!(
                "{image_id} in {region} is not tagged {TAG_IMAGE_SHA}={}: not this build's AMI; nothing was promoted",
                candidate.image_sha256
            )));
        }
        for t in templates {
            let name = parameter_name(t, manifest, region);
            let current = get(&ssm, opts, &name).await?;
            if let (Some(cur), false) = (&current, opts.force) {
                if cur != image_id {
                    let newer = newer_build(&ec2, opts, cur, &manifest.name, candidate.source_date_epoch).await?;
                    if let Some(epoch) = newer {
                        return Err(PublishError::Refused(format!(
                            "{name} in {region} names {cur}, a newer build of {} (SOURCE_DATE_EPOCH {epoch}, this one {}); \
                             `kiln rollback` moves it back, --force moves it to this build; nothing was promoted",
                            manifest.name, candidate.source_date_epoch
                        )));
                    }
                }
            }
            plan.push((region.clone(), name, current, image_id.clone()));
        }
    }
    let mut moves = Vec::new();
    for (region, name, from, to) in plan {
        let written = from.as_deref() != Some(to.as_str());
        if written {
            let ssm = clients(opts, &region).await.ssm;
            put(&ssm, opts, &name, &to, &format!("{PROMOTE} {}", candidate.ami_name)).await?;
        }
        moves.push(Move { region, name, from, to, written });
    }
    Ok(moves)
}

/// Moves every pointer back to what it named before the last promotion.
pub async fn rollback(target: &std::path::Path, opts: &PublishOptions) -> Result<Vec<Move>, PublishError> {
    let files = crate::outputs::Outputs::of(target);
    let manifest = Manifest::load(&files.manifest())?;
    let (templates, recipe_regions) = pointers(&manifest)?;
    let regions = if opts.regions.is_empty() { recipe_regions } else { opts.regions.clone() };
    let mut plan = Vec::new();
    for region in &regions {
        let Clients { ssm, ec2, .. } = clients(opts, region).await;
        for t in templates {
            let name = parameter_name(t, &manifest, region);
            let history = history(&ssm, opts, &name).await?;
            let stack = promoted(&history);
            let (Some(current), Some(previous)) = (history.last().map(|h| h.0.clone()), stack.iter().rev().nth(1))
            else {
                return Err(PublishError::Refused(format!(
                    "{name} in {region} has no earlier promotion to go back to; nothing was rolled back"
                )));
            };
            let exists = with_retry(&opts.retry, "DescribeImages", || ec2.describe_images().image_ids(previous).send())
                .await
                .ok()
                .and_then(|o| o.images().first().and_then(|i| i.state()).map(|s| s.as_str() == "available"))
                .unwrap_or(false);
            if !exists {
                return Err(PublishError::Refused(format!(
                    "{name} in {region} would go back to {previous}, which is no longer available; nothing was rolled back"
                )));
            }
            plan.push((region.clone(), name, current, previous.clone()));
        }
    }
    let mut moves = Vec::new();
    for (region, name, from, to) in plan {
        let ssm = clients(opts, &region).await.ssm;
        put(&ssm, opts, &name, &to, &format!("{ROLLBACK} from {from}")).await?;
        moves.push(Move { region, name, from: Some(from), to, written: true });
    }
    Ok(moves)
}

/// The promoted values still in force, oldest first: a write by `kiln rollback` undoes the
/// promotion before it; any other write (a promotion, or a change by hand) pushes.
pub fn promoted(history: &[(String, String)]) -> Vec<String> {
    let mut stack: Vec<String> = Vec::new();
    for (value, description) in history {
        if description.starts_with(ROLLBACK) {
            stack.pop();
            // What the rollback wrote is the new top (the stack may have been shorter than the
            // history, when it began before kiln).
            if stack.last() != Some(value) {
                stack.push(value.clone());
            }
        } else if stack.last() != Some(value) {
            stack.push(value.clone());
        }
    }
    stack
}

async fn get(ssm: &aws_sdk_ssm::Client, opts: &PublishOptions, name: &str) -> Result<Option<String>, PublishError> {
    match with_retry(&opts.retry, "GetParameter", || ssm.get_parameter().name(name).send()).await {
        Ok(o) => Ok(o.parameter().and_then(|p| p.value()).map(str::to_string)),
        Err(e) if e.code() == Some("ParameterNotFound") => Ok(None),
        Err(e) => Err(e.into()),
    }
}

async fn put(
    ssm: &aws_sdk_ssm::Client,
    opts: &PublishOptions,
    name: &str,
    value: &str,
    description: &str,
) -> Result<(), PublishError> {
    with_retry(&opts.retry, "PutParameter", || {
        ssm.put_parameter()
            .name(name)
            .value(value)
            .description(description)
            .r#type(aws_sdk_ssm::types::ParameterType::String)
            .data_type("aws:ec2:image")
            .overwrite(true)
            .send()
    })
    .await?;
    Ok(())
}

/// Every version of the parameter, oldest first, as (value, description).
async fn history(
    ssm: &aws_sdk_ssm::Client,
    opts: &PublishOptions,
    name: &str,
) -> Result<Vec<(String, String)>, PublishError> {
    let mut out: Vec<(i64, String, String)> = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = match with_retry(&opts.retry, "GetParameterHistory", || {
            ssm.get_parameter_history().name(name).max_results(50).set_next_token(token.clone()).send()
        })
        .await
        {
            Ok(p) => p,
            Err(e) if e.code() == Some("ParameterNotFound") => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        for p in page.parameters() {
            out.push((
                p.version(),
                p.value().unwrap_or_default().to_string(),
                p.description().unwrap_or_default().to_string(),
            ));
        }
        token = page.next_token().filter(|t| !t.is_empty()).map(str::to_string);
        if token.is_none() {
            break;
        }
    }
    out.sort_by_key(|v| v.0);
    Ok(out.into_iter().map(|(_, v, d)| (v, d)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn a_rollback_pops_the_last_promotion_and_two_go_back_two() {
        let p = |d: &str| format!("{PROMOTE} {d}");
        let (a, b, c) = ("ami-a", "ami-b", "ami-c");
        let hist = h(&[(a, &p("1")), (b, &p("2")), (c, &p("3"))]);
        assert_eq!(promoted(&hist), [a, b, c]);
        let mut once = hist.clone();
        once.push((b.into(), format!("{ROLLBACK} from {c}")));
        assert_eq!(promoted(&once), [a, b]);
        let mut twice = once.clone();
        twice.push((a.into(), format!("{ROLLBACK} from {b}")));
        assert_eq!(promoted(&twice), [a]);
        // Promoting again after a rollback pushes; the same value twice is one entry.
        twice.push((c.into(), p("3")));
        twice.push((c.into(), p("3")));
        assert_eq!(promoted(&twice), [a, c]);
        // A value set by hand counts as a promotion.
        assert_eq!(promoted(&h(&[(a, ""), (b, &p("2"))])), [a, b]);
    }
}
