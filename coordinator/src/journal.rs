//! The durable result journal: every result is appended here, and synced to disk, before the
//! coordinator acknowledges it to the agent. A restarted coordinator replays the journal and
//! resumes where it stopped; the Parquet/CSV outputs are rebuilt from it.
//!
//! File format (`journal.dbj` in the output directory):
//!
//! ```text
//! "DBJRNL01"                                  8-byte magic
//! [u32 len LE][u32 crc32 LE][len bytes JSON]  header frame: format version, run id, grid hash
//! [u32 len LE][u32 crc32 LE][len bytes JSON]  one frame per ResultRecord, in arrival order
//! ...
//! ```
//!
//! A crash can leave the last frame torn (short, or with a CRC that does not match). Replay stops
//! at the first such frame, truncates the file there with a warning saying how many bytes were
//! dropped, and carries on with the valid prefix: those dropped results were never acknowledged
//! (the sync comes first), so their agents send them again. A write that fails half-way is rolled
//! back at once for the same reason, so later appends never land behind garbage.

use crate::record::ResultRecord;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Name of the journal inside the output directory.
pub const JOURNAL_FILE_NAME: &str = "journal.dbj";

/// Version of the frame and header format; a journal of another version is refused, not guessed.
pub const JOURNAL_FORMAT_VERSION: u32 = 1;

/// Identifies a decodebench journal, so that an unrelated file is never truncated as "torn".
const MAGIC: &[u8; 8] = b"DBJRNL01";

/// `[u32 len][u32 crc32]`
const FRAME_HEADER_BYTES: usize = 8;

/// Largest frame replay accepts. A record holds at most two kernels of `MAX_TRIALS` (100,000)
/// samples, about 4 MiB of JSON; a length beyond this is corruption, not a record.
pub const MAX_FRAME_BYTES: u32 = 64 << 20;

/// What a journal belongs to: the run and the grid. Only the grid hash must match on resume; the
/// run id of an existing journal wins (see [`Journal::meta`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalMeta {
    pub run_id: String,
    pub grid_hash: String,
}

/// The first frame of every journal.
#[derive(Debug, Serialize, Deserialize)]
struct JournalHeader {
    format_version: u32,
    run_id: String,
    grid_hash: String,
    created_unix_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {}: {source}; check that the --out directory is writable and has space", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "journal {}: written for a different grid (its grid hash {journal}, this grid {grid}); \
         use a fresh --out directory, or run with the same grid to resume",
        path.display()
    )]
    GridMismatch {
        path: PathBuf,
        journal: String,
        grid: String,
    },
    #[error(
        "journal {}: not a decodebench journal ({reason}); use a fresh --out directory or move \
         the file away",
        path.display()
    )]
    NotAJournal { path: PathBuf, reason: String },
    #[error(
        "journal {}: format version {found}, this build reads version {JOURNAL_FORMAT_VERSION}; \
         resume with the decodebench version that wrote it, or use a fresh --out directory",
        path.display()
    )]
    UnsupportedVersion { path: PathBuf, found: u32 },
    #[error(
        "journal {}: another process holds it open for writing; stop the other coordinator or \
         use a different --out directory",
        path.display()
    )]
    Locked { path: PathBuf },
    #[error(
        "result for case {case_id} cannot be journaled: {reason}; the record was not written \
         (a non-finite number, e.g. NaN, does not survive JSON)"
    )]
    Unencodable { case_id: String, reason: String },
    #[error(
        "journal {}: an earlier write failed and could not be rolled back; restart the \
         coordinator, which recovers from the journal",
        path.display()
    )]
    Poisoned { path: PathBuf },
}

/// An open journal, positioned for appending.
#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
    meta: JournalMeta,
    /// Bytes known to be durably in the file: the end of the last fully synced frame.
    len: u64,
    records: u64,
    /// Reused encoding buffer, so appends do not allocate per record.
    buf: Vec<u8>,
    /// Set when a failed write could not be rolled back; every later append is refused.
    poisoned: bool,
}

