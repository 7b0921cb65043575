//! What the readers read from: a read-only disk addressed by byte offset. An image file is one;
//! an EBS snapshot read block by block over the network is another ([`BlockDevice`] over a
//! [`Fetch`]), so `kiln inspect` reads a local image and an AMI with the same code and touches
//! only the blocks the readers ask for.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A read-only disk.
pub trait Device: Send + Sync + std::fmt::Debug {
    /// Reads exactly `buf.len()` bytes at `offset`; reading past the end is an error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// The disk's size in bytes.
    fn size(&self) -> u64;
    /// What to call it in messages: a path, or a snapshot id.
    fn name(&self) -> String;
}

/// An image file.
#[derive(Debug)]
pub struct FileDevice {
    path: PathBuf,
    file: File,
    size: u64,
}

impl FileDevice {
    pub fn open(path: &Path) -> io::Result<Arc<dyn Device>> {
        let file =
            File::open(path).map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", path.display())))?;
        let size = file.metadata()?.len();
        Ok(Arc::new(FileDevice { path: path.to_path_buf(), file, size }))
    }
}

impl Device for FileDevice {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("reading {} bytes at offset {offset} of {}: {e}", buf.len(), self.path.display()),
            )
        })
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn name(&self) -> String {
        self.path.display().to_string()
    }
}

/// Where a [`BlockDevice`]'s blocks come from.
pub trait Fetch: Send + Sync + std::fmt::Debug {
    /// Bytes per block (EBS: 512 KiB).
    fn block_size(&self) -> u64;
    /// The disk's size in bytes, a whole number of blocks.
    fn size(&self) -> u64;
    /// Block `index` in full; None for a block never written, which reads as zeros.
    fn fetch(&self, index: u64) -> io::Result<Option<Vec<u8>>>;
    fn name(&self) -> String;
}

/// What a [`BlockDevice`] has done: blocks fetched (and their bytes), and reads the cache or a
/// never-written block answered without fetching.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    pub blocks_fetched: u64,
    pub bytes_fetched: u64,
    pub cache_hits: u64,
    pub zero_blocks: u64,
}

/// A disk read through [`Fetch`] one block at a time, keeping at most `cache_blocks` blocks in
/// memory (least recently used goes first), so a reader that walks inode tables and directories
/// fetches each block about once without holding the volume.
#[derive(Debug)]
pub struct BlockDevice<F: Fetch> {
    fetch: F,
    cache_blocks: usize,
    cache: Mutex<Cache>,
    fetched: AtomicU64,
    fetched_bytes: AtomicU64,
    hits: AtomicU64,
    zeros: AtomicU64,
}

#[derive(Debug, Default)]
struct Cache {
    blocks: HashMap<u64, Arc<[u8]>>,
    /// Least recently used first; an index may appear more than once (stale entries are
    /// skipped on eviction).
    order: VecDeque<u64>,
}

impl<F: Fetch> BlockDevice<F> {
    /// `cache_bytes` bounds the memory the cache holds (at least one block is kept).
    pub fn new(fetch: F, cache_bytes: u64) -> Self {
        let cache_blocks = (cache_bytes / fetch.block_size().max(1)).max(1) as usize;
        BlockDevice {
            fetch,
            cache_blocks,
            cache: Mutex::default(),
            fetched: AtomicU64::new(0),
            fetched_bytes: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            zeros: AtomicU64::new(0),
        }
    }

    pub fn stats(&self) -> Stats {
        Stats {
            blocks_fetched: self.fetched.load(Ordering::Relaxed),
            bytes_fetched: self.fetched_bytes.load(Ordering::Relaxed),
            cache_hits: self.hits.load(Ordering::Relaxed),
            zero_blocks: self.zeros.load(Ordering::Relaxed),
        }
    }

    pub fn fetcher(&self) -> &F {
        &self.fetch
    }

    /// Block `index`, from the cache or fetched; None when it was never written.
    fn block(&self, index: u64) -> io::Result<Option<Arc<[u8]>>> {
        {
            let mut c = self.cache.lock().expect("cache lock");
            if let Some(b) = c.blocks.get(&index).cloned() {
                c.order.push_back(index);
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(Some(b));
            }
        }
        let Some(data) = self.fetch.fetch(index)? else {
            self.zeros.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        let bs = self.fetch.block_size();
        if data.len() as u64 != bs {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: block {index} came back with {} bytes, not {bs}", self.fetch.name(), data.len()),
            ));
        }
        self.fetched.fetch_add(1, Ordering::Relaxed);
        self.fetched_bytes.fetch_add(bs, Ordering::Relaxed);
        let data: Arc<[u8]> = data.into();
        let mut c = self.cache.lock().expect("cache lock");
        c.blocks.insert(index, data.clone());
        c.order.push_back(index);
        while c.blocks.len() > self.cache_blocks {
            let Some(old) = c.order.pop_front() else { break };
            // Evict only an index not used again since this entry of the queue.
            if !c.order.contains(&old) {
                c.blocks.remove(&old);
            }
        }
        // Stale repeats would grow the queue without bound on a long read.
        if c.order.len() > 4 * self.cache_blocks + 64 {
            let mut seen = std::collections::HashSet::new();
            let mut kept: Vec<u64> = c.order.iter().rev().filter(|i| seen.insert(**i)).copied().collect();
            kept.reverse();
            c.order = kept.into();
        }
        Ok(Some(data))
    }
}

