//! Releases that cannot be lost by accident: deregistration protection on every AMI and copy,
//! a prune that asks whether an AMI is still used before it retires one (and disables before
//! it deregisters), lineage tags and time-based copies. Judges: the requests counted at the
//! proxy in front of moto (every one checked against botocore's service models when the proxy
//! is dropped), and what EC2 then holds. The proxy answers what moto lacks
//! (DescribeImageReferences, deregistration protection, DisableImage, lastLaunchedTime) and
//! refuses, as EC2 does, to deregister a protected AMI.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::common;
use crate::moto::{fake_aws_env, Mode, Moto, Proxy};
use crate::publish::{block_bytes, publish_remembering, rt, sdk_conf, settings, write_image};

/// The test image's AMI settings with these `[ami]` fields set (in the manifest's form).
fn with(regions: &[&str], fields: Value) -> kiln::manifest::AmiSettings {
    let mut j = serde_json::to_value(settings(regions)).unwrap();
    for (k, v) in fields.as_object().unwrap() {
        j[k] = v.clone();
    }
    serde_json::from_value(j).unwrap()
}

/// Build `n` of the test image (its blocks salted by `n`), as an image and its manifest.
fn image(n: u8, ami: kiln::manifest::AmiSettings) -> (tempfile::TempDir, PathBuf) {
    let dir = common::tempdir();
    let data: BTreeMap<u64, Vec<u8>> = [0u64, 3].iter().map(|&i| (i, block_bytes(i, 40 + n))).collect();
    let m = write_image(dir.path(), "img", 8, &data, ami);
    (dir, m)
}

fn ami_of(record: &Value, region: &str) -> (String, String) {
    let a = record["amis"].as_array().unwrap().iter().find(|a| a["region"] == region).unwrap();
    (a["image_id"].as_str().unwrap().to_string(), a["snapshot_id"].as_str().unwrap().to_string())
}

fn prune(proxy: &Proxy, manifest: &Path, extra: &[&str]) -> Value {
    let mut c = common::kiln();
    fake_aws_env(&mut c)
        .args(["prune", "--json", "--keep", "1", "--endpoint-url", &proxy.url()])
        .args(extra)
        .arg(manifest);
    let o = c.output().unwrap();
    assert!(o.status.success(), "kiln prune failed:\n{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice::<Value>(&o.stdout).unwrap()[0].clone()
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|a| a["image_id"].as_str().unwrap().to_string()).collect()
}

fn rfc3339(secs_ago: i64) -> String {
    let t = time::OffsetDateTime::now_utc() - time::Duration::seconds(secs_ago);
    t.format(&time::format_description::well_known::Rfc3339).unwrap()
}

