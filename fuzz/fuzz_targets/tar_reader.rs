//! Fuzzes kiln's tar reader: any byte string given as an archive must produce a tree or a
//! typed error, never a panic, a hang or an out-of-bounds content reference. On success the
//! whole tree is walked and every file's content read back through `Tree::read_content`,
//! which is what the ext4 writer does, so bad segment offsets or sizes surface here too.
//!
//! Run: `cargo +nightly fuzz run tar_reader` from the repository root (see fuzz/README.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

// The library modules are included by path as siblings (tar.rs names the tree `super::tree`),
// so the fuzzer exercises exactly the shipped source without building the rest of kiln.
#[allow(dead_code)]
#[path = "../../src/formats/tar.rs"]
mod tar;
#[allow(dead_code)]
#[path = "../../src/formats/tree.rs"]
mod tree;

use tar::{read_tar, TarOptions};
use tree::Kind;

fuzz_target!(|data: &[u8]| {
    // read_tar takes a path (contents stay by reference in the archive), so each input is
    // written to a private temp file. One directory per process: libFuzzer may run several
    // jobs in parallel.
    let dir = std::env::temp_dir().join(format!("kiln-fuzz-tar-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("input.tar");
    std::fs::write(&path, data).expect("write input");
    let opts = TarOptions { spool_dir: Some(dir.clone()) };
    let Ok(tree) = read_tar(&path, &opts) else { return };
    let mut files = Vec::new();
    tree.walk(|_path, id, first| {
        if first {
            files.push(id);
        }
    });
    let mut buf = vec![0u8; 1 << 16];
    for id in files {
        let _ = tree.nlink(id);
        if let Kind::File(content) = &tree.inode(id).kind {
            // Sizes come from the archive; cap what is read so a claimed 8 EiB file with no
            // data segments does not make one input take forever (holes read as zeros).
            let len = content.size.min(1 << 20);
            let mut off = 0;
            while off < len {
                let n = (len - off).min(buf.len() as u64) as usize;
                // An I/O error (content past the end of a truncated archive) is a fine answer;
                // a panic is not.
                if tree.read_content(content, off, &mut buf[..n]).is_err() {
                    break;
                }
                off += n as u64;
            }
        }
    }
});
