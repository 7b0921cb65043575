//! `kiln test` end to end: the EC2 recipe's image launched the way EC2 launches it must pass
//! every check, twice with different identities, on a network that reaches nothing else; and
//! the judge itself is judged: an image with planted faults must fail exactly the checks that
//! catch them and pass every other.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value;

use crate::common::{kiln, run_ok, tempdir, tool};

const EPOCH: &str = "1700000000";

fn root_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Builds a recipe (for x86_64 unless `arch` says otherwise); returns the image path (its
/// tempdir lives for the run).
fn build_for(recipe: &str, arch: Option<&str>) -> Option<PathBuf> {
    let qemu = if arch == Some("arm64") { "qemu-system-aarch64" } else { "qemu-system-x86_64" };
    for t in ["mmdebstrap", qemu, "qemu-img", "ssh"] {
        tool(t)?;
    }
    let dir = Box::leak(Box::new(tempdir()));
    let out = dir.path().join("out");
    let o = run_ok(
        kiln()
            .arg("build")
            .arg(root_dir().join(recipe))
            .args(arch.map(|a| ["--arch", a]).into_iter().flatten())
            .arg("--out")
            .arg(&out)
            .arg("--json")
            .env("KILN_CACHE_DIR", crate::common::cache_dir())
            .env("SOURCE_DATE_EPOCH", EPOCH),
    );
    let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
    Some(PathBuf::from(summary["image"].as_str().unwrap()))
}

fn build(recipe: &str) -> Option<PathBuf> {
    build_for(recipe, None)
}

pub(crate) fn ec2_image() -> Option<&'static PathBuf> {
    static I: OnceLock<Option<PathBuf>> = OnceLock::new();
    I.get_or_init(|| build("recipes/debian-12-ec2.toml")).as_ref()
}

/// Runs `kiln test --json` and returns its exit status and report.
pub(crate) fn kiln_test(image: &Path, extra: &[&str]) -> (bool, Value, String) {
    // Under CI contention an x86_64 launch can take several minutes; an explicit --timeout wins.
    let timeout: &[&str] = if extra.contains(&"--timeout") { &[] } else { &["--timeout", "1500"] };
    let o = kiln().arg("test").arg(image).arg("--json").args(timeout).args(extra).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let report: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("kiln test --json printed no report ({e}):\n{err}"));
    (o.status.success(), report, err)
}

