//! Hashed (htree) directories: the dx_root/dx_node index over leaf blocks sorted by name hash,
//! which lets the kernel find a name in a large directory without reading every block.
//!
//! Layout of an indexed directory, in logical block order: the root (fake `.` and `..`
//! entries, dx_root_info, the first index level), then the interior nodes when there are two
//! levels, then the leaves. Every index block ends in a dx_tail checksum, every leaf in the
//! usual directory-entry checksum tail. Names hash with half-MD4 over unsigned chars (the
//! superblock says so: hash version 1, `EXT2_FLAGS_UNSIGNED_HASH`), seeded by `s_hash_seed`.

use super::csum;
use super::ondisk::{dirent, sb};
use super::BLOCK_SIZE;

const BS: usize = BLOCK_SIZE as usize;
/// Directory block bytes before the 12-byte checksum tail.
const LEAF_USABLE: usize = BS - dirent::TAIL_SIZE;
/// dx_root: `.` (12) + `..` header (12) + dx_root_info (8), then the count/limit entry.
const ROOT_ENTRIES_AT: usize = dirent::DX_ROOT_INFO_AT + dirent::DX_INFO_SIZE as usize;
/// dx_node: a fake empty entry (8), then the count/limit entry.
const NODE_ENTRIES_AT: usize = dirent::HEADER;
pub const ROOT_LIMIT: usize = (BS - ROOT_ENTRIES_AT - dirent::DX_TAIL_SIZE) / dirent::DX_ENTRY_SIZE;
pub const NODE_LIMIT: usize = (BS - NODE_ENTRIES_AT - dirent::DX_TAIL_SIZE) / dirent::DX_ENTRY_SIZE;

/// A directory entry: name, inode number, file type.
pub type Entry = (Vec<u8>, u32, u8);

/// An entry's record length: header and name, padded to 4 bytes.
pub fn dirent_len(name_len: usize) -> usize {
    (dirent::HEADER + name_len).div_ceil(4) * 4
}

/// The major half-MD4 hash of a name as ext4 computes it (`ext4fs_dirhash`, unsigned chars).
pub fn name_hash(name: &[u8], seed: &[u8; 16]) -> u32 {
    let mut buf: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];
    let words: [u32; 4] = std::array::from_fn(|i| u32::from_le_bytes(seed[4 * i..4 * i + 4].try_into().expect("4")));
    if words.iter().any(|&w| w != 0) {
        buf = words;
    }
    let mut p = name;
    loop {
        let input = str2hashbuf(p);
        half_md4_transform(&mut buf, &input);
        if p.len() <= 32 {
            break;
        }
        p = &p[32..];
    }
    let hash = buf[1] & !1;
    // 0x7fffffff << 1 marks the end of a readdir stream (EXT4_HTREE_EOF_32BIT); never a hash.
    if hash == 0xffff_fffe {
        0xffff_fffc
    } else {
        hash
    }
}

/// `str2hashbuf_unsigned` for 8 words: packs up to 32 bytes big-end-first into words, padded
/// with a pattern made from the remaining length (which may exceed 32).
fn str2hashbuf(msg: &[u8]) -> [u32; 8] {
    let num = 8;
    let len = msg.len();
    let mut pad = (len as u32) | ((len as u32) << 8);
    pad |= pad << 16;
    let mut out = [pad; 8];
    let mut val = pad;
    let take = len.min(num * 4);
    let mut w = 0;
    for (i, &c) in msg[..take].iter().enumerate() {
        val = u32::from(c).wrapping_add(val << 8);
        if i % 4 == 3 {
            out[w] = val;
            w += 1;
            val = pad;
        }
    }
    if w < num {
        out[w] = val;
    }
    out
}

