//! Reading an AMI where it is: `kiln inspect` and `--audit` of a published AMI through the EBS
//! direct APIs, and `kiln pull`. Judges: the same commands on the local image the AMI was
//! published from, the GetSnapshotBlock requests counted at the proxy in front of moto, the
//! original image's bytes and its build manifest's block digests.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::common::{self, kiln};
use crate::moto::{fake_aws_env, Mode, Moto, Proxy};

const KEY_PATH: &str = "/root/.ssh/id_ed25519";

/// A tarball-based image carrying a private key (allowed by its recipe, so the build passes)
/// and a 24 MiB payload, published through the proxy; returns the image and its AMI id.
fn publish_keyed_image(proxy: &Proxy, dir: &Path) -> (PathBuf, String) {
    crate::build::synthetic_base_with(dir, "2.10-3");
    let mut rng = common::XorShift(0x5eed_0fa1);
    std::fs::write(dir.join("payload.bin"), rng.bytes(24 << 20)).unwrap();
    let recipe = dir.join("keyed.toml");
    std::fs::write(
        &recipe,
        format!(
            "[image]\nname = \"keyed\"\narch = \"x86_64\"\nbase = {{ tarball = \"base.tar\" }}\n\n\
             [system]\nnetwork = \"none\"\n\n\
             [[files]]\npath = \"{KEY_PATH}\"\nmode = \"0600\"\n\
             content = \"-----BEGIN OPENSSH PRIVATE KEY-----\\nb3BlbnNzaC1rZXktdjEAAAAA\\n-----END OPENSSH PRIVATE KEY-----\\n\"\n\n\
             [[files]]\npath = \"/srv/payload.bin\"\nsource = \"payload.bin\"\n\n\
             [audit]\nallow = [\"{KEY_PATH}\"]\n\n\
             [ami]\nname = \"keyed-{{arch}}\"\nregions = [\"us-east-1\"]\n"
        ),
    )
    .unwrap();
    let out = dir.join("out");
    let mut c = kiln();
    fake_aws_env(&mut c)
        .args(["build", "--quiet", "--publish", "--endpoint-url", &proxy.url()])
        .arg(&recipe)
        .arg("--out")
        .arg(&out)
        .env("KILN_STATE_DIR", dir.join("state"))
        .env("SOURCE_DATE_EPOCH", "1700000000");
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rec: Value = serde_json::from_slice(&std::fs::read(out.join("keyed-x86_64.publish.json")).unwrap()).unwrap();
    (out.join("keyed-x86_64.raw"), rec["amis"][0]["image_id"].as_str().unwrap().to_string())
}

fn inspect(proxy: &Proxy, target: &str, audit: bool) -> (Option<i32>, Value) {
    let mut c = kiln();
    fake_aws_env(&mut c).args(["inspect", "--json", "--endpoint-url", &proxy.url(), target]);
    if audit {
        c.arg("--audit");
    }
    let o = c.output().unwrap();
    let v = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
    });
    (o.status.code(), v)
}

fn gets(proxy: &Proxy) -> u64 {
    proxy.requests().iter().filter(|r| r.action() == "GetSnapshotBlock" && !r.faulted).count() as u64
}

