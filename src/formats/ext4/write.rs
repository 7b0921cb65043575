//! Emission: the planned file system as one stream of ascending writes. Only blocks that hold
//! something non-zero are passed on; everything else is a hole.

use super::csum;
use super::layout::{Ext4Plan, InodeRec, RegionKind, FLEX};
use super::ondisk::{gd, hi16, hi16_of32, hi32, inode, inum, lo16, lo32, sb};
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

/// A block number or count that the plan has checked to fit 32 bits (kiln does not set the
/// 64bit feature, so the file system has fewer than 2^32 blocks and inodes).
fn planned32(v: u64) -> u32 {
    u32::try_from(v).expect("the plan keeps block numbers and inode counts below 2^32")
}

/// A per-group count: at most [`BLOCKS_PER_GROUP`] (32768), which fits the 16-bit fields.
fn group16(v: u32) -> u16 {
    u16::try_from(v).expect("a group holds at most 32768 blocks and inodes")
}

/// Seconds split into the 32-bit field and the extra field's epoch bits, with nanoseconds.
fn time_fields(t: Timestamp) -> (u32, u32) {
    // The 32-bit field holds the seconds' low bits (as a signed value); the two epoch bits
    // say how many 2^32-second spans to add, so the truncation is the format's own.
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
                    if rec.used || ino < inum::FIRST as usize {
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
        let mut s = vec![0u8; sb::SIZE];
        let free_blocks: u64 = stats.iter().map(|g| u64::from(g.free_blocks)).sum();
        let free_inodes: u64 = stats.iter().map(|g| u64::from(g.free_inodes)).sum();
        let (t, _) = time_fields(Timestamp::new(o.timestamp, 0));
        sb::INODES_COUNT.put(&mut s, planned32(geo.inodes()));
        sb::BLOCKS_COUNT_LO.put(&mut s, planned32(geo.blocks));
        sb::R_BLOCKS_COUNT_LO.put(&mut s, planned32(self.reserved_blocks));
        sb::FREE_BLOCKS_COUNT_LO.put(&mut s, planned32(free_blocks));
        sb::FREE_INODES_COUNT.put(&mut s, planned32(free_inodes));
        sb::FIRST_DATA_BLOCK.put(&mut s, 0); // 0 with 4 KiB blocks
        sb::LOG_BLOCK_SIZE.put(&mut s, BLOCK_SIZE.trailing_zeros() - 10);
        sb::LOG_CLUSTER_SIZE.put(&mut s, BLOCK_SIZE.trailing_zeros() - 10);
        sb::BLOCKS_PER_GROUP.put(&mut s, planned32(BLOCKS_PER_GROUP));
        sb::CLUSTERS_PER_GROUP.put(&mut s, planned32(BLOCKS_PER_GROUP));
        sb::INODES_PER_GROUP.put(&mut s, planned32(geo.inodes_per_group));
        sb::WTIME.put(&mut s, t);
        sb::MAX_MNT_COUNT.put(&mut s, 0xFFFF); // no forced checks
        sb::MAGIC.put(&mut s, sb::EXT4_SUPER_MAGIC);
        sb::STATE.put(&mut s, sb::STATE_VALID);
        sb::ERRORS.put(&mut s, sb::ERRORS_CONTINUE);
        sb::LASTCHECK.put(&mut s, t);
        sb::REV_LEVEL.put(&mut s, sb::DYNAMIC_REV);
        sb::FIRST_INO.put(&mut s, inum::FIRST);
        sb::INODE_SIZE.put(&mut s, INODE_SIZE as u16);
        // A backup names its group in 16 bits; e2fsprogs truncates the same way.
        sb::BLOCK_GROUP_NR.put(&mut s, (group & 0xFFFF) as u16);
        sb::FEATURE_COMPAT.put(&mut s, COMPAT);
        sb::FEATURE_INCOMPAT.put(&mut s, INCOMPAT);
        sb::FEATURE_RO_COMPAT.put(&mut s, RO_COMPAT);
        sb::UUID.put(&mut s, &o.uuid);
        sb::VOLUME_NAME.put(&mut s, o.label.as_bytes());
        sb::JOURNAL_INUM.put(&mut s, inum::JOURNAL);
        sb::HASH_SEED.put(&mut s, &o.hash_seed);
        sb::DEF_HASH_VERSION.put(&mut s, sb::DX_HASH_HALF_MD4);
        sb::JNL_BACKUP_TYPE.put(&mut s, sb::JNL_BACKUP_BLOCKS);
        sb::DEFAULT_MOUNT_OPTS.put(&mut s, sb::DEFM_XATTR_USER | sb::DEFM_ACL);
        sb::MKFS_TIME.put(&mut s, t);
        let j = &self.inodes[inum::JOURNAL as usize - 1];
        sb::JNL_BLOCKS.put(&mut s, &j.i_block);
        sb::JNL_SIZE_HIGH.put(&mut s, hi32(j.size));
        sb::JNL_SIZE.put(&mut s, lo32(j.size));
        sb::MIN_EXTRA_ISIZE.put(&mut s, inode::EXTRA_ISIZE);
        sb::WANT_EXTRA_ISIZE.put(&mut s, inode::EXTRA_ISIZE);
        sb::FLAGS.put(&mut s, sb::FLAGS_UNSIGNED_HASH);
        sb::LOG_GROUPS_PER_FLEX.put(&mut s, FLEX.trailing_zeros() as u8);
        sb::CHECKSUM_TYPE.put(&mut s, sb::CRC32C_CHKSUM);
        let c = csum::raw(!0, &s[..sb::CHECKSUM.0]);
        sb::CHECKSUM.put(&mut s, c);
        s
    }

    fn descriptors(&self, stats: &[GroupStats]) -> Vec<u8> {
        let geo = &self.geo;
        let mut d = vec![0u8; (geo.gdt_blocks as usize) * BS];
        let ipg_bytes = geo.inodes_per_group as usize / 8;
        for (g, st) in stats.iter().enumerate() {
            let at = g * gd::SIZE;
            let e = &mut d[at..at + gd::SIZE];
            let group = g as u64;
            gd::BLOCK_BITMAP_LO.put(e, planned32(geo.block_bitmap(group)));
            gd::INODE_BITMAP_LO.put(e, planned32(geo.inode_bitmap(group)));
            gd::INODE_TABLE_LO.put(e, planned32(geo.inode_table(group)));
            gd::FREE_BLOCKS_COUNT_LO.put(e, group16(st.free_blocks));
            gd::FREE_INODES_COUNT_LO.put(e, group16(st.free_inodes));
            gd::USED_DIRS_COUNT_LO.put(e, group16(st.used_dirs));
            gd::FLAGS.put(e, gd::INODE_ZEROED);
            // Without the 64bit feature only the low halves of the bitmap checksums are kept.
            gd::BLOCK_BITMAP_CSUM_LO.put(e, lo16(csum::raw(self.fs_seed, &st.block_bitmap)));
            gd::INODE_BITMAP_CSUM_LO.put(e, lo16(csum::raw(self.fs_seed, &st.inode_bitmap[..ipg_bytes])));
            gd::ITABLE_UNUSED_LO.put(e, group16(st.itable_unused));
            // Over the whole descriptor with its checksum field still zero.
            let c = csum::raw(csum::raw(self.fs_seed, &planned32(group).to_le_bytes()), &e[..gd::SIZE]);
            gd::CHECKSUM.put(e, lo16(c));
        }
        d
    }

    fn inode_bytes(&self, ino: u32, r: &InodeRec) -> [u8; INODE_SIZE as usize] {
        let mut b = [0u8; INODE_SIZE as usize];
        inode::MODE.put(&mut b, r.mode);
        inode::UID.put(&mut b, lo16(r.uid));
        inode::SIZE_LO.put(&mut b, lo32(r.size));
        let (a, ax) = time_fields(r.atime);
        let (c, cx) = time_fields(r.ctime);
        let (m, mx) = time_fields(r.mtime);
        let (cr, crx) = time_fields(r.crtime);
        inode::ATIME.put(&mut b, a);
        inode::CTIME.put(&mut b, c);
        inode::MTIME.put(&mut b, m);
        inode::GID.put(&mut b, lo16(r.gid));
        inode::LINKS_COUNT.put(&mut b, r.links);
        // i_blocks counts 512-byte sectors in 48 bits (huge_file without EXT4_HUGE_FILE_FL).
        let sectors = r.fs_blocks * (BLOCK_SIZE / 512);
        inode::BLOCKS_LO.put(&mut b, lo32(sectors));
        inode::FLAGS.put(&mut b, r.flags);
        inode::BLOCK.put(&mut b, &r.i_block);
        inode::FILE_ACL_LO.put(&mut b, lo32(r.file_acl));
        inode::SIZE_HIGH.put(&mut b, hi32(r.size));
        inode::BLOCKS_HIGH.put(&mut b, hi16(sectors));
        inode::FILE_ACL_HIGH.put(&mut b, hi16(r.file_acl));
        inode::UID_HIGH.put(&mut b, hi16_of32(r.uid));
        inode::GID_HIGH.put(&mut b, hi16_of32(r.gid));
        inode::EXTRA_ISIZE_FIELD.put(&mut b, inode::EXTRA_ISIZE);
        inode::CTIME_EXTRA.put(&mut b, cx);
        inode::MTIME_EXTRA.put(&mut b, mx);
        inode::ATIME_EXTRA.put(&mut b, ax);
        inode::CRTIME.put(&mut b, cr);
        inode::CRTIME_EXTRA.put(&mut b, crx);
        b[inode::XATTR_AT..inode::XATTR_AT + r.ibody_xattr.len()].copy_from_slice(&r.ibody_xattr);
        // Checksum with both checksum fields zero: seed(ino, generation) over the whole inode.
        let seed = csum::inode_seed(self.fs_seed, ino, 0);
        let c = csum::raw(seed, &b);
        inode::CHECKSUM_LO.put(&mut b, lo16(c));
        inode::CHECKSUM_HI.put(&mut b, hi16_of32(c));
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
                    let bytes = self.superblock(g, &stats);
                    // The primary sits 1024 bytes into block 0; backups start their block.
                    sink.write_at(if g == 0 { sb::OFFSET } else { off }, &bytes)?;
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
                                blk[at..at + INODE_SIZE as usize].copy_from_slice(&self.inode_bytes(planned32(ino), r));
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