fn half_md4_transform(buf: &mut [u32; 4], x: &[u32; 8]) {
    const K1: u32 = 0;
    const K2: u32 = 0x5A82_7999;
    const K3: u32 = 0x6ED9_EBA1;
    let f = |x: u32, y: u32, z: u32| z ^ (x & (y ^ z));
    let g = |x: u32, y: u32, z: u32| (x & y).wrapping_add((x ^ y) & z);
    let h = |x: u32, y: u32, z: u32| x ^ y ^ z;
    let (mut a, mut b, mut c, mut d) = (buf[0], buf[1], buf[2], buf[3]);
    macro_rules! round {
        ($f:expr, $a:ident, $b:ident, $c:ident, $d:ident, $x:expr, $s:expr) => {
            $a = $a.wrapping_add($f($b, $c, $d)).wrapping_add($x).rotate_left($s)
        };
    }
    round!(f, a, b, c, d, x[0].wrapping_add(K1), 3);
    round!(f, d, a, b, c, x[1].wrapping_add(K1), 7);
    round!(f, c, d, a, b, x[2].wrapping_add(K1), 11);
    round!(f, b, c, d, a, x[3].wrapping_add(K1), 19);
    round!(f, a, b, c, d, x[4].wrapping_add(K1), 3);
    round!(f, d, a, b, c, x[5].wrapping_add(K1), 7);
    round!(f, c, d, a, b, x[6].wrapping_add(K1), 11);
    round!(f, b, c, d, a, x[7].wrapping_add(K1), 19);

    round!(g, a, b, c, d, x[1].wrapping_add(K2), 3);
    round!(g, d, a, b, c, x[3].wrapping_add(K2), 5);
    round!(g, c, d, a, b, x[5].wrapping_add(K2), 9);
    round!(g, b, c, d, a, x[7].wrapping_add(K2), 13);
    round!(g, a, b, c, d, x[0].wrapping_add(K2), 3);
    round!(g, d, a, b, c, x[2].wrapping_add(K2), 5);
    round!(g, c, d, a, b, x[4].wrapping_add(K2), 9);
    round!(g, b, c, d, a, x[6].wrapping_add(K2), 13);

    round!(h, a, b, c, d, x[3].wrapping_add(K3), 3);
    round!(h, d, a, b, c, x[7].wrapping_add(K3), 9);
    round!(h, c, d, a, b, x[2].wrapping_add(K3), 11);
    round!(h, b, c, d, a, x[6].wrapping_add(K3), 15);
    round!(h, a, b, c, d, x[1].wrapping_add(K3), 3);
    round!(h, d, a, b, c, x[5].wrapping_add(K3), 9);
    round!(h, c, d, a, b, x[0].wrapping_add(K3), 11);
    round!(h, b, c, d, a, x[4].wrapping_add(K3), 15);

    buf[0] = buf[0].wrapping_add(a);
    buf[1] = buf[1].wrapping_add(b);
    buf[2] = buf[2].wrapping_add(c);
    buf[3] = buf[3].wrapping_add(d);
}

/// Entries sorted by hash and cut into leaves; `starts[i]` is the hash leaf `i` begins with
/// (low bit set when it continues a run of equal hashes from the leaf before).
pub struct Leaves {
    leaves: Vec<Vec<(u32, usize)>>,
    starts: Vec<u32>,
}

/// Plans the leaves of an indexed directory; None when the entries fit one linear block (no
/// index needed) — the caller counts and writes those linearly.
pub fn plan_leaves(entries: &[Entry], seed: &[u8; 16]) -> Option<Leaves> {
    let linear: usize = 24 + entries.iter().map(|e| dirent_len(e.0.len())).sum::<usize>();
    if linear <= LEAF_USABLE {
        return None;
    }
    let mut hashed: Vec<(u32, usize)> = entries.iter().enumerate().map(|(i, e)| (name_hash(&e.0, seed), i)).collect();
    // Equal hashes keep name order, so the result does not depend on the input's order.
    hashed.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| entries[a.1].0.cmp(&entries[b.1].0)));
    let mut leaves: Vec<Vec<(u32, usize)>> = vec![Vec::new()];
    let mut starts = vec![0u32];
    let mut used = 0usize;
    for (k, &(h, i)) in hashed.iter().enumerate() {
        let l = dirent_len(entries[i].0.len());
        if used + l > LEAF_USABLE {
            let prev = hashed[k - 1].0;
            starts.push(if prev == h { h | 1 } else { h });
            leaves.push(Vec::new());
            used = 0;
        }
        leaves.last_mut().expect("one leaf at least").push((h, i));
        used += l;
    }
    Some(Leaves { leaves, starts })
}

impl Leaves {
    /// Interior nodes needed: none when the root holds every leaf.
    fn nodes(&self) -> usize {
        let n = self.leaves.len();
        if n <= ROOT_LIMIT {
            0
        } else {
            n.div_ceil(NODE_LIMIT)
        }
    }
    /// Whether two index levels suffice (three need the large_dir feature, which kiln does not set).
    pub fn fits(&self) -> bool {
        self.nodes() <= ROOT_LIMIT
    }
    pub fn block_count(&self) -> u64 {
        (1 + self.nodes() + self.leaves.len()) as u64
    }
}

/// One directory entry at `at`. Record lengths are at most a block and names at most 255
/// bytes (the planner checked), so both fit their fields.
pub fn put_dirent(blk: &mut [u8], at: usize, ino: u32, rec_len: usize, name: &[u8], ft: u8) {
    let e = &mut blk[at..];
    dirent::INODE.put(e, ino);
    dirent::REC_LEN.put(e, u16::try_from(rec_len).expect("a record fits a block"));
    dirent::NAME_LEN.put(e, u8::try_from(name.len()).expect("names are at most 255 bytes"));
    dirent::FILE_TYPE.put(e, ft);
    e[dirent::HEADER..dirent::HEADER + name.len()].copy_from_slice(name);
}

