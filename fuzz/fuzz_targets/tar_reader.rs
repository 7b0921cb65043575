//! Coverage-guided fuzzing of the tar reader: any bytes must give a tree or an error, never a
//! panic, and an accepted tree must be readable within its own bounds.
//!
//!   cargo +nightly fuzz run tar_reader fuzz/corpus/tar_reader -- -max_total_time=300
#![no_main]

use kiln::formats::tar::{read_tar, TarOptions};
use kiln::formats::tree::Kind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.tar");
    std::fs::write(&path, data).unwrap();
    if let Ok(tree) = read_tar(&path, &TarOptions { spool_dir: Some(dir.path().to_path_buf()) }) {
        tree.walk(|_, id, _| {
            if let Kind::File(c) = &tree.inode(id).kind {
                let mut buf = vec![0u8; c.size.min(1 << 16) as usize];
                let _ = tree.read_content(c, 0, &mut buf);
            }
        });
    }
});
