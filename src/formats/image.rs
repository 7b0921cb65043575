//! The image as one ordered stream of extents, and the sinks that consume it.
//!
//! Every format writer (ext4, FAT, GPT) emits its bytes through [`Sink::write_at`] at strictly
//! ascending, non-overlapping offsets; whatever lies between two writes is zeros and is never
//! passed along. A sink can therefore sparse-write, hash and digest blocks in the same single
//! pass, and a hole costs nothing.

use std::io;

use serde::{Deserialize, Serialize};

/// Consumer of an ordered extent stream.
pub trait Sink {
    /// `data` belongs at `offset`. Offsets are strictly ascending across calls and never overlap
    /// an earlier write; the range between the end of the previous write and `offset` is zeros.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;

    /// The stream is complete and the image is `len` bytes long (trailing zeros included).
    fn finish(&mut self, len: u64) -> io::Result<()> {
        let _ = len;
        Ok(())
    }
}

impl<S: Sink + ?Sized> Sink for &mut S {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        (**self).write_at(offset, data)
    }
    fn finish(&mut self, len: u64) -> io::Result<()> {
        (**self).finish(len)
    }
}

/// Shifts a stream by `base` bytes: lets a filesystem writer address its own partition from 0.
/// `finish` is not forwarded (the partition's end is not the image's end).
pub struct Window<S> {
    pub base: u64,
    pub inner: S,
}

impl<S: Sink> Sink for Window<S> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.inner.write_at(self.base + offset, data)
    }
}

/// Checks the ordering contract and collects the stream in memory; for tests and small images.
#[derive(Debug, Default)]
pub struct VecSink {
    pub bytes: Vec<u8>,
    next: u64,
}

impl Sink for VecSink {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        if offset < self.next {
            return Err(io::Error::other(format!("write at {offset} goes back before {}", self.next)));
        }
        let end = offset as usize + data.len();
        if self.bytes.len() < end {
            self.bytes.resize(end, 0);
        }
        self.bytes[offset as usize..end].copy_from_slice(data);
        self.next = end as u64;
        Ok(())
    }
    fn finish(&mut self, len: u64) -> io::Result<()> {
        if len < self.next {
            return Err(io::Error::other(format!(
                "image length {len} is shorter than the data written ({})",
                self.next
            )));
        }
        self.bytes.resize(len as usize, 0);
        Ok(())
    }
}

/// All zeros, for hashing gaps without allocating.
static ZEROS: [u8; 1 << 16] = [0; 1 << 16];

/// Writes the stream into a sparse file: gaps are never written, so they stay holes. Data goes
/// to a temporary file beside the destination; only [`SparseFile::persist`] puts it at the
/// final path, so an interrupted write leaves nothing there.
pub struct SparseFile {
    tmp: Option<tempfile::NamedTempFile>,
    dest: std::path::PathBuf,
    /// Contiguous pending bytes and where they start: many small metadata writes become few
    /// large ones.
    pending: Vec<u8>,
    pending_at: u64,
    len: Option<u64>,
}

/// Coalesce up to this much before a positioned write.
const PENDING_MAX: usize = 8 << 20;

impl SparseFile {
    pub fn create(dest: &std::path::Path) -> io::Result<SparseFile> {
        let tmp = crate::atomic::temp_beside(dest)?;
        Ok(SparseFile { tmp: Some(tmp), dest: dest.to_path_buf(), pending: Vec::new(), pending_at: 0, len: None })
    }