/// Why replay stopped before the end of the file.
enum TailDamage {
    Torn(&'static str),
    Corrupt(String),
}

impl Journal {
    /// Opens (or creates) `dir/journal.dbj`, replays it and returns the records in the order they
    /// were appended. A torn or corrupt tail is truncated away with a warning; a journal of
    /// another grid is refused.
    pub fn open(
        dir: &Path,
        meta: &JournalMeta,
    ) -> Result<(Journal, Vec<ResultRecord>), JournalError> {
        let path = dir.join(JOURNAL_FILE_NAME);
        let io_err = |source| JournalError::Io {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(dir).map_err(io_err)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(JournalError::Locked { path }),
            Err(fs::TryLockError::Error(e)) => return Err(io_err(e)),
        }
        let file_len = file.metadata().map_err(io_err)?.len();

        let mut journal = Journal {
            file,
            path: path.clone(),
            meta: meta.clone(),
            len: 0,
            records: 0,
            buf: Vec::with_capacity(4096),
            poisoned: false,
        };
        if file_len < MAGIC.len() as u64 + FRAME_HEADER_BYTES as u64 {
            journal.check_fresh_file(file_len)?;
            journal.create()?;
            return Ok((journal, Vec::new()));
        }

        let mut reader = BufReader::with_capacity(1 << 20, &journal.file);
        let mut magic = [0u8; 8];
        reader.read_exact(&mut magic).map_err(io_err)?;
        if &magic != MAGIC {
            return Err(JournalError::NotAJournal {
                path,
                reason: format!("it starts with {magic:?}, not {MAGIC:?}"),
            });
        }
        let mut offset = MAGIC.len() as u64;
        let header: JournalHeader =
            match read_frame(&mut reader, file_len - offset).map_err(io_err)? {
                Ok(payload) => {
                    offset += (FRAME_HEADER_BYTES + payload.len()) as u64;
                    serde_json::from_slice(&payload).map_err(|e| JournalError::NotAJournal {
                        path: path.clone(),
                        reason: format!("unreadable header: {e}"),
                    })?
                }
                Err(TailDamage::Torn(_)) => {
                    // Creation itself was cut short: no record can follow an unsynced header.
                    drop(reader);
                    tracing::warn!(
                        path = %path.display(),
                        dropped_bytes = file_len,
                        "journal: header was torn by a crash during creation; starting it afresh"
                    );
                    journal.file.set_len(0).map_err(io_err)?;
                    journal.create()?;
                    return Ok((journal, Vec::new()));
                }
                Err(TailDamage::Corrupt(reason)) => {
                    return Err(JournalError::NotAJournal {
                        path,
                        reason: format!("corrupt header: {reason}"),
                    })
                }
            };
        if header.format_version != JOURNAL_FORMAT_VERSION {
            return Err(JournalError::UnsupportedVersion {
                path,
                found: header.format_version,
            });
        }
        if header.grid_hash != meta.grid_hash {
            return Err(JournalError::GridMismatch {
                path,
                journal: header.grid_hash,
                grid: meta.grid_hash.clone(),
            });
        }
        let mut records = Vec::new();
        let damage = loop {
            if offset == file_len {
                break None;
            }
            match read_frame(&mut reader, file_len - offset).map_err(io_err)? {
                Ok(payload) => match serde_json::from_slice::<ResultRecord>(&payload) {
                    Ok(record) => {
                        records.push(record);
                        offset += (FRAME_HEADER_BYTES + payload.len()) as u64;
                    }
                    Err(e) => break Some(TailDamage::Corrupt(format!("undecodable record: {e}"))),
                },
                Err(damage) => break Some(damage),
            }
        };
        drop(reader);
        if let Some(damage) = damage {
            let reason = match damage {
                TailDamage::Torn(what) => what.to_string(),
                TailDamage::Corrupt(what) => what,
            };
            tracing::warn!(
                path = %path.display(),
                offset,
                dropped_bytes = file_len - offset,
                kept_records = records.len(),
                reason = %reason,
                "journal: dropping a torn or corrupt tail; results in it were never acknowledged \
                 and will be sent again"
            );
            journal.file.set_len(offset).map_err(io_err)?;
            journal.file.sync_all().map_err(io_err)?;
        }
        journal.file.seek(SeekFrom::Start(offset)).map_err(io_err)?;
        journal.len = offset;
        journal.records = records.len() as u64;
        journal.meta = JournalMeta {
            run_id: header.run_id,
            grid_hash: header.grid_hash,
        };
        Ok((journal, records))
    }

