//! Emission: the planned file system as one stream of ascending writes. Only blocks that hold
//! something non-zero are passed on; everything else is a hole.

use super::csum;
use super::layout::{Ext4Plan, InodeRec, RegionKind, FIRST_INO, FLEX, JOURNAL_INO};
use super::{features, Ext4Error, BLOCKS_PER_GROUP, BLOCK_SIZE, INODE_SIZE};
use crate::image::Sink;
use crate::tree::{Kind, Timestamp, Tree};

const BS: usize = BLOCK_SIZE as usize;

const COMPAT: u32 = features::HAS_JOURNAL | features::EXT_ATTR | features::DIR_INDEX;
const INCOMPAT: u32 = features::FILETYPE | features::EXTENTS | features::FLEX_BG;
const RO_COMPAT: u32 = features::SPARSE_SUPER
    | features::LARGE_FILE
    | features::HUGE_FILE
    | features::DIR_NLINK
    | features::EXTRA_ISIZE
    | features::METADATA_CSUM;
/// bg_flags: the inode table is zeroed (holes read as zeros).
const BG_INODE_ZEROED: u16 = 0x4;

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Seconds split into the 32-bit field and the extra field's epoch bits, with nanoseconds.
fn time_fields(t: Timestamp) -> (u32, u32) {
    let lo = t.secs as u32;
    let epoch = ((t.secs - i64::from(lo as i32)) >> 32) as u32 & 3;
    (lo, epoch | (t.nanos.min(999_999_999) << 2))
}

struct GroupStats {
    free_blocks: u32,
    free_inodes: u32,
    used_dirs: u32,
    itable_unused: u32,
    block_bitmap: Vec<u8>,
    inode_bitmap: Vec<u8>,
}

impl Ext4Plan {
    fn group_stats(&self) -> Vec<GroupStats> {
        let geo = &self.geo;
        let ipg = geo.inodes_per_group as usize;
        (0..geo.groups)
            .map(|g| {
                let mut bb = vec![0u8; BS];
                let start = geo.group_start(g);
                let n = geo.group_blocks(g);
                let mut free = 0u32;
                for i in 0..BLOCKS_PER_GROUP {
                    let used = i >= n || self.is_used(start + i);
                    if used {
                        bb[(i / 8) as usize] |= 1 << (i % 8);
                    } else {
                        free += 1;
                    }
                }
                let mut ib = vec![0u8; BS];
                // Bits past the group's inodes are set, as the kernel and e2fsck expect.
                for byte in ib.iter_mut().skip(ipg / 8) {
                    *byte = 0xff;
                }
                let (mut free_inodes, mut dirs, mut last_used) = (0u32, 0u32, 0usize);
                for i in 0..ipg {
                    let ino = g as usize * ipg + i + 1;
                    let rec = &self.inodes[ino - 1];
                    if rec.used || ino < FIRST_INO as usize {
                        ib[i / 8] |= 1 << (i % 8);
                        last_used = i + 1;
                        if rec.is_dir {
                            dirs += 1;
                        }
                    } else {
                        free_inodes += 1;
                    }
                }
                GroupStats {
                    free_blocks: free,
                    free_inodes,
                    used_dirs: dirs,
                    itable_unused: (ipg - last_used) as u32,
                    block_bitmap: bb,
                    inode_bitmap: ib,
                }
            })
            .collect()
    }

    fn superblock(&self, group: u64, stats: &[GroupStats]) -> Vec<u8> {
        let geo = &self.geo;
        let o = &self.opts;
        let mut s = vec![0u8; 1024];
        let free_blocks: u64 = stats.iter().map(|g| u64::from(g.free_blocks)).sum();
        let free_inodes: u64 = stats.iter().map(|g| u64::from(g.free_inodes)).sum();
        let t = o.timestamp as u32;
        put32(&mut s, 0x00, geo.inodes() as u32);
        put32(&mut s, 0x04, geo.blocks as u32);
        put32(&mut s, 0x08, self.reserved_blocks as u32);
        put32(&mut s, 0x0C, free_blocks as u32);
        put32(&mut s, 0x10, free_inodes as u32);
        put32(&mut s, 0x14, 0); // first data block: 0 with 4 KiB blocks
        put32(&mut s, 0x18, 2); // log2(block size) - 10
        put32(&mut s, 0x1C, 2);
        put32(&mut s, 0x20, BLOCKS_PER_GROUP as u32);
        put32(&mut s, 0x24, BLOCKS_PER_GROUP as u32);
        put32(&mut s, 0x28, geo.inodes_per_group as u32);
        put32(&mut s, 0x30, t); // write time
        put16(&mut s, 0x36, 0xFFFF); // max mount count: no forced checks
        put16(&mut s, 0x38, 0xEF53);
        put16(&mut s, 0x3A, 1); // clean
        put16(&mut s, 0x3C, 1); // errors: continue
        put32(&mut s, 0x40, t); // last check
        put32(&mut s, 0x4C, 1); // dynamic revision
        put32(&mut s, 0x54, FIRST_INO);
        put16(&mut s, 0x58, INODE_SIZE as u16);
        put16(&mut s, 0x5A, group as u16);
        put32(&mut s, 0x5C, COMPAT);
        put32(&mut s, 0x60, INCOMPAT);
        put32(&mut s, 0x64, RO_COMPAT);
        s[0x68..0x78].copy_from_slice(&o.uuid);
        s[0x78..0x78 + o.label.len()].copy_from_slice(o.label.as_bytes());
        put32(&mut s, 0xE0, JOURNAL_INO);
        s[0xEC..0xFC].copy_from_slice(&o.hash_seed);
        s[0xFC] = 1; // default hash: half_md4
        s[0xFD] = 1; // s_jnl_blocks holds a copy of the journal inode's block map
        put32(&mut s, 0x100, 0x0004 | 0x0008); // default mount options: user_xattr, acl
        put32(&mut s, 0x108, t); // mkfs time
        let j = &self.inodes[JOURNAL_INO as usize - 1];
        s[0x10C..0x10C + 60].copy_from_slice(&j.i_block);
        put32(&mut s, 0x10C + 60, (j.size >> 32) as u32);
        put32(&mut s, 0x10C + 64, j.size as u32);
        put16(&mut s, 0x15C, 32); // min extra isize
        put16(&mut s, 0x15E, 32); // want extra isize
        put32(&mut s, 0x160, 0x2); // directory hashes are unsigned
        s[0x174] = FLEX.trailing_zeros() as u8;
        s[0x175] = 1; // checksum type: crc32c
        let c = csum::raw(!0, &s[..0x3FC]);
        put32(&mut s, 0x3FC, c);
        s
    }

