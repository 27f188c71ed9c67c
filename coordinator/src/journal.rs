//! The durable result journal: every result is appended here, and synced to disk, before the
//! coordinator acknowledges it to the agent. A restarted coordinator replays the journal and
//! resumes where it stopped; the Parquet/CSV outputs are rebuilt from it.
//!
//! File format (`journal.dbj` in the output directory):
//!
//! ```text
//! "DBJRNL01"                                  8-byte magic
//! [u32 len LE][u32 crc32 LE][len bytes JSON]  header frame: format version, run id, grid hash
//! [u32 len LE][u32 crc32 LE][len bytes JSON]  one frame per ResultRecord or event, in arrival order
//! ...
//! ```
//!
//! A frame after the header is a result ([`ResultRecord`]) or an *event*: a JSON object whose
//! first key is `"event"`, naming its kind: `"lost"` ([`LossRecord`]), a case charged a loss
//! because its agent's lease expired, so that a resumed coordinator still knows which cases kill
//! agents; `"attempt_failed"` ([`FailedAttemptRecord`]), an agent reported the case's kernels
//! failed and the case was queued for another attempt (journaled before the report is answered,
//! like a result), so that a resumed coordinator goes on counting its attempts and its final
//! failed record keeps every attempt's error; `"retry_round"` ([`RetryRoundRecord`]), a
//! `--retry-failed` round started, so that a restarted coordinator resumes that round rather
//! than starting another ([`Journal::replay`] says where each stands among the results). An event of a kind this build does not
//! know (a newer decodebench wrote it) is skipped with a warning, not taken for damage; an event
//! of a known kind that does not decode is a damaged frame like an undecodable result.
//!
//! # Format versions
//!
//! Version 1 is results only; version 2 adds events. A decodebench that reads only version 1
//! takes an event frame for damage in the middle of the journal: it would save a `.damaged-*`
//! copy, rewrite the journal without the events and forget the losses. So every journal this
//! build creates is version 2, which such a build refuses with a message (its "format version
//! 2, this build reads version 1") and leaves untouched.
//!
//! This build resumes version-1 journals too. A result frame is the same in both versions, so a
//! resumed version-1 journal *stays version 1 as long as only results are appended to it*: the
//! older build that wrote it can still resume it. Before the first event is appended, the
//! journal is upgraded to version 2 (see [`Journal::upgrade`]: the file is copied with a
//! version-2 header into a temporary file, synced and renamed over the journal, so a crash
//! leaves either the version-1 journal without the event or the version-2 one with every
//! record). A version-1 journal that already holds events (the builds that added loss events
//! wrote them under version 1) is upgraded as soon as it is opened. So every journal with an
//! event in it says version 2, and no build can mistake its events for damage. A version above
//! 2 (a newer decodebench) or below 1 is refused, and the file left untouched.
//!
//! A crash can leave the last frame torn (short, or with a CRC that does not match): replay cuts
//! such a *torn tail* off with a warning saying how many bytes were dropped, and carries on with
//! the valid prefix. Those dropped results were never acknowledged (the sync comes first), so
//! their agents send them again. A write that fails half-way is rolled back at once for the same
//! reason, so later appends never land behind garbage.
//!
//! A crash normally damages only the tail; a disk (or a crash that persists a batch's pages out
//! of order) can damage a frame that has intact frames after it. When replay
//! meets a bad frame it therefore scans forward, byte by byte, for the next place where a whole
//! record frame starts (a plausible length within the file, a JSON object payload, a matching
//! CRC, and a record that decodes) and carries on from there. Only when nothing intact follows is
//! the damage a torn tail. Otherwise the damaged bytes may have held acknowledged results: the original
//! file is first saved next to the journal as `journal.dbj.damaged-<unix seconds>`, then the
//! journal is rewritten crash-safely (temporary file, sync, rename, directory sync) with every
//! intact record, and a warning says what was lost and where the original is. The lost cases
//! have no result in the journal, so they run again. See [`Journal::recovery`].
//!
//! A damaged header is never "repaired": if intact records follow it, the journal is refused and
//! left untouched ([`JournalError::DamagedHeader`]).

use crate::record::{FailedAttemptRecord, LossRecord, ResultRecord, RetryRoundRecord};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Name of the journal inside the output directory.
pub const JOURNAL_FILE_NAME: &str = "journal.dbj";

/// Version of the frame and header format this build writes: 2, results and events (version 1
/// had results only). A journal of a version this build does not read is refused, not guessed.
pub const JOURNAL_FORMAT_VERSION: u32 = 2;

/// The oldest version this build reads: a version-1 journal (results only) is resumed, and
/// upgraded to [`JOURNAL_FORMAT_VERSION`] before its first event (see the module docs).
pub const OLDEST_JOURNAL_FORMAT_VERSION: u32 = 1;

/// Identifies a decodebench journal, so that an unrelated file is never truncated as "torn".
const MAGIC: &[u8; 8] = b"DBJRNL01";

/// `[u32 len][u32 crc32]`
const FRAME_HEADER_BYTES: usize = 8;

/// The smallest record payload: a record is a JSON object, so at least `{}`.
const MIN_RECORD_BYTES: u32 = 2;

/// Suffix of the temporary file a damaged journal is rewritten into before it replaces it.
const RECOVERING_SUFFIX: &str = ".recovering";

/// Suffix of the temporary file a version-1 journal is copied into, with a version-2 header,
/// before it replaces it ([`Journal::upgrade`]).
const UPGRADING_SUFFIX: &str = ".upgrading";

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

/// What [`Journal::open`] found wrong in an existing journal and repaired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalRecovery {
    /// Byte ranges (offsets in the original file) in the middle of the journal that held no
    /// readable record but were followed by intact ones: disk damage, not a crash.
    pub damaged_ranges: Vec<Range<u64>>,
    /// Records lost in `damaged_ranges`. Exact when `lost_records_exact` (the stored frame
    /// lengths in every range still chain exactly to the next intact frame); otherwise a lower
    /// bound that counts one record for each range whose frames cannot be told apart.
    pub lost_records: u64,
    pub lost_records_exact: bool,
    /// Intact records kept from after the first damaged range.
    pub kept_after_damage: u64,
    /// Bytes of a torn final frame that were cut off (a crash's leftovers, never acknowledged).
    pub torn_tail_bytes: u64,
    /// Where the original file was saved before the journal was rewritten without the damaged
    /// ranges; `None` when only a torn tail was cut off.
    pub saved_copy: Option<PathBuf>,
}

impl JournalRecovery {
    /// What the warning says about damage in the middle of the journal (a torn tail has its own).
    pub fn message(&self) -> String {
        let lost = if self.lost_records_exact {
            self.lost_records.to_string()
        } else {
            format!("at least {}", self.lost_records)
        };
        let saved = self
            .saved_copy
            .as_ref()
            .map_or_else(|| "(not saved)".to_string(), |p| p.display().to_string());
        format!(
            "journal: damage in the middle of the journal: {lost} record(s) (results or \
             events) in {} damaged range(s) ({} bytes) were lost and those cases will be run \
             again; the {} intact \
             result(s) found after the damage were kept. The original file was saved as {saved} \
             and the journal was rewritten without the damaged bytes. This is disk damage \
             (acknowledged results lost: check the disk), or a crash that wrote a batch's pages \
             out of order (nothing acknowledged lost)",
            self.damaged_ranges.len(),
            self.damaged_bytes(),
            self.kept_after_damage,
        )
    }

    /// Bytes in `damaged_ranges`.
    pub fn damaged_bytes(&self) -> u64 {
        self.damaged_ranges.iter().map(|r| r.end - r.start).sum()
    }
}

/// What a journal holds, as [`Journal::replay`] reads it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Replay {
    /// The results, in the order they were appended.
    pub records: Vec<ResultRecord>,
    /// The losses, in the order they were charged.
    pub losses: Vec<ReplayedLoss>,
    /// The failed attempts queued for another attempt, in the order they were reported.
    pub failed_attempts: Vec<ReplayedFailedAttempt>,
    /// The `--retry-failed` rounds, in the order they started.
    pub retry_rounds: Vec<ReplayedRetryRound>,
}

/// A loss found in the journal, and where it stands among the results.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayedLoss {
    pub loss: LossRecord,
    /// How many results precede it in the journal: it is later than `records[..after_records]`
    /// (so a result of its unit at an index at or past this one came after the loss).
    pub after_records: usize,
}

/// A failed attempt found in the journal, and where it stands among the results.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayedFailedAttempt {
    pub attempt: FailedAttemptRecord,
    /// How many results precede it: it is later than `records[..after_records]` (so a result of
    /// its unit at an index at or past this one came after the failed attempt).
    pub after_records: usize,
}

/// A `--retry-failed` round found in the journal, and where it stands among the results, the
/// losses and the failed attempts.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayedRetryRound {
    pub round: RetryRoundRecord,
    /// How many results precede it: `records[after_records..]` came after the round started.
    pub after_records: usize,
    /// How many losses precede it: `losses[after_losses..]` were charged after it started.
    pub after_losses: usize,
    /// How many failed attempts precede it: `failed_attempts[after_failed_attempts..]` were
    /// reported after it started.
    pub after_failed_attempts: usize,
}

/// One frame after the header.
#[derive(Debug, Clone, PartialEq)]
enum Entry {
    Result(ResultRecord),
    Loss(LossRecord),
    FailedAttempt(FailedAttemptRecord),
    RetryRound(RetryRoundRecord),
    /// An event of a kind this build does not know (written by a newer decodebench): skipped.
    UnknownEvent,
}

impl Entry {
    fn is_result(&self) -> bool {
        matches!(self, Entry::Result(_))
    }
}

/// An event frame's payload: `{"event":"<kind>", ...the kind's fields}`.
#[derive(Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Event {
    Lost(Box<LossRecord>),
    AttemptFailed(Box<FailedAttemptRecord>),
    RetryRound(Box<RetryRoundRecord>),
    #[serde(other)]
    Unknown,
}

