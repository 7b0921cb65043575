//! SSM Parameter Store: the names consumers look an AMI up by (`/golden/debian-12/x86_64/latest`),
//! set in each region to that region's AMI id with the `aws:ec2:image` data type, once the AMI
//! is `available` (the caller waited for it).
//!
//! A parameter that already names a newer build of the same image (kiln's `kiln:name` tag, a
//! later `kiln:source-date-epoch`) is left alone unless forced: re-publishing an old build must
//! not roll consumers back.

use serde::{Deserialize, Serialize};

use super::ami::{expand_name, TAG_NAME, TAG_SOURCE_DATE_EPOCH};
use super::{clients, Clients, PublishError, PublishOptions, RegionImage};
use crate::aws::with_retry;
use crate::manifest::Manifest;
use crate::progress::Progress;

/// One parameter in one region, as this publish left it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parameter {
    pub region: String,
    pub name: String,
    /// The AMI id the parameter holds now.
    pub value: String,
    /// False when it already held this AMI, or holds a newer build that was kept.
    pub written: bool,
}

/// The parameter name for one region: the recipe's template with `{region}` and the AMI name's
/// placeholders filled in.
pub fn parameter_name(template: &str, manifest: &Manifest, region: &str) -> String {
    expand_name(&template.replace("{region}", region), manifest)
}

/// Sets every parameter of `templates` in every region of `amis`.
pub async fn set_parameters(
    templates: &[String],
    manifest: &Manifest,
    amis: &[RegionImage],
    opts: &PublishOptions,
    force: bool,
    progress: &dyn Progress,
    notes: &mut Vec<String>,
) -> Result<Vec<Parameter>, PublishError> {
    let mut out = Vec::new();
    for ami in amis {
        let Clients { ssm, ec2, .. } = clients(opts, &ami.region).await;
        for template in templates {
            let name = parameter_name(template, manifest, &ami.region);
            let current = match with_retry(&opts.retry, "GetParameter", || ssm.get_parameter().name(&name).send()).await
            {
                Ok(o) => o.parameter().and_then(|p| p.value()).map(str::to_string),
                Err(e) if e.code() == Some("ParameterNotFound") => None,
                Err(e) => return Err(e.into()),
            };
            if current.as_deref() == Some(ami.image_id.as_str()) {
                out.push(Parameter { region: ami.region.clone(), name, value: ami.image_id.clone(), written: false });
                continue;
            }
            // A parameter that names one build (`{date}`, `{sha}`) is written once: what a
            // consumer pinned to it stays what it was.
            if let (Some(cur), false, true) = (&current, force, versioned(template)) {
                let note = format!(
                    "{name} in {} kept at {cur}: a parameter naming one build is written once; --force overwrites it",
                    ami.region
                );
                progress.note(&note);
                notes.push(note);
                out.push(Parameter { region: ami.region.clone(), name, value: cur.clone(), written: false });
                continue;
            }
            if let (Some(cur), false) = (&current, force) {
                if let Some(epoch) = newer_build(&ec2, opts, cur, &manifest.name, manifest.source_date_epoch).await? {
                    let note = format!(
                        "{name} in {} kept at {cur}: it names a newer build of {} (SOURCE_DATE_EPOCH {epoch}, this one {}); --force overwrites it",
                        ami.region, manifest.name, manifest.source_date_epoch
                    );
                    progress.note(&note);
                    notes.push(note);
                    out.push(Parameter { region: ami.region.clone(), name, value: cur.clone(), written: false });
                    continue;
                }
            }
            with_retry(&opts.retry, "PutParameter", || {
                ssm.put_parameter()
                    .name(&name)
                    .value(&ami.image_id)
                    .r#type(aws_sdk_ssm::types::ParameterType::String)
                    .data_type("aws:ec2:image")
                    .overwrite(true)
                    .send()
            })
            .await?;
            progress.note(&format!("{name} in {} = {}", ami.region, ami.image_id));
            out.push(Parameter { region: ami.region.clone(), name, value: ami.image_id.clone(), written: true });
        }
    }
    Ok(out)
}

/// A template naming one build: its value is never meant to change.
pub fn versioned(template: &str) -> bool {
    template.contains("{date}") || template.contains("{sha}")
}

/// The SOURCE_DATE_EPOCH of `image_id` when it is a build of image `family` later than
/// `epoch`; None for anything else (another image, an AMI kiln did not make, one that is gone).
pub(super) async fn newer_build(
    ec2: &aws_sdk_ec2::Client,
    opts: &PublishOptions,
    image_id: &str,
    family: &str,
    epoch: i64,
) -> Result<Option<i64>, PublishError> {
    let out = match with_retry(&opts.retry, "DescribeImages", || ec2.describe_images().image_ids(image_id).send()).await
    {
        Ok(o) => o,
        Err(e) if e.code().is_some_and(|c| c.starts_with("InvalidAMIID")) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let Some(image) = out.images().first() else { return Ok(None) };
    let tag = |k: &str| image.tags().iter().find(|t| t.key() == Some(k)).and_then(|t| t.value());
    if tag(TAG_NAME) != Some(family) {
        return Ok(None);
    }
    Ok(tag(TAG_SOURCE_DATE_EPOCH).and_then(|e| e.parse::<i64>().ok()).filter(|&e| e > epoch))
}
