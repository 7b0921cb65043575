//! The team's own software in an image (the service layer): a `.deb` from the build host, a
//! vendor repository served on 127.0.0.1 and signed by a key made here, users, files owned by
//! them and build steps, on top of the cached Debian base. Judged by debugfs and e2fsck on the
//! image, by the manifest and SBOM, by `kiln test` launching it, and by what a build refuses.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

use crate::common::{kiln, run_ok, stdout_of, tempdir, tool};

const EPOCH: &str = "1700000000";

fn root_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A copy of `recipes/` (so tests can change a `.deb` without touching the checkout), an apt
/// repository served on 127.0.0.1 with `kiln-vendor-tool`, its key and another key, and an SSH
/// key pair for a recipe user.
struct World {
    dir: PathBuf,
    port: u16,
    ssh_fingerprint: String,
    ssh_public: String,
}

fn sh(cmd: &str, dir: &Path) -> String {
    stdout_of(Command::new("bash").arg("-euc").arg(cmd).current_dir(dir))
}

/// Serves `dir` over HTTP on 127.0.0.1 for the rest of the test run (apt's only network here).
fn serve(dir: PathBuf) -> u16 {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let port = server.server_addr().to_ip().unwrap().port();
    std::thread::spawn(move || {
        for req in server.incoming_requests() {
            let rel = req.url().trim_start_matches('/').split('?').next().unwrap_or("").to_string();
            let path = dir.join(&rel);
            let resp = if !rel.contains("..") && path.is_file() {
                tiny_http::Response::from_data(std::fs::read(&path).unwrap())
            } else {
                tiny_http::Response::from_data(Vec::new()).with_status_code(404)
            };
            let _ = req.respond(resp);
        }
    });
    port
}

/// The repository: `dists/stable/main/binary-{amd64,arm64}`, `Release` signed into `InRelease`
/// with a key generated here (gpg's agent is stopped before returning).
fn make_repository(dir: &Path) {
    let script = r#"
export GNUPGHOME="$PWD/gnupg"
mkdir -m 700 gnupg
mkdir -p vt/DEBIAN vt/usr/bin repo/pool keys
printf 'Package: kiln-vendor-tool\nVersion: 2.1\nArchitecture: all\nMaintainer: vendor <v@example.invalid>\nDescription: a vendor tool from a signed repository\n test\n' > vt/DEBIAN/control
printf '#!/bin/sh\necho "kiln-vendor-tool 2.1"\n' > vt/usr/bin/kiln-vendor-tool
chmod 755 vt/usr/bin/kiln-vendor-tool
dpkg-deb --root-owner-group --build vt repo/pool/kiln-vendor-tool_2.1_all.deb >/dev/null
gpg --batch --quiet --passphrase '' --quick-gen-key "kiln test vendor <vendor@example.invalid>" ed25519 sign never 2>/dev/null
gpg --batch --armor --export > keys/vendor.asc
gpg --batch --export > keys/vendor.gpg
cd repo
for a in amd64 arm64; do
  mkdir -p dists/stable/main/binary-$a
  apt-ftparchive --arch $a packages pool > dists/stable/main/binary-$a/Packages
done
apt-ftparchive -o APT::FTPArchive::Release::Suite=stable -o APT::FTPArchive::Release::Codename=stable \
  -o 'APT::FTPArchive::Release::Architectures=amd64 arm64' -o APT::FTPArchive::Release::Components=main \
  release dists/stable > dists/stable/Release
gpg --batch --yes --clearsign -o dists/stable/InRelease dists/stable/Release
cd ..
# Another key, which must not verify the repository.
export GNUPGHOME="$PWD/gnupg-other"
mkdir -m 700 gnupg-other
gpg --batch --quiet --passphrase '' --quick-gen-key "someone else <other@example.invalid>" ed25519 sign never 2>/dev/null
gpg --batch --armor --export > keys/other.asc
gpgconf --kill all
GNUPGHOME="$PWD/gnupg" gpgconf --kill all
"#;
    sh(script, dir);
}

