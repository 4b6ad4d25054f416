//! Streaming an etcd snapshot into an S3 multipart upload: chunks are checked, compressed,
//! encrypted and uploaded in parts as they arrive; nothing holds the whole snapshot, in memory
//! or on disk. The etcd file's own trailing SHA-256 is verified before the upload is completed:
//! a snapshot that fails is aborted, never stored as good.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use object_store::{MultipartUpload, PutPayload};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// S3 part size: above the 5 MiB minimum, small enough to keep memory flat.
pub const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts on the wire at once: S3 servers write parts in parallel, so one part at a time leaves
/// the link idle while each one is stored. Memory is about this many parts plus one.
pub const PARTS_IN_FLIGHT: usize = 3;
/// Room past a part's size for the last chunk written into it, so the buffer never regrows.
const PART_SLACK: usize = 1024 * 1024;
const TRAILER: usize = 32;
/// How long a failed upload's abort is tried again while S3 does not answer: its parts cost
/// storage until a lifecycle rule (if any) removes them, and an S3 restart takes seconds.
pub const ABORT_RETRY_FOR: Duration = Duration::from_secs(30);
const ABORT_FIRST_WAIT: Duration = Duration::from_millis(500);
const ABORT_MAX_WAIT: Duration = Duration::from_secs(5);

/// etcd's integrity check (`hasChecksum` and `copyAndVerifyDB` in etcdutl): the file is the
/// bbolt database followed by its raw SHA-256, so its size is 32 more than a multiple of 512.
/// One SHA-256 pass serves both digests: the database's is the state before the last 32 bytes,
/// the whole file's is that state fed the last 32 bytes too.
#[derive(Default)]
pub struct Verifier {
    db: Sha256,
    /// The last 32 bytes seen (or fewer): the trailer, once the stream ends.
    tail: Vec<u8>,
    total: u64,
}

/// A verified snapshot's sizes and digests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub size: u64,
    /// SHA-256 of the whole file, trailer included (what a download can be checked against).
    pub file_sha256: String,
    /// The trailer: SHA-256 of the database.
    pub db_sha256: String,
}