/// [`Event`] for writing, by reference.
#[derive(Clone, Copy, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum EventRef<'a> {
    Lost(&'a LossRecord),
    AttemptFailed(&'a FailedAttemptRecord),
    RetryRound(&'a RetryRoundRecord),
}

/// How every event payload starts (serde_json writes the tag first and no spaces); a result
/// record's first key is `run_id`.
const EVENT_PREFIX: &[u8] = b"{\"event\":";

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
        "journal {}: written for a different grid (its grid hash {journal}, this grid {grid}), \
         or by a decodebench whose case ids differ (they changed when the lengths became the \
         reference script's own draws); use a fresh --out directory, or resume with the grid \
         file and the decodebench version that wrote it",
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
        "journal {}: its header frame is damaged ({reason}) but {records} intact record(s) \
         (results or events) follow it; the file was left untouched. Copy it somewhere safe, then move it and the \
         results files beside it out of the --out directory (or use a fresh --out directory) to \
         start over",
        path.display()
    )]
    DamagedHeader {
        path: PathBuf,
        reason: String,
        records: u64,
    },
    #[error(
        "journal {}: format version {found}, this build reads versions \
         {OLDEST_JOURNAL_FORMAT_VERSION} to {JOURNAL_FORMAT_VERSION}; resume with the decodebench \
         version that wrote it, or use a fresh --out directory",
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
    /// The version in the file's header: [`JOURNAL_FORMAT_VERSION`], or 1 for a resumed version-1
    /// journal that no event has been appended to yet.
    format_version: u32,
    /// When the journal was created (its header's), kept by [`Journal::upgrade`].
    created_unix_ms: i64,
    /// Where the header frame ends: the first record frame starts here.
    header_end: u64,
    /// Bytes known to be durably in the file: the end of the last fully synced frame.
    len: u64,
    records: u64,
    losses: u64,
    failed_attempts: u64,
    /// Reused encoding buffer, so appends do not allocate per record.
    buf: Vec<u8>,
    /// Set when a failed write could not be rolled back; every later append is refused.
    poisoned: bool,
    /// What opening the journal repaired, if anything.
    recovery: Option<JournalRecovery>,
}

/// Why replay stopped before the end of the file.
enum TailDamage {
    Torn(&'static str),
    Corrupt(String),
}

impl TailDamage {
    fn into_reason(self) -> String {
        match self {
            TailDamage::Torn(what) => what.to_string(),
            TailDamage::Corrupt(what) => what,
        }
    }
}

/// Why [`lock_current`] found no journal to write.
enum LockError {
    /// Another process holds the journal's lock.
    Held,
    Io(io::Error),
}

/// Opens (or creates) the journal at `path` and takes its exclusive lock (held until the file is
/// closed). A holder that rewrites the journal (damage recovery, a format upgrade) renames a new,
/// already locked file over it and closes the old one; a process that opened the old file just
/// before the rename would then lock a file no longer in the directory, so the lock counts only
/// if `path` still names the locked file, and the open is tried again otherwise.
fn lock_current(path: &Path) -> Result<File, LockError> {
    const TRIES: usize = 8;
    for _ in 0..TRIES {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(LockError::Io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(LockError::Held),
            Err(fs::TryLockError::Error(e)) => return Err(LockError::Io(e)),
        }
        // Replaced (or removed) between the open and the lock: open what the name is now.
        if still_named(&file, path).map_err(LockError::Io)? {
            return Ok(file);
        }
    }
    // The name kept changing under us: some other process is rewriting the journal.
    Err(LockError::Held)
}

/// Whether `path` names `file` (the same inode), rather than a file renamed over it since, or
/// nothing.
fn still_named(file: &File, path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let open = file.metadata()?;
    match fs::metadata(path) {
        Ok(named) => Ok(named.dev() == open.dev() && named.ino() == open.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

impl Journal {
    /// Opens (or creates) `dir/journal.dbj`, replays it and returns the records in the order they
    /// were appended. A torn tail is truncated away with a warning; damage with intact records
    /// after it is skipped, keeping those records, after the original file was saved aside (see
    /// the module documentation and [`Journal::recovery`]); a journal of another grid is refused.
    /// The journal's events are read and left out; [`Journal::replay`] returns them too.
    pub fn open(
        dir: &Path,
        meta: &JournalMeta,
    ) -> Result<(Journal, Vec<ResultRecord>), JournalError> {
        Journal::replay(dir, meta).map(|(journal, replay)| (journal, replay.records))
    }

    /// [`Journal::open`], returning the events the journal holds beside its results (losses,
    /// failed attempts, retry rounds), each with its place among the results.
    pub fn replay(dir: &Path, meta: &JournalMeta) -> Result<(Journal, Replay), JournalError> {
        let path = dir.join(JOURNAL_FILE_NAME);
        let io_err = |source| JournalError::Io {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(dir).map_err(io_err)?;
        let file = lock_current(&path).map_err(|e| match e {
            LockError::Held => JournalError::Locked { path: path.clone() },
            LockError::Io(e) => io_err(e),
        })?;
        let file_len = file.metadata().map_err(io_err)?.len();

        let mut journal = Journal {
            file,
            path: path.clone(),
            meta: meta.clone(),
            format_version: JOURNAL_FORMAT_VERSION,
            created_unix_ms: 0,
            header_end: 0,
            len: 0,
            records: 0,
            losses: 0,
            failed_attempts: 0,
            buf: Vec::with_capacity(4096),
            poisoned: false,
            recovery: None,
        };
        if file_len < MAGIC.len() as u64 + FRAME_HEADER_BYTES as u64 {
            journal.check_fresh_file(file_len)?;
            journal.create()?;
            return Ok((journal, Replay::default()));
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
                Err(damage) => {
                    // A crash during creation can only leave a header with nothing after it. If
                    // intact records follow, this is disk damage: refuse, and destroy nothing.
                    let torn = matches!(damage, TailDamage::Torn(_));
                    let reason = damage.into_reason();
                    reader
                        .seek(SeekFrom::Start(MAGIC.len() as u64))
                        .map_err(io_err)?;
                    let mut rest = Vec::new();
                    reader.read_to_end(&mut rest).map_err(io_err)?;
                    drop(reader);
                    let intact = count_intact_frames(&rest);
                    if intact > 0 {
                        return Err(JournalError::DamagedHeader {
                            path,
                            reason,
                            records: intact,
                        });
                    }
                    if !torn {
                        return Err(JournalError::NotAJournal {
                            path,
                            reason: format!("corrupt header: {reason}"),
                        });
                    }
                    tracing::warn!(
                        path = %path.display(),
                        dropped_bytes = file_len,
                        "journal: header was torn by a crash during creation; starting it afresh"
                    );
                    journal.file.set_len(0).map_err(io_err)?;
                    journal.create()?;
                    return Ok((journal, Replay::default()));
                }
            };
        if !(OLDEST_JOURNAL_FORMAT_VERSION..=JOURNAL_FORMAT_VERSION)
            .contains(&header.format_version)
        {
            return Err(JournalError::UnsupportedVersion {
                path,
                found: header.format_version,
            });
        }
        journal.format_version = header.format_version;
        journal.created_unix_ms = header.created_unix_ms;
        journal.header_end = offset;
        if header.grid_hash != meta.grid_hash {
            return Err(JournalError::GridMismatch {
                path,
                journal: header.grid_hash,
                grid: meta.grid_hash.clone(),
            });
        }
        let mut entries = Vec::new();
        let first_damage = loop {
            if offset == file_len {
                break None;
            }
            match read_frame(&mut reader, file_len - offset).map_err(io_err)? {
                Ok(payload) => match decode_entry(&payload) {
                    Ok(entry) => {
                        entries.push(entry);
                        offset += (FRAME_HEADER_BYTES + payload.len()) as u64;
                    }
                    Err(reason) => break Some(reason),
                },
                Err(damage) => break Some(damage.into_reason()),
            }
        };
        if let Some(reason) = first_damage {
            // Everything from the bad frame on is examined in memory, so that replay can scan
            // forward for the next intact frame. A torn tail is short; a damaged journal's rest
            // is no bigger than the records it holds.
            reader.seek(SeekFrom::Start(offset)).map_err(io_err)?;
            let mut rest = Vec::new();
            reader.read_to_end(&mut rest).map_err(io_err)?;
            drop(reader);
            let scan = scan_after_damage(&rest);
            if scan.damaged.is_empty() {
                // Nothing intact after the bad frame: what a crash leaves. Cut it off in place.
                tracing::warn!(
                    path = %path.display(),
                    offset,
                    dropped_bytes = file_len - offset,
                    kept_records = entries.iter().filter(|e| e.is_result()).count(),
                    reason = %reason,
                    "journal: dropping a torn tail (a frame cut short by a crash, with nothing \
                     intact after it); results in it were never acknowledged and will be sent \
                     again"
                );
                journal.file.set_len(offset).map_err(io_err)?;
                journal.file.sync_all().map_err(io_err)?;
                journal.recovery = Some(JournalRecovery {
                    damaged_ranges: Vec::new(),
                    lost_records: 0,
                    lost_records_exact: true,
                    kept_after_damage: 0,
                    torn_tail_bytes: file_len - offset,
                    saved_copy: None,
                });
            } else {
                let kept_before = entries.iter().filter(|e| e.is_result()).count();
                let saved = journal
                    .rewrite_without_damage(offset, scan.kept.iter().map(|r| &rest[r.clone()]))?;
                let recovery = JournalRecovery {
                    damaged_ranges: scan
                        .damaged
                        .iter()
                        .map(|d| offset + d.range.start as u64..offset + d.range.end as u64)
                        .collect(),
                    lost_records: scan.damaged.iter().map(|d| d.lost).sum(),
                    lost_records_exact: scan.damaged.iter().all(|d| d.exact),
                    kept_after_damage: scan.entries.iter().filter(|e| e.is_result()).count() as u64,
                    torn_tail_bytes: scan.torn_tail.map_or(0, |t| (rest.len() - t) as u64),
                    saved_copy: Some(saved.clone()),
                };
                tracing::warn!(
                    path = %path.display(),
                    damaged_ranges = %RangesList(&recovery.damaged_ranges),
                    damaged_bytes = recovery.damaged_bytes(),
                    kept_records_before_damage = kept_before,
                    kept_records_after_resync = recovery.kept_after_damage,
                    torn_tail_bytes = recovery.torn_tail_bytes,
                    reason = %reason,
                    "{}",
                    recovery.message()
                );
                entries.extend(scan.entries);
                offset = journal.len;
                journal.recovery = Some(recovery);
            }
        }
        journal.file.seek(SeekFrom::Start(offset)).map_err(io_err)?;
        journal.len = offset;
        journal.meta = JournalMeta {
            run_id: header.run_id,
            grid_hash: header.grid_hash,
        };
        let mut replay = Replay::default();
        let mut unknown_events = 0u64;
        for entry in entries {
            match entry {
                Entry::Result(record) => replay.records.push(record),
                Entry::Loss(loss) => replay.losses.push(ReplayedLoss {
                    loss,
                    after_records: replay.records.len(),
                }),
                Entry::FailedAttempt(attempt) => {
                    replay.failed_attempts.push(ReplayedFailedAttempt {
                        attempt,
                        after_records: replay.records.len(),
                    })
                }
                Entry::RetryRound(round) => replay.retry_rounds.push(ReplayedRetryRound {
                    round,
                    after_records: replay.records.len(),
                    after_losses: replay.losses.len(),
                    after_failed_attempts: replay.failed_attempts.len(),
                }),
                Entry::UnknownEvent => unknown_events += 1,
            }
        }
        if unknown_events > 0 {
            tracing::warn!(
                path = %path.display(),
                events = unknown_events,
                "journal: skipped events of a kind this build does not know (a newer decodebench \
                 wrote them); every result was read"
            );
        }
        journal.records = replay.records.len() as u64;
        journal.losses = replay.losses.len() as u64;
        journal.failed_attempts = replay.failed_attempts.len() as u64;
        if unknown_events > 0
            || !replay.losses.is_empty()
            || !replay.failed_attempts.is_empty()
            || !replay.retry_rounds.is_empty()
        {
            // Events written under version 1 (before the version was bumped): say version 2 now,
            // so that a build that reads only version 1 refuses the journal rather than dropping
            // them as damage.
            journal.upgrade()?;
        }
        Ok((journal, replay))
    }

    /// The journal's run id and grid hash. When an existing journal was resumed, its run id is
    /// the original one, whatever was passed to [`Journal::open`].
    pub fn meta(&self) -> &JournalMeta {
        &self.meta
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What opening this journal found damaged and repaired: `None` for a clean journal.
    pub fn recovery(&self) -> Option<&JournalRecovery> {
        self.recovery.as_ref()
    }

    /// Records in the journal (replayed plus appended).
    pub fn record_count(&self) -> u64 {
        self.records
    }

    /// Losses in the journal (replayed plus appended).
    pub fn loss_count(&self) -> u64 {
        self.losses
    }

    /// Failed attempts in the journal (replayed plus appended).
    pub fn failed_attempt_count(&self) -> u64 {
        self.failed_attempts
    }

    /// Bytes durably in the file.
    pub fn len_bytes(&self) -> u64 {
        self.len
    }

    /// The format version in the file's header: [`JOURNAL_FORMAT_VERSION`], or 1 for a resumed
    /// version-1 journal that holds no event yet.
    pub fn format_version(&self) -> u32 {
        self.format_version
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
        self.write_buf()?;
        self.records += records.len() as u64;
        Ok(())
    }

    /// Appends loss events with a single write and a single sync, like
    /// [`Journal::append_batch`]: all of them are durable when this returns `Ok`, or none is in
    /// the file.
    ///
    /// A version-1 journal is upgraded to version 2 first ([`Journal::upgrade`]).
    pub fn append_losses(&mut self, losses: &[LossRecord]) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned {
                path: self.path.clone(),
            });
        }
        self.buf.clear();
        for loss in losses {
            encode_loss(&mut self.buf, loss)?;
        }
        if !self.buf.is_empty() {
            self.upgrade()?;
        }
        self.write_buf()?;
        self.losses += losses.len() as u64;
        Ok(())
    }

    /// Appends failed-attempt events with a single write and a single sync, like
    /// [`Journal::append_losses`] (a version-1 journal is upgraded first): all of them are durable
    /// when this returns `Ok`, or none is in the file. Only then may the reports be answered.
    pub fn append_failed_attempts(
        &mut self,
        attempts: &[FailedAttemptRecord],
    ) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned {
                path: self.path.clone(),
            });
        }
        self.buf.clear();
        for attempt in attempts {
            encode_event(
                &mut self.buf,
                EventRef::AttemptFailed(attempt),
                &attempt.case_id,
            )?;
        }
        if !self.buf.is_empty() {
            self.upgrade()?;
        }
        self.write_buf()?;
        self.failed_attempts += attempts.len() as u64;
        Ok(())
    }