fn world() -> Option<&'static World> {
    static W: OnceLock<Option<World>> = OnceLock::new();
    W.get_or_init(|| {
        for t in ["mmdebstrap", "gpg", "apt-ftparchive", "dpkg-deb", "debugfs", "ssh-keygen"] {
            tool(t)?;
        }
        let dir = Box::leak(Box::new(tempdir())).path().to_path_buf();
        // The shipped recipes, copied: the example service recipe extends the EC2 one.
        run_ok(Command::new("cp").arg("-a").arg(root_dir().join("recipes")).arg(dir.join("recipes")));
        let _ = std::fs::remove_dir_all(dir.join("recipes/hello-service/dist"));
        run_ok(Command::new(dir.join("recipes/hello-service/build-deb.sh")).arg("1.0.0"));
        make_repository(&dir);
        let port = serve(dir.join("repo"));
        run_ok(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "ops@kiln-test", "-f"])
                .arg(dir.join("ops_key")),
        );
        let ssh_public = std::fs::read_to_string(dir.join("ops_key.pub")).unwrap().trim().to_string();
        let fp = stdout_of(Command::new("ssh-keygen").arg("-lf").arg(dir.join("ops_key.pub")));
        let ssh_fingerprint = fp.split_whitespace().nth(1).unwrap().to_string();
        Some(World { dir, port, ssh_fingerprint, ssh_public })
    })
    .as_ref()
}

impl World {
    /// The test recipe: the example service recipe, plus the vendor repository, a package from
    /// it, a user with a login key, a file that user owns and a step using both packages.
    fn recipe(&self, key: &str) -> PathBuf {
        let path = self.dir.join("recipes").join(format!("service-test-{}.toml", key.replace(['/', '.'], "-")));
        let text = format!(
            r#"extends = "hello-service.toml"

[image]
name = "service-test"

[[repositories]]
name = "vendor"
uri = "http://127.0.0.1:{port}"
suites = ["stable"]
key = "../{key}"

[packages]
include = ["kiln-vendor-tool"]

[[users]]
name = "ops"
uid = 1500
groups = ["adm", "deploy"]
shell = "/bin/bash"
authorized_keys = ["{ssh}"]

[[files]]
path = "/var/lib/ops-notes"
content = "for ops\n"
owner = "ops:ops"
mode = "0600"

[[steps]]
run = "echo step-two-says-hello; kiln-vendor-tool > /etc/vendor-tool.out; hello -g from-a-step >> /etc/vendor-tool.out"

[test]
commands = [
  "kiln-vendor-tool | grep -q 'kiln-vendor-tool 2.1'",
  "grep -qx 'Signed-By: /usr/share/keyrings/vendor.asc' /etc/apt/sources.list.d/vendor.sources",
  "sudo apt-get --print-uris update 2>&1 | grep -q '127.0.0.1:{port}/dists/stable/InRelease'",
  "id ops | grep -q 'uid=1500(ops)'",
  "sudo ssh-keygen -lf /home/ops/.ssh/authorized_keys | grep -qF '{fp}'",
]
"#,
            port = self.port,
            ssh = self.ssh_public,
            fp = self.ssh_fingerprint,
        );
        std::fs::write(&path, text).unwrap();
        path
    }
}

struct Built {
    summary: Value,
    stderr: String,
    image: PathBuf,
    manifest: Value,
}

fn build(recipe: &Path, arch: Option<&str>, out: &Path) -> Built {
    let o = run_ok(
        kiln()
            .arg("build")
            .arg(recipe)
            .args(arch.map(|a| ["--arch", a]).into_iter().flatten())
            .arg("--out")
            .arg(out)
            .arg("--json")
            .env("KILN_CACHE_DIR", crate::common::cache_dir())
            .env("SOURCE_DATE_EPOCH", EPOCH),
    );
    let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
    let image = PathBuf::from(summary["image"].as_str().unwrap());
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(summary["manifest"].as_str().unwrap()).unwrap()).unwrap();
    Built { summary, stderr: String::from_utf8_lossy(&o.stderr).into_owned(), image, manifest }
}