/// The AMI read by id gives the local image's partition table and audit findings (the planted
/// key among them, so `--audit` exits 1); `inspect` fetches a few blocks, far fewer than the
/// snapshot's data blocks, and reports exactly the GetSnapshotBlock requests the proxy saw.
/// `kiln pull` of the AMI is byte-identical to the image, its block digests are the build
/// manifest's, and a pull that was interrupted fetches only what it lacks.
#[test]
fn an_ami_is_inspected_audited_and_pulled_without_launching_it() {
    let Some(moto) = Moto::start() else { return };
    let proxy = Proxy::start(moto.port, Mode::Pass);
    let t = common::tempdir();
    let (image, ami) = publish_keyed_image(&proxy, t.path());
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(image.with_extension("manifest.json")).unwrap()).unwrap();
    let data_blocks = manifest["blocks"]["data_blocks"].as_array().unwrap().len() as u64;

    // inspect: the same table, from a handful of blocks.
    let (code, local) = inspect(&proxy, image.to_str().unwrap(), false);
    assert_eq!(code, Some(0));
    proxy.clear();
    let (code, remote) = inspect(&proxy, &ami, false);
    assert_eq!(code, Some(0), "{remote}");
    assert_eq!(remote["partitions"], local["partitions"]);
    assert_eq!((remote["disk_guid"].clone(), remote["table"].clone()), (local["disk_guid"].clone(), "gpt".into()));
    let read = &remote["read"];
    assert_eq!(read["data_blocks"], data_blocks, "{read}");
    assert_eq!(read["blocks_fetched"], gets(&proxy), "the reported count is what was requested");
    let fetched = read["blocks_fetched"].as_u64().unwrap();
    eprintln!("inspect {ami}: {fetched} of {data_blocks} data blocks fetched");
    assert!(fetched >= 2 && fetched * 4 <= data_blocks, "inspect fetched {fetched} of {data_blocks} blocks");

    // --audit: the same findings (the key), and the same verdict.
    let (code, local) = inspect(&proxy, image.to_str().unwrap(), true);
    assert_eq!(code, Some(1), "{local}");
    proxy.clear();
    let (code, remote) = inspect(&proxy, &ami, true);
    assert_eq!(code, Some(1), "{remote}");
    let audits = |v: &Value| -> Vec<Value> {
        v["partitions"].as_array().unwrap().iter().filter_map(|p| p["filesystem"].get("audit").cloned()).collect()
    };
    assert_eq!(audits(&remote), audits(&local));
    let findings = audits(&remote)[0]["findings"].as_array().unwrap().clone();
    assert!(findings.iter().any(|f| f["path"] == KEY_PATH), "{findings:?}");
    assert_eq!(remote["read"]["blocks_fetched"], gets(&proxy));
    eprintln!("inspect --audit {ami}: {} of {data_blocks} data blocks fetched", remote["read"]["blocks_fetched"]);
    // The audit reads every file's first bytes, not the payload's 24 MiB.
    assert!(remote["read"]["blocks_fetched"].as_u64().unwrap() < data_blocks, "{}", remote["read"]);

    // pull: the image's bytes, the build's block digests.
    let pulled_dir = t.path().join("pulled");
    proxy.clear();
    let pull = |dir: &Path| {
        let mut c = kiln();
        fake_aws_env(&mut c).args(["pull", "--json", "--endpoint-url", &proxy.url(), &ami, "-o"]).arg(dir);
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<Value>(&o.stdout).unwrap()
    };
    let p = pull(&pulled_dir);
    assert_eq!(gets(&proxy), data_blocks, "pull fetches each listed block once");
    let raw = pulled_dir.join(format!("{ami}.raw"));
    assert!(
        std::fs::read(&raw).unwrap() == std::fs::read(&image).unwrap(),
        "the pulled image differs from the original"
    );
    let written: Value =
        serde_json::from_slice(&std::fs::read(pulled_dir.join(format!("{ami}.pull.json"))).unwrap()).unwrap();
    assert_eq!(written["blocks"], manifest["blocks"]);
    assert_eq!(written["image"]["sha256"], manifest["image"]["sha256"]);
    assert_eq!(written["image"]["tagged_sha256"], manifest["image"]["sha256"]);
    assert_eq!(p["blocks_resumed"], 0);
    // Holes stay holes: the pulled file uses about as much disk as the image's data.
    let used = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&raw).unwrap()) * 512;
    assert!(used <= (data_blocks + 1) * 524_288, "{used} bytes allocated for {data_blocks} data blocks");

    // An interrupted pull: half the blocks on disk and listed, one of them damaged since.
    let again = t.path().join("again");
    std::fs::create_dir_all(&again).unwrap();
    let part = again.join(format!("{ami}.raw.part"));
    std::fs::copy(&raw, &part).unwrap();
    let listed: Vec<&Value> = written["blocks"]["data_blocks"].as_array().unwrap().iter().step_by(2).collect();
    let mut state = format!("{}\n", written["snapshot_id"].as_str().unwrap());
    for b in &listed {
        state.push_str(&format!("{} {}\n", b["index"], b["sha256"].as_str().unwrap()));
    }
    std::fs::write(again.join(format!("{ami}.pull-state")), state).unwrap();
    let damaged = listed[0]["index"].as_u64().unwrap();
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new().write(true).open(&part).unwrap(),
        b"X",
        damaged * 524_288 + 7,
    )
    .unwrap();
    proxy.clear();
    let p = pull(&again);
    let kept = listed.len() as u64 - 1;
    assert_eq!(p["blocks_resumed"], kept, "{p}");
    assert_eq!(gets(&proxy), data_blocks - kept, "only the missing and the damaged blocks are fetched");
    assert!(std::fs::read(again.join(format!("{ami}.raw"))).unwrap() == std::fs::read(&image).unwrap());
    assert!(!part.exists() && !again.join(format!("{ami}.pull-state")).exists());
}

/// A snapshot id works like an AMI id; an id that does not exist is an error naming it. `kiln
/// diff` of the AMI against the image it was published from finds nothing (its packages read
/// from dpkg's status in the AMI equal the build manifest's); against a build with another
/// `hello` it lists exactly that package, the files that record it, and the blocks that differ.
#[test]
fn a_snapshot_id_is_read_an_ami_is_diffed_and_a_missing_ami_is_named() {
    let Some(moto) = Moto::start() else { return };
    let proxy = Proxy::start(moto.port, Mode::Pass);
    let t = common::tempdir();
    let (image, ami) = publish_keyed_image(&proxy, t.path());
    let rec: Value = serde_json::from_slice(&std::fs::read(image.with_extension("publish.json")).unwrap()).unwrap();
    let snap = rec["snapshot_id"].as_str().unwrap_or_else(|| panic!("no snapshot_id in {rec}"));
    let (code, v) = inspect(&proxy, snap, false);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["read"]["snapshot_id"], snap);
    let (_, by_ami) = inspect(&proxy, &ami, false);
    assert_eq!(v["partitions"], by_ami["partitions"]);

    let mut c = kiln();
    let o = fake_aws_env(&mut c)
        .args(["inspect", "--endpoint-url", &proxy.url(), "ami-0000000000badbad0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("ami-0000000000badbad0"), "{err}");
}
