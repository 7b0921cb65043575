//! Fuzzes the ext2/3/4 reader behind `kiln inspect` and `kiln inspect --audit`: any bytes given
//! as an image must give a superblock summary and a tree, or a typed error; never a panic, an
//! overflow (block-size shifts, group counts, extent ranges, indirect block chains), a hang or a
//! huge allocation. The input is also read through the block cache EBS snapshots go through
//! (4 KiB blocks, a four-block cache).
#![no_main]

use std::sync::Arc;

use kiln_formats::device::{BlockDevice, MemoryFetch};
use kiln_formats::ext4::read::{read_tree, read_tree_from, Superblock};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = kiln_fuzz::input_file("ext4", data);
    if let Ok(Some(sb)) = Superblock::read_at(&path, 0) {
        let _ = sb.feature_names();
    }
    if let Ok(tree) = read_tree(&path, 0) {
        kiln_fuzz::read_every_file(&tree);
    }
    let dev = Arc::new(BlockDevice::new(MemoryFetch { data: data.to_vec(), block_size: 4096 }, 4 * 4096));
    if let Ok(tree) = read_tree_from(dev, 0) {
        kiln_fuzz::read_every_file(&tree);
    }
});