    fn descriptors(&self, stats: &[GroupStats]) -> Vec<u8> {
        let geo = &self.geo;
        let mut d = vec![0u8; (geo.gdt_blocks as usize) * BS];
        let ipg_bytes = geo.inodes_per_group as usize / 8;
        for (g, st) in stats.iter().enumerate() {
            let at = g * 32;
            let e = &mut d[at..at + 32];
            put32(e, 0x00, geo.block_bitmap(g as u64) as u32);
            put32(e, 0x04, geo.inode_bitmap(g as u64) as u32);
            put32(e, 0x08, geo.inode_table(g as u64) as u32);
            put16(e, 0x0C, st.free_blocks as u16);
            put16(e, 0x0E, st.free_inodes as u16);
            put16(e, 0x10, st.used_dirs as u16);
            put16(e, 0x12, BG_INODE_ZEROED);
            put16(e, 0x18, csum::raw(self.fs_seed, &st.block_bitmap) as u16);
            put16(e, 0x1A, csum::raw(self.fs_seed, &st.inode_bitmap[..ipg_bytes]) as u16);
            put16(e, 0x1C, st.itable_unused as u16);
            // Over the whole descriptor with its checksum field still zero.
            let c = csum::raw(csum::raw(self.fs_seed, &(g as u32).to_le_bytes()), &e[..0x20]);
            put16(e, 0x1E, c as u16);
        }
        d
    }

    fn inode_bytes(&self, ino: u32, r: &InodeRec) -> [u8; INODE_SIZE as usize] {
        let mut b = [0u8; INODE_SIZE as usize];
        put16(&mut b, 0x00, r.mode);
        put16(&mut b, 0x02, r.uid as u16);
        put32(&mut b, 0x04, r.size as u32);
        let (a, ax) = time_fields(r.atime);
        let (c, cx) = time_fields(r.ctime);
        let (m, mx) = time_fields(r.mtime);
        let (cr, crx) = time_fields(r.crtime);
        put32(&mut b, 0x08, a);
        put32(&mut b, 0x0C, c);
        put32(&mut b, 0x10, m);
        put16(&mut b, 0x18, r.gid as u16);
        put16(&mut b, 0x1A, r.links);
        let sectors = r.fs_blocks * (BLOCK_SIZE / 512);
        put32(&mut b, 0x1C, sectors as u32);
        put32(&mut b, 0x20, r.flags);
        b[0x28..0x64].copy_from_slice(&r.i_block);
        put32(&mut b, 0x68, r.file_acl as u32);
        put32(&mut b, 0x6C, (r.size >> 32) as u32);
        put16(&mut b, 0x74, (sectors >> 32) as u16);
        put16(&mut b, 0x76, (r.file_acl >> 32) as u16);
        put16(&mut b, 0x78, (r.uid >> 16) as u16);
        put16(&mut b, 0x7A, (r.gid >> 16) as u16);
        put16(&mut b, 0x80, 32); // i_extra_isize
        put32(&mut b, 0x84, cx);
        put32(&mut b, 0x88, mx);
        put32(&mut b, 0x8C, ax);
        put32(&mut b, 0x90, cr);
        put32(&mut b, 0x94, crx);
        b[0xA0..0xA0 + r.ibody_xattr.len()].copy_from_slice(&r.ibody_xattr);
        // Checksum with both checksum fields zero: seed(ino, generation) over the whole inode.
        let seed = csum::inode_seed(self.fs_seed, ino, 0);
        let c = csum::raw(seed, &b);
        put16(&mut b, 0x7C, c as u16);
        put16(&mut b, 0x82, (c >> 16) as u16);
        b
    }