    fn flush_pending(&mut self) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        if !self.pending.is_empty() {
            let f = self.tmp.as_ref().expect("open until persisted").as_file();
            f.write_all_at(&self.pending, self.pending_at)?;
            self.pending.clear();
        }
        Ok(())
    }

    /// Starts writing the data out to the disk without waiting for it, so the fsync in
    /// [`SparseFile::persist`] finds little left to do when other work (hashing) ran meanwhile.
    pub fn start_writeback(&mut self) -> io::Result<()> {
        use std::os::unix::io::AsRawFd;
        self.flush_pending()?;
        let fd = self.tmp.as_ref().expect("open until persisted").as_file().as_raw_fd();
        // SAFETY: fd is an open file descriptor owned by self for the duration of the call.
        if unsafe { libc::sync_file_range(fd, 0, 0, libc::SYNC_FILE_RANGE_WRITE) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Moves the finished file to its destination (after [`Sink::finish`]).
    pub fn persist(mut self) -> io::Result<()> {
        self.flush_pending()?;
        if self.len.is_none() {
            return Err(io::Error::other("image stream was not finished"));
        }
        let tmp = self.tmp.take().expect("open until persisted");
        crate::atomic::persist(tmp, &self.dest)
    }
}

impl Sink for SparseFile {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        if !self.pending.is_empty()
            && offset == self.pending_at + self.pending.len() as u64
            && self.pending.len() + data.len() <= PENDING_MAX
        {
            self.pending.extend_from_slice(data);
            return Ok(());
        }
        self.flush_pending()?;
        if data.len() >= PENDING_MAX {
            use std::os::unix::fs::FileExt;
            return self.tmp.as_ref().expect("open").as_file().write_all_at(data, offset);
        }
        self.pending_at = offset;
        self.pending.extend_from_slice(data);
        Ok(())
    }

    fn finish(&mut self, len: u64) -> io::Result<()> {
        self.flush_pending()?;
        self.tmp.as_ref().expect("open").as_file().set_len(len)?;
        self.len = Some(len);
        Ok(())
    }
}

/// SHA-256 of the whole image, gaps hashed as zeros.
pub struct Sha256Sink {
    hasher: sha2::Sha256,
    at: u64,
    digest: Option<[u8; 32]>,
}

impl Default for Sha256Sink {
    fn default() -> Self {
        Self::new()
    }
}

impl Sha256Sink {
    pub fn new() -> Self {
        use sha2::Digest;
        Sha256Sink { hasher: sha2::Sha256::new(), at: 0, digest: None }
    }

    fn zeros_to(&mut self, to: u64) {
        use sha2::Digest;
        while self.at < to {
            let n = (to - self.at).min(ZEROS.len() as u64) as usize;
            self.hasher.update(&ZEROS[..n]);
            self.at += n as u64;
        }
    }

    /// The hex digest; only after [`Sink::finish`].
    pub fn hex(&self) -> String {
        hex::encode(self.digest.expect("stream finished"))
    }
}

impl Sink for Sha256Sink {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        use sha2::Digest;
        if offset < self.at {
            return Err(io::Error::other(format!("write at {offset} goes back before {}", self.at)));
        }
        self.zeros_to(offset);
        self.hasher.update(data);
        self.at += data.len() as u64;
        Ok(())
    }

    fn finish(&mut self, len: u64) -> io::Result<()> {
        use sha2::Digest;
        self.zeros_to(len);
        self.digest = Some(std::mem::take(&mut self.hasher).finalize().into());
        Ok(())
    }
}

/// Which blocks of an image hold data, and their digests: what an EBS upload sends and what a
/// read-back is checked against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockMap {
    pub block_size: u64,
    /// Blocks that hold data, ascending by index; every other block is all zeros.
    pub data_blocks: Vec<BlockDigest>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockDigest {
    pub index: u64,
    /// SHA-256 (hex) of the block's 524288 bytes.
    pub sha256: String,
}

/// SHA-256 of every fixed-size block that received data (EBS snapshots move 512 KiB blocks).
/// A block whose received bytes are all zero is left out: it reads back as zeros anyway.
pub struct BlockDigests {
    block_size: u64,
    current: Option<u64>,
    buf: Vec<u8>,
    dirty: bool,
    blocks: Vec<BlockDigest>,
}

impl BlockDigests {
    pub fn new(block_size: u64) -> Self {
        BlockDigests { block_size, current: None, buf: vec![0; block_size as usize], dirty: false, blocks: Vec::new() }
    }

    fn close_block(&mut self) {
        use sha2::Digest;
        if let Some(index) = self.current.take() {
            if self.dirty && self.buf.iter().any(|&b| b != 0) {
                self.blocks.push(BlockDigest { index, sha256: hex::encode(sha2::Sha256::digest(&self.buf)) });
            }
            self.buf.fill(0);
            self.dirty = false;
        }
    }

    pub fn into_block_map(mut self) -> BlockMap {
        self.close_block();
        BlockMap { block_size: self.block_size, data_blocks: self.blocks }
    }
}

