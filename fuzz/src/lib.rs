//! What every fuzz target needs: the input as a file (kiln's readers take paths, since file
//! contents stay by reference), and a walk that reads back every file of a tree the way the
//! ext4 writer and `kiln inspect --audit` do.

use std::path::PathBuf;

use kiln_formats::tree::{Kind, Tree};

/// Writes `data` to a file private to this process (libFuzzer may run jobs in parallel) and
/// returns its path; `name` keeps the targets apart.
pub fn input_file(name: &str, data: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-fuzz-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("input");
    std::fs::write(&path, data).expect("write input");
    path
}

/// Visits every inode and reads each file's contents, up to 1 MiB each: sizes come from the
/// input, so a claimed 8 EiB file of holes must not make one input take forever. An I/O error
/// (contents past the end of a truncated input) is a fine answer; a panic is not.
pub fn read_every_file(tree: &Tree) {
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
            let len = content.size.min(1 << 20);
            let mut off = 0;
            while off < len {
                let n = (len - off).min(buf.len() as u64) as usize;
                if tree.read_content(content, off, &mut buf[..n]).is_err() {
                    break;
                }
                off += n as u64;
            }
        }
    }
}