    /// Appends the event that a `--retry-failed` round starts, and syncs it, like
    /// [`Journal::append_losses`] (a version-1 journal is upgraded first).
    pub fn append_retry_round(&mut self, round: &RetryRoundRecord) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned {
                path: self.path.clone(),
            });
        }
        let payload =
            serde_json::to_vec(&EventRef::RetryRound(round)).map_err(|e| JournalError::Io {
                path: self.path.clone(),
                source: io::Error::other(e),
            })?;
        self.upgrade()?;
        self.buf.clear();
        push_frame(&mut self.buf, &payload);
        self.write_buf()
    }

    /// Writes the encoded frames in `buf` and syncs them; on failure, rolls the file back.
    fn write_buf(&mut self) -> Result<(), JournalError> {
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

    /// Replaces the journal with its first `prefix_len` bytes (magic, header and the records
    /// before the damage) followed by `frames`, and returns where the original was saved.
    ///
    /// Nothing is destroyed and nothing is half-done: the original is first saved as a
    /// `.damaged-*` file (a hard link, or a synced copy where links are not supported), then the
    /// journal is replaced crash-safely ([`Journal::replace`]). On error the journal is unchanged.
    fn rewrite_without_damage<'a>(
        &mut self,
        prefix_len: u64,
        frames: impl Iterator<Item = &'a [u8]>,
    ) -> Result<PathBuf, JournalError> {
        let io_err = |source| JournalError::Io {
            path: self.path.clone(),
            source,
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let saved = save_damaged_copy(&self.path).map_err(io_err)?;
        crate::sink::sync_dir(dir).map_err(io_err)?;
        let journal_path = self.path.clone();
        let tmp_path = self.temp_path(RECOVERING_SUFFIX);
        let tmp_err = tmp_path.clone();
        self.replace(&tmp_path, move |old, out| {
            let read_err = |source| JournalError::Io {
                path: journal_path.clone(),
                source,
            };
            let write_err = |source| JournalError::Io {
                path: tmp_err.clone(),
                source,
            };
            let mut len = copy_exactly(old, 0, prefix_len, out).map_err(read_err)?;
            for frame in frames {
                out.write_all(frame).map_err(write_err)?;
                len += frame.len() as u64;
            }
            Ok(len)
        })?;
        Ok(saved)
    }

    /// Makes a version-1 journal a version-2 one, so that events may be appended to it (see the
    /// module docs); a journal that already is version 2 is left alone. The journal is replaced
    /// (`Journal::replace`) by the magic, a version-2 header with the same run id, grid hash
    /// and creation time, and every frame after the old header, byte for byte. A crash leaves
    /// the old journal or the new one, whole; on error the journal is unchanged.
    pub fn upgrade(&mut self) -> Result<(), JournalError> {
        if self.format_version >= JOURNAL_FORMAT_VERSION {
            return Ok(());
        }
        if self.poisoned {
            return Err(JournalError::Poisoned {
                path: self.path.clone(),
            });
        }
        let header = JournalHeader {
            format_version: JOURNAL_FORMAT_VERSION,
            run_id: self.meta.run_id.clone(),
            grid_hash: self.meta.grid_hash.clone(),
            created_unix_ms: self.created_unix_ms,
        };
        let mut head = MAGIC.to_vec();
        let payload = serde_json::to_vec(&header).map_err(|e| JournalError::Io {
            path: self.path.clone(),
            source: io::Error::other(e),
        })?;
        push_frame(&mut head, &payload);
        let new_header_end = head.len() as u64;
        let (from, frames_len) = (self.header_end, self.len - self.header_end);
        let journal_path = self.path.clone();
        let tmp_path = self.temp_path(UPGRADING_SUFFIX);
        let tmp_err = tmp_path.clone();
        self.replace(&tmp_path, move |old, out| {
            out.write_all(&head).map_err(|source| JournalError::Io {
                path: tmp_err.clone(),
                source,
            })?;
            let copied =
                copy_exactly(old, from, frames_len, out).map_err(|source| JournalError::Io {
                    path: journal_path.clone(),
                    source,
                })?;
            Ok(head.len() as u64 + copied)
        })?;
        let from_version = std::mem::replace(&mut self.format_version, JOURNAL_FORMAT_VERSION);
        self.header_end = new_header_end;
        tracing::info!(
            path = %self.path.display(),
            from_version,
            to_version = JOURNAL_FORMAT_VERSION,
            "journal: upgraded to format version {JOURNAL_FORMAT_VERSION} to hold events (every \
             result kept); a decodebench that reads only version {from_version} now refuses it \
             instead of taking the events for damage"
        );
        Ok(())
    }

    /// `<journal path><suffix>`: where a replacement of the journal is written first.
    fn temp_path(&self, suffix: &str) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    }

    /// Replaces the journal file with what `fill` writes (it gets the old journal to read from
    /// and returns how many bytes it wrote), crash-safely: `fill` writes into `tmp_path`, which
    /// is locked, synced and renamed over the journal's name, and the directory is synced. A
    /// crash at any point leaves either the old journal (whose next opening does the same work
    /// again) or the new one. On error the journal is unchanged and `tmp_path` removed.
    fn replace(
        &mut self,
        tmp_path: &Path,
        fill: impl FnOnce(&File, &mut BufWriter<&File>) -> Result<u64, JournalError>,
    ) -> Result<(), JournalError> {
        let io_err = |source| JournalError::Io {
            path: self.path.clone(),
            source,
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let written = (|| -> Result<(File, u64), JournalError> {
            let tmp_err = |source| JournalError::Io {
                path: tmp_path.to_path_buf(),
                source,
            };
            let tmp = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(tmp_path)
                .map_err(tmp_err)?;
            // Locked before it takes the journal's name, so no other coordinator can open the
            // new journal unlocked in between.
            match tmp.try_lock() {
                Ok(()) => {}
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(JournalError::Locked {
                        path: tmp_path.to_path_buf(),
                    })
                }
                Err(fs::TryLockError::Error(e)) => return Err(tmp_err(e)),
            }
            let mut out = BufWriter::with_capacity(1 << 20, &tmp);
            let len = fill(&self.file, &mut out)?;
            out.flush().map_err(tmp_err)?;
            drop(out);
            tmp.sync_all().map_err(tmp_err)?;
            fs::rename(tmp_path, &self.path).map_err(tmp_err)?;
            Ok((tmp, len))
        })();
        let (file, len) = match written {
            Ok(done) => done,
            Err(e) => {
                let _ = fs::remove_file(tmp_path);
                return Err(e);
            }
        };
        crate::sink::sync_dir(dir).map_err(io_err)?;
        // The old handle (and its lock) now belongs to the old inode only.
        self.file = file;
        self.file.seek(SeekFrom::Start(len)).map_err(io_err)?;
        self.len = len;
        Ok(())
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
        self.header_end = self.len;
        self.format_version = header.format_version;
        self.created_unix_ms = header.created_unix_ms;
        self.records = 0;
        self.losses = 0;
        self.failed_attempts = 0;
        Ok(())
    }
}