    /// Writes the file system through `sink` (offsets relative to its start).
    pub fn write(&self, tree: &Tree, sink: &mut dyn Sink) -> Result<(), Ext4Error> {
        let geo = &self.geo;
        let stats = self.group_stats();
        let gdt = self.descriptors(&stats);

        // Everything that has a fixed place, merged with the planned regions by block.
        enum Item<'a> {
            Super(u64),
            Gdt,
            BlockBitmap(u64),
            InodeBitmap(u64),
            InodeTable(u64),
            Region(&'a super::layout::Region),
        }
        let mut items: Vec<(u64, Item)> = Vec::new();
        for g in 0..geo.groups {
            if geo.has_super(g) {
                items.push((geo.group_start(g), Item::Super(g)));
                items.push((geo.group_start(g) + 1, Item::Gdt));
            }
            items.push((geo.block_bitmap(g), Item::BlockBitmap(g)));
            items.push((geo.inode_bitmap(g), Item::InodeBitmap(g)));
            items.push((geo.inode_table(g), Item::InodeTable(g)));
        }
        for r in &self.regions {
            items.push((r.start, Item::Region(r)));
        }
        items.sort_by_key(|(b, _)| *b);

        let mut buf = vec![0u8; 256 * BS];
        for (block, item) in items {
            let off = block * BLOCK_SIZE;
            match item {
                Item::Super(g) => {
                    let sb = self.superblock(g, &stats);
                    // The primary sits 1024 bytes into block 0; backups start their block.
                    sink.write_at(if g == 0 { 1024 } else { off }, &sb)?;
                }
                Item::Gdt => sink.write_at(off, &gdt)?,
                Item::BlockBitmap(g) => sink.write_at(off, &stats[g as usize].block_bitmap)?,
                Item::InodeBitmap(g) => sink.write_at(off, &stats[g as usize].inode_bitmap)?,
                Item::InodeTable(g) => {
                    let ipg = geo.inodes_per_group;
                    for k in 0..geo.itable_blocks {
                        let first = g * ipg + k * (BLOCK_SIZE / INODE_SIZE) + 1;
                        let mut blk = [0u8; BS];
                        let mut any = false;
                        for i in 0..(BLOCK_SIZE / INODE_SIZE) {
                            let ino = first + i;
                            let r = &self.inodes[ino as usize - 1];
                            if r.used {
                                let at = (i * INODE_SIZE) as usize;
                                blk[at..at + INODE_SIZE as usize].copy_from_slice(&self.inode_bytes(ino as u32, r));
                                any = true;
                            }
                        }
                        if any {
                            sink.write_at(off + k * BLOCK_SIZE, &blk)?;
                        }
                    }
                }
                Item::Region(r) => match &r.kind {
                    RegionKind::Built(idx) => {
                        for (k, &i) in idx.iter().enumerate() {
                            let blk = &self.built[i];
                            if blk.iter().any(|&x| x != 0) {
                                sink.write_at(off + k as u64 * BLOCK_SIZE, blk)?;
                            }
                        }
                    }
                    RegionKind::File { tree_inode, file_block } => {
                        let Kind::File(content) = &tree.inode(*tree_inode).kind else {
                            unreachable!("file regions belong to files")
                        };
                        let mut done = 0u64;
                        while done < r.len {
                            let n = (r.len - done).min(256);
                            let fpos = (file_block + done) * BLOCK_SIZE;
                            let want = (n * BLOCK_SIZE).min(content.size.saturating_sub(fpos)) as usize;
                            let chunk = &mut buf[..(n * BLOCK_SIZE) as usize];
                            chunk[want..].fill(0);
                            tree.read_content(content, fpos, &mut chunk[..want])?;
                            emit_nonzero(sink, off + done * BLOCK_SIZE, chunk)?;
                            done += n;
                        }
                    }
                },
            }
        }
        Ok(())
    }
}

/// Writes `data` at `offset`, leaving out whole zero blocks (they read back as zeros).
fn emit_nonzero(sink: &mut dyn Sink, offset: u64, data: &[u8]) -> std::io::Result<()> {
    let mut run_start: Option<usize> = None;
    for (i, blk) in data.chunks(BS).enumerate() {
        let zero = blk.iter().all(|&b| b == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(i),
            (true, Some(s)) => {
                sink.write_at(offset + (s * BS) as u64, &data[s * BS..i * BS])?;
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = run_start {
        sink.write_at(offset + (s * BS) as u64, &data[s * BS..])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_beyond_2038_and_before_1970_use_the_epoch_bits() {
        assert_eq!(time_fields(Timestamp::new(0, 5)), (0, 5 << 2));
        let (lo, x) = time_fields(Timestamp::new(4_102_444_800, 0)); // 2100-01-01
        assert_eq!(x & 3, 1);
        assert_eq!(i64::from(lo as i32) + (i64::from(x & 3) << 32), 4_102_444_800);
        let (lo, x) = time_fields(Timestamp::new(-1_000_000, 0));
        assert_eq!(x & 3, 0);
        assert_eq!(i64::from(lo as i32), -1_000_000);
    }
}