/// Four old AMIs of one image and a new one, `keep = 1`: one a launch template refers to, one
/// launched two days ago (`keep_if_launched_within = 30d`), one protected (published with
/// `protect = true`) and one unused. Prune disables only the unused one
/// (`disable_before_delete = 7d`), says why each other stays, and deregisters it (deleting its
/// snapshot) only once its `kiln:disabled-at` is eight days old. `--unprotect` removes the
/// protection and starts the protected one's retirement. No DeregisterImage ever names the
/// protected AMI, and the one a launch template uses is never disabled.
#[test]
fn prune_asks_whether_an_ami_is_used_and_disables_before_it_deregisters() {
    let Some(moto) = Moto::start() else { return };
    let proxy = Proxy::start(moto.port, Mode::Pass);
    let state = common::tempdir();
    let retire = serde_json::json!({ "keep_if_launched_within_days": 30, "disable_before_delete_days": 7 });
    let mut records = Vec::new();
    let mut dirs = Vec::new();
    for n in 0..5u8 {
        let mut fields = retire.clone();
        if n == 2 {
            fields["protect"] = "enabled".into();
        }
        let (dir, m) = image(n, with(&["us-east-1"], fields));
        records.push(publish_remembering(&proxy, &m, state.path(), &["--full"]).0);
        dirs.push((dir, m));
        // Creation dates have whole seconds: keep the publishes apart.
        std::thread::sleep(Duration::from_millis(1100));
    }
    let amis: Vec<(String, String)> = records.iter().map(|r| ami_of(r, "us-east-1")).collect();
    let [referenced, launched, protected, unused, newest] = [0, 1, 2, 3, 4].map(|i| amis[i].0.clone());
    assert_eq!(proxy.image(&protected).protection.as_deref(), Some("enabled"), "publish protected the AMI");
    let template = "arn:aws:ec2:us-east-1:123456789012:launch-template/lt-0123456789abcdef0";
    proxy.set_image(&referenced, |e| e.references = vec![("ec2:LaunchTemplate".into(), template.into())]);
    proxy.set_image(&launched, |e| e.last_launched = Some(rfc3339(2 * 86_400)));
    // Launched long ago counts for nothing.
    proxy.set_image(&unused, |e| e.last_launched = Some(rfc3339(90 * 86_400)));
    let manifest = &dirs[4].1;

    proxy.clear();
    let first = prune(&proxy, manifest, &[]);
    assert_eq!(ids(&first["kept"]), [newest.as_str()]);
    assert_eq!(ids(&first["disabled"]), [unused.as_str()], "{first}");
    assert!(first["deregistered"].as_array().unwrap().is_empty(), "{first}");
    let why: BTreeMap<String, String> = first["stayed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["image_id"].as_str().unwrap().to_string(), s["why"].as_str().unwrap().to_string()))
        .collect();
    assert!(why[&referenced].contains(template), "{why:?}");
    assert!(why[&launched].contains("launched on") && why[&launched].contains("30d"), "{why:?}");
    assert!(why[&protected].contains("protection"), "{why:?}");
    assert_eq!(why.len(), 3, "{why:?}");
    assert!(proxy.image(&unused).disabled && !proxy.image(&referenced).disabled);
    let sent = |action: &str| -> Vec<String> {
        proxy
            .requests()
            .iter()
            .filter(|r| r.action() == action && !r.faulted)
            .filter_map(|r| r.form().get("ImageId").cloned())
            .collect()
    };
    assert_eq!(sent("DisableImage"), [unused.as_str()]);
    assert!(sent("DeregisterImage").is_empty());
    let refs =
        proxy.requests().into_iter().find(|r| r.action() == "DescribeImageReferences").expect("references asked");
    assert_eq!(refs.form().get("IncludeAllResourceTypes").map(String::as_str), Some("true"));

    // A week later nothing changed; eight days after the stamp the unused AMI goes.
    let again = prune(&proxy, manifest, &[]);
    assert_eq!(again["stayed"].as_array().unwrap().len(), 4, "{again}");
    assert!(again["stayed"].to_string().contains("deregistered after"), "{again}");
    let ec2 = aws_sdk_ec2::Client::new(&sdk_conf(&moto.url(), "us-east-1"));
    let stamp = aws_sdk_ec2::types::Tag::builder().key("kiln:disabled-at").value(rfc3339(8 * 86_400)).build();
    rt().block_on(ec2.create_tags().resources(&unused).tags(stamp).send()).unwrap();
    proxy.clear();
    let later = prune(&proxy, manifest, &[]);
    assert_eq!(ids(&later["deregistered"]), [unused.as_str()], "{later}");
    assert_eq!(later["snapshots_deleted"], serde_json::json!([amis[3].1]));
    assert_eq!(sent("DeregisterImage"), [unused.as_str()]);

    // --unprotect: the protected AMI loses its protection and starts its retirement.
    proxy.clear();
    let unprotected = prune(&proxy, manifest, &["--unprotect"]);
    assert_eq!(unprotected["unprotected"], serde_json::json!([protected]));
    assert_eq!(ids(&unprotected["disabled"]), [protected.as_str()], "{unprotected}");
    assert_eq!(sent("DisableImageDeregistrationProtection"), [protected.as_str()]);
    assert!(!sent("DeregisterImage").contains(&protected));
    // The AMIs production uses were never touched.
    assert!(!proxy.image(&referenced).disabled && !proxy.image(&launched).disabled);
}

/// What a pipeline built around Packer does with `packer-manifest.json`: the build of the last
/// run, its `artifact_id` split into `region:ami` pairs.
const PACKER_READER: &str = r#"
import json, sys
m = json.load(open(sys.argv[1]))
build = [b for b in m["builds"] if b["packer_run_uuid"] == m["last_run_uuid"]][-1]
assert build["builder_type"] == "amazon-ebs"
print(json.dumps(dict(pair.split(":", 1) for pair in build["artifact_id"].split(","))))
"#;

/// A copy carries everything the source AMI has: tags (with lineage: the kiln version and,
/// for an incremental publish, the parent snapshot), launch permissions, deprecation and
/// protection (with its cooldown), and it is a time-based copy (`copy_within = "30m"`). Both
/// publishes land in a Packer manifest (`--packer-manifest`) that a script reading only
/// Packer's format understands.
#[test]
fn a_copy_carries_tags_permissions_deprecation_protection_and_lineage() {
    let Some(moto) = Moto::start() else { return };
    let proxy = Proxy::start(moto.port, Mode::Pass);
    let state = common::tempdir();
    let regions = ["us-east-1", "eu-west-1"];
    let fields =
        serde_json::json!({ "protect": "enabled-with-cooldown", "copy_within_minutes": 30, "deprecate_after": "90d" });
    let packer = state.path().join("packer-manifest.json");
    let packer_arg = ["--packer-manifest", packer.to_str().unwrap()];
    let (_d0, m0) = image(0, with(&regions, fields.clone()));
    let (first, _) = publish_remembering(&proxy, &m0, state.path(), &packer_arg);
    std::thread::sleep(Duration::from_millis(1100));
    proxy.clear();
    let (_d1, m1) = image(1, with(&regions, fields));
    let (second, _) = publish_remembering(&proxy, &m1, state.path(), &packer_arg);
    // A script that knows only Packer's manifest post-processor finds the newest run's AMIs.
    let o = std::process::Command::new("python3").arg("-c").arg(PACKER_READER).arg(&packer).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let found: BTreeMap<String, String> = serde_json::from_slice(&o.stdout).unwrap();
    let want: BTreeMap<String, String> = regions.iter().map(|r| (r.to_string(), ami_of(&second, r).0)).collect();
    assert_eq!(found, want);
    let m: Value = serde_json::from_slice(&std::fs::read(&packer).unwrap()).unwrap();
    assert_eq!(m["builds"].as_array().unwrap().len(), 2, "each publish adds a build: {m}");
    assert_eq!(m["builds"][1]["custom_data"]["image_sha256"], second["image_sha256"]);
    let parent = ami_of(&first, "us-east-1").1;
    let copy = proxy.requests().into_iter().find(|r| r.action() == "CopyImage").expect("a copy");
    assert_eq!(copy.form().get("SnapshotCopyCompletionDurationMinutes").map(String::as_str), Some("30"));
    // The kiln that built the image, as its manifest says (`write_image` writes "test").
    let version = "test";
    for region in regions {
        let (id, snap) = ami_of(&second, region);
        let extra = proxy.image(&id);
        assert_eq!(extra.protection.as_deref(), Some("enabled-with-cooldown"), "{region} {id}");
        let reqs: Vec<_> = proxy.requests().into_iter().filter(|r| r.form().get("ImageId") == Some(&id)).collect();
        let did = |action: &str| reqs.iter().any(|r| r.action() == action);
        assert!(did("EnableImageDeprecation") && did("ModifyImageAttribute"), "{region} {id}: deprecation and sharing");
        assert!(
            reqs.iter().any(|r| r.action() == "EnableImageDeregistrationProtection"
                && r.form().get("WithCooldown").map(String::as_str) == Some("true")),
            "{region} {id}"
        );
        let ec2 = aws_sdk_ec2::Client::new(&sdk_conf(&moto.url(), region));
        let described = rt().block_on(ec2.describe_images().image_ids(&id).send()).unwrap();
        let tags: BTreeMap<String, String> = described.images()[0]
            .tags()
            .iter()
            .map(|t| (t.key().unwrap().to_string(), t.value().unwrap().to_string()))
            .collect();
        assert_eq!(tags.get("kiln:version").map(String::as_str), Some(version), "{region} {tags:?}");
        assert_eq!(tags.get("kiln:parent-snapshot"), Some(&parent), "{region} {tags:?}");
        assert_eq!(tags.get("team").map(String::as_str), Some("platform"));
        if !snap.is_empty() {
            let s = rt().block_on(ec2.describe_snapshots().snapshot_ids(&snap).send()).unwrap();
            let stags: Vec<&str> = s.snapshots()[0].tags().iter().filter_map(|t| t.key()).collect();
            assert!(stags.contains(&"kiln:version") && stags.contains(&"kiln:image-sha256"), "{region} {stags:?}");
        }
    }
}

/// Build `n` of the test image with SOURCE_DATE_EPOCH `epoch` (a later build is newer).
fn dated(n: u8, epoch: i64, ami: kiln::manifest::AmiSettings) -> (tempfile::TempDir, PathBuf) {
    let (dir, m) = image(n, ami);
    let mut v: Value = serde_json::from_slice(&std::fs::read(&m).unwrap()).unwrap();
    v["source_date_epoch"] = epoch.into();
    std::fs::write(&m, serde_json::to_vec(&v).unwrap()).unwrap();
    (dir, m)
}

fn pointer_cmd(proxy: &Proxy, verb: &str, target: &Path, extra: &[&str]) -> std::process::Output {
    let mut c = common::kiln();
    fake_aws_env(&mut c).args([verb, "--json", "--endpoint-url", &proxy.url()]).args(extra).arg(target);
    c.output().unwrap()
}

fn pointer(moto: &Moto, region: &str, name: &str) -> Option<String> {
    let ssm = aws_sdk_ssm::Client::new(&sdk_conf(&moto.url(), region));
    rt().block_on(ssm.get_parameter().name(name).send()).ok().and_then(|o| o.parameter()?.value().map(str::to_string))
}

/// `kiln promote` moves the pointer only when the build's AMI is available in every region of
/// the recipe: a build published to one region of two is refused and nothing moves. It never
/// moves the pointer to an older build without --force. `kiln rollback` restores the value
/// before the last promotion from the parameter's history, and refuses when there is none. A
/// parameter naming one build (`{sha}`) is written once.
#[test]
fn promote_needs_every_region_never_goes_backwards_and_rollback_restores() {
    let Some(moto) = Moto::start() else { return };
    let proxy = Proxy::start(moto.port, Mode::Pass);
    let state = common::tempdir();
    let regions = ["us-east-1", "eu-west-1"];
    let fields =
        serde_json::json!({ "ssm_promote": ["/golden/{name}/latest"], "ssm_parameters": ["/golden/{name}/{sha}"] });
    let latest = "/golden/img/latest";
    let (_da, a) = dated(0, 1_700_000_000, with(&regions, fields.clone()));
    let (rec_a, _) = publish_remembering(&proxy, &a, state.path(), &[]);
    assert!(pointer(&moto, "us-east-1", latest).is_none(), "a publish does not move the pointer");
    let o = pointer_cmd(&proxy, "promote", &a, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for r in regions {
        assert_eq!(pointer(&moto, r, latest), Some(ami_of(&rec_a, r).0), "{r}");
    }

    // Build B reaches one region only: promote refuses, and nothing moves anywhere.
    let (_db, b) = dated(1, 1_700_086_400, with(&regions, fields.clone()));
    publish_remembering(&proxy, &b, state.path(), &["--region", "us-east-1"]);
    let o = pointer_cmd(&proxy, "promote", &b, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("eu-west-1") && err.contains("nothing was promoted"), "{err}");
    assert_eq!(pointer(&moto, "us-east-1", latest), Some(ami_of(&rec_a, "us-east-1").0));
    let (rec_b, _) = publish_remembering(&proxy, &b, state.path(), &[]);
    let o = pointer_cmd(&proxy, "promote", &b, &["--require-test"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("kiln test"));
    let o = pointer_cmd(&proxy, "promote", &b, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let moves: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(moves.as_array().unwrap().len(), 2);
    for r in regions {
        assert_eq!(pointer(&moto, r, latest), Some(ami_of(&rec_b, r).0), "{r}");
    }

    // Promoting the older build is refused; --force moves it.
    let o = pointer_cmd(&proxy, "promote", &a, &[]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("newer build"));
    assert_eq!(pointer(&moto, "eu-west-1", latest), Some(ami_of(&rec_b, "eu-west-1").0));

    // Rollback: back to A in both regions, from SSM's history; a second has nowhere to go.
    let o = pointer_cmd(&proxy, "rollback", &b, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for r in regions {
        assert_eq!(pointer(&moto, r, latest), Some(ami_of(&rec_a, r).0), "{r}");
    }
    let o = pointer_cmd(&proxy, "rollback", &b, &[]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("no earlier promotion"));
    let o = pointer_cmd(&proxy, "promote", &b, &[]);
    assert!(o.status.success());
    // Pinning the older build by its AMI id (the copies found by name and SHA-256): refused
    // without --force, done with it, in both regions.
    let ami_a = ami_of(&rec_a, "us-east-1").0;
    let by_id = |extra: &[&str]| {
        let mut c = common::kiln();
        fake_aws_env(&mut c)
            .args(["promote", "--json", "--endpoint-url", &proxy.url(), &ami_a, "--manifest"])
            .arg(&b)
            .args(extra);
        c.output().unwrap()
    };
    let o = by_id(&[]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("newer build"));
    let o = by_id(&["--force"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for r in regions {
        assert_eq!(pointer(&moto, r, latest), Some(ami_of(&rec_a, r).0), "{r}");
    }

    // The per-build parameter is written once: changed by hand, a publish leaves it alone.
    let sha = rec_a["image_sha256"].as_str().unwrap();
    let versioned = format!("/golden/img/{}", &sha[..12]);
    assert_eq!(pointer(&moto, "us-east-1", &versioned), Some(ami_of(&rec_a, "us-east-1").0));
    let ssm = aws_sdk_ssm::Client::new(&sdk_conf(&moto.url(), "us-east-1"));
    let pinned = ami_of(&rec_b, "us-east-1").0;
    rt().block_on(
        ssm.put_parameter().name(&versioned).value(&pinned).data_type("aws:ec2:image").overwrite(true).send(),
    )
    .unwrap();
    let (_, err) = publish_remembering(&proxy, &a, state.path(), &[]);
    assert!(err.contains("written once"), "{err}");
    assert_eq!(pointer(&moto, "us-east-1", &versioned), Some(pinned));
}

/// What a release sequence leaves: the pointer (by build), and each build's AMI: there,
/// protected, disabled.
#[derive(Debug, PartialEq, Eq)]
struct EndState {
    pointer: Option<usize>,
    amis: Vec<(bool, Option<String>, bool)>,
}

/// Four builds; build 0 protected. Promote 1, then 3; roll back (to 1); a launch template
/// refers to build 1 (as the pointer would make EC2 report); prune keeps 1 with a grace
/// period, so build 2 is disabled, then (its stamp aged) deregistered; --unprotect then starts
/// build 0's retirement.
fn release_sequence(mode: Mode) -> (EndState, usize) {
    let moto = Moto::start().expect("moto");
    let proxy = Proxy::start(moto.port, mode);
    let state = common::tempdir();
    let mut builds = Vec::new();
    let mut records = Vec::new();
    for n in 0..4u8 {
        let mut fields =
            serde_json::json!({ "ssm_promote": ["/golden/{name}/latest"], "disable_before_delete_days": 7 });
        if n == 0 {
            fields["protect"] = "enabled".into();
        }
        let (d, m) = dated(n, 1_700_000_000 + i64::from(n) * 86_400, with(&["us-east-1"], fields));
        records.push(publish_remembering(&proxy, &m, state.path(), &["--full"]).0);
        builds.push((d, m));
        std::thread::sleep(Duration::from_millis(1100));
    }
    let ok = |o: std::process::Output| assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    ok(pointer_cmd(&proxy, "promote", &builds[1].1, &[]));
    ok(pointer_cmd(&proxy, "promote", &builds[3].1, &[]));
    ok(pointer_cmd(&proxy, "rollback", &builds[3].1, &[]));
    let ids: Vec<String> = records.iter().map(|r| ami_of(r, "us-east-1").0).collect();
    let arn = "arn:aws:ec2:us-east-1:123456789012:launch-template/lt-0123456789abcdef0";
    proxy.set_image(&ids[1], |e| e.references = vec![("ec2:LaunchTemplate".into(), arn.into())]);
    let manifest = &builds[3].1;
    prune(&proxy, manifest, &[]);
    let ec2 = aws_sdk_ec2::Client::new(&sdk_conf(&moto.url(), "us-east-1"));
    let stamp = aws_sdk_ec2::types::Tag::builder().key("kiln:disabled-at").value(rfc3339(8 * 86_400)).build();
    rt().block_on(ec2.create_tags().resources(&ids[2]).tags(stamp).send()).unwrap();
    prune(&proxy, manifest, &[]);
    prune(&proxy, manifest, &["--unprotect"]);
    let faulted = proxy.requests().iter().filter(|r| r.faulted).count();
    let deregistered_protected =
        proxy.requests().iter().any(|r| r.action() == "DeregisterImage" && r.form().get("ImageId") == Some(&ids[0]));
    assert!(!deregistered_protected, "a protected AMI was sent DeregisterImage");
    let described = rt().block_on(ec2.describe_images().owners("self").send()).unwrap();
    let alive: Vec<String> = described.images().iter().filter_map(|i| i.image_id().map(str::to_string)).collect();
    let amis = ids
        .iter()
        .map(|id| {
            let e = proxy.image(id);
            (alive.contains(id), e.protection, e.disabled)
        })
        .collect();
    let value = pointer(&moto, "us-east-1", "/golden/img/latest");
    (EndState { pointer: value.and_then(|v| ids.iter().position(|i| *i == v)), amis }, faulted)
}

/// The release sequence through the proxy that drops or fails 35 % of requests ends exactly
/// as it does without faults: retries and idempotent steps, no step done twice or skipped.
#[test]
fn promote_rollback_prune_and_protection_ride_out_faults() {
    if Moto::start().is_none() {
        return;
    }
    let (clean, none) = release_sequence(Mode::Pass);
    assert_eq!(none, 0);
    assert_eq!(clean.pointer, Some(1), "{clean:?}");
    let expect = vec![
        (true, Some("disabled".to_string()), true), // protection removed, disabled, waiting
        (true, None, false),                        // the launch template's: untouched
        (false, None, true),                        // disabled, then deregistered
        (true, None, false),                        // the newest
    ];
    assert_eq!(clean.amis, expect, "{clean:?}");
    let (faulty, faulted) = release_sequence(Mode::Faults { seed: 29, percent: 35 });
    assert!(faulted >= 10, "only {faulted} requests faulted: the test would prove nothing");
    assert_eq!(faulty, clean);
}
