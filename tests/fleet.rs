//! A fleet of CI runners sharing staged bases and publish history through S3 (moto's S3 here,
//! conditional writes included): each "runner" is a kiln process with its own local cache and
//! state directory, and they share only a bucket prefix.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::bundle::{get_object, s3_client};
use crate::common::{kiln, tempdir, tool};
use crate::moto::{fake_aws_env, Moto};

const EPOCH: &str = "1700000000";
const BUCKET: &str = "kiln-fleet";

fn root_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// One runner's `kiln build` of the minimal recipe with `cache` as its local cache and
/// `url` as the shared one.
fn runner_build(moto: &Moto, cache: &Path, out: &Path, url: &str) -> Command {
    let mut c = kiln();
    c.arg("build")
        .arg(root_dir().join("recipes/debian-12-minimal.toml"))
        .arg("--out")
        .arg(out)
        .arg("--json")
        .env("KILN_CACHE_DIR", cache)
        .env("KILN_CACHE_URL", url)
        .env("SOURCE_DATE_EPOCH", EPOCH);
    fake_aws_env(&mut c).env("AWS_ENDPOINT_URL", moto.url());
    c
}

fn summary(o: &Output) -> Value {
    assert!(o.status.success(), "kiln build failed:\n{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("--json prints one JSON object")
}

/// A PATH whose `mmdebstrap` records that it ran and fails: a runner that must not stage.
fn path_without_staging(dir: &Path) -> (String, PathBuf) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let marker = dir.join("mmdebstrap-ran");
    let fake = bin.join("mmdebstrap");
    std::fs::write(&fake, format!("#!/bin/sh\ntouch {}\nexit 1\n", marker.display())).unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    (format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default()), marker)
}

/// Every object key under `prefix`.
fn keys(rt: &tokio::runtime::Runtime, s3: &aws_sdk_s3::Client, prefix: &str) -> Vec<String> {
    let r = rt.block_on(s3.list_objects_v2().bucket(BUCKET).prefix(prefix).send()).unwrap();
    let mut v: Vec<String> = r.contents().iter().filter_map(|o| o.key().map(String::from)).collect();
    v.sort();
    v
}

/// Runner A has the base (staged here or before, in the shared test cache) and shares it;
/// runner B, with an empty cache and an mmdebstrap that fails, builds the same bytes from the
/// shared copy. A flipped byte in the shared base is caught: runner C stages afresh (the same
/// bytes again, the epoch being fixed) and repairs the shared copy, which runner D then uses.
#[test]
fn runners_share_staged_bases_through_s3_and_never_use_a_corrupt_one() {
    if tool("mmdebstrap").is_none() {
        return;
    }
    let Some(moto) = Moto::start() else { return };
    let (rt, s3, _) = s3_client(&moto.url());
    rt.block_on(s3.create_bucket().bucket(BUCKET).send()).unwrap();
    let url = format!("s3://{BUCKET}/nightly");
    let t = tempdir();

    let a = summary(&runner_build(&moto, &crate::common::cache_dir(), &t.path().join("a"), &url).output().unwrap());
    assert_ne!(a["base_origin"]["from"], "shared", "{a:#}");
    // One object, recorded under the base's archive-state name (and its resolution's, when
    // it was staged with one).
    let shared = keys(&rt, &s3, "nightly/");
    let objects: Vec<&String> = shared.iter().filter(|k| k.starts_with("nightly/bases/objects/")).collect();
    let records: Vec<&String> = shared.iter().filter(|k| k.ends_with(".json")).collect();
    assert_eq!(objects.len(), 1, "{shared:?}");
    assert!((1..=2).contains(&records.len()) && records.len() + 1 == shared.len(), "{shared:?}");
    let object = objects[0].clone();
    for r in records {
        let record: Value = serde_json::from_slice(&get_object(&rt, &s3, BUCKET, r)).unwrap();
        assert_eq!(format!("nightly/{}", record["object"].as_str().unwrap()), object, "{record:#}");
        assert_eq!(record["info"], a["base"], "the record carries the base's archive state");
    }

    let b_dir = t.path().join("runner-b");
    let (path, marker) = path_without_staging(&b_dir);
    let o = runner_build(&moto, &b_dir.join("cache"), &b_dir.join("out"), &url).env("PATH", &path).output().unwrap();
    let b = summary(&o);
    assert!(!marker.exists(), "runner B ran mmdebstrap");
    assert_eq!(b["base_origin"]["from"], "shared", "{b:#}");
    assert!(b["base_origin"]["why"].as_str().unwrap().contains("SHA-256 verified"), "{b:#}");
    assert_eq!(b["sha256"], a["sha256"], "the shared base built other bytes");
    assert_eq!(b["base"], a["base"]);

    // One byte flipped in the middle of the shared base.
    let mut bytes = get_object(&rt, &s3, BUCKET, &object);
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    rt.block_on(s3.put_object().bucket(BUCKET).key(&object).body(bytes.into()).send()).unwrap();
    let c_dir = t.path().join("runner-c");
    let o = runner_build(&moto, &c_dir.join("cache"), &c_dir.join("out"), &url).output().unwrap();
    let c = summary(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("is corrupt") && err.contains("not used"), "{err}");
    assert_eq!(c["base_origin"]["from"], "staged", "{c:#}");
    assert!(c["base_origin"]["why"].as_str().unwrap().contains("corrupt"), "{c:#}");
    assert_eq!(c["sha256"], a["sha256"]);

    let d_dir = t.path().join("runner-d");
    let (path, marker) = path_without_staging(&d_dir);
    let o = runner_build(&moto, &d_dir.join("cache"), &d_dir.join("out"), &url).env("PATH", &path).output().unwrap();
    let d = summary(&o);
    assert!(!marker.exists(), "runner D ran mmdebstrap: the shared base was not repaired");
    assert_eq!(d["base_origin"]["from"], "shared", "{d:#}");
    assert_eq!(d["sha256"], a["sha256"]);
}