impl Verifier {
    pub fn update(&mut self, chunk: &[u8]) {
        self.total += chunk.len() as u64;
        let seen = self.tail.len() + chunk.len();
        if seen <= TRAILER {
            self.tail.extend_from_slice(chunk);
            return;
        }
        // Everything but the last 32 bytes seen so far is database: first what the tail
        // held, then the chunk, hashed where it lies.
        let to_db = seen - TRAILER;
        let from_tail = to_db.min(self.tail.len());
        self.db.update(&self.tail[..from_tail]);
        let from_chunk = to_db - from_tail;
        self.db.update(&chunk[..from_chunk]);
        self.tail.drain(..from_tail);
        self.tail.extend_from_slice(&chunk[from_chunk..]);
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn verify(self) -> Result<Verified, String> {
        if self.total <= TRAILER as u64 {
            return Err(format!("the snapshot is empty ({} bytes)", self.total));
        }
        if self.total % 512 != TRAILER as u64 {
            return Err(format!(
                "the snapshot has no SHA-256 trailer: {} bytes is not 32 more than a multiple of 512",
                self.total
            ));
        }
        let mut file = self.db.clone();
        file.update(&self.tail);
        let db = hex::encode(self.db.finalize());
        let trailer = hex::encode(&self.tail);
        if db != trailer {
            return Err(format!(
                "the snapshot is corrupt: its SHA-256 trailer says {trailer}, its database hashes to {db}"
            ));
        }
        Ok(Verified {
            size: self.total,
            file_sha256: hex::encode(file.finalize()),
            db_sha256: db,
        })
    }
}

/// One layer of the output chain; `finish` flushes its framing (zstd frame end, age's last
/// chunk) into the next layer.
pub trait Stage: Write + Send {
    fn finish(self: Box<Self>) -> io::Result<()>;
}

/// The end of the chain: bytes waiting to become an S3 part.
#[derive(Clone, Default)]
pub struct PartBuffer(Arc<Mutex<Vec<u8>>>);

impl PartBuffer {
    pub fn len(&self) -> usize {
        self.0.lock().map(|b| b.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes so far, leaving a fresh buffer sized for a whole part: a `Vec` left to grow
    /// doubles past 8 MiB to 16, and the part on the wire keeps that capacity.
    pub fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .map(|mut b| std::mem::replace(&mut *b, Vec::with_capacity(PART_SIZE + PART_SLACK)))
            .unwrap_or_default()
    }
}

impl Write for PartBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| io::Error::other("part buffer poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Stage for PartBuffer {
    fn finish(self: Box<Self>) -> io::Result<()> {
        Ok(())
    }
}

struct Zstd(zstd::stream::write::Encoder<'static, Box<dyn Stage>>);

impl Write for Zstd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl Stage for Zstd {
    fn finish(self: Box<Self>) -> io::Result<()> {
        self.0.finish()?.finish()
    }
}

struct Age(age::stream::StreamWriter<Box<dyn Stage>>);

impl Write for Age {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl Stage for Age {
    fn finish(self: Box<Self>) -> io::Result<()> {
        self.0.finish()?.finish()
    }
}

/// Parses age recipients (`age1...`).
pub fn recipients(keys: &[String]) -> Result<Vec<age::x25519::Recipient>, String> {
    keys.iter()
        .map(|k| {
            k.parse::<age::x25519::Recipient>()
                .map_err(|e| format!("{k:?} is not an age recipient: {e}"))
        })
        .collect()
}

/// raw → zstd (optional) → age (optional) → `buffer`.
pub fn chain(
    buffer: PartBuffer,
    zstd_level: Option<i32>,
    recipients: &[age::x25519::Recipient],
) -> io::Result<Box<dyn Stage>> {
    let mut stage: Box<dyn Stage> = Box::new(buffer);
    if !recipients.is_empty() {
        let encryptor =
            age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
                .map_err(io::Error::other)?;
        stage = Box::new(Age(encryptor.wrap_output(stage)?));
    }
    if let Some(level) = zstd_level {
        stage = Box::new(Zstd(zstd::stream::write::Encoder::new(stage, level)?));
    }
    Ok(stage)
}

/// Uploads parts as the buffer fills, up to [`PARTS_IN_FLIGHT`] at once; a failed part
/// surfaces at the next `flush` or at `complete`.
pub struct PartUploader {
    upload: Box<dyn MultipartUpload>,
    in_flight: tokio::task::JoinSet<Result<(), object_store::Error>>,
    stored: u64,
    /// Over the parts in order: the stored object's digest, for the manifest.
    hasher: Sha256,
}

/// What a completed upload stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub bytes: u64,
    /// SHA-256 of the stored object, as a download of it hashes.
    pub sha256: String,
}

impl PartUploader {
    pub fn new(upload: Box<dyn MultipartUpload>) -> Self {
        Self {
            upload,
            in_flight: tokio::task::JoinSet::new(),
            stored: 0,
            hasher: Sha256::new(),
        }
    }

    /// Sends whatever the buffer holds as the next part, once it holds at least `min`.
    pub async fn flush(
        &mut self,
        buffer: &PartBuffer,
        min: usize,
    ) -> Result<(), object_store::Error> {
        if buffer.len() < min.max(1) {
            return Ok(());
        }
        while self.in_flight.len() >= PARTS_IN_FLIGHT {
            self.settle_one().await?;
        }
        let part = buffer.take();
        self.stored += part.len() as u64;
        self.hasher.update(&part);
        // The part's number is fixed here, in call order, whenever it finishes.
        self.in_flight
            .spawn(self.upload.put_part(PutPayload::from(part)));
        Ok(())
    }

    async fn settle_one(&mut self) -> Result<(), object_store::Error> {
        match self.in_flight.join_next().await {
            Some(Ok(result)) => result,
            Some(Err(e)) => Err(object_store::Error::Generic {
                store: "S3",
                source: Box::new(e),
            }),
            None => Ok(()),
        }
    }

    /// Waits for every part, then completes the upload; what was stored. On failure the
    /// upload is still open: the caller aborts it ([`PartUploader::abort`]).
    pub async fn complete(&mut self) -> Result<Stored, object_store::Error> {
        while !self.in_flight.is_empty() {
            self.settle_one().await?;
        }
        self.upload.complete().await?;
        Ok(Stored {
            bytes: self.stored,
            sha256: hex::encode(std::mem::take(&mut self.hasher).finalize()),
        })
    }

    /// Stops the parts on the wire and aborts the upload, so no half object is left. S3 may be
    /// the reason the upload failed: the abort is tried again with backoff for up to `budget`
    /// (or until `cancel`; a cancelled job tries once), so an outage shorter than that leaves
    /// no parts behind. An upload S3 no longer knows counts as aborted.
    pub async fn abort(
        mut self,
        budget: Duration,
        cancel: &CancellationToken,
    ) -> Result<Aborted, object_store::Error> {
        self.in_flight.abort_all();
        while self.in_flight.join_next().await.is_some() {}
        let started = tokio::time::Instant::now();
        let deadline = started + budget;
        let mut wait = ABORT_FIRST_WAIT;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let error = match tokio::time::timeout_at(deadline, self.upload.abort()).await {
                Ok(Ok(())) | Ok(Err(object_store::Error::NotFound { .. })) => {
                    return Ok(Aborted {
                        attempts,
                        took: started.elapsed(),
                    });
                }
                Ok(Err(e)) => e,
                Err(_) => object_store::Error::Generic {
                    store: "S3",
                    source: format!("no answer to the abort within {budget:?}").into(),
                },
            };
            if cancel.is_cancelled() || tokio::time::Instant::now() + wait >= deadline {
                return Err(error);
            }
            tracing::info!(error = %error, retry_in = ?wait, "Aborting the upload failed; trying again");
            tokio::select! {
                () = cancel.cancelled() => return Err(error),
                () = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(ABORT_MAX_WAIT);
        }
    }
}

/// How an abort went: tries and time, for the log.
#[derive(Debug, Clone, Copy)]
pub struct Aborted {
    pub attempts: u32,
    pub took: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot-shaped file: `db` of `len` bytes, then its SHA-256.
    fn snapshot(len: usize) -> Vec<u8> {
        let db: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let mut file = db.clone();
        file.extend_from_slice(&Sha256::digest(&db));
        file
    }

    #[test]
    fn a_good_snapshot_verifies_whatever_the_chunking() {
        let file = snapshot(512 * 40);
        for chunk in [1, 7, 31, 32, 33, 4096, 100_000] {
            let mut v = Verifier::default();
            file.chunks(chunk).for_each(|c| v.update(c));
            let ok = v.verify().expect("verifies");
            assert_eq!(ok.size, file.len() as u64);
            assert_eq!(ok.db_sha256, hex::encode(&file[file.len() - 32..]));
            assert_eq!(ok.file_sha256, hex::encode(Sha256::digest(&file)));
        }
    }

    #[test]
    fn a_flipped_byte_a_missing_trailer_and_an_empty_file_are_refused() {
        let mut file = snapshot(512 * 8);
        file[100] ^= 0x01;
        let mut v = Verifier::default();
        v.update(&file);
        assert!(v.verify().expect_err("corrupt").contains("corrupt"));
        let mut v = Verifier::default();
        v.update(&vec![0u8; 4096]);
        assert!(
            v.verify()
                .expect_err("no trailer")
                .contains("no SHA-256 trailer")
        );
        assert!(
            Verifier::default()
                .verify()
                .expect_err("empty")
                .contains("empty")
        );
    }

    #[test]
    fn the_chain_compresses_then_encrypts_and_round_trips() {
        let identity = age::x25519::Identity::generate();
        let file = snapshot(512 * 200);
        let buffer = PartBuffer::default();
        let mut stage = chain(buffer.clone(), Some(3), &[identity.to_public()]).expect("chain");
        for c in file.chunks(1000) {
            stage.write_all(c).expect("write");
        }
        stage.finish().expect("finish");
        let stored = buffer.take();
        assert!(stored.starts_with(b"age-encryption.org/v1"));
        let decryptor = age::Decryptor::new(&stored[..]).expect("age header");
        let mut reader = decryptor
            .decrypt(std::iter::once(&identity as &dyn age::Identity))
            .expect("decrypt");
        let mut compressed = Vec::new();
        std::io::Read::read_to_end(&mut reader, &mut compressed).expect("read");
        assert_eq!(zstd::decode_all(&compressed[..]).expect("zstd"), file);
    }
}