/// Copies `len` bytes of `file` from `offset` into `out`; a file that holds fewer is an error
/// (it shrank while it was being copied).
fn copy_exactly(file: &File, offset: u64, len: u64, out: &mut impl Write) -> io::Result<u64> {
    let mut file = file;
    file.seek(SeekFrom::Start(offset))?;
    let copied = io::copy(&mut file.take(len), out)?;
    if copied != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "the journal shrank while it was being copied ({copied} of {len} bytes from \
                 offset {offset} read)"
            ),
        ));
    }
    Ok(copied)
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

/// Appends one loss event's frame to `out`, or leaves `out` as it was and explains why it cannot
/// be journaled ([`encode_event`]).
fn encode_loss(out: &mut Vec<u8>, loss: &LossRecord) -> Result<(), JournalError> {
    encode_event(out, EventRef::Lost(loss), &loss.case_id)
}

/// Appends one event's frame to `out` (`case_id`: the case it concerns, for the error), or
/// leaves `out` as it was and explains why it cannot be journaled (checked by decoding it back,
/// as [`encode_record`] does).
fn encode_event(out: &mut Vec<u8>, event: EventRef<'_>, case_id: &str) -> Result<(), JournalError> {
    let unencodable = |reason: String| JournalError::Unencodable {
        case_id: case_id.to_string(),
        reason,
    };
    let payload = serde_json::to_vec(&event).map_err(|e| unencodable(e.to_string()))?;
    if payload.len() > MAX_FRAME_BYTES as usize {
        return Err(unencodable(format!(
            "{} bytes of JSON, more than the {MAX_FRAME_BYTES}-byte frame limit",
            payload.len()
        )));
    }
    let same = match (decode_entry(&payload), event) {
        (Ok(Entry::Loss(back)), EventRef::Lost(e)) => back == *e,
        (Ok(Entry::FailedAttempt(back)), EventRef::AttemptFailed(e)) => back == *e,
        (Ok(Entry::RetryRound(back)), EventRef::RetryRound(e)) => back == *e,
        (Ok(_), _) => false,
        (Err(e), _) => return Err(unencodable(format!("it would not read back: {e}"))),
    };
    if !same {
        return Err(unencodable("it would not read back as itself".into()));
    }
    push_frame(out, &payload);
    Ok(())
}

/// Decodes one frame payload after the header (a result or an event), or says why it is neither.
fn decode_entry(payload: &[u8]) -> Result<Entry, String> {
    if payload.starts_with(EVENT_PREFIX) {
        return match serde_json::from_slice::<Event>(payload) {
            Ok(Event::Lost(loss)) => Ok(Entry::Loss(*loss)),
            Ok(Event::AttemptFailed(attempt)) => Ok(Entry::FailedAttempt(*attempt)),
            Ok(Event::RetryRound(round)) => Ok(Entry::RetryRound(*round)),
            Ok(Event::Unknown) => Ok(Entry::UnknownEvent),
            Err(e) => Err(format!("undecodable event: {e}")),
        };
    }
    serde_json::from_slice::<ResultRecord>(payload)
        .map(Entry::Result)
        .map_err(|e| format!("undecodable record: {e}"))
}

/// Why the bytes at some position of a damaged journal are not a whole, intact record frame.
/// Cheap to make: resynchronisation tries one at every byte.
enum FrameFault {
    ShortHeader,
    Length(u32),
    ShortPayload,
    NotAnObject,
    Crc { stored: u32, actual: u32 },
    Undecodable(String),
}

impl fmt::Display for FrameFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameFault::ShortHeader => write!(f, "short frame header"),
            FrameFault::Length(len) => write!(
                f,
                "implausible frame length {len} (a record frame holds {MIN_RECORD_BYTES} to \
                 {MAX_FRAME_BYTES} bytes)"
            ),
            FrameFault::ShortPayload => write!(f, "short frame payload"),
            FrameFault::NotAnObject => write!(f, "payload is not a JSON object"),
            FrameFault::Crc { stored, actual } => write!(
                f,
                "CRC mismatch (stored {stored:#010x}, computed {actual:#010x})"
            ),
            FrameFault::Undecodable(e) => write!(f, "{e}"),
        }
    }
}

/// The record frame starting at `buf[pos]`, and where it ends, if it is whole and intact: a
/// length from [`MIN_RECORD_BYTES`] to [`MAX_FRAME_BYTES`] that fits in the rest of `buf`, a
/// payload that starts with `{` and ends with `}`, a matching CRC, and a record (or an event)
/// that decodes.
///
/// The cheap checks come first, so scanning garbage byte by byte rarely computes a CRC. A false
/// match inside an intact payload is impossible: serde_json escapes control characters, so a
/// payload never holds the zero to four byte a length's high byte needs.
fn frame_at(buf: &[u8], pos: usize) -> Result<(Entry, usize), FrameFault> {
    let rest = &buf[pos..];
    if rest.len() < FRAME_HEADER_BYTES {
        return Err(FrameFault::ShortHeader);
    }
    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
    if !(MIN_RECORD_BYTES..=MAX_FRAME_BYTES).contains(&len) {
        return Err(FrameFault::Length(len));
    }
    let end = FRAME_HEADER_BYTES + len as usize;
    if rest.len() < end {
        return Err(FrameFault::ShortPayload);
    }
    let payload = &rest[FRAME_HEADER_BYTES..end];
    if payload[0] != b'{' || payload[payload.len() - 1] != b'}' {
        return Err(FrameFault::NotAnObject);
    }
    let stored = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
    let actual = crc32fast::hash(payload);
    if stored != actual {
        return Err(FrameFault::Crc { stored, actual });
    }
    let entry = decode_entry(payload).map_err(FrameFault::Undecodable)?;
    Ok((entry, pos + end))
}

/// A damaged range found by [`scan_after_damage`], relative to its buffer.
struct DamagedRange {
    range: Range<usize>,
    /// Records lost in the range: exact when `exact`, else a lower bound (1).
    lost: u64,
    /// The frames' stored lengths still chain exactly from the start of the range to the next
    /// intact frame, so `lost` frames were there.
    exact: bool,
}

impl DamagedRange {
    fn new(buf: &[u8], range: Range<usize>) -> DamagedRange {
        let mut pos = range.start;
        let mut frames = 0;
        while pos + FRAME_HEADER_BYTES <= range.end {
            let b = &buf[pos..pos + 4];
            let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            let end = pos + FRAME_HEADER_BYTES + len as usize;
            if !(MIN_RECORD_BYTES..=MAX_FRAME_BYTES).contains(&len) || end > range.end {
                break;
            }
            frames += 1;
            pos = end;
        }
        let exact = pos == range.end;
        DamagedRange {
            lost: if exact { frames } else { 1 },
            exact,
            range,
        }
    }
}

/// What [`scan_after_damage`] found.
struct DamageScan {
    /// The intact frames' records and events.
    entries: Vec<Entry>,
    /// The byte ranges of the intact frames of `entries`.
    kept: Vec<Range<usize>>,
    /// Damaged ranges with intact frames after them.
    damaged: Vec<DamagedRange>,
    /// Where a final damaged stretch with nothing intact after it (a torn tail) starts.
    torn_tail: Option<usize>,
}

/// Reads `buf`, the rest of a journal from a frame that failed to read, resynchronising after
/// every bad frame at the next position where an intact record frame starts.
fn scan_after_damage(buf: &[u8]) -> DamageScan {
    let mut scan = DamageScan {
        entries: Vec::new(),
        kept: Vec::new(),
        damaged: Vec::new(),
        torn_tail: None,
    };
    // Invariant: no intact frame starts at `bad`.
    let mut bad = 0;
    loop {
        let Some((next, record, end)) = (bad + 1..buf.len())
            .find_map(|p| frame_at(buf, p).ok().map(|(record, end)| (p, record, end)))
        else {
            if bad < buf.len() {
                scan.torn_tail = Some(bad);
            }
            return scan;
        };
        scan.damaged.push(DamagedRange::new(buf, bad..next));
        scan.entries.push(record);
        scan.kept.push(next..end);
        let mut pos = end;
        loop {
            if pos == buf.len() {
                return scan;
            }
            match frame_at(buf, pos) {
                Ok((record, end)) => {
                    scan.entries.push(record);
                    scan.kept.push(pos..end);
                    pos = end;
                }
                Err(_) => break,
            }
        }
        bad = pos;
    }
}