/// The x86_64 image of the test recipe, built once for the tests that read it.
fn x86() -> Option<&'static Built> {
    static B: OnceLock<Option<Built>> = OnceLock::new();
    B.get_or_init(|| {
        let w = world()?;
        let out = Box::leak(Box::new(tempdir())).path().join("out");
        Some(build(&w.recipe("keys/vendor.asc"), None, &out))
    })
    .as_ref()
}

/// The root file system of an image, extracted for debugfs (kept for the run).
fn root_fs(b: &Built) -> PathBuf {
    let p = b.manifest["disk"]["partitions"].as_array().unwrap().iter().find(|p| p["filesystem"] == "ext4").unwrap();
    let dest = Box::leak(Box::new(tempdir())).path().join("root.ext4");
    run_ok(
        Command::new("dd")
            .arg(format!("if={}", b.image.display()))
            .arg(format!("of={}", dest.display()))
            .args(["bs=512", "conv=sparse", "status=none"])
            .arg(format!("skip={}", p["first_lba"]))
            .arg(format!("count={}", p["last_lba"].as_u64().unwrap() - p["first_lba"].as_u64().unwrap() + 1)),
    );
    dest
}

fn debugfs(fs: &Path, request: &str) -> String {
    let o = Command::new(tool("debugfs").unwrap()).arg("-R").arg(request).arg(fs).output().unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `(mode, uid, gid)` of a path in the file system, from debugfs's `stat`.
fn owner_mode(fs: &Path, path: &str) -> (String, u32, u32) {
    let s = debugfs(fs, &format!("stat {path}"));
    let field = |k: &str| {
        s.split(k).nth(1).and_then(|r| r.split_whitespace().next()).unwrap_or_else(|| panic!("{path}: {s}")).to_string()
    };
    (field("Mode:"), field("User:").parse().unwrap(), field("Group:").parse().unwrap())
}

fn package<'a>(m: &'a Value, name: &str) -> &'a Value {
    m["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in the manifest"))
}