impl Sink for BlockDigests {
    fn write_at(&mut self, mut offset: u64, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let index = offset / self.block_size;
            if self.current != Some(index) {
                if self.current.is_some_and(|c| c > index) {
                    return Err(io::Error::other(format!("write at {offset} goes back to an earlier block")));
                }
                self.close_block();
                self.current = Some(index);
            }
            let within = (offset % self.block_size) as usize;
            let n = data.len().min(self.block_size as usize - within);
            self.buf[within..within + n].copy_from_slice(&data[..n]);
            self.dirty = true;
            offset += n as u64;
            data = &data[n..];
        }
        Ok(())
    }

    fn finish(&mut self, _len: u64) -> io::Result<()> {
        self.close_block();
        Ok(())
    }
}

/// Sends the stream to several sinks.
pub struct Tee<'a>(pub Vec<&'a mut dyn Sink>);

impl Sink for Tee<'_> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        for s in self.0.iter_mut() {
            s.write_at(offset, data)?;
        }
        Ok(())
    }
    fn finish(&mut self, len: u64) -> io::Result<()> {
        for s in self.0.iter_mut() {
            s.finish(len)?;
        }
        Ok(())
    }
}

impl<A: Sink, B: Sink> Sink for (A, B) {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write_at(offset, data)?;
        self.1.write_at(offset, data)
    }
    fn finish(&mut self, len: u64) -> io::Result<()> {
        self.0.finish(len)?;
        self.1.finish(len)
    }
}

/// Bytes handed to the worker at once: large enough that the queue costs nothing per byte.
const OFFLOAD_CHUNK: usize = 1 << 20;
/// Chunks in flight: the writer runs at most this far ahead of the worker (bounded memory).
const OFFLOAD_DEPTH: usize = 8;

enum Handoff {
    Data(u64, Vec<u8>),
    Finish(u64),
}

/// Runs a sink on a thread of its own, so its work (hashing the image) overlaps the caller's
/// (planning and writing it) on another core. The stream is copied into recycled chunks and
/// handed over through a bounded queue, in order: the inner sink sees exactly the calls it
/// would have seen, so its result is the same bytes for bytes.
pub struct Offload<S: Sink + Send + 'static> {
    queue: Option<std::sync::mpsc::SyncSender<Handoff>>,
    free: std::sync::mpsc::Receiver<Vec<u8>>,
    allocated: usize,
    /// The chunk being filled: its offset and bytes (contiguous writes are batched).
    open: Option<(u64, Vec<u8>)>,
    worker: Option<std::thread::JoinHandle<(S, io::Result<()>)>>,
}

impl<S: Sink + Send + 'static> Offload<S> {
    pub fn spawn(mut inner: S) -> io::Result<Self> {
        let (queue, rx) = std::sync::mpsc::sync_channel::<Handoff>(OFFLOAD_DEPTH);
        let (give_back, free) = std::sync::mpsc::channel::<Vec<u8>>();
        let worker = std::thread::Builder::new().name("kiln-digests".into()).spawn(move || {
            let mut result = Ok(());
            for h in rx {
                if result.is_err() {
                    continue; // drain, so the writer never blocks on a dead worker
                }
                result = match h {
                    Handoff::Data(offset, mut buf) => {
                        let r = inner.write_at(offset, &buf);
                        buf.clear();
                        let _ = give_back.send(buf);
                        r
                    }
                    Handoff::Finish(len) => inner.finish(len),
                };
            }
            (inner, result)
        })?;
        Ok(Offload { queue: Some(queue), free, allocated: 0, open: None, worker: Some(worker) })
    }

    fn send(&mut self, h: Handoff) -> io::Result<()> {
        let q = self.queue.as_ref().ok_or_else(|| io::Error::other("the stream was already finished"))?;
        q.send(h).map_err(|_| io::Error::other("the digest worker stopped"))
    }

    fn flush_open(&mut self) -> io::Result<()> {
        match self.open.take() {
            Some((offset, buf)) => self.send(Handoff::Data(offset, buf)),
            None => Ok(()),
        }
    }

    fn empty_chunk(&mut self) -> io::Result<Vec<u8>> {
        if let Ok(b) = self.free.try_recv() {
            return Ok(b);
        }
        if self.allocated < OFFLOAD_DEPTH + 2 {
            self.allocated += 1;
            return Ok(Vec::with_capacity(OFFLOAD_CHUNK));
        }
        self.free.recv().map_err(|_| io::Error::other("the digest worker stopped"))
    }

    /// Waits for the worker and returns the inner sink, after [`Sink::finish`].
    pub fn join(mut self) -> io::Result<S> {
        self.queue.take();
        let worker = self.worker.take().expect("joined once");
        let (inner, result) = worker.join().map_err(|_| io::Error::other("the digest worker panicked"))?;
        result.map(|()| inner)
    }
}

