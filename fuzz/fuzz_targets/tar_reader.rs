//! Fuzzes kiln's tar reader: any byte string given as an archive must produce a tree or a
//! typed error, never a panic, a hang or an out-of-bounds content reference. On success every
//! file's content is read back through `Tree::read_content`, as the ext4 writer does, so bad
//! segment offsets or sizes surface here too.
//!
//! Run: `cargo fuzz run tar_reader` from the repository root (see fuzz/README.md).
#![no_main]

use kiln_formats::tar::{read_tar, TarOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = kiln_fuzz::input_file("tar", data);
    let opts = TarOptions { spool_dir: path.parent().map(Into::into) };
    if let Ok(tree) = read_tar(&path, &opts) {
        kiln_fuzz::read_every_file(&tree);
    }
});
