//! Fuzzes `kiln inspect` and `kiln inspect --audit` on arbitrary bytes as a disk: the partition
//! table (GPT, MBR, or none), each partition's file system summary, and every ext2/3/4 tree
//! read back. Each input is read twice: as an image file, and through the block cache an EBS
//! snapshot is read through (`BlockDevice`, a two-block cache so eviction runs on every input,
//! blocks of 512 B to 64 KiB chosen by the last byte). Any input must give a summary or a typed
//! error, never a panic (LBA ranges past the end or past u64 bytes, partitions ending before
//! they start, reads straddling blocks or the end of the disk).
#![no_main]

use std::sync::Arc;

use kiln_formats::device::{BlockDevice, Device, FileDevice, MemoryFetch};
use libfuzzer_sys::fuzz_target;

fn inspect(dev: Arc<dyn Device>) {
    let Ok(disk) = kiln_formats::inspect::read_device(dev.clone()) else { return };
    for p in &disk.partitions {
        if let (Some(kiln_formats::inspect::FileSystem::Ext4(_)), Some(offset)) = (&p.filesystem, p.offset_bytes) {
            if let Ok(tree) = kiln_formats::ext4::read::read_tree_from(dev.clone(), offset) {
                kiln_fuzz::read_every_file(&tree);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // libFuzzer's hook aborts on any panic, even one kiln catches: fatfs 0.3.6 panics on
    // cluster numbers below 2 and `fat::summary` turns that into "unreadable". The default hook
    // keeps a panic that escapes (libfuzzer-sys aborts on it) a crash.
    static DEFAULT_HOOK: std::sync::Once = std::sync::Once::new();
    DEFAULT_HOOK.call_once(|| drop(std::panic::take_hook()));
    let path = kiln_fuzz::input_file("inspect", data);
    inspect(FileDevice::open(&path).expect("input file"));
    let block_size = 512u64 << (data.last().copied().unwrap_or(0) % 8);
    let blocks = BlockDevice::new(MemoryFetch { data: data.to_vec(), block_size }, 2 * block_size);
    inspect(Arc::new(blocks));
});