impl<S: Sink + Send + 'static> Sink for Offload<S> {
    fn write_at(&mut self, mut offset: u64, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let contiguous =
                matches!(&self.open, Some((o, b)) if o + b.len() as u64 == offset && b.len() < OFFLOAD_CHUNK);
            if !contiguous {
                self.flush_open()?;
                let buf = self.empty_chunk()?;
                self.open = Some((offset, buf));
            }
            let (_, buf) = self.open.as_mut().expect("opened above");
            let n = data.len().min(OFFLOAD_CHUNK - buf.len());
            buf.extend_from_slice(&data[..n]);
            offset += n as u64;
            data = &data[n..];
        }
        Ok(())
    }

    fn finish(&mut self, len: u64) -> io::Result<()> {
        self.flush_open()?;
        self.send(Handoff::Finish(len))?;
        self.queue.take();
        Ok(())
    }
}

impl<S: Sink + Send + 'static> Drop for Offload<S> {
    fn drop(&mut self) {
        // An abandoned stream (an error upstream) still ends the worker.
        self.queue.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// A sparse in-memory block device for writers that need `Read + Write + Seek` (the gpt and
/// fatfs crates): only 4 KiB chunks that were written take memory, and [`SparseMem::emit`]
/// turns the result back into an ordered stream.
#[derive(Debug, Default)]
pub struct SparseMem {
    len: u64,
    pos: u64,
    chunks: std::collections::BTreeMap<u64, Box<[u8; SPARSE_CHUNK]>>,
}

const SPARSE_CHUNK: usize = 4096;

impl SparseMem {
    pub fn new(len: u64) -> Self {
        SparseMem { len, pos: 0, chunks: Default::default() }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Emits every non-zero chunk whose offset lies in `range`, shifted by `base`.
    pub fn emit_range(&self, range: std::ops::Range<u64>, base: u64, sink: &mut dyn Sink) -> io::Result<()> {
        for (&idx, chunk) in
            self.chunks.range(range.start / SPARSE_CHUNK as u64..range.end.div_ceil(SPARSE_CHUNK as u64))
        {
            let start = idx * SPARSE_CHUNK as u64;
            let end = (start + SPARSE_CHUNK as u64).min(self.len);
            let data = &chunk[..(end - start) as usize];
            if data.iter().any(|&b| b != 0) {
                sink.write_at(base + start, data)?;
            }
        }
        Ok(())
    }

    /// Emits everything, shifted by `base`.
    pub fn emit(&self, base: u64, sink: &mut dyn Sink) -> io::Result<()> {
        self.emit_range(0..self.len, base, sink)
    }

    /// Reads bytes at an offset (zeros where nothing was written).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            let at = offset + i as u64;
            *b = self.chunks.get(&(at / SPARSE_CHUNK as u64)).map_or(0, |c| c[(at % SPARSE_CHUNK as u64) as usize]);
        }
    }
}