/// How many intact record frames `buf` holds, found as replay would find them after damage.
fn count_intact_frames(buf: &[u8]) -> u64 {
    let mut pos = 0;
    let mut count = 0;
    while let Ok((_, end)) = frame_at(buf, pos) {
        count += 1;
        pos = end;
    }
    if pos < buf.len() {
        count += scan_after_damage(&buf[pos..]).entries.len() as u64;
    }
    count
}

/// Saves the journal at `path` as `<path>.damaged-<unix seconds>` (with `-2`, `-3`, ... if that
/// name is taken), as a hard link where possible, else as a synced copy. Never overwrites.
fn save_damaged_copy(path: &Path) -> io::Result<PathBuf> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut link_failed = false;
    for n in 1..=1000u32 {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".damaged-{secs}"));
        if n > 1 {
            name.push(format!("-{n}"));
        }
        let saved = PathBuf::from(name);
        if !link_failed {
            match fs::hard_link(path, &saved) {
                Ok(()) => return Ok(saved),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(_) => link_failed = true,
            }
        }
        let mut copy = match OpenOptions::new().write(true).create_new(true).open(&saved) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        };
        let copied = io::copy(&mut File::open(path)?, &mut copy).and_then(|_| copy.sync_all());
        if let Err(e) = copied {
            drop(copy);
            let _ = fs::remove_file(&saved);
            return Err(e);
        }
        return Ok(saved);
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("too many {}.damaged-{secs}* files", path.display()),
    ))
}

/// Formats byte ranges for a log line, the first few in full.
struct RangesList<'a>(&'a [Range<u64>]);

