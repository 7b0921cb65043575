//! The house rules the compiler cannot see by itself: the library crates' dependencies, and
//! one definition for each fact that used to be written in several places.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// `file:line` of every line under src/ containing `needle` (case-insensitive).
fn lines_with(needle: &str) -> Vec<String> {
    let needle = needle.to_lowercase();
    let mut hits = Vec::new();
    for f in sources(&repo().join("src")) {
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, line) in text.lines().enumerate() {
            if line.to_lowercase().contains(&needle) {
                hits.push(format!("{}:{}", f.strip_prefix(repo()).unwrap().display(), i + 1));
            }
        }
    }
    hits
}

/// The formats and the recipe and manifest model are crates of their own so that nothing of
/// AWS, async, the command line or the terminal can reach them; their dependency trees (as
/// cargo resolves them, not as the manifests read) must stay that way, so the fuzz targets
/// keep building without the AWS SDK.
#[test]
fn the_formats_and_model_crates_depend_on_no_aws_async_cli_or_terminal_code() {
    for krate in ["kiln-formats", "kiln-model"] {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .current_dir(repo())
            .args(["tree", "--offline", "-p", krate, "-e", "normal", "--prefix", "none", "-f", "{p}"])
            .output()
            .expect("cargo tree runs");
        assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
        let tree = String::from_utf8(out.stdout).unwrap();
        let names: Vec<&str> = tree.lines().filter_map(|l| l.split_whitespace().next()).collect();
        assert!(names.contains(&krate) && names.contains(&"sha2"), "unexpected cargo tree output:\n{tree}");
        let forbidden = |n: &&str| {
            n.starts_with("aws-")
                || ["tokio", "hyper", "clap", "indicatif", "anyhow", "kiln"].contains(n)
                || n.starts_with("tokio-")
        };
        let bad: Vec<&str> = names.iter().copied().filter(forbidden).collect();
        assert!(bad.is_empty(), "{krate} now depends on {bad:?}");
    }
}

/// Each of these facts was once written in several modules; one definition each now.
#[test]
fn each_fact_is_defined_once() {
    for fact in [
        // Partition type GUIDs: the ESP, the x86_64 and arm64 root, BIOS boot.
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
        "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
        "B921B045-1DF0-41C3-AF44-4C6F280D3FAE",
        "21686148-6449-6E6F-744E-656564454649",
        // ext4 feature names (and with them their bits).
        "\"metadata_csum\"",
        "\"flex_bg\"",
        // Architecture names as users write them.
        "\"aarch64\"",
    ] {
        let hits = lines_with(fact);
        assert_eq!(hits.len(), 1, "{fact} is written at {hits:?}");
    }
    // The fuzz targets use the format crate, not the files by path.
    for f in [sources(&repo().join("fuzz/fuzz_targets")), sources(&repo().join("fuzz/src"))].concat() {
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(!text.contains("#[path"), "{} includes sources by path", f.display());
    }
}

/// The files that go with an image are named by one type, `kiln::outputs::Outputs`: no other
/// file under src/ builds one of their names (`format!("{name}.manifest.json")`) or tests for
/// one by its suffix. Help texts that show an example path are not names being made.
#[test]
fn an_images_files_are_named_in_one_place() {
    let suffixes = [
        ".manifest.json",
        ".raw.sha256",
        ".spdx.json",
        ".intoto.jsonl",
        ".test.json",
        ".publish.json",
        ".publish-state.json",
        ".bundle.json",
    ];
    let mut outside = Vec::new();
    let mut inside = 0;
    for f in sources(&repo().join("src")) {
        let text = std::fs::read_to_string(&f).unwrap();
        let rel = f.strip_prefix(repo()).unwrap().display().to_string();
        for (i, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            if suffixes.iter().any(|s| line.contains(&format!("\"{s}\"")) || line.contains(&format!("}}{s}\""))) {
                if rel == "src/model/outputs.rs" {
                    inside += 1;
                } else {
                    outside.push(format!("{rel}:{}: {}", i + 1, code));
                }
            }
        }
    }
    assert!(outside.is_empty(), "an image's file names made outside Outputs:\n{}", outside.join("\n"));
    // The rule itself is found, so the search cannot pass by finding nothing.
    assert!(inside >= suffixes.len(), "only {inside} suffixes found in src/model/outputs.rs");
}

