//! `kiln diff`, judged against what changed on purpose and against what an incremental
//! publish really sends (PutSnapshotBlock requests counted at the proxy in front of moto).

use serde_json::Value;

use crate::common::{self, kiln};
use crate::moto::{Mode, Moto, Proxy};

/// Two nightly builds of one recipe: Tuesday's base has `hello` at a newer version and the
/// recipe's /etc/motd says something else. `kiln diff` lists exactly that package and those
/// files (the motd and dpkg's status, which records the version), its block count equals the
/// PutSnapshotBlock requests of Tuesday's incremental publish, it exits 1; an image against
/// itself differs in nothing and exits 0.
#[test]
fn a_nightly_diff_lists_the_package_the_files_and_the_blocks_publish_sends() {
    let Some(moto) = Moto::start() else { return };
    let proxy = Proxy::start(moto.port, Mode::Pass);
    let t = common::tempdir();
    let state = t.path().join("state");
    let build = |night: &str, hello: &str| {
        let src = t.path().join(format!("{night}-src"));
        std::fs::create_dir_all(&src).unwrap();
        crate::build::synthetic_base_with(&src, hello);
        crate::publish::nightly_publish(&proxy, &src, &t.path().join(night), &t.path().join("cache"), &state, night)
    };
    let monday = build("monday", "2.10-3");
    proxy.clear();
    let tuesday = build("tuesday", "2.10-4");
    let sent = proxy.requests().iter().filter(|r| r.action() == "PutSnapshotBlock" && !r.faulted).count();
    assert!(sent > 0, "Tuesday's publish sent nothing");

    let o = kiln().arg("diff").arg(&monday).arg(&tuesday).arg("--json").output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    let d: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(d["packages"], serde_json::json!([{ "name": "hello:amd64", "from": "2.10-3", "to": "2.10-4" }]));
    assert_eq!(
        d["files"],
        serde_json::json!([
            { "path": "/etc/motd", "change": "changed", "what": ["content"] },
            { "path": "/var/lib/dpkg/status", "change": "changed", "what": ["content"] },
        ])
    );
    assert_eq!(d["blocks_changed"], sent as u64, "kiln diff and the incremental publish disagree");

    let text =
        String::from_utf8_lossy(&kiln().arg("diff").arg(&monday).arg(&tuesday).output().unwrap().stdout).into_owned();
    assert!(text.contains("~ hello:amd64 2.10-3 -> 2.10-4") && text.contains("~ /etc/motd (content)"), "{text}");

    let same = kiln()
        .arg("diff")
        .arg(&monday)
        .arg(monday.with_extension("").with_extension("manifest.json"))
        .output()
        .unwrap();
    assert_eq!(same.status.code(), Some(0), "{}", String::from_utf8_lossy(&same.stdout));
    let none = String::from_utf8_lossy(&same.stdout).into_owned();
    assert!(
        none.contains("packages: 0 added, 0 removed, 0 changed version") && none.contains("blocks: 0 of"),
        "{none}"
    );

    let missing = kiln().arg("diff").arg(&monday).arg(t.path().join("nowhere.raw")).output().unwrap();
    assert_eq!(missing.status.code(), Some(2), "a missing image is trouble, not a difference");
}