/// The layer's users, files, step results, repository sources and keys are in the image as
/// debugfs reads them; the manifest says where each package came from; the file system is clean.
#[test]
fn own_packages_repository_users_files_and_steps_are_in_the_image() {
    let Some(b) = x86() else { return };
    let w = world().unwrap();
    let fs = root_fs(b);
    let fsck = Command::new(tool("e2fsck").unwrap()).arg("-fn").arg(&fs).output().unwrap();
    assert!(fsck.status.success(), "{}", String::from_utf8_lossy(&fsck.stdout));

    let passwd = debugfs(&fs, "cat /etc/passwd");
    assert!(passwd.lines().any(|l| l == "ops:x:1500:1500::/home/ops:/bin/bash"), "{passwd}");
    assert!(
        passwd.lines().any(|l| l.starts_with("deploy:x:") && l.ends_with(":/var/lib/deploy:/bin/bash")),
        "{passwd}"
    );
    // The package's maintainer script made its own system user.
    assert!(passwd.lines().any(|l| l.starts_with("hello:x:") && l.ends_with(":/usr/sbin/nologin")), "{passwd}");
    let group = debugfs(&fs, "cat /etc/group");
    let members = |g: &str| group.lines().find(|l| l.starts_with(&format!("{g}:"))).unwrap_or_default().to_string();
    assert!(members("adm").ends_with("deploy,ops") || members("adm").contains("ops"), "{group}");
    assert!(members("deploy").contains("ops"), "{group}");
    assert_eq!(owner_mode(&fs, "/home/ops"), ("0755".into(), 1500, 1500));
    assert_eq!(owner_mode(&fs, "/home/ops/.ssh"), ("0700".into(), 1500, 1500));
    assert_eq!(owner_mode(&fs, "/home/ops/.ssh/authorized_keys"), ("0600".into(), 1500, 1500));
    assert_eq!(debugfs(&fs, "cat /home/ops/.ssh/authorized_keys"), format!("{}\n", w.ssh_public));
    // A recipe file owned by a recipe user.
    assert_eq!(owner_mode(&fs, "/var/lib/ops-notes"), ("0600".into(), 1500, 1500));
    // The steps ran after packages, users and files, in order, with the packages usable.
    assert_eq!(debugfs(&fs, "cat /etc/vendor-tool.out"), "kiln-vendor-tool 2.1\nfrom-a-step\n");
    assert_eq!(debugfs(&fs, "cat /etc/kiln-hello/baked"), "kiln-hello 1.0.0 answers\n");
    // The repository stays usable in every instance: its deb822 source and its key.
    assert_eq!(
        debugfs(&fs, "cat /etc/apt/sources.list.d/vendor.sources"),
        format!("Types: deb\nURIs: http://127.0.0.1:{}\nSuites: stable\nComponents: main\nSigned-By: /usr/share/keyrings/vendor.asc\n", w.port)
    );
    assert_eq!(
        debugfs(&fs, "cat /usr/share/keyrings/vendor.asc"),
        std::fs::read_to_string(w.dir.join("keys/vendor.asc")).unwrap()
    );
    // The socket unit the package enabled, and nothing of the layer's own work left behind.
    assert!(debugfs(&fs, "ls /etc/systemd/system/sockets.target.wants").contains("kiln-hello.socket"));
    for gone in ["/run/kiln", "/.kiln-layer", "/tmp/kiln"] {
        assert!(debugfs(&fs, &format!("stat {gone}")).is_empty(), "{gone} is in the image");
    }
    // Origins: the local file, the repository, and Debian's own dependency.
    let m = &b.manifest;
    assert_eq!(package(m, "kiln-hello")["origin"], "local:hello-service/dist/kiln-hello.deb");
    assert_eq!(package(m, "kiln-hello")["version"], "1.0.0");
    assert_eq!(package(m, "kiln-vendor-tool")["origin"], "repository:vendor");
    assert!(package(m, "hello").get("origin").is_none());
    let repos = m["layer"]["repositories"].as_array().unwrap();
    assert_eq!(repos.len(), 1);
    let in_release = std::fs::read(w.dir.join("repo/dists/stable/InRelease")).unwrap();
    assert_eq!(repos[0]["sha256"], hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&in_release)));
    assert_eq!(repos[0]["suite"], "stable");
    let sbom: Value =
        serde_json::from_slice(&std::fs::read(b.image.with_file_name("service-test-x86_64.spdx.json")).unwrap())
            .unwrap();
    let purl = |name: &str| {
        let p = sbom["packages"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap();
        p["externalRefs"][0]["referenceLocator"].as_str().unwrap().to_string()
    };
    assert_eq!(purl("kiln-vendor-tool"), "pkg:deb/vendor/kiln-vendor-tool@2.1?arch=all");
    assert_eq!(purl("kiln-hello"), "pkg:deb/local/kiln-hello@1.0.0?arch=all");
    assert!(purl("hello").starts_with("pkg:deb/debian/hello@"), "{}", purl("hello"));
    // The steps' output is in the build's log.
    assert!(b.stderr.contains("kiln-step 2: step-two-says-hello"), "{}", b.stderr);
    assert!(b.stderr.contains("kiln-step 1: setup.sh: kiln-hello 1.0.0 answers"), "{}", b.stderr);
}