impl io::Read for SparseMem {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.len.saturating_sub(self.pos)) as usize;
        let mut done = 0;
        while done < n {
            let at = self.pos + done as u64;
            let within = (at % SPARSE_CHUNK as u64) as usize;
            let take = (SPARSE_CHUNK - within).min(n - done);
            match self.chunks.get(&(at / SPARSE_CHUNK as u64)) {
                Some(c) => buf[done..done + take].copy_from_slice(&c[within..within + take]),
                None => buf[done..done + take].fill(0),
            }
            done += take;
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl io::Write for SparseMem {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.pos + buf.len() as u64 > self.len {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "write past the end of the device"));
        }
        let mut done = 0;
        while done < buf.len() {
            let at = self.pos + done as u64;
            let within = (at % SPARSE_CHUNK as u64) as usize;
            let take = (SPARSE_CHUNK - within).min(buf.len() - done);
            let src = &buf[done..done + take];
            let key = at / SPARSE_CHUNK as u64;
            // Writing zeros into a chunk that does not exist changes nothing: keep it a hole.
            if self.chunks.contains_key(&key) || src.iter().any(|&b| b != 0) {
                let c = self.chunks.entry(key).or_insert_with(|| Box::new([0; SPARSE_CHUNK]));
                c[within..within + take].copy_from_slice(src);
            }
            done += take;
        }
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl io::Seek for SparseMem {
    fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
        let new = match pos {
            io::SeekFrom::Start(n) => n as i128,
            io::SeekFrom::End(d) => self.len as i128 + d as i128,
            io::SeekFrom::Current(d) => self.pos as i128 + d as i128,
        };
        if new < 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"));
        }
        self.pos = new as u64;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};

    /// On its own thread, a sink computes exactly what it computes inline, and an error it
    /// meets reaches the caller.
    #[test]
    fn offload_gives_the_same_digests_and_reports_errors() {
        let block = 512 * 1024;
        let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut at = 4096u64;
        for i in 0..3000u64 {
            let len = [1usize, 4096, 70_000, 3 << 20][(i % 4) as usize];
            writes.push((at, (0..len).map(|k| (k as u64 * 31 + i) as u8).collect()));
            at += len as u64 + [0, 1, 4096, 9 << 20][(i % 3) as usize];
        }
        let len = at + 12345;
        let mut inline = (Sha256Sink::new(), BlockDigests::new(block));
        let mut off = Offload::spawn((Sha256Sink::new(), BlockDigests::new(block))).unwrap();
        for (o, d) in &writes {
            inline.write_at(*o, d).unwrap();
            off.write_at(*o, d).unwrap();
        }
        inline.finish(len).unwrap();
        off.finish(len).unwrap();
        let (sha, blocks) = off.join().unwrap();
        assert_eq!(sha.hex(), inline.0.hex());
        assert_eq!(blocks.into_block_map(), inline.1.into_block_map());

        let mut off = Offload::spawn(Sha256Sink::new()).unwrap();
        off.write_at(10 << 20, b"late").unwrap();
        off.write_at(0, b"goes back").unwrap();
        off.finish(20 << 20).unwrap();
        assert!(off.join().is_err(), "a write that goes back is an error");
    }

    #[test]
    fn sparse_mem_reads_back_and_emits_only_data() {
        let mut m = SparseMem::new(1 << 20);
        m.seek(SeekFrom::Start(5000)).unwrap();
        m.write_all(b"hello").unwrap();
        m.seek(SeekFrom::Start(100_000)).unwrap();
        m.write_all(&[0; 9000]).unwrap();
        let mut b = [0u8; 7];
        m.seek(SeekFrom::Start(4999)).unwrap();
        m.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"\0hello\0");
        let mut v = VecSink::default();
        m.emit(10, &mut v).unwrap();
        v.finish(1 << 20).unwrap();
        assert_eq!(&v.bytes[5010..5015], b"hello");
        assert!(m.chunks.len() == 1, "zero writes stay holes");
    }

    #[test]
    fn digests_and_hash_agree_with_a_plain_computation() {
        use sha2::Digest;
        let mut sha = Sha256Sink::new();
        let mut blocks = BlockDigests::new(4096);
        let mut vec = VecSink::default();
        {
            let mut t = Tee(vec![&mut sha, &mut blocks, &mut vec]);
            t.write_at(100, &[1; 10]).unwrap();
            t.write_at(9000, &[2; 5000]).unwrap();
            t.write_at(20000, &[0; 100]).unwrap();
            t.finish(30000).unwrap();
        }
        assert_eq!(sha.hex(), hex::encode(sha2::Sha256::digest(&vec.bytes)));
        let map = blocks.into_block_map();
        let idx: Vec<u64> = map.data_blocks.iter().map(|b| b.index).collect();
        assert_eq!(idx, vec![0, 2, 3]);
        assert_eq!(map.data_blocks[1].sha256, hex::encode(sha2::Sha256::digest(&vec.bytes[8192..12288])));
    }

    #[test]
    fn sparse_file_appears_only_when_persisted() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("x.raw");
        let mut f = SparseFile::create(&dest).unwrap();
        f.write_at(4096, b"abc").unwrap();
        f.write_at(4099, b"def").unwrap();
        f.write_at(1 << 20, b"z").unwrap();
        f.finish(4 << 20).unwrap();
        assert!(!dest.exists());
        f.persist().unwrap();
        let bytes = std::fs::read(&dest).unwrap();
        assert_eq!(bytes.len(), 4 << 20);
        assert_eq!(&bytes[4096..4102], b"abcdef");
        assert_eq!(bytes[1 << 20], b'z');
        let dropped = SparseFile::create(&d.path().join("y.raw")).unwrap();
        drop(dropped);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1, "an abandoned write leaves nothing");
    }
}
