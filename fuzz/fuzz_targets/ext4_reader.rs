//! Fuzzes the ext4 reader behind `kiln inspect` and `kiln inspect --audit`: any bytes given as
//! an image must give a superblock summary and a tree, or a typed error; never a panic, an
//! overflow (block-size shifts, group counts, extent ranges), a hang or a huge allocation.
#![no_main]

use kiln_formats::ext4::read::{read_tree, Superblock};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = kiln_fuzz::input_file("ext4", data);
    if let Ok(Some(sb)) = Superblock::read_at(&path, 0) {
        let _ = sb.feature_names();
    }
    if let Ok(tree) = read_tree(&path, 0) {
        kiln_fuzz::read_every_file(&tree);
    }
});