/// The image launches clean the way EC2 launches it, and the recipes' own checks pass inside:
/// the service answers on its port, the repository's source is what apt reads, the user's key
/// is the one the recipe gave.
#[test]
fn the_service_image_launches_clean_and_answers() {
    let Some(b) = x86() else { return };
    for t in ["qemu-system-x86_64", "qemu-img", "ssh"] {
        if tool(t).is_none() {
            return;
        }
    }
    let o = kiln().arg("test").arg(&b.image).args(["--json", "--timeout", "1500"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    let report: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("no report ({e}):\n{err}"));
    assert!(o.status.success() && report["passed"] == true, "kiln test failed:\n{err}\n{report:#}");
    let checks = report["launches"][0]["checks"].as_array().unwrap();
    let recipe: Vec<&Value> = checks.iter().filter(|c| c["id"].as_str().unwrap().starts_with("recipe: ")).collect();
    // hello-service.toml's four and the test recipe's five, every one passed.
    assert_eq!(recipe.len(), 9, "{checks:#?}");
    assert!(recipe.iter().all(|c| c["status"] == "pass"), "{checks:#?}");
}

/// The same inputs give the same image, with the layer taken from the cache; a new build of the
/// team's `.deb` alone stages the layer again but never the Debian base.
#[test]
fn a_new_deb_restages_only_the_layer_and_same_inputs_give_the_same_bytes() {
    let Some(first) = x86() else { return };
    let w = world().unwrap();
    let t = tempdir();
    // The layer staged afresh from the same inputs gives the same bytes.
    let layers = crate::common::cache_dir().join("layers");
    for e in std::fs::read_dir(&layers).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("service-test-x86_64-") {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    let again = build(&w.recipe("keys/vendor.asc"), None, &t.path().join("again"));
    assert!(again.stderr.contains("layer: installing 2 packages"), "{}", again.stderr);
    assert_eq!(again.manifest["image"]["sha256"], first.manifest["image"]["sha256"]);
    assert_eq!(again.summary["base_cached"], true);
    // And from the cache, the same again without staging it.
    let cached = build(&w.recipe("keys/vendor.asc"), None, &t.path().join("cached"));
    assert!(cached.stderr.contains("service layer: unchanged inputs, reused from the cache"), "{}", cached.stderr);
    assert!(!cached.stderr.contains("layer: installing"), "{}", cached.stderr);
    assert_eq!(cached.manifest["image"]["sha256"], first.manifest["image"]["sha256"]);

    // Tonight's package: a copy of the recipes with a new version of the .deb.
    run_ok(Command::new("cp").arg("-a").arg(w.dir.join("recipes")).arg(t.path().join("recipes")));
    run_ok(Command::new(t.path().join("recipes/hello-service/build-deb.sh")).arg("1.0.1"));
    std::fs::copy(w.dir.join("keys/vendor.asc"), t.path().join("vendor.asc")).unwrap();
    let recipe = t.path().join("recipes/service-test-keys-vendor-asc.toml");
    let text =
        std::fs::read_to_string(&recipe).unwrap().replace("key = \"../keys/vendor.asc\"", "key = \"../vendor.asc\"");
    std::fs::write(&recipe, text).unwrap();
    let tonight = build(&recipe, None, &t.path().join("tonight"));
    // The base is the one staged for the first build (same key, same staging time).
    assert_eq!(tonight.summary["base_cached"], true, "{}", tonight.stderr);
    assert_eq!(tonight.manifest["base"]["staged_at"], first.manifest["base"]["staged_at"]);
    assert!(tonight.stderr.contains("layer: installing 2 packages"), "{}", tonight.stderr);
    assert_eq!(package(&tonight.manifest, "kiln-hello")["version"], "1.0.1");
    assert_eq!(tonight.manifest["base"]["cache_key"], first.manifest["base"]["cache_key"]);
    assert_ne!(tonight.manifest["layer"]["cache_key"], first.manifest["layer"]["cache_key"]);
    assert_ne!(tonight.manifest["image"]["sha256"], first.manifest["image"]["sha256"]);
    // Only what the new package changed: the recipe hash follows the .deb's bytes.
    assert_ne!(tonight.manifest["recipe"]["sha256"], first.manifest["recipe"]["sha256"]);
}

/// The same recipe for arm64 (the `.deb`s are `Architecture: all`; the steps run arm64
/// programs under qemu-user): files, users, the steps' results and the repository's package.
#[test]
fn the_service_recipe_builds_for_arm64() {
    let Some(w) = world() else { return };
    let out = tempdir();
    let b = build(&w.recipe("keys/vendor.asc"), Some("arm64"), &out.path().join("out"));
    assert_eq!(b.manifest["arch"], "arm64");
    let fs = root_fs(&b);
    let passwd = debugfs(&fs, "cat /etc/passwd");
    assert!(passwd.lines().any(|l| l == "ops:x:1500:1500::/home/ops:/bin/bash"), "{passwd}");
    assert_eq!(owner_mode(&fs, "/var/lib/ops-notes"), ("0600".into(), 1500, 1500));
    assert_eq!(owner_mode(&fs, "/home/ops/.ssh/authorized_keys"), ("0600".into(), 1500, 1500));
    assert_eq!(debugfs(&fs, "cat /etc/vendor-tool.out"), "kiln-vendor-tool 2.1\nfrom-a-step\n");
    assert_eq!(debugfs(&fs, "cat /etc/kiln-hello/baked"), "kiln-hello 1.0.0 answers\n");
    assert_eq!(package(&b.manifest, "hello")["arch"], "arm64");
    assert_eq!(package(&b.manifest, "kiln-vendor-tool")["origin"], "repository:vendor");
}

/// Runs a build that must fail and returns its error, checking nothing reached the outputs.
fn refused(recipe: &Path) -> String {
    let out = tempdir();
    let o = kiln()
        .arg("build")
        .arg(recipe)
        .arg("--out")
        .arg(out.path().join("out"))
        .env("KILN_CACHE_DIR", crate::common::cache_dir())
        .env("SOURCE_DATE_EPOCH", EPOCH)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "the build should have failed:\n{err}");
    let written: Vec<_> = std::fs::read_dir(out.path().join("out"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(written.is_empty(), "a failed build left {written:?}\n{err}");
    err
}

/// A repository whose InRelease another key signed is refused before anything is staged, with
/// the repository's name and the recipe line.
#[test]
fn a_repository_signed_by_another_key_is_refused() {
    let Some(w) = world() else { return };
    let recipe = w.recipe("keys/other.asc");
    let err = refused(&recipe);
    let name = recipe.file_name().unwrap().to_string_lossy().into_owned();
    assert!(err.contains(&format!("{name}:6:1: repository `vendor` (http://127.0.0.1:{})", w.port)), "{err}");
    assert!(err.contains("its InRelease does not verify with key"), "{err}");
    assert!(err.contains("NO_PUBKEY"), "{err}");
    assert!(!err.contains("staging"), "{err}");
    // The same repository with its own key in binary form verifies.
    let ok = w.recipe("keys/vendor.gpg");
    let out = kiln().arg("check").arg(&ok).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Writes a recipe beside the world's recipes, extending the EC2 one (its base is cached).
fn recipe_with(w: &World, name: &str, body: &str) -> PathBuf {
    let p = w.dir.join("recipes").join(format!("{name}.toml"));
    std::fs::write(&p, format!("extends = \"debian-12-ec2.toml\"\n\n[image]\nname = \"{name}\"\n\n{body}")).unwrap();
    p
}

fn deb(w: &World, name: &str, arch: &str, depends: &str) -> String {
    let dir = w.dir.join(format!("pkg-{name}"));
    std::fs::create_dir_all(dir.join("DEBIAN")).unwrap();
    std::fs::write(
        dir.join("DEBIAN/control"),
        format!("Package: {name}\nVersion: 1\nArchitecture: {arch}\nMaintainer: t <t@example.invalid>\n{depends}Description: test\n test\n"),
    )
    .unwrap();
    let out = w.dir.join("recipes").join(format!("{name}.deb"));
    run_ok(Command::new("dpkg-deb").arg("--root-owner-group").arg("--build").arg(&dir).arg(&out));
    format!("{name}.deb")
}

/// A package for another architecture, and two files of one package, are refused at the
/// recipe line before anything is staged.
#[test]
fn a_local_package_for_another_architecture_is_refused() {
    let Some(w) = world() else { return };
    let file = deb(w, "kiln-arm-only", "arm64", "");
    let r = recipe_with(w, "wrong-arch", &format!("[packages]\nlocal = [\"{file}\"]\n"));
    let err = refused(&r);
    assert!(err.contains("wrong-arch.toml:7:10: packages.local: `kiln-arm-only.deb` is kiln-arm-only 1 for arm64, but the image is amd64"), "{err}");
    assert!(err.contains("--arch arm64"), "{err}");
    assert!(!err.contains("staging"), "{err}");
}

/// Dependencies apt cannot satisfy name the local package's recipe line and apt's words; a
/// failing step names itself, its exit status and its last lines; neither leaves an image.
#[test]
fn unsatisfiable_dependencies_and_a_failing_step_stop_the_build() {
    let Some(w) = world() else { return };
    let file = deb(w, "kiln-needs-nothing-real", "all", "Depends: kiln-no-such-package\n");
    let r = recipe_with(w, "unsatisfiable", &format!("[packages]\nlocal = [\"{file}\"]\n"));
    let err = refused(&r);
    assert!(err.contains("unsatisfiable.toml:7:10: packages.local `kiln-needs-nothing-real.deb` (kiln-needs-nothing-real 1): its dependencies cannot be installed"), "{err}");
    assert!(err.contains("Depends: kiln-no-such-package"), "{err}");

    let r = recipe_with(
        w,
        "failing-step",
        "[[steps]]\nrun = \"echo first\"\n\n[[steps]]\nrun = \"\"\"\necho preparing\necho about to fail >&2\nexit 7\n\"\"\"\n",
    );
    let err = refused(&r);
    assert!(err.contains("failing-step.toml:9:1: step 2 (`echo preparing…`) failed with exit status 7"), "{err}");
    assert!(err.contains("preparing\nabout to fail"), "{err}");
    assert!(err.contains("No image was written"), "{err}");
    assert!(err.contains("kiln-step 1: first"), "the first step's output is in the log: {err}");

    // The audit runs after the steps: a key a step leaves behind stops the build.
    let r = recipe_with(
        w,
        "step-leaves-a-key",
        "[[steps]]\nrun = \"mkdir -p /etc/app && printf -- '-----BEGIN PRIVATE KEY-----\\\\nMIIE\\\\n-----END PRIVATE KEY-----\\\\n' > /etc/app/tls.key\"\n",
    );
    let err = refused(&r);
    assert!(err.contains("/etc/app/tls.key"), "{err}");
    assert!(err.contains("would carry what a golden image must not"), "{err}");
}

/// `--offline` builds the service recipe from the cache without reading Debian's archive or the
/// repository (their state comes from the cached base and layer): the same image as online.
/// (An image name of its own: the other tests remove and replace `service-test`'s layers.)
#[test]
fn an_offline_rebuild_gives_the_same_image() {
    let Some(w) = world() else { return };
    let recipe = w.dir.join("recipes/service-offline.toml");
    let text = std::fs::read_to_string(w.recipe("keys/vendor.asc")).unwrap();
    std::fs::write(&recipe, text.replace("name = \"service-test\"", "name = \"service-offline\"")).unwrap();
    let t = tempdir();
    let online = build(&recipe, None, &t.path().join("online"));
    let o = run_ok(
        kiln()
            .arg("build")
            .arg(&recipe)
            .args(["--offline", "--json", "--out"])
            .arg(t.path().join("offline"))
            .env("KILN_CACHE_DIR", crate::common::cache_dir())
            .env("SOURCE_DATE_EPOCH", EPOCH),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("offline: the base was staged"), "{err}");
    assert!(!err.contains("reading the recipe's repositories"), "{err}");
    assert!(err.contains("service layer: unchanged inputs, reused from the cache"), "{err}");
    let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["sha256"], online.summary["sha256"], "{err}");
}
