//! What a user reads when something is wrong: each cause once, no raw bytes from an input,
//! short lines; and tables whose columns line up.

use std::process::Command;

use crate::common::{kiln, run_ok, tempdir, tool};

/// kiln's error line for a command that must fail.
fn error_of(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(!o.status.success(), "expected a failure");
    let err = String::from_utf8(o.stderr).expect("messages are UTF-8");
    assert!(err.starts_with("kiln: error: "), "{err}");
    assert!(err.chars().all(|c| c == '\n' || !c.is_control()), "a control character reached the terminal: {err:?}");
    err
}

#[test]
fn a_missing_recipe_says_its_cause_once() {
    let err = error_of(kiln().args(["build", "/nonexistent/recipe.toml"]));
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    assert!(err.contains("/nonexistent/recipe.toml") && err.len() < 200, "{err}");
}

#[test]
fn a_manifest_that_is_not_json_says_its_cause_once() {
    let t = tempdir();
    let bad = t.path().join("bad.manifest.json");
    std::fs::write(&bad, "{ not json").unwrap();
    let err = error_of(kiln().arg("publish").arg(&bad));
    assert_eq!(err.matches("key must be a string").count(), 1, "{err}");
    assert!(err.contains("is not a kiln build manifest") && err.len() < 300, "{err}");
}

#[test]
fn a_binary_input_is_escaped_and_cut_short() {
    let t = tempdir();
    let bin = t.path().join("not-a.tar");
    // An ELF-like header, escape sequences and every byte value: none may reach the terminal.
    let mut bytes = b"\x7fELF\x02\x01\x01\x1b[2J\x07".to_vec();
    bytes.extend((0..=255u8).cycle().take(8192));
    std::fs::write(&bin, &bytes).unwrap();
    let err = error_of(kiln().arg("mkfs").arg(&bin).arg(t.path().join("out.img")));
    assert!(err.contains("\\x7fELF") || err.contains("not-a.tar"), "{err}");
    assert!(err.lines().all(|l| l.chars().count() <= 420), "{err}");
}

/// `kiln inspect` on a disk whose partition names and types differ in length: every row's
/// cells start where the header's labels start.
#[test]
fn the_inspect_table_lines_up() {
    let Some(sgdisk) = tool("sgdisk") else { return };
    let t = tempdir();
    let img = t.path().join("disk.raw");
    std::fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
    run_ok(
        Command::new(sgdisk)
            .args(["-n", "1:2048:+8M", "-t", "1:EF00", "-c", "1:EFI"])
            .args(["-n", "2:0:+16M", "-t", "2:8300", "-c", "2:a-much-longer-partition-name"])
            .args(["-n", "3:0:0", "-t", "3:EF02", "-c", "3:b"])
            .arg(&img),
    );
    let out = String::from_utf8(run_ok(kiln().arg("inspect").arg(&img)).stdout).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    let header = lines.iter().position(|l| l.contains("name") && l.contains("GUID")).expect(&out);
    let rows: Vec<&str> = lines[header + 1..].iter().copied().filter(|l| !l.starts_with(' ')).collect();
    assert_eq!(rows.len(), 3, "{out}");
    let col = |label: &str| lines[header].find(label).unwrap();
    for row in &rows {
        let cells: Vec<&str> = row.split("  ").filter(|c| !c.trim().is_empty()).map(str::trim).collect();
        for (label, cell) in [("name", 1), ("type", 2), ("GUID", 6)] {
            assert_eq!(row.find(cells[cell]), Some(col(label)), "{label} in {row:?}\n{out}");
        }
        // Right-aligned numbers end where their header ends.
        let size_end = col("size") + "size".len();
        assert_eq!(row[..size_end].trim_end().len(), size_end, "size in {row:?}\n{out}");
    }
}

/// Every command that takes an architecture parses it the same way and says what it accepts.
#[test]
fn every_arch_flag_parses_one_way() {
    for cmd in [&["build", "r.toml"][..], &["check", "r.toml"], &["boot", "x.raw"], &["bundle", "x.raw"]] {
        let o = kiln().args(cmd).args(["--arch", "sparc"]).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{cmd:?}: {err}");
        assert!(err.contains("`sparc` is not an architecture kiln builds") && err.contains("x86_64"), "{cmd:?}: {err}");
    }
}