/// The binary parses and prints; the library decides. No file under src/cli/ sets a time
/// limit (a `Duration` from a number, or a number as the default of a `--…timeout` flag) or
/// names a region: those defaults live in the library, beside the code they govern, where
/// `kiln build --test` and `kiln test` share them.
#[test]
fn the_command_line_sets_no_timeout_or_region() {
    let mut found = Vec::new();
    let mut flags = 0;
    for f in sources(&repo().join("src/cli")) {
        let text = std::fs::read_to_string(&f).unwrap();
        let rel = f.strip_prefix(repo()).unwrap().display().to_string();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            let numeric_default = code
                .split("default_value_t = ")
                .nth(1)
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()));
            // The field the attribute belongs to is the next `pub NAME:` line.
            let field = lines[i..].iter().find_map(|l| l.trim_start().strip_prefix("pub ")).unwrap_or("");
            if code.starts_with("#[arg") && field.split(':').next().is_some_and(|n| n.contains("timeout")) {
                flags += 1;
            }
            let duration = code.contains("Duration::from_secs(")
                && code.split("Duration::from_secs(").skip(1).any(|r| r.starts_with(|c: char| c.is_ascii_digit()));
            let region = ["\"us-", "\"eu-", "\"ap-", "\"sa-", "\"ca-", "\"me-", "\"af-"]
                .iter()
                .any(|p| code.split(p).skip(1).any(|r| r.split('"').next().is_some_and(is_region_tail)));
            if duration || region || (numeric_default && field.split(':').next().is_some_and(|n| n.contains("timeout")))
            {
                found.push(format!("{rel}:{}: {code}", i + 1));
            }
        }
    }
    assert!(found.is_empty(), "policy in the command line:\n{}", found.join("\n"));
    // The search sees the timeout flags it guards, so it cannot pass by finding none.
    assert!(flags >= 4, "only {flags} --…timeout flags found under src/cli/");
}

/// `east-1` of `"us-east-1"`: a whole quoted region name, not one inside help text.
fn is_region_tail(s: &str) -> bool {
    let mut parts = s.split('-');
    matches!((parts.next(), parts.next(), parts.next()),
        (Some(w), Some(n), None) if w.chars().all(|c| c.is_ascii_lowercase()) && !w.is_empty()
            && n.chars().all(|c| c.is_ascii_digit()) && !n.is_empty())
}

/// ext4's on-disk layout is written down once, in `src/formats/ext4/ondisk.rs`: the reader
/// and the writer both take their offsets and magic numbers from it, so a field cannot be
/// written at one offset and read at another. The superblock magic is spelled in exactly one
/// file under src/.
#[test]
fn the_ext4_reader_and_writer_share_one_on_disk_layout() {
    let ext4 = repo().join("src/formats/ext4");
    for file in ["read.rs", "write.rs", "layout.rs", "htree.rs"] {
        let text = std::fs::read_to_string(ext4.join(file)).unwrap();
        assert!(text.contains("use super::ondisk::"), "src/formats/ext4/{file} does not use the on-disk layout module");
    }
    let magic = ["0xef53", "0xef_53"];
    let mut files: Vec<String> = sources(&repo().join("src"))
        .into_iter()
        .filter(|f| {
            let text = std::fs::read_to_string(f).unwrap().to_lowercase();
            magic.iter().any(|m| text.contains(m))
        })
        .map(|f| f.strip_prefix(repo()).unwrap().display().to_string())
        .collect();
    files.sort();
    assert_eq!(files, ["src/formats/ext4/ondisk.rs"], "the ext4 magic number is spelled outside the layout module");
    // Nor are the extent, xattr or journal magics spelled twice.
    for other in ["0xf30a", "0xea02_0000", "0xc03b_3998"] {
        let hits = lines_with(other);
        assert_eq!(hits.len(), 1, "{other} is written at {hits:?}");
    }
}

/// The recipe and manifest model is data and rules: it reads the recipe, the files the recipe
/// names and the manifest it is given, but runs no program, looks for none on the host, and
/// keeps nothing on disk. Finding programs (`kiln::host`) and remembering file digests between
/// runs (`kiln::digest_cache`, passed to the model as a `FileDigests`) live in the top crate.
#[test]
fn the_model_crate_runs_no_program_and_writes_no_file() {
    let forbidden = [
        // Running or finding programs.
        "std::process",
        "Command::new",
        "find_program",
        // Writing files: an on-disk cache or any other state.
        "DigestCache",
        "fs::write",
        "File::create",
        "OpenOptions",
        "create_dir",
        "remove_file",
        "rename(",
        "atomic::",
        "set_permissions",
    ];
    let model = repo().join("src/model");
    let mut hits = Vec::new();
    for f in sources(&model) {
        let text = std::fs::read_to_string(&f).unwrap();
        // Unit tests may make scratch files; the crate's code may not.
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        for (i, line) in code.lines().enumerate() {
            let line = line.trim_start();
            if line.starts_with("//") {
                continue;
            }
            for needle in forbidden.iter().filter(|n| line.contains(*n)) {
                hits.push(format!("{}:{}: {needle}", f.strip_prefix(repo()).unwrap().display(), i + 1));
            }
        }
    }
    assert!(hits.is_empty(), "the model crate does host I/O beyond reading its inputs:\n{}", hits.join("\n"));
}