    /// The journal's run id and grid hash. When an existing journal was resumed, its run id is
    /// the original one, whatever was passed to [`Journal::open`].
    pub fn meta(&self) -> &JournalMeta {
        &self.meta
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records in the journal (replayed plus appended).
    pub fn record_count(&self) -> u64 {
        self.records
    }

    /// Bytes durably in the file.
    pub fn len_bytes(&self) -> u64 {
        self.len
    }

    /// Appends one record and syncs it to disk before returning: once this returns `Ok`, the
    /// record survives a crash, and only then may the result be acknowledged.
    pub fn append(&mut self, record: &ResultRecord) -> Result<(), JournalError> {
        self.append_batch(std::slice::from_ref(record))
    }

    /// Appends many records with a single write and a single sync (group commit). Either all of
    /// them are durable when this returns `Ok`, or none is in the file.
    pub fn append_batch(&mut self, records: &[ResultRecord]) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned {
                path: self.path.clone(),
            });
        }
        self.buf.clear();
        for record in records {
            encode_record(&mut self.buf, record)?;
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        let written = self
            .file
            .write_all(&self.buf)
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.len += self.buf.len() as u64;
                self.records += records.len() as u64;
                Ok(())
            }
            Err(source) => {
                self.roll_back();
                Err(JournalError::Io {
                    path: self.path.clone(),
                    source,
                })
            }
        }
    }

    /// Cuts the file back to the last durable frame after a failed write, so the next append
    /// does not land behind a partial frame (which replay would treat as the end of the journal).
    fn roll_back(&mut self) {
        let restored = self
            .file
            .set_len(self.len)
            .and_then(|()| self.file.seek(SeekFrom::Start(self.len)).map(|_| ()));
        if let Err(e) = restored {
            tracing::error!(
                path = %self.path.display(),
                error = %e,
                "journal: could not roll back a failed write; refusing further appends"
            );
            self.poisoned = true;
        }
    }

    /// A file too short to hold a header is either new (empty) or a creation cut short; anything
    /// else there is not ours to overwrite.
    fn check_fresh_file(&mut self, file_len: u64) -> Result<(), JournalError> {
        if file_len == 0 {
            return Ok(());
        }
        let mut start = Vec::with_capacity(file_len as usize);
        (&self.file)
            .read_to_end(&mut start)
            .map_err(|source| JournalError::Io {
                path: self.path.clone(),
                source,
            })?;
        let magic_part = &start[..start.len().min(MAGIC.len())];
        if !MAGIC.starts_with(magic_part) {
            return Err(JournalError::NotAJournal {
                path: self.path.clone(),
                reason: format!("{file_len} bytes that do not start with {MAGIC:?}"),
            });
        }
        tracing::warn!(
            path = %self.path.display(),
            dropped_bytes = file_len,
            "journal: header was torn by a crash during creation; starting it afresh"
        );
        self.file.set_len(0).map_err(|source| JournalError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Writes the magic and the header frame into an empty file and makes both, and the file's
    /// directory entry, durable.
    fn create(&mut self) -> Result<(), JournalError> {
        let header = JournalHeader {
            format_version: JOURNAL_FORMAT_VERSION,
            run_id: self.meta.run_id.clone(),
            grid_hash: self.meta.grid_hash.clone(),
            created_unix_ms: chrono::Utc::now().timestamp_millis(),
        };
        let mut bytes = MAGIC.to_vec();
        let payload = serde_json::to_vec(&header).map_err(|e| JournalError::Io {
            path: self.path.clone(),
            source: io::Error::other(e),
        })?;
        push_frame(&mut bytes, &payload);
        let io_err = |source| JournalError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.seek(SeekFrom::Start(0)).map_err(io_err)?;
        self.file.write_all(&bytes).map_err(io_err)?;
        self.file.sync_all().map_err(io_err)?;
        if let Some(dir) = self.path.parent() {
            crate::sink::sync_dir(dir).map_err(io_err)?;
        }
        self.len = bytes.len() as u64;
        self.records = 0;
        Ok(())
    }
}

fn push_frame(out: &mut Vec<u8>, payload: &[u8]) {
    // Payload sizes are bounded by MAX_FRAME_BYTES at encode time.
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Appends one record's frame to `out`, or leaves `out` as it was and explains why the record
/// cannot be journaled. The record is decoded back before it is accepted: serde_json writes a
/// NaN or infinity as `null`, which would then fail to replay and cut the journal short.
fn encode_record(out: &mut Vec<u8>, record: &ResultRecord) -> Result<(), JournalError> {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_BYTES]);
    let unencodable = |reason: String| JournalError::Unencodable {
        case_id: record.case.id.clone(),
        reason,
    };
    let checked = serde_json::to_writer(&mut *out, record)
        .map_err(|e| unencodable(e.to_string()))
        .and_then(|()| {
            let payload = &out[start + FRAME_HEADER_BYTES..];
            if payload.len() > MAX_FRAME_BYTES as usize {
                return Err(unencodable(format!(
                    "{} bytes of JSON, more than the {MAX_FRAME_BYTES}-byte frame limit",
                    payload.len()
                )));
            }
            serde_json::from_slice::<ResultRecord>(payload)
                .map(|_| ())
                .map_err(|e| unencodable(format!("it would not read back: {e}")))
        });
    if let Err(e) = checked {
        out.truncate(start);
        return Err(e);
    }
    let payload_len = out.len() - start - FRAME_HEADER_BYTES;
    let crc = crc32fast::hash(&out[start + FRAME_HEADER_BYTES..]);
    out[start..start + 4].copy_from_slice(&(payload_len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Reads one frame. The outer `io::Result` is a real read error; the inner one says whether the
/// frame was whole and intact. `remaining` is the number of bytes left in the file.
fn read_frame(reader: &mut impl Read, remaining: u64) -> io::Result<Result<Vec<u8>, TailDamage>> {
    if remaining < FRAME_HEADER_BYTES as u64 {
        return Ok(Err(TailDamage::Torn("short frame header")));
    }
    let mut head = [0u8; FRAME_HEADER_BYTES];
    reader.read_exact(&mut head)?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if len > MAX_FRAME_BYTES {
        return Ok(Err(TailDamage::Corrupt(format!(
            "frame length {len} exceeds the {MAX_FRAME_BYTES}-byte limit"
        ))));
    }
    if u64::from(len) > remaining - FRAME_HEADER_BYTES as u64 {
        return Ok(Err(TailDamage::Torn("short frame payload")));
    }
    let mut payload = vec![0u8; len as usize];
    reader.read_exact(&mut payload)?;
    let actual = crc32fast::hash(&payload);
    if actual != crc {
        return Ok(Err(TailDamage::Corrupt(format!(
            "CRC mismatch (stored {crc:#010x}, computed {actual:#010x})"
        ))));
    }
    Ok(Ok(payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::tests::sample_record;

    fn meta(grid: &str) -> JournalMeta {
        JournalMeta {
            run_id: "run-a".into(),
            grid_hash: grid.into(),
        }
    }

    fn records(n: u32) -> Vec<ResultRecord> {
        (1..=n)
            .map(|b| sample_record(b, &[1.0, f64::from(b)], &[2.0]))
            .collect()
    }

    fn journal_path(dir: &Path) -> PathBuf {
        dir.join(JOURNAL_FILE_NAME)
    }

    #[test]
    fn replay_returns_records_in_append_order() {
        let dir = tempfile::tempdir().unwrap();
        let recs = records(5);
        {
            let (mut j, replayed) = Journal::open(dir.path(), &meta("g1")).unwrap();
            assert!(replayed.is_empty());
            j.append(&recs[0]).unwrap();
            j.append_batch(&recs[1..4]).unwrap();
            j.append_batch(&[]).unwrap();
            j.append(&recs[4]).unwrap();
            assert_eq!(j.record_count(), 5);
        }
        let (j, replayed) = Journal::open(dir.path(), &meta("g1")).unwrap();
        assert_eq!(replayed, recs);
        assert_eq!(j.record_count(), 5);
        assert_eq!(
            j.len_bytes(),
            fs::metadata(journal_path(dir.path())).unwrap().len()
        );
    }

    #[test]
    fn resume_keeps_the_original_run_id_and_appends_after_replay() {
        let dir = tempfile::tempdir().unwrap();
        let recs = records(3);
        {
            let (mut j, _) = Journal::open(dir.path(), &meta("g1")).unwrap();
            j.append(&recs[0]).unwrap();
        }
        let other_run = JournalMeta {
            run_id: "run-b".into(),
            grid_hash: "g1".into(),
        };
        {
            let (mut j, replayed) = Journal::open(dir.path(), &other_run).unwrap();
            assert_eq!(j.meta().run_id, "run-a");
            assert_eq!(replayed.len(), 1);
            j.append_batch(&recs[1..]).unwrap();
        }
        let (_, replayed) = Journal::open(dir.path(), &meta("g1")).unwrap();
        assert_eq!(replayed, recs);
    }

    #[test]
    fn torn_tail_is_truncated_and_the_valid_prefix_kept() {
        let dir = tempfile::tempdir().unwrap();
        let recs = records(4);
        let (mut j, _) = Journal::open(dir.path(), &meta("g1")).unwrap();
        j.append_batch(&recs[..3]).unwrap();
        let good_len = j.len_bytes();
        j.append(&recs[3]).unwrap();
        let full_len = j.len_bytes();
        drop(j);

        // Cut the last record in the middle of its payload.
        let path = journal_path(dir.path());
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len((good_len + full_len) / 2).unwrap();
        drop(f);
        let (mut j, replayed) = Journal::open(dir.path(), &meta("g1")).unwrap();
        assert_eq!(replayed, recs[..3]);
        assert_eq!(fs::metadata(&path).unwrap().len(), good_len);
        // Appending after recovery lands right after the valid prefix.
        j.append(&recs[3]).unwrap();
        drop(j);
        let (_, replayed) = Journal::open(dir.path(), &meta("g1")).unwrap();
        assert_eq!(replayed, recs);
    }

    #[test]
    fn torn_frame_header_and_trailing_garbage_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let recs = records(2);
        let path = journal_path(dir.path());
        let (mut j, _) = Journal::open(dir.path(), &meta("g1")).unwrap();
        j.append_batch(&recs).unwrap();
        let good_len = j.len_bytes();
        drop(j);
        for garbage in [&b"\x05\x00"[..], &b"garbage that is not a frame at all"[..]] {
            let mut f = OpenOptions::new().append(true).open(&path).unwrap();
            f.write_all(garbage).unwrap();
            drop(f);
            let (_, replayed) = Journal::open(dir.path(), &meta("g1")).unwrap();
            assert_eq!(replayed, recs);
            assert_eq!(fs::metadata(&path).unwrap().len(), good_len);
        }
    }

    #[test]
    fn corrupt_crc_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let recs = records(3);
        let path = journal_path(dir.path());
        let (mut j, _) = Journal::open(dir.path(), &meta("g1")).unwrap();
        j.append_batch(&recs[..2]).unwrap();
        let before_last = j.len_bytes();
        j.append(&recs[2]).unwrap();
        drop(j);
        // Flip one bit inside the last record's JSON: same length, wrong CRC.
        let mut bytes = fs::read(&path).unwrap();
        let i = before_last as usize + FRAME_HEADER_BYTES + 20;
        bytes[i] ^= 0x01;
        fs::write(&path, &bytes).unwrap();
        let (_, replayed) = Journal::open(dir.path(), &meta("g1")).unwrap();
        assert_eq!(replayed, recs[..2]);
        assert_eq!(fs::metadata(&path).unwrap().len(), before_last);
    }

    #[test]
    fn corrupt_length_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let recs = records(2);
        let path = journal_path(dir.path());
        let (mut j, _) = Journal::open(dir.path(), &meta("g1")).unwrap();
        j.append(&recs[0]).unwrap();
        let before_last = j.len_bytes();
        j.append(&recs[1]).unwrap();
        drop(j);
        let mut bytes = fs::read(&path).unwrap();
        bytes[before_last as usize + 3] = 0xff; // length > MAX_FRAME_BYTES
        fs::write(&path, &bytes).unwrap();
        let (_, replayed) = Journal::open(dir.path(), &meta("g1")).unwrap();
        assert_eq!(replayed, recs[..1]);
    }

    #[test]
    fn a_journal_of_another_grid_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path(), &meta("g1")).unwrap();
        j.append(&records(1)[0]).unwrap();
        drop(j);
        let e = Journal::open(dir.path(), &meta("g2"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("different grid"), "{e}");
        assert!(e.contains("g1") && e.contains("g2"), "{e}");
        assert!(e.contains("fresh --out directory"), "{e}");
        // Nothing was destroyed by the refusal.
        let (_, replayed) = Journal::open(dir.path(), &meta("g1")).unwrap();
        assert_eq!(replayed.len(), 1);
    }

    #[test]
    fn foreign_files_are_never_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(dir.path());
        for content in [&b"hello, world: some other file"[..], &b"abc"[..]] {
            fs::write(&path, content).unwrap();
            let e = Journal::open(dir.path(), &meta("g1"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("not a decodebench journal"), "{e}");
            assert_eq!(fs::read(&path).unwrap(), content);
        }
    }

    #[test]
    fn a_torn_header_starts_a_fresh_journal() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(dir.path());
        {
            Journal::open(dir.path(), &meta("g1")).unwrap();
        }
        let full = fs::read(&path).unwrap();
        for cut in [3, MAGIC.len() + 4, full.len() - 1] {
            fs::write(&path, &full[..cut]).unwrap();
            let (mut j, replayed) = Journal::open(dir.path(), &meta("g1")).unwrap();
            assert!(replayed.is_empty());
            j.append(&records(1)[0]).unwrap();
            drop(j);
            let (_, replayed) = Journal::open(dir.path(), &meta("g1")).unwrap();
            assert_eq!(replayed.len(), 1, "cut at {cut}");
            fs::write(&path, &full[..cut]).unwrap();
        }
    }

    #[test]
    fn a_second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_held, _) = Journal::open(dir.path(), &meta("g1")).unwrap();
        let e = Journal::open(dir.path(), &meta("g1"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("another process holds it"), "{e}");
    }

    #[test]
    fn records_that_would_not_replay_are_refused_up_front() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path(), &meta("g1")).unwrap();
        let good = records(2);
        let mut bad = good[0].clone();
        bad.measurement.kernels[0].samples_ms.push(f64::NAN);
        let e = j
            .append_batch(&[good[0].clone(), bad, good[1].clone()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot be journaled"), "{e}");
        assert_eq!(j.record_count(), 0, "nothing of a refused batch is written");
        j.append_batch(&good).unwrap();
        drop(j);
        let (_, replayed) = Journal::open(dir.path(), &meta("g1")).unwrap();
        assert_eq!(replayed, good);
    }

    /// Group-commit throughput on this machine's disk; run with `--ignored --nocapture`.
    #[test]
    #[ignore = "timing measurement, not a check"]
    fn group_commit_throughput() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path(), &meta("g1")).unwrap();
        let recs: Vec<ResultRecord> = (0..10_000)
            .map(|i| sample_record(i % 256 + 1, &[1.0; 20], &[2.0; 20]))
            .collect();
        let start = std::time::Instant::now();
        for chunk in recs.chunks(500) {
            j.append_batch(chunk).unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "appended {} records ({} bytes) in {secs:.3} s: {:.0} records/s with 500-record group commits",
            recs.len(),
            j.len_bytes(),
            recs.len() as f64 / secs
        );
        drop(j);
        let start = std::time::Instant::now();
        let (_, replayed) = Journal::open(dir.path(), &meta("g1")).unwrap();
        println!(
            "replayed {} records in {:.3} s",
            replayed.len(),
            start.elapsed().as_secs_f64()
        );
    }
}