impl<F: Fetch> Device for BlockDevice<F> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= self.fetch.size()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "reading {} bytes at offset {offset} of {}, which holds {} bytes",
                    buf.len(),
                    self.fetch.name(),
                    self.fetch.size()
                ),
            )
        })?;
        let bs = self.fetch.block_size();
        let mut at = offset;
        while at < end {
            let (index, within) = (at / bs, at % bs);
            let n = (bs - within).min(end - at) as usize;
            let to = &mut buf[(at - offset) as usize..][..n];
            match self.block(index)? {
                Some(b) => to.copy_from_slice(&b[within as usize..][..n]),
                None => to.fill(0),
            }
            at += n as u64;
        }
        Ok(())
    }
    fn size(&self) -> u64 {
        self.fetch.size()
    }
    fn name(&self) -> String {
        self.fetch.name()
    }
}

/// A byte range of a device as a read-only stream, for crates that read through `Read + Seek`
/// (gpt, fatfs). Writing fails.
#[derive(Debug)]
pub struct Window {
    dev: Arc<dyn Device>,
    start: u64,
    len: u64,
    pos: u64,
}

impl Window {
    pub fn new(dev: Arc<dyn Device>, start: u64, len: u64) -> Window {
        let len = len.min(dev.size().saturating_sub(start));
        Window { dev, start, len, pos: 0 }
    }
    pub fn whole(dev: Arc<dyn Device>) -> Window {
        let len = dev.size();
        Window { dev, start: 0, len, pos: 0 }
    }
}

impl Read for Window {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.len.saturating_sub(self.pos)) as usize;
        let Some(at) = self.start.checked_add(self.pos) else { return Ok(0) };
        self.dev.read_exact_at(&mut buf[..n], at)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for Window {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::other("reading a disk never writes"))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for Window {
    fn seek(&mut self, p: SeekFrom) -> io::Result<u64> {
        let (base, delta) = match p {
            SeekFrom::Start(n) => (n, 0),
            SeekFrom::End(d) => (self.len, d),
            SeekFrom::Current(d) => (self.pos, d),
        };
        self.pos = base
            .checked_add_signed(delta)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek outside the disk"))?;
        Ok(self.pos)
    }
}

/// Bytes in memory served as blocks: for tests and the fuzz targets, which read hostile
/// contents through the same block cache an EBS snapshot goes through.
#[derive(Debug)]
pub struct MemoryFetch {
    pub data: Vec<u8>,
    pub block_size: u64,
}

impl Fetch for MemoryFetch {
    fn block_size(&self) -> u64 {
        self.block_size
    }
    fn size(&self) -> u64 {
        (self.data.len() as u64).div_ceil(self.block_size) * self.block_size
    }
    fn fetch(&self, index: u64) -> io::Result<Option<Vec<u8>>> {
        let from = index.saturating_mul(self.block_size);
        if from >= self.data.len() as u64 {
            return Ok(None);
        }
        let part = &self.data[from as usize..][..(self.data.len() as u64 - from).min(self.block_size) as usize];
        if part.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        let mut b = part.to_vec();
        b.resize(self.block_size as usize, 0);
        Ok(Some(b))
    }
    fn name(&self) -> String {
        "memory".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut d: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        d[4096..8192].fill(0);
        d
    }

    #[test]
    fn reads_across_blocks_equal_the_bytes_and_zero_blocks_are_not_fetched() {
        let data = sample();
        let dev = BlockDevice::new(MemoryFetch { data: data.clone(), block_size: 4096 }, 1 << 20);
        let mut buf = vec![0u8; 9000];
        dev.read_exact_at(&mut buf, 1000).unwrap();
        assert_eq!(buf, data[1000..10_000]);
        let s = dev.stats();
        assert_eq!((s.blocks_fetched, s.zero_blocks, s.bytes_fetched), (2, 1, 8192));
        // Past the end (the size is rounded up to whole blocks) is an error, not zeros.
        assert!(dev.read_exact_at(&mut [0u8; 2], 3 * 4096 - 1).is_err());
    }

    #[test]
    fn the_cache_holds_no_more_than_its_bound_and_keeps_what_is_used_again() {
        let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i / 1024) as u8 | 1).collect();
        let dev = BlockDevice::new(MemoryFetch { data, block_size: 1024 }, 4 * 1024);
        let mut b = [0u8; 1];
        for i in 0..64 {
            dev.read_exact_at(&mut b, i * 1024).unwrap();
            dev.read_exact_at(&mut b, 0).unwrap(); // block 0 stays hot
        }
        assert!(dev.cache.lock().unwrap().blocks.len() <= 4);
        let s = dev.stats();
        assert_eq!(s.blocks_fetched, 64, "block 0 was fetched once: {s:?}");
        assert_eq!(s.cache_hits, 64);
    }
}