pub(crate) fn checks(report: &Value, launch: usize) -> Vec<(String, String, String)> {
    report["launches"][launch]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap().to_string(),
                c["status"].as_str().unwrap().to_string(),
                c["evidence"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The EC2 image passes every built-in check on two launches whose identities differ; the
/// metadata service saw the IMDSv2 token flow; and from inside, the guest reaches the
/// metadata service but not an outside address.
#[test]
fn ec2_image_launches_clean_twice_on_an_isolated_network() {
    let Some(image) = ec2_image() else { return };
    // Routed through QEMU's side of the network (169.254.0.2), a connection to an outside
    // address (TEST-NET-1) must still fail: restrict=on drops it.
    let outside =
        "sudo ip route add 192.0.2.1/32 via 169.254.0.2 && ! timeout 10 bash -c 'exec 3<>/dev/tcp/192.0.2.1/80'";
    let metadata = "timeout 10 bash -c 'exec 3<>/dev/tcp/169.254.169.254/80'";
    // apt reads the image's deb822 sources: the suite, its -updates and its security suite
    // (the build host's sources carry the security archive).
    let apt = "sudo apt-get --print-uris update | grep -c -e '/dists/bookworm-updates/InRelease' -e '/dists/bookworm-security/InRelease' | grep -qx 2";
    let (ok, report, err) = kiln_test(image, &["--launches", "2", "--run", outside, "--run", metadata, "--run", apt]);
    assert!(ok && report["passed"] == true, "kiln test failed:\n{err}\n{report:#}");
    for l in 0..2 {
        let c = checks(&report, l);
        for want in [
            "ssh-login",
            "systemd",
            "cloud-init",
            "user-data",
            "growth",
            "machine-id",
            "host-keys",
            "dns",
            "kernel-cmdline",
            "esp-mount",
        ] {
            assert!(c.iter().any(|(id, s, _)| id == want && s == "pass"), "launch {l}: {want} did not pass: {c:#?}");
        }
        assert_eq!(c.iter().filter(|(id, s, _)| id.starts_with("recipe: ") && s == "pass").count(), 3, "{c:#?}");
        // cloud-init used the token flow: a PUT for the token, then GETs that carry it.
        let reqs = report["launches"][l]["imds_requests"].as_array().unwrap();
        assert!(reqs.iter().any(|r| r["method"] == "PUT" && r["path"] == "/latest/api/token" && r["status"] == 200));
        assert!(reqs.iter().any(|r| r["with_token"] == true && r["path"].as_str().unwrap().contains("public-keys")));
        assert!(reqs.iter().any(|r| r["with_token"] == true && r["path"].as_str().unwrap().ends_with("user-data")));
    }
    let across = &report["across_launches"];
    assert_eq!(across[0]["id"], "unique-identity");
    assert_eq!(across[0]["status"], "pass", "{across:#}");
    // The report sits beside the image.
    let name = image.file_name().unwrap().to_string_lossy().replace(".raw", ".test.json");
    assert!(image.with_file_name(name).is_file());
}

/// Without cloud-init, an image still grows, makes its own identity and takes its resolver
/// from the network; kiln test logs in as root with the key handed over as a credential, and
/// says that on EC2 nothing would install it.
#[test]
fn minimal_image_without_cloud_init_launches_clean_twice() {
    let Some(image) = build("recipes/debian-12-minimal.toml") else { return };
    let (ok, report, err) = kiln_test(&image, &["--launches", "2"]);
    assert!(ok && report["passed"] == true, "kiln test failed:\n{err}\n{report:#}");
    for l in 0..2 {
        let c = checks(&report, l);
        for want in ["ssh-login", "systemd", "growth", "machine-id", "host-keys", "dns", "kernel-cmdline"] {
            assert!(c.iter().any(|(id, s, _)| id == want && s == "pass"), "launch {l}: {want} did not pass: {c:#?}");
        }
        for skipped in ["cloud-init", "user-data"] {
            assert!(
                c.iter().any(|(id, s, _)| id == skipped && s == "skip"),
                "launch {l}: {skipped} not skipped: {c:#?}"
            );
        }
        let login = c.iter().find(|(id, _, _)| id == "ssh-login").unwrap();
        assert!(login.2.contains("nothing would install the launch key"), "{login:?}");
        assert!(report["launches"][l]["timings"]["cloud_init_done_secs"].is_null());
    }
    assert_eq!(report["across_launches"][0]["status"], "pass");
}

/// The web server recipe's own [test] commands: nginx is active and serves the baked page.
#[test]
fn web_server_passes_its_own_checks() {
    let Some(image) = build("recipes/web-server.toml") else { return };
    let (ok, report, err) = kiln_test(&image, &[]);
    assert!(ok && report["passed"] == true, "kiln test failed:\n{err}\n{report:#}");
    let c = checks(&report, 0);
    assert_eq!(c.iter().filter(|(id, s, _)| id.starts_with("recipe: ") && s == "pass").count(), 2, "{c:#?}");
}

/// An image with planted faults fails exactly the checks that should catch them, every
/// other check still passes, `kiln build --test` exits non-zero and records the failures in
/// the manifest, the logs are kept, and `--publish` never starts (its endpoint is a closed
/// port: reaching it would show as a publishing error).
#[test]
fn the_judge_catches_each_planted_fault() {
    for t in ["mmdebstrap", "qemu-system-x86_64", "qemu-img", "ssh"] {
        if tool(t).is_none() {
            return;
        }
    }
    let dir = tempdir();
    let o = kiln()
        .arg("build")
        .arg(root_dir().join("fixtures/launch/faults.toml"))
        .arg("--out")
        .arg(dir.path())
        .arg("--test")
        .args(["--publish", "--endpoint-url", "http://127.0.0.1:9"])
        .env("KILN_CACHE_DIR", crate::common::cache_dir())
        .env("KILN_STATE_DIR", dir.path().join("state"))
        .env("SOURCE_DATE_EPOCH", EPOCH)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "kiln build --test passed an image with planted faults:\n{err}");
    assert!(!err.contains("publishing"), "a failed test must stop --publish:\n{err}");
    assert!(!dir.path().join("launch-faults-x86_64.publish.json").exists());
    let image = dir.path().join("launch-faults-x86_64.raw");
    let report: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("launch-faults-x86_64.test.json")).unwrap()).unwrap();
    assert_eq!(report["passed"], false);
    let c = checks(&report, 0);
    let failed: Vec<&str> = c.iter().filter(|(_, s, _)| s == "fail").map(|(id, _, _)| id.as_str()).collect();
    assert_eq!(failed, ["systemd", "growth", "recipe: exit 1"], "{c:#?}");
    let systemd = c.iter().find(|(id, _, _)| id == "systemd").unwrap();
    assert!(systemd.2.contains("kiln-planted-failure.service"), "{systemd:?}");
    assert!(c.iter().any(|(id, s, _)| id == "recipe: test -s /etc/machine-id" && s == "pass"), "{c:#?}");
    assert!(err.contains("3 check(s) failed"), "{err}");
    let manifest = kiln::manifest::Manifest::load(&dir.path().join("launch-faults-x86_64.manifest.json")).unwrap();
    let result = manifest.test_result.expect("kiln build --test records its result");
    assert!(!result.passed);
    assert_eq!(result.failures, ["launch 1: systemd", "launch 1: growth", "launch 1: recipe: exit 1"]);
    let logs = dir.path().join("launch-faults-x86_64.test");
    let console = std::fs::read_to_string(logs.join("launch-1.console.log")).expect("console log kept on failure");
    assert!(console.contains("Linux version"), "the kept console log holds the boot");
    assert!(logs.join("launch-1.imds.json").is_file());
    assert!(image.is_file());
}