impl fmt::Display for RangesList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 8;
        for (i, r) in self.0.iter().take(SHOWN).enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{}..{}", r.start, r.end)?;
        }
        if self.0.len() > SHOWN {
            write!(f, " and {} more", self.0.len() - SHOWN)?;
        }
        Ok(())
    }
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

    /// Creates a journal of `recs`, appended one by one, and returns each record frame's byte
    /// range in the file.
    fn write_frames(dir: &Path, recs: &[ResultRecord]) -> Vec<Range<usize>> {
        let (mut j, _) = Journal::open(dir, &meta("g1")).unwrap();
        recs.iter()
            .map(|r| {
                let start = j.len_bytes() as usize;
                j.append(r).unwrap();
                start..j.len_bytes() as usize
            })
            .collect()
    }

    /// Overwrites `n` bytes at `at` with zeros, as a bad sector or a QA engineer would.
    fn zero_bytes(path: &Path, at: usize, n: usize) {
        let mut bytes = fs::read(path).unwrap();
        bytes[at..at + n].fill(0);
        fs::write(path, &bytes).unwrap();
    }

    fn damaged_copies(dir: &Path) -> Vec<PathBuf> {
        let mut copies: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("journal.dbj.damaged-")
            })
            .collect();
        copies.sort();
        copies
    }

    fn file_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// `recs` without the records at `lost`.
    fn without(recs: &[ResultRecord], lost: &[usize]) -> Vec<ResultRecord> {
        recs.iter()
            .enumerate()
            .filter(|(i, _)| !lost.contains(i))
            .map(|(_, r)| r.clone())
            .collect()
    }

    /// `bytes` without the byte ranges `cut` (sorted, disjoint).
    fn cut_out(bytes: &[u8], cut: &[Range<usize>]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut from = 0;
        for r in cut {
            out.extend_from_slice(&bytes[from..r.start]);
            from = r.end;
        }
        out.extend_from_slice(&bytes[from..]);
        out
    }

    fn u64_range(r: &Range<usize>) -> Range<u64> {
        r.start as u64..r.end as u64
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
        // A torn tail is a crash's leftover, never acknowledged: cut off in place, not saved.
        let recovery = j.recovery().unwrap();
        assert_eq!(recovery.torn_tail_bytes, (full_len - good_len) / 2);
        assert!(recovery.damaged_ranges.is_empty());
        assert_eq!(recovery.saved_copy, None);
        assert!(damaged_copies(dir.path()).is_empty());
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
            let (j, replayed) = Journal::open(dir.path(), &meta("g1")).unwrap();
            assert_eq!(replayed, recs);
            assert_eq!(fs::metadata(&path).unwrap().len(), good_len);
            assert_eq!(j.recovery().unwrap().torn_tail_bytes, garbage.len() as u64);
            assert!(damaged_copies(dir.path()).is_empty());
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
        // A bad final frame with nothing intact after it is what a crash leaves (a size that
        // reached the disk before the data did): a torn tail, cut off without a saved copy.
        assert!(damaged_copies(dir.path()).is_empty());
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

    #[test]
    fn damage_in_a_middle_record_keeps_every_intact_record_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(dir.path());
        let recs = records(7);
        let frames = write_frames(dir.path(), &recs);
        zero_bytes(&path, frames[3].start + 20, 8);
        let damaged = fs::read(&path).unwrap();

        let (j, replayed) = Journal::open(dir.path(), &meta("g1")).unwrap();
        assert_eq!(replayed, without(&recs, &[3]));
        assert_eq!(j.record_count(), 6);
        let recovery = j.recovery().unwrap().clone();
        assert_eq!(recovery.damaged_ranges, vec![u64_range(&frames[3])]);
        assert_eq!(recovery.damaged_bytes(), frames[3].len() as u64);
        assert_eq!(
            (recovery.lost_records, recovery.lost_records_exact),
            (1, true)
        );
        assert_eq!(recovery.kept_after_damage, 3);
        assert_eq!(recovery.torn_tail_bytes, 0);

        // The original, damaged bytes are kept next to the journal, byte for byte.
        let copies = damaged_copies(dir.path());
        assert_eq!(copies.len(), 1);
        assert_eq!(recovery.saved_copy.as_ref(), Some(&copies[0]));
        assert_eq!(fs::read(&copies[0]).unwrap(), damaged);
        // The journal is the original without the damaged frame; no temporary file is left.
        let clean = cut_out(&damaged, &[frames[3].clone()]);
        assert_eq!(fs::read(&path).unwrap(), clean);
        assert_eq!(j.len_bytes(), clean.len() as u64);
        let copy_name = copies[0]
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert_eq!(
            file_names(dir.path()),
            vec![JOURNAL_FILE_NAME.to_string(), copy_name]
        );

        // The warning says what happened, truthfully, and where the original is.
        let logs = recovery.message();
        assert!(
            logs.contains("1 record(s) (results or events) in 1 damaged range(s)"),
            "{logs}"
        );
        assert!(logs.contains("will be run again"), "{logs}");
        assert!(
            logs.contains("3 intact result(s) found after the damage"),
            "{logs}"
        );
        assert!(
            logs.contains(&format!("saved as {}", copies[0].display())),
            "{logs}"
        );
        assert!(!logs.contains("never acknowledged"), "{logs}");
    }

    #[test]
    fn damage_in_the_first_record_keeps_all_later_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(dir.path());
        let recs = records(5);
        let frames = write_frames(dir.path(), &recs);
        zero_bytes(&path, frames[0].start + 30, 8);
        let (j, replayed) = Journal::open(dir.path(), &meta("g1")).unwrap();
        assert_eq!(replayed, recs[1..]);
        let recovery = j.recovery().unwrap();
        assert_eq!(recovery.damaged_ranges, vec![u64_range(&frames[0])]);
        assert_eq!(recovery.kept_after_damage, 4);
        assert_eq!(damaged_copies(dir.path()).len(), 1);
    }

    #[test]
    fn damage_in_a_frame_header_or_across_frames_is_skipped() {
        // Zeroed length and CRC: the stored length no longer says how long the frame was.
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(dir.path());
        let recs = records(6);
        let frames = write_frames(dir.path(), &recs);
        zero_bytes(&path, frames[2].start, 8);
        let (j, replayed) = Journal::open(dir.path(), &meta("g1")).unwrap();
        assert_eq!(replayed, without(&recs, &[2]));
        let recovery = j.recovery().unwrap();
        assert_eq!(recovery.damaged_ranges, vec![u64_range(&frames[2])]);
        assert_eq!(
            (recovery.lost_records, recovery.lost_records_exact),
            (1, false)
        );
        drop(j);

        // Zeros across the boundary of two frames take both out; the rest is kept.
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(dir.path());
        let frames = write_frames(dir.path(), &recs);
        zero_bytes(&path, frames[2].end - 4, 8);
        let (j, replayed) = Journal::open(dir.path(), &meta("g1")).unwrap();
        assert_eq!(replayed, without(&recs, &[2, 3]));
        let recovery = j.recovery().unwrap();
        assert_eq!(
            recovery.damaged_ranges,
            vec![frames[2].start as u64..frames[4].start as u64]
        );
        assert!(!recovery.lost_records_exact && recovery.lost_records >= 1);
        assert_eq!(recovery.kept_after_damage, 2);
    }

    #[test]
    fn several_damaged_ranges_and_a_torn_tail_are_all_handled() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(dir.path());
        let recs = records(8);
        let frames = write_frames(dir.path(), &recs);
        zero_bytes(&path, frames[1].start + 40, 8);
        zero_bytes(&path, frames[5].start + 12, 8);
        let torn_at = frames[7].start + 15;
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(torn_at as u64).unwrap();
        drop(f);
        let damaged = fs::read(&path).unwrap();

        let (j, replayed) = Journal::open(dir.path(), &meta("g1")).unwrap();
        assert_eq!(replayed, without(&recs, &[1, 5, 7]));
        let recovery = j.recovery().unwrap();
        assert_eq!(
            recovery.damaged_ranges,
            vec![u64_range(&frames[1]), u64_range(&frames[5])]
        );
        assert_eq!(
            (recovery.lost_records, recovery.lost_records_exact),
            (2, true)
        );
        assert_eq!(recovery.kept_after_damage, 4);
        assert_eq!(recovery.torn_tail_bytes, 15);
        let copies = damaged_copies(dir.path());
        assert_eq!(fs::read(&copies[0]).unwrap(), damaged);
        assert_eq!(
            fs::read(&path).unwrap(),
            cut_out(
                &damaged,
                &[
                    frames[1].clone(),
                    frames[5].clone(),
                    frames[7].start..torn_at
                ]
            )
        );
    }

    #[test]
    fn a_recovered_journal_appends_and_reopens_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(dir.path());
        let recs = records(6);
        let frames = write_frames(dir.path(), &recs);
        zero_bytes(&path, frames[2].start + 25, 8);
        {
            let (mut j, replayed) = Journal::open(dir.path(), &meta("g1")).unwrap();
            assert_eq!(replayed, without(&recs, &[2]));
            // The lost case runs again and its result is appended after recovery.
            j.append(&recs[2]).unwrap();
            assert_eq!(j.record_count(), 6);
            assert_eq!(j.len_bytes(), fs::metadata(&path).unwrap().len());
        }
        let (j, replayed) = Journal::open(dir.path(), &meta("g1")).unwrap();
        let mut expected = without(&recs, &[2]);
        expected.push(recs[2].clone());
        assert_eq!(replayed, expected);
        assert_eq!(j.recovery(), None, "a recovered journal reopens clean");
        assert_eq!(damaged_copies(dir.path()).len(), 1);
        // The lock moved to the rewritten file: a second writer is still refused.
        let e = Journal::open(dir.path(), &meta("g1"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("another process holds it"), "{e}");
    }

    #[test]
    fn a_damaged_header_with_records_after_it_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(dir.path());
        let recs = records(3);
        write_frames(dir.path(), &recs);
        let good = fs::read(&path).unwrap();
        // A length beyond the end of the file (which looks like a torn creation), and a payload
        // byte flipped (a CRC mismatch).
        for (at, value) in [(MAGIC.len() + 2, 0x10u8), (MAGIC.len() + 20, b'#')] {
            let mut bad = good.clone();
            bad[at] = value;
            fs::write(&path, &bad).unwrap();
            let e = Journal::open(dir.path(), &meta("g1"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("header frame is damaged"), "{e}");
            assert!(e.contains("3 intact record(s)"), "{e}");
            assert!(e.contains("left untouched"), "{e}");
            assert_eq!(fs::read(&path).unwrap(), bad);
            assert!(damaged_copies(dir.path()).is_empty());
        }
    }

    #[test]
    fn resync_ignores_garbage_that_is_not_a_whole_frame() {
        // A frame-like header in garbage, with a plausible length but no valid payload, must not
        // be taken for a record; nor may a valid frame that runs past the end of the file.
        let mut buf = vec![0xAAu8; 64];
        buf[10..14].copy_from_slice(&20u32.to_le_bytes());
        buf[18] = b'{';
        buf[37] = b'}';
        let mut frame = Vec::new();
        encode_record(&mut frame, &records(1)[0]).unwrap();
        buf.extend_from_slice(&frame[..frame.len() - 1]);
        let scan = scan_after_damage(&buf);
        assert!(scan.entries.is_empty());
        assert!(scan.damaged.is_empty());
        assert_eq!(scan.torn_tail, Some(0));
        // With the last byte back, the frame is found.
        buf.push(*frame.last().unwrap());
        let scan = scan_after_damage(&buf);
        assert_eq!(scan.entries.len(), 1);
        assert_eq!(scan.kept, vec![64..buf.len()]);
        assert_eq!(scan.damaged[0].range, 0..64);
    }

    /// The CPU device of the test records' agent `agent_id`.
    fn cpu_device(agent_id: &str) -> decodebench_kernels::DeviceIdentity {
        decodebench_kernels::DeviceIdentity {
            backend: "cpu".into(),
            uuid: format!("CPU-{agent_id}"),
            sku: "cpu".into(),
            ..Default::default()
        }
    }

    fn loss(case_id: &str, agent_id: &str, cause: crate::record::LossCause) -> LossRecord {
        LossRecord {
            run_id: "run-a".into(),
            case_id: case_id.into(),
            agent_id: agent_id.into(),
            device: cpu_device(agent_id),
            cause,
            lost_unix_ms: 1_700_000_000_000,
        }
    }

    /// The frame of a loss event, as the journal writes it.
    fn loss_frame(l: &LossRecord) -> Vec<u8> {
        let mut frame = Vec::new();
        encode_loss(&mut frame, l).unwrap();
        frame
    }

    #[test]
    fn loss_events_replay_in_order_among_the_results() {
        use crate::record::LossCause;
        let dir = tempfile::tempdir().unwrap();
        let recs = records(4);
        let l1 = loss("c1", "agent-1", LossCause::Shard);
        let l2 = loss("c2", "agent-1", LossCause::Shard);
        let l3 = loss("c1", "agent-2", LossCause::Running);
        {
            let (mut j, replay) = Journal::replay(dir.path(), &meta("g1")).unwrap();
            assert_eq!(replay, Replay::default());
            j.append(&recs[0]).unwrap();
            j.append_losses(&[l1.clone(), l2.clone()]).unwrap();
            j.append_batch(&recs[1..3]).unwrap();
            j.append_losses(std::slice::from_ref(&l3)).unwrap();
            j.append_losses(&[]).unwrap();
            assert_eq!((j.record_count(), j.loss_count()), (3, 3));
        }
        let (mut j, replay) = Journal::replay(dir.path(), &meta("g1")).unwrap();
        assert_eq!(replay.records, recs[..3]);
        let at = |loss: &LossRecord, after_records| ReplayedLoss {
            loss: loss.clone(),
            after_records,
        };
        assert_eq!(replay.losses, vec![at(&l1, 1), at(&l2, 1), at(&l3, 3)]);
        assert_eq!((j.record_count(), j.loss_count()), (3, 3));
        assert_eq!(j.recovery(), None);
        // The event is a tagged JSON object of its own, not a result.
        let bytes = fs::read(journal_path(dir.path())).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            text.contains(
                r#"{"event":"lost","run_id":"run-a","case_id":"c1","agent_id":"agent-2""#
            ) && text.contains(r#""cause":"running""#),
            "{text}"
        );
        // Appending goes on after a replay; `open` gives the results alone.
        j.append(&recs[3]).unwrap();
        drop(j);
        let (j, replayed) = Journal::open(dir.path(), &meta("g1")).unwrap();
        assert_eq!(replayed, recs);
        assert_eq!((j.record_count(), j.loss_count()), (4, 3));
    }

    fn failed_attempt(case_id: &str, agent_id: &str, attempt: u32) -> FailedAttemptRecord {
        FailedAttemptRecord {
            run_id: "run-a".into(),
            case_id: case_id.into(),
            agent_id: agent_id.into(),
            device: cpu_device(agent_id),
            attempt,
            errors: vec![
                format!("attempt {attempt} on {agent_id} (CPU-{agent_id}): optimized: wrong"),
                format!("attempt {attempt} on {agent_id} (CPU-{agent_id}): baseline: \"quoted\""),
            ],
            failed_unix_ms: 1_700_000_000_000 + i64::from(attempt),
        }
    }

    /// Failed attempts replay in order, each with its place among the results, in a journal
    /// that interleaves them with results, losses and a retry round; the round says how many
    /// failed attempts came before it.
    #[test]
    fn failed_attempt_events_replay_in_order_among_results_and_losses() {
        use crate::record::{LossCause, RetryRoundRecord};
        let dir = tempfile::tempdir().unwrap();
        let recs = records(4);
        let a1 = failed_attempt("c1", "agent-1", 1);
        let a2 = failed_attempt("c2", "agent-1", 1);
        let a3 = failed_attempt("c1", "agent-2", 2);
        let l1 = loss("c3", "agent-3", LossCause::Running);
        let round = RetryRoundRecord {
            run_id: "run-a".into(),
            round: "1".into(),
            units: 1,
            started_unix_ms: 1_700_000_000_500,
        };
        {
            let (mut j, replay) = Journal::replay(dir.path(), &meta("g1")).unwrap();
            assert!(replay.failed_attempts.is_empty());
            j.append(&recs[0]).unwrap();
            j.append_failed_attempts(&[a1.clone(), a2.clone()]).unwrap();
            j.append_losses(std::slice::from_ref(&l1)).unwrap();
            j.append_batch(&recs[1..3]).unwrap();
            j.append_retry_round(&round).unwrap();
            j.append_failed_attempts(std::slice::from_ref(&a3)).unwrap();
            j.append_failed_attempts(&[]).unwrap();
            assert_eq!(
                (j.record_count(), j.loss_count(), j.failed_attempt_count()),
                (3, 1, 3)
            );
        }
        let (mut j, replay) = Journal::replay(dir.path(), &meta("g1")).unwrap();
        assert_eq!(j.recovery(), None);
        assert_eq!(replay.records, recs[..3]);
        let at = |attempt: &FailedAttemptRecord, after_records| ReplayedFailedAttempt {
            attempt: attempt.clone(),
            after_records,
        };
        assert_eq!(
            replay.failed_attempts,
            vec![at(&a1, 1), at(&a2, 1), at(&a3, 3)]
        );
        assert_eq!(
            replay.losses,
            vec![ReplayedLoss {
                loss: l1,
                after_records: 1
            }]
        );
        assert_eq!(
            replay.retry_rounds,
            vec![ReplayedRetryRound {
                round,
                after_records: 3,
                after_losses: 1,
                after_failed_attempts: 2
            }]
        );
        assert_eq!(j.failed_attempt_count(), 3);
        let text =
            String::from_utf8_lossy(&fs::read(journal_path(dir.path())).unwrap()).into_owned();
        assert!(
            text.contains(
                r#"{"event":"attempt_failed","run_id":"run-a","case_id":"c1","agent_id":"agent-2""#
            ),
            "{text}"
        );
        // Appending goes on; `open` gives the results alone.
        j.append(&recs[3]).unwrap();
        drop(j);
        let (j, replayed) = Journal::open(dir.path(), &meta("g1")).unwrap();
        assert_eq!(replayed, recs);
        assert_eq!(j.failed_attempt_count(), 3);
    }

    /// A version-1 journal becomes version 2 before its first failed attempt, as before a loss;
    /// a torn failed attempt at the tail is cut off like a torn result.
    #[test]
    fn a_failed_attempt_upgrades_a_version_1_journal_and_a_torn_one_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(dir.path());
        let recs = records(2);
        fs::write(&path, v1_journal(&result_payloads(&recs))).unwrap();
        let a1 = failed_attempt("c1", "agent-1", 1);
        let a2 = failed_attempt("c1", "agent-2", 2);
        let before_last = {
            let (mut j, _) = Journal::replay(dir.path(), &meta("g1")).unwrap();
            assert_eq!(j.format_version(), 1);
            j.append_failed_attempts(std::slice::from_ref(&a1)).unwrap();
            assert_eq!(j.format_version(), 2);
            let before_last = j.len_bytes();
            j.append_failed_attempts(std::slice::from_ref(&a2)).unwrap();
            before_last
        };
        assert_eq!(header_and_rest(&path).0["format_version"], 2);
        let full = fs::read(&path).unwrap();
        fs::write(&path, &full[..full.len() - 5]).unwrap();
        let (j, replay) = Journal::replay(dir.path(), &meta("g1")).unwrap();
        assert_eq!(replay.records, recs);
        assert_eq!(
            replay.failed_attempts,
            vec![ReplayedFailedAttempt {
                attempt: a1,
                after_records: 2
            }]
        );
        assert_eq!(
            j.recovery().map(|r| r.torn_tail_bytes),
            Some(full.len() as u64 - 5 - before_last)
        );
    }

    /// An `attempt_failed` event without its fields is a damaged frame, not skipped as unknown.
    #[test]
    fn a_malformed_failed_attempt_is_a_damaged_frame() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(dir.path());
        let recs = records(2);
        write_frames(dir.path(), &recs[..1]);
        let mut bytes = fs::read(&path).unwrap();
        let malformed_at = bytes.len();
        push_frame(&mut bytes, br#"{"event":"attempt_failed","case_id":"c1"}"#);
        let malformed = malformed_at..bytes.len();
        push_frame(&mut bytes, &serde_json::to_vec(&recs[1]).unwrap());
        fs::write(&path, &bytes).unwrap();
        let (j, replay) = Journal::replay(dir.path(), &meta("g1")).unwrap();
        assert_eq!(replay.records, recs);
        assert!(replay.failed_attempts.is_empty());
        assert_eq!(
            j.recovery().unwrap().damaged_ranges,
            vec![u64_range(&malformed)]
        );
    }

    /// A `--retry-failed` round's event replays where it was appended among the results and the
    /// losses; appending one to a version-1 journal upgrades it first, as a loss does.
    #[test]
    fn retry_round_events_replay_with_their_position() {
        use crate::record::{LossCause, RetryRoundRecord};
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(dir.path());
        let recs = records(3);
        fs::write(&path, v1_journal(&result_payloads(&recs[..2]))).unwrap();
        let round = RetryRoundRecord {
            run_id: "run-old".into(),
            round: "fix-1".into(),
            units: 2,
            started_unix_ms: 1_700_000_000_123,
        };
        {
            let (mut j, replay) = Journal::replay(dir.path(), &meta("g1")).unwrap();
            assert!(replay.retry_rounds.is_empty());
            j.append_losses(&[loss("c1", "agent-1", LossCause::Alone)])
                .unwrap();
            j.append_retry_round(&round).unwrap();
            j.append(&recs[2]).unwrap();
        }
        let text = String::from_utf8_lossy(&fs::read(&path).unwrap()).into_owned();
        assert!(
            text.contains(r#"{"event":"retry_round","run_id":"run-old","round":"fix-1","units":2"#),
            "{text}"
        );
        let (j, replay) = Journal::replay(dir.path(), &meta("g1")).unwrap();
        assert_eq!(j.format_version(), 2);
        assert_eq!(replay.records, recs);
        assert_eq!(
            replay.retry_rounds,
            vec![ReplayedRetryRound {
                round,
                after_records: 2,
                after_losses: 1,
                after_failed_attempts: 0
            }]
        );
        // A version-1 journal gets a retry round's event only after it is upgraded.
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(dir.path());
        fs::write(&path, v1_journal(&result_payloads(&recs))).unwrap();
        let (mut j, _) = Journal::replay(dir.path(), &meta("g1")).unwrap();
        assert_eq!(j.format_version(), 1);
        j.append_retry_round(&replay.retry_rounds[0].round).unwrap();
        assert_eq!(j.format_version(), 2);
        assert_eq!(header_and_rest(&path).0["format_version"], 2);
    }

    /// The header of a version-1 journal, as the releases before events wrote it.
    const V1_HEADER: &[u8] =
        br#"{"format_version":1,"run_id":"run-old","grid_hash":"g1","created_unix_ms":1700000000000}"#;

    /// A version-1 journal: the magic, [`V1_HEADER`] and `frames` (payloads), byte for byte as a
    /// release before the version bump wrote them.
    fn v1_journal(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut old = MAGIC.to_vec();
        push_frame(&mut old, V1_HEADER);
        for f in frames {
            push_frame(&mut old, f);
        }
        old
    }

    fn result_payloads(recs: &[ResultRecord]) -> Vec<Vec<u8>> {
        recs.iter()
            .map(|r| serde_json::to_vec(r).unwrap())
            .collect()
    }

    /// The header frame of the journal file at `path`, and the bytes after it.
    fn header_and_rest(path: &Path) -> (serde_json::Value, Vec<u8>) {
        let bytes = fs::read(path).unwrap();
        assert_eq!(&bytes[..MAGIC.len()], MAGIC);
        let at = MAGIC.len();
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let payload = &bytes[at + FRAME_HEADER_BYTES..at + FRAME_HEADER_BYTES + len];
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap());
        assert_eq!(crc, crc32fast::hash(payload), "the header frame is intact");
        (
            serde_json::from_slice(payload).unwrap(),
            bytes[at + FRAME_HEADER_BYTES + len..].to_vec(),
        )
    }

    /// A decodebench that reads only version 1 refuses any other version (its check was
    /// `format_version != 1`), and so refuses, untouched, every journal this build creates.
    #[test]
    fn a_new_journal_is_version_2() {
        use crate::record::LossCause;
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(dir.path());
        let (mut j, _) = Journal::open(dir.path(), &meta("g1")).unwrap();
        assert_eq!(j.format_version(), 2);
        let (header, rest) = header_and_rest(&path);
        assert_eq!(header["format_version"], 2, "{header}");
        assert!(rest.is_empty());
        j.append(&records(1)[0]).unwrap();
        j.append_losses(&[loss("c1", "agent-1", LossCause::Alone)])
            .unwrap();
        drop(j);
        let (header, _) = header_and_rest(&path);
        assert_eq!(header["format_version"], 2, "{header}");
        let (j, replay) = Journal::replay(dir.path(), &meta("g1")).unwrap();
        assert_eq!((replay.records.len(), replay.losses.len()), (1, 1));
        assert_eq!(j.format_version(), 2);
    }

    /// A journal written before loss events existed (version 1, results only) resumes; it stays
    /// version 1 while only results are appended (the build that wrote it can still resume it),
    /// and becomes version 2, every frame kept byte for byte, before its first event.
    #[test]
    fn an_old_journal_without_loss_events_replays_as_before() {
        use crate::record::LossCause;
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(dir.path());
        let recs = records(4);
        let old = v1_journal(&result_payloads(&recs[..3]));
        fs::write(&path, &old).unwrap();
        let appended_result = {
            let (mut j, replay) = Journal::replay(dir.path(), &meta("g1")).unwrap();
            assert_eq!(replay.records, recs[..3]);
            assert!(replay.losses.is_empty());
            assert_eq!(j.recovery(), None, "nothing in an old journal is damage");
            assert_eq!(j.meta().run_id, "run-old");
            assert_eq!(j.format_version(), 1);
            assert_eq!(fs::read(&path).unwrap(), old, "replay changed nothing");
            // A result is the same frame in both versions: the journal stays version 1.
            j.append(&recs[3]).unwrap();
            assert_eq!(j.format_version(), 1);
            let bytes = fs::read(&path).unwrap();
            assert!(bytes.starts_with(&old));
            bytes[old.len()..].to_vec()
        };
        let old_frames = old[MAGIC.len() + FRAME_HEADER_BYTES + V1_HEADER.len()..].to_vec();
        let l = loss("c9", "agent-1", LossCause::Alone);
        {
            let (mut j, replay) = Journal::replay(dir.path(), &meta("g1")).unwrap();
            assert_eq!(replay.records, recs);
            assert_eq!(j.format_version(), 1, "reopened, still version 1");
            // The resumed run journals a loss: the journal becomes version 2 first.
            j.append_losses(std::slice::from_ref(&l)).unwrap();
            assert_eq!(j.format_version(), 2);
            assert_eq!(j.len_bytes(), fs::metadata(&path).unwrap().len());
            // And appending goes on after the upgrade.
            j.append_losses(&[]).unwrap();
        }
        let (header, rest) = header_and_rest(&path);
        assert_eq!(
            header,
            serde_json::json!({"format_version": 2, "run_id": "run-old", "grid_hash": "g1",
                               "created_unix_ms": 1_700_000_000_000i64}),
            "only the version changed"
        );
        let mut expected = old_frames.clone();
        expected.extend_from_slice(&appended_result);
        expected.extend_from_slice(&loss_frame(&l));
        assert_eq!(rest, expected, "every frame kept byte for byte");
        assert_eq!(
            file_names(dir.path()),
            [JOURNAL_FILE_NAME],
            "no copy or temporary file left"
        );
        let (j, replay) = Journal::replay(dir.path(), &meta("g1")).unwrap();
        assert_eq!(replay.records, recs);
        assert_eq!(replay.losses.len(), 1);
        assert_eq!(replay.losses[0].after_records, 4);
        assert_eq!((j.format_version(), j.recovery()), (2, None));
    }

    /// The builds that added loss events wrote them under version 1: such a journal is upgraded
    /// as soon as it is opened, so that an older build can no longer take them for damage.
    #[test]
    fn a_version_1_journal_that_holds_loss_events_is_upgraded_when_opened() {
        use crate::record::LossCause;
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(dir.path());
        let recs = records(2);
        let l = loss("c1", "agent-1", LossCause::Running);
        let mut frames = result_payloads(&recs);
        frames.insert(1, serde_json::to_vec(&EventRef::Lost(&l)).unwrap());
        let old = v1_journal(&frames);
        fs::write(&path, &old).unwrap();
        let (j, replay) = Journal::replay(dir.path(), &meta("g1")).unwrap();
        assert_eq!(replay.records, recs);
        assert_eq!(
            replay.losses,
            vec![ReplayedLoss {
                loss: l,
                after_records: 1
            }]
        );
        assert_eq!((j.format_version(), j.recovery()), (2, None));
        let (header, rest) = header_and_rest(&path);
        assert_eq!(header["format_version"], 2);
        assert_eq!(
            rest,
            old[MAGIC.len() + FRAME_HEADER_BYTES + V1_HEADER.len()..],
            "every frame kept"
        );
        assert!(damaged_copies(dir.path()).is_empty());
    }

    /// An upgrade that cannot be written (here its temporary file's name is taken by a
    /// directory) leaves the version-1 journal as it was and the event unwritten; once the way is
    /// clear, the next append upgrades it. A temporary file left by a crash is written over.
    #[test]
    fn a_failed_upgrade_changes_nothing_and_the_next_append_upgrades() {
        use crate::record::LossCause;
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(dir.path());
        let old = v1_journal(&result_payloads(&records(2)));
        fs::write(&path, &old).unwrap();
        let tmp = dir
            .path()
            .join(format!("{JOURNAL_FILE_NAME}{UPGRADING_SUFFIX}"));
        fs::create_dir(&tmp).unwrap();
        let (mut j, _) = Journal::replay(dir.path(), &meta("g1")).unwrap();
        let l = loss("c1", "agent-1", LossCause::Alone);
        let e = j
            .append_losses(std::slice::from_ref(&l))
            .unwrap_err()
            .to_string();
        assert!(e.contains(".upgrading"), "{e}");
        assert_eq!(fs::read(&path).unwrap(), old, "the journal is unchanged");
        assert_eq!((j.format_version(), j.loss_count()), (1, 0));
        // A crash's leftover in its place.
        fs::remove_dir(&tmp).unwrap();
        fs::write(&tmp, b"half a journal").unwrap();
        j.append_losses(std::slice::from_ref(&l)).unwrap();
        assert_eq!((j.format_version(), j.loss_count()), (2, 1));
        assert!(!tmp.exists());
        drop(j);
        let (_, replay) = Journal::replay(dir.path(), &meta("g1")).unwrap();
        assert_eq!((replay.records.len(), replay.losses.len()), (2, 1));
    }

    /// A version this build does not read is refused with the version found and the ones it
    /// reads, and the file left untouched.
    #[test]
    fn other_format_versions_are_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(dir.path());
        for version in [0, 3, 99] {
            let mut bytes = MAGIC.to_vec();
            push_frame(
                &mut bytes,
                format!(
                    r#"{{"format_version":{version},"run_id":"r","grid_hash":"g1","created_unix_ms":0}}"#
                )
                .as_bytes(),
            );
            push_frame(&mut bytes, &serde_json::to_vec(&records(1)[0]).unwrap());
            fs::write(&path, &bytes).unwrap();
            let e = Journal::open(dir.path(), &meta("g1"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!(
                    "format version {version}, this build reads versions 1 to 2"
                )),
                "{e}"
            );
            assert!(e.contains("fresh --out directory"), "{e}");
            assert_eq!(fs::read(&path).unwrap(), bytes);
            assert_eq!(file_names(dir.path()), [JOURNAL_FILE_NAME]);
        }
    }

    #[test]
    fn a_torn_loss_event_at_the_tail_is_cut_off_like_a_torn_record() {
        use crate::record::LossCause;
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(dir.path());
        let recs = records(2);
        let l1 = loss("c1", "agent-1", LossCause::Shard);
        let l2 = loss("c2", "agent-2", LossCause::Alone);
        let before_last = {
            let (mut j, _) = Journal::open(dir.path(), &meta("g1")).unwrap();
            j.append_batch(&recs).unwrap();
            j.append_losses(std::slice::from_ref(&l1)).unwrap();
            let before_last = j.len_bytes();
            j.append_losses(std::slice::from_ref(&l2)).unwrap();
            before_last
        };
        let full = fs::read(&path).unwrap();
        for cut in [before_last as usize + 3, full.len() - 1] {
            fs::write(&path, &full[..cut]).unwrap();
            let (j, replay) = Journal::replay(dir.path(), &meta("g1")).unwrap();
            assert_eq!(replay.records, recs);
            assert_eq!(replay.losses.len(), 1, "cut at {cut}");
            assert_eq!(replay.losses[0].loss, l1);
            let recovery = j.recovery().unwrap();
            assert_eq!(recovery.torn_tail_bytes, (cut as u64) - before_last);
            assert_eq!(recovery.saved_copy, None);
            assert_eq!(fs::metadata(&path).unwrap().len(), before_last);
        }
        assert!(damaged_copies(dir.path()).is_empty());
    }

    #[test]
    fn a_malformed_loss_event_is_a_damaged_frame_and_an_unknown_event_is_skipped() {
        use crate::record::LossCause;
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(dir.path());
        let recs = records(3);
        write_frames(dir.path(), &recs[..1]);
        let good_loss = loss("c1", "agent-1", LossCause::Running);
        let mut bytes = fs::read(&path).unwrap();
        // Intact frames (right length and CRC) whose payload is an event: one of a kind this build
        // does not know, one "lost" without its fields, then a good one.
        push_frame(&mut bytes, br#"{"event":"drained","agent_id":"agent-1"}"#);
        let malformed_at = bytes.len();
        push_frame(&mut bytes, br#"{"event":"lost","case_id":7}"#);
        let malformed = malformed_at..bytes.len();
        bytes.extend_from_slice(&loss_frame(&good_loss));
        for r in &recs[1..] {
            push_frame(&mut bytes, &serde_json::to_vec(r).unwrap());
        }
        fs::write(&path, &bytes).unwrap();

        let (j, replay) = Journal::replay(dir.path(), &meta("g1")).unwrap();
        assert_eq!(replay.records, recs, "every result is kept");
        assert_eq!(
            replay.losses,
            vec![ReplayedLoss {
                loss: good_loss,
                after_records: 1
            }]
        );
        // The malformed event is damage in the middle, handled as any: the range named, the
        // original saved, the journal rewritten without it; the unknown event is not damage.
        let recovery = j.recovery().unwrap();
        assert_eq!(recovery.damaged_ranges, vec![u64_range(&malformed)]);
        let copies = damaged_copies(dir.path());
        assert_eq!(copies.len(), 1);
        assert_eq!(fs::read(&copies[0]).unwrap(), bytes);
        assert_eq!(
            fs::read(&path).unwrap(),
            cut_out(&bytes, std::slice::from_ref(&malformed))
        );
        drop(j);
        let (j, replay) = Journal::replay(dir.path(), &meta("g1")).unwrap();
        assert_eq!((replay.records.len(), replay.losses.len()), (3, 1));
        assert_eq!(j.recovery(), None);
    }

    #[test]
    fn loss_events_after_damage_are_found_by_the_resync() {
        use crate::record::LossCause;
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(dir.path());
        let recs = records(3);
        let frames = write_frames(dir.path(), &recs);
        let l = loss("c1", "agent-1", LossCause::Alone);
        let mut bytes = fs::read(&path).unwrap();
        bytes.extend_from_slice(&loss_frame(&l));
        fs::write(&path, &bytes).unwrap();
        zero_bytes(&path, frames[1].start + 20, 8);
        let (j, replay) = Journal::replay(dir.path(), &meta("g1")).unwrap();
        assert_eq!(replay.records, without(&recs, &[1]));
        assert_eq!(replay.losses.len(), 1);
        assert_eq!(replay.losses[0].loss, l);
        assert_eq!(replay.losses[0].after_records, 2);
        let recovery = j.recovery().unwrap();
        assert_eq!(recovery.damaged_ranges, vec![u64_range(&frames[1])]);
        assert_eq!(recovery.kept_after_damage, 1, "results, not events");
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

    /// Two writers would interleave frames: a second open of the same journal is refused, naming
    /// what to do, while the first is alive, and succeeds once it is closed.
    #[test]
    fn a_journal_open_elsewhere_is_refused_until_it_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let m = meta("g1");
        let (first, _) = Journal::open(dir.path(), &m).unwrap();
        let err = Journal::open(dir.path(), &m).map(|_| ()).unwrap_err();
        assert!(matches!(err, JournalError::Locked { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("another process") && text.contains("--out"),
            "{text}"
        );
        drop(first);
        Journal::open(dir.path(), &m).expect("free once the first writer closed it");
    }

    /// A lock taken on a file that was renamed over in the meantime guards nothing: the name
    /// check sees it, for the file the lock was taken on and for a missing name.
    #[test]
    fn a_lock_counts_only_on_the_file_the_name_still_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE_NAME);
        fs::write(&path, b"old").unwrap();
        let old = File::open(&path).unwrap();
        assert!(still_named(&old, &path).unwrap());
        let replacement = dir.path().join("journal.dbj.new");
        fs::write(&replacement, b"new").unwrap();
        fs::rename(&replacement, &path).unwrap();
        assert!(!still_named(&old, &path).unwrap(), "renamed over");
        let current = lock_current(&path).unwrap_or_else(|_| panic!("the new file is free"));
        assert!(still_named(&current, &path).unwrap());
        fs::remove_file(&path).unwrap();
        assert!(!still_named(&current, &path).unwrap(), "removed");
    }
}