/// Writes count/limit, the entries (the first one's hash slot holds count/limit) and the
/// dx_tail checksum of one index block.
fn put_index(blk: &mut [u8], at: usize, limit: usize, entries: &[(u32, u32)], iseed: u32) {
    let count = entries.len();
    let fits = |n: usize| u16::try_from(n).expect("an index block holds fewer than 512 entries");
    dirent::DX_LIMIT.put(&mut blk[at..], fits(limit));
    dirent::DX_COUNT.put(&mut blk[at..], fits(count));
    for (k, &(hash, block)) in entries.iter().enumerate() {
        let e = &mut blk[at + dirent::DX_ENTRY_SIZE * k..];
        if k > 0 {
            dirent::DX_HASH.put(e, hash);
        }
        dirent::DX_BLOCK.put(e, block);
    }
    // ext4_dx_csum: the block up to the last used entry, then dt_reserved, then a zero checksum.
    let tail = at + dirent::DX_ENTRY_SIZE * limit;
    let c = csum::raw(csum::raw(iseed, &blk[..at + dirent::DX_ENTRY_SIZE * count]), &blk[tail..tail + 4]);
    let c = csum::raw(c, &[0u8; 4]);
    dirent::DX_TAIL_CHECKSUM.put(&mut blk[tail..], c);
}

/// The blocks of an indexed directory, in logical order.
pub fn write(ino: u32, parent: u32, entries: &[Entry], leaves: &Leaves, iseed: u32) -> Vec<Vec<u8>> {
    let nodes = leaves.nodes();
    let first_leaf = 1 + nodes;
    let mut out = Vec::with_capacity(first_leaf + leaves.leaves.len());

    let mut root = vec![0u8; BS];
    let dot = dirent_len(1);
    put_dirent(&mut root, 0, ino, dot, b".", dirent::FT_DIR);
    put_dirent(&mut root, dot, parent, BS - dot, b"..", dirent::FT_DIR);
    let info = &mut root[dirent::DX_ROOT_INFO_AT..];
    // Half-MD4; the unsigned variant comes from the superblock's flag.
    dirent::DX_INFO_HASH_VERSION.put(info, sb::DX_HASH_HALF_MD4);
    dirent::DX_INFO_LENGTH.put(info, dirent::DX_INFO_SIZE);
    dirent::DX_INFO_INDIRECT_LEVELS.put(info, u8::from(nodes > 0));
    let leaf_entries: Vec<(u32, u32)> =
        leaves.starts.iter().enumerate().map(|(k, &h)| (h, (first_leaf + k) as u32)).collect();
    if nodes == 0 {
        put_index(&mut root, ROOT_ENTRIES_AT, ROOT_LIMIT, &leaf_entries, iseed);
        out.push(root);
    } else {
        let groups: Vec<&[(u32, u32)]> = leaf_entries.chunks(NODE_LIMIT).collect();
        let node_entries: Vec<(u32, u32)> = groups.iter().enumerate().map(|(k, g)| (g[0].0, (1 + k) as u32)).collect();
        put_index(&mut root, ROOT_ENTRIES_AT, ROOT_LIMIT, &node_entries, iseed);
        out.push(root);
        for g in groups {
            let mut node = vec![0u8; BS];
            // A fake entry spanning the block, so directory walkers skip it.
            dirent::REC_LEN.put(&mut node, u16::try_from(BS).expect("4 KiB blocks"));
            put_index(&mut node, NODE_ENTRIES_AT, NODE_LIMIT, g, iseed);
            out.push(node);
        }
    }
    for leaf in &leaves.leaves {
        let mut blk = vec![0u8; BS];
        let mut at = 0;
        let mut last = 0;
        for &(_, i) in leaf {
            let (name, cino, ft) = &entries[i];
            let l = dirent_len(name.len());
            put_dirent(&mut blk, at, *cino, l, name, *ft);
            last = at;
            at += l;
        }
        seal_leaf(&mut blk, last, iseed);
        out.push(blk);
    }
    out
}

/// Stretches the last entry to the checksum tail and writes the tail.
pub fn seal_leaf(blk: &mut [u8], last: usize, iseed: u32) {
    dirent::REC_LEN.put(&mut blk[last..], u16::try_from(LEAF_USABLE - last).expect("inside a block"));
    let tail = &mut blk[LEAF_USABLE..];
    dirent::TAIL_REC_LEN.put(tail, dirent::TAIL_SIZE as u16);
    dirent::TAIL_FT.put(tail, dirent::FT_DIR_CSUM);
    let c = csum::raw(iseed, &blk[..LEAF_USABLE]);
    dirent::TAIL_CHECKSUM.put(&mut blk[LEAF_USABLE..], c);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_cover_every_entry_once_in_hash_order() {
        let entries: Vec<Entry> = (0..5000u32).map(|i| (format!("file-{i:05}").into_bytes(), 12 + i, 1)).collect();
        let l = plan_leaves(&entries, &[7; 16]).expect("5000 entries need an index");
        let mut seen: Vec<usize> = l.leaves.iter().flatten().map(|&(_, i)| i).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..5000).collect::<Vec<_>>());
        let flat: Vec<u32> = l.leaves.iter().flatten().map(|&(h, _)| h).collect();
        assert!(flat.windows(2).all(|w| w[0] <= w[1]));
        for (k, leaf) in l.leaves.iter().enumerate().skip(1) {
            assert_eq!(l.starts[k] & !1, leaf[0].0, "leaf {k} starts at its first hash");
        }
        assert!(plan_leaves(&entries[..10], &[7; 16]).is_none(), "ten entries fit one block");
    }
}