#[test]
fn test_help_teaches_with_examples() {
    let o = run_ok(kiln().args(["test", "--help"]));
    let help = String::from_utf8_lossy(&o.stdout);
    for flag in ["--launches", "--volume-size", "--user-data", "--run", "--key", "--identity", "--json", "--timeout"] {
        assert!(help.contains(flag), "{flag} missing from kiln test --help");
        let example = help.lines().any(|l| l.trim_start().starts_with("kiln test") && l.contains(flag));
        assert!(example || flag == "--identity", "no example uses {flag}:\n{help}");
    }
}

/// The relay QEMU runs per guest connection hands each answer over as it comes, while the
/// connection stays open (HTTP keep-alive): a relay that buffered its output would leave the
/// guest waiting for an answer that never ends in a newline.
#[test]
fn the_metadata_relay_answers_while_the_connection_stays_open() {
    use std::io::{Read, Write};
    use std::process::Stdio;
    let md = kiln::imds::InstanceMetadata::sample();
    let server = kiln::imds::Server::start(md).unwrap();
    let mut relay = kiln()
        .arg("imds-relay")
        .arg(server.addr().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = relay.stdin.take().unwrap();
    write!(stdin, "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n").unwrap();
    stdin.flush().unwrap();
    let mut stdout = relay.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if got.ends_with(b"i-0123456789abcdef0") {
                let _ = tx.send(got.clone());
            }
        }
    });
    let got = rx.recv_timeout(std::time::Duration::from_secs(20));
    drop(stdin);
    let _ = relay.kill();
    let _ = relay.wait();
    let got = got.expect("no answer through the relay while the connection was open");
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
}