/// A runner killed while it uploads a base leaves nothing under the prefix: the multipart
/// upload never completed, so neither the object nor its record exists, and the next runner
/// finds no base rather than a broken one.
#[test]
fn a_runner_killed_mid_upload_leaves_nothing_visible() {
    if tool("mmdebstrap").is_none() {
        return;
    }
    let Some(moto) = Moto::start() else { return };
    let (rt, s3, _) = s3_client(&moto.url());
    rt.block_on(s3.create_bucket().bucket(BUCKET).send()).unwrap();
    // Warm the local cache first (a no-op when the other tests did), with no shared URL.
    let t = tempdir();
    let warm = runner_build(&moto, &crate::common::cache_dir(), &t.path().join("warm"), "")
        .env_remove("KILN_CACHE_URL")
        .output()
        .unwrap();
    summary(&warm);
    let mut child =
        runner_build(&moto, &crate::common::cache_dir(), &t.path().join("out"), &format!("s3://{BUCKET}/killed"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let uploading = loop {
        let ups = rt.block_on(s3.list_multipart_uploads().bucket(BUCKET).prefix("killed/").send()).unwrap();
        if !ups.uploads().is_empty() {
            break true;
        }
        if child.try_wait().unwrap().is_some() || std::time::Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // SAFETY: kill(2) on a child this test started and has not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let status = child.wait().unwrap();
    assert!(uploading, "the runner finished before its upload was seen ({status})");
    assert_eq!(keys(&rt, &s3, "killed/"), Vec::<String>::new(), "a killed upload left objects");
}

/// `kiln plan` judged on two recipes built from a local archive: both jobs to do at first;
/// the README's plain-shell fan-out (run as written) builds and publishes them (moto); then
/// both are current and `--pending` lists nothing; a changed recipe is the one job to do
/// again, under a new key; a re-signed archive with the same packages leaves both current.
#[test]
fn kiln_plan_fans_out_and_skips_what_is_current() {
    let Some(moto) = Moto::start() else { return };
    let t = tempdir();
    let fake = crate::build::FakeArchive::start(t.path());
    let ci = t.path().join("ci");
    std::fs::create_dir_all(ci.join("recipes")).unwrap();
    let write_recipe = |name: &str, extra: &str| {
        let text = format!(
            "{}\n[system]\nnetwork = \"none\"\n\n[ami]\nname = \"{name}-{{arch}}-{{sha}}\"\nregions = [\"us-east-1\"]\n\
             root_volume = {{ size = \"2GiB\", type = \"gp3\" }}\nlaunch_permissions = {{ accounts = [], public = false }}\n{extra}",
            fake.image_section(name)
        );
        std::fs::write(ci.join(format!("recipes/{name}.toml")), text).unwrap();
    };
    write_recipe("web", "");
    write_recipe("worker", "");
    let kiln_dir = Path::new(env!("CARGO_BIN_EXE_kiln")).parent().unwrap().to_path_buf();
    let path = format!("{}:{}:{}", fake.bin.display(), kiln_dir.display(), std::env::var("PATH").unwrap_or_default());
    let env = |c: &mut Command| {
        fake_aws_env(c)
            .current_dir(&ci)
            .env("PATH", &path)
            .env("AWS_ENDPOINT_URL", moto.url())
            .env("KILN_CACHE_DIR", t.path().join("cache"))
            .env("KILN_STATE_DIR", t.path().join("state"))
            .env("SOURCE_DATE_EPOCH", EPOCH)
            .env_remove("KILN_CACHE_URL")
            .env_remove("KILN_STATE_URL");
    };
    let plan = |extra: &[&str]| -> Output {
        let mut c = kiln();
        c.args(["plan", "recipes/web.toml", "recipes/worker.toml"]).args(extra);
        env(&mut c);
        let o = c.output().unwrap();
        assert!(o.status.success(), "kiln plan failed:\n{}", String::from_utf8_lossy(&o.stderr));
        o
    };
    let jobs = || -> Vec<Value> {
        let v: Value = serde_json::from_slice(&plan(&["--json"]).stdout).unwrap();
        v["jobs"].as_array().unwrap().clone()
    };
    let field = |jobs: &[Value], f: &str| -> Vec<Value> { jobs.iter().map(|j| j[f].clone()).collect() };

    let first = jobs();
    assert_eq!(field(&first, "name"), [Value::from("web-x86_64"), Value::from("worker-x86_64")]);
    assert_eq!(field(&first, "skip"), [Value::from(false), Value::from(false)]);
    assert_eq!(field(&first, "built"), [Value::from(false), Value::from(false)]);
    assert_eq!(field(&first, "published"), [Value::from(false), Value::from(false)]);
    assert_eq!(first[0]["base"]["status"], "stage");
    assert_eq!(first[0]["manifest"], "out/web-x86_64.manifest.json");
    let key = |j: &Value| j["key"].as_str().unwrap().to_string();
    assert!(first.iter().all(|j| key(j).len() == 64) && key(&first[0]) != key(&first[1]), "{first:#?}");
    let pending = String::from_utf8(plan(&["--pending"]).stdout).unwrap();
    assert_eq!(pending, "recipes/web.toml x86_64\nrecipes/worker.toml x86_64\n");

    // The README's fan-out, as written there.
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let line =
        readme.lines().find(|l| l.starts_with("kiln plan ") && l.contains("| xargs")).expect("README's xargs line");
    let mut sh = Command::new("sh");
    sh.arg("-c").arg(line);
    env(&mut sh);
    let o = sh.output().unwrap();
    assert!(o.status.success(), "{line}\n{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(fake.stagings(), 1, "the two recipes share one base, staged once");

    let done = jobs();
    assert_eq!(field(&done, "skip"), [Value::from(true), Value::from(true)], "{done:#?}");
    assert_eq!(field(&done, "published"), [Value::from(true), Value::from(true)]);
    assert_eq!(done[0]["base"]["status"], "cached");
    assert_eq!(field(&done, "key"), field(&first, "key"), "a job's key changed by running it");
    assert_eq!(plan(&["--pending"]).stdout, b"");

    write_recipe("worker", "\n[[files]]\npath = \"/etc/motd\"\ncontent = \"tonight\\n\"\n");
    let changed = jobs();
    assert_eq!(field(&changed, "skip"), [Value::from(true), Value::from(false)], "{changed:#?}");
    assert_eq!(changed[1]["built"], false);
    assert_ne!(key(&changed[1]), key(&done[1]));
    assert_eq!(key(&changed[0]), key(&done[0]));

    fake.set("Tue, 08 Dec 2026 08:00:00 UTC", "1.0-1");
    let resigned = jobs();
    assert_eq!(resigned[0]["skip"], true, "{resigned:#?}");
    assert!(resigned[0]["base"]["why"].as_str().unwrap().contains("same versions"), "{resigned:#?}");
}