/// Debian 13 (trixie) launches as clean as Debian 12: same recipe, next release.
#[test]
fn debian_13_ec2_image_launches_clean() {
    let Some(image) = build("recipes/debian-13-ec2.toml") else { return };
    let (ok, report, err) = kiln_test(&image, &[]);
    assert!(ok && report["passed"] == true, "kiln test failed:\n{err}\n{report:#}");
    let c = checks(&report, 0);
    assert!(c.iter().all(|(_, s, _)| s == "pass"), "{c:#?}");
    assert_eq!(c.len(), 10, "{c:#?}");
}

/// The same EC2 recipe built for arm64 (staged under qemu-user) differs from the x86_64 image
/// only where the architecture must show, and launches clean the way a Graviton instance boots
/// it: UEFI firmware (AAVMF), NVMe root, the metadata service, every built-in check.
#[test]
fn ec2_recipe_for_arm64_differs_only_where_it_must_and_launches_clean() {
    let Some(x86) = ec2_image() else { return };
    let Some(arm) = build_for("recipes/debian-12-ec2.toml", Some("arm64")) else { return };
    let manifest = |image: &Path| {
        let m = image.with_file_name(image.file_name().unwrap().to_string_lossy().replace(".raw", ".manifest.json"));
        kiln::manifest::Manifest::load(&m).unwrap()
    };
    let (xm, am) = (manifest(x86), manifest(&arm));
    assert_eq!(am.name, "debian-12-ec2-arm64");
    assert_eq!(am.arch, kiln::platform::Arch::Arm64);
    // Same recipe, OS and partition layout; the root partition type says the architecture.
    assert_eq!(xm.recipe.sha256, am.recipe.sha256);
    assert_eq!((xm.os, xm.boot), (am.os, am.boot));
    assert_eq!(xm.disk.partitions.len(), am.disk.partitions.len());
    for (x, a) in xm.disk.partitions.iter().zip(&am.disk.partitions) {
        assert_eq!(
            (x.name.as_str(), x.first_lba, x.filesystem.as_str()),
            (a.name.as_str(), a.first_lba, a.filesystem.as_str())
        );
    }
    let root = am.disk.partitions.iter().find(|p| p.filesystem == "ext4").unwrap();
    assert_eq!(root.type_guid, kiln::platform::Arch::Arm64.root_partition_type());
    // The same package names but for the architecture's own (kernel flavour, boot loader).
    let names = |m: &kiln::manifest::Manifest| {
        m.packages.iter().map(|p| p.name.clone()).collect::<std::collections::BTreeSet<_>>()
    };
    let only_x86: Vec<_> = names(&xm).difference(&names(&am)).cloned().collect();
    let only_arm: Vec<_> = names(&am).difference(&names(&xm)).cloned().collect();
    assert!(only_x86.iter().all(|n| n.contains("amd64") || n.contains("intel") || n.contains("x86")), "{only_x86:?}");
    assert!(only_arm.iter().all(|n| n.contains("arm64") || n.contains("arm")), "{only_arm:?}");
    assert!(am.packages.iter().all(|p| p.arch == "arm64" || p.arch == "all"));
    // Both were staged from the same state of the archive.
    let suites = |m: &kiln::manifest::Manifest| m.base.as_ref().unwrap().archive.clone();
    assert_eq!(suites(&xm), suites(&am));
    // Under emulation an arm64 launch is slow: one launch, a longer deadline.
    let (ok, report, err) = kiln_test(&arm, &["--timeout", "2700"]);
    assert!(ok && report["passed"] == true, "kiln test failed:\n{err}\n{report:#}");
    let c = checks(&report, 0);
    for want in ["ssh-login", "systemd", "cloud-init", "user-data", "growth", "machine-id", "host-keys", "dns"] {
        assert!(c.iter().any(|(id, s, _)| id == want && s == "pass"), "{want} did not pass: {c:#?}");
    }
}
