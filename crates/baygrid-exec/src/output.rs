//! Reading a job's output a bounded piece at a time.
//!
//! A job may print without end: a loop of `yes`, a progress bar without newlines, a line of
//! megabytes. What the agent reads per step, what one line may carry and what one attempt
//! ships to the server are all bounded here, so that neither the agent's memory, nor its
//! steps between heartbeats, nor the store grow with a job's output. The whole output stays
//! where the engine wrote it, in the job's folder on the cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The most read from one stream in one call: bounds the agent's memory and the work of
/// one step.
pub const READ_BYTES: usize = 1 << 20;
/// The most lines taken from one stream in one call.
pub const READ_LINES: usize = 10_000;
/// The longest line shipped; the rest of a longer one is cut, and the line says so.
pub const LINE_BYTES: usize = 16 << 10;

/// How much of one attempt's output is shipped to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputLimits {
    /// Bytes shipped from the start of the output, all streams together.
    #[serde(default = "default_head_bytes")]
    pub head_bytes: u64,
    /// Lines shipped from the start of the output, all streams together.
    #[serde(default = "default_head_lines")]
    pub head_lines: u64,
    /// Once past the head: the bytes shipped from each stream's end, when it ends.
    #[serde(default = "default_tail_bytes")]
    pub tail_bytes: u64,
}

fn default_head_bytes() -> u64 {
    32 << 20
}
fn default_head_lines() -> u64 {
    200_000
}
fn default_tail_bytes() -> u64 {
    256 << 10
}

impl Default for OutputLimits {
    fn default() -> Self {
        OutputLimits {
            head_bytes: default_head_bytes(),
            head_lines: default_head_lines(),
            tail_bytes: default_tail_bytes(),
        }
    }
}

impl OutputLimits {
    /// No head limit: every line, for output that stays at the site.
    pub fn whole() -> Self {
        OutputLimits {
            head_bytes: u64::MAX,
            head_lines: u64::MAX,
            tail_bytes: 0,
        }
    }
}

/// Where reading a job's output has got to; persisted with the handle.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogCursor {
    /// Bytes already read, per output stream.
    pub offsets: BTreeMap<String, u64>,
    #[serde(default)]
    pub limits: OutputLimits,
    /// Lines and bytes shipped so far, all streams together.
    #[serde(default)]
    pub shipped_lines: u64,
    #[serde(default)]
    pub shipped_bytes: u64,
    /// Whether the line saying the head is spent has been shipped.
    #[serde(default)]
    pub capped: bool,
    /// Streams in the middle of a line too long to ship whole: the rest of it is skipped.
    #[serde(default)]
    pub cutting: BTreeSet<String>,
    /// Ended streams with more written than the last call read.
    #[serde(default)]
    pub behind: BTreeSet<String>,
}

impl LogCursor {
    /// A cursor at the start of every stream, shipping within `limits`.
    pub fn new(limits: OutputLimits) -> Self {
        LogCursor {
            limits,
            ..LogCursor::default()
        }
    }

    /// Whether a stream that has ended has more to read: its writer is done but the last call
    /// stopped at [`READ_BYTES`] or [`READ_LINES`]. Until it has none, the job's last report
    /// must wait.
    pub fn is_behind(&self) -> bool {
        !self.behind.is_empty()
    }

    fn head_spent(&self) -> bool {
        self.shipped_bytes >= self.limits.head_bytes || self.shipped_lines >= self.limits.head_lines
    }

    /// The lines appended to `path` since this cursor last read it (kept under `key`):
    /// complete lines only, unless the writer has `ended`, when a last partial line counts.
    /// At most [`READ_BYTES`] and [`READ_LINES`] a call; see [`LogCursor::is_behind`].
    pub fn read_new_lines(&mut self, path: &Path, key: &str, ended: bool) -> Vec<String> {
        let Ok(len) = std::fs::metadata(path).map(|m| m.len()) else {
            return Vec::new();
        };
        let read = |offset: u64, want: usize| -> std::io::Result<Vec<u8>> {
            let mut file = std::fs::File::open(path)?;
            file.seek(SeekFrom::Start(offset))?;
            let mut buf = Vec::with_capacity(want);
            file.take(want as u64).read_to_end(&mut buf)?;
            Ok(buf)
        };
        self.advance(key, len, ended, read, Some(path))
    }

    /// The lines of `bytes` (the whole output so far of stream `key`) past this cursor, as
    /// [`LogCursor::read_new_lines`] takes them from a file.
    pub fn take_new_lines(&mut self, key: &str, bytes: &[u8], ended: bool) -> Vec<String> {
        let read = |offset: u64, want: usize| -> std::io::Result<Vec<u8>> {
            let from = (offset as usize).min(bytes.len());
            Ok(bytes[from..(from + want).min(bytes.len())].to_vec())
        };
        self.advance(key, bytes.len() as u64, ended, read, None)
    }

    fn advance(
        &mut self,
        key: &str,
        len: u64,
        ended: bool,
        mut read: impl FnMut(u64, usize) -> std::io::Result<Vec<u8>>,
        whole: Option<&Path>,
    ) -> Vec<String> {
        let mut offset = self.offsets.get(key).copied().unwrap_or(0);
        self.behind.remove(key);
        if len <= offset {
            return Vec::new();
        }
        let mut lines = Vec::new();
        if self.head_spent() {
            if !self.capped {
                self.capped = true;
                lines.push(format!(
                    "[baygrid] output past the first {} or {} lines is not shipped while the job runs; \
                     each stream's last {} comes when it ends{}",
                    size(self.limits.head_bytes),
                    self.limits.head_lines,
                    size(self.limits.tail_bytes),
                    kept_at(whole),
                ));
            }
            if !ended {
                return lines;
            }
            // the stream has ended: ship its tail, from the first line that starts in it
            let tail_from = len.saturating_sub(self.limits.tail_bytes);
            if tail_from > offset {
                let Ok(around) = read(
                    tail_from - 1,
                    (len - tail_from + 1).min(READ_BYTES as u64) as usize,
                ) else {
                    return lines;
                };
                let start = match around.iter().position(|b| *b == b'\n') {
                    Some(i) => tail_from + i as u64,
                    None => {
                        self.cutting.insert(key.to_string());
                        tail_from
                    }
                };
                lines.push(format!(
                    "[baygrid] {} bytes of this stream left out here{}",
                    start - offset,
                    kept_at(whole),
                ));
                offset = start;
            }
        }
        let tail = self.head_spent();
        let want = (len - offset).min(READ_BYTES as u64) as usize;
        let Ok(buf) = read(offset, want) else {
            self.offsets.insert(key.to_string(), offset);
            return lines;
        };
        let at_end = offset + buf.len() as u64 >= len;
        let mut pos = 0;
        if self.cutting.contains(key) {
            match buf.iter().position(|b| *b == b'\n') {
                Some(i) => {
                    pos = i + 1;
                    self.cutting.remove(key);
                }
                None => {
                    pos = buf.len();
                    if at_end && ended {
                        self.cutting.remove(key);
                    }
                }
            }
        }
        let mut taken = 0;
        while pos < buf.len() && taken < READ_LINES && (tail || !self.head_spent()) {
            let rest = &buf[pos..];
            match rest.iter().position(|b| *b == b'\n') {
                Some(i) => {
                    lines.push(shape(&rest[..i]));
                    self.count(i + 1);
                    pos += i + 1;
                }
                None if at_end && ended => {
                    lines.push(shape(rest));
                    self.count(rest.len());
                    pos = buf.len();
                }
                None if rest.len() > LINE_BYTES => {
                    // a line too long to wait for the end of: its start now, the rest skipped
                    lines.push(shape(rest));
                    self.count(LINE_BYTES);
                    pos = buf.len();
                    self.cutting.insert(key.to_string());
                }
                None => break,
            }
            taken += 1;
        }
        offset += pos as u64;
        self.offsets.insert(key.to_string(), offset);
        if ended && offset < len {
            self.behind.insert(key.to_string());
        }
        lines
    }

    fn count(&mut self, bytes: usize) {
        self.shipped_lines += 1;
        self.shipped_bytes += bytes.min(LINE_BYTES + 1) as u64;
    }
}

/// A line as shipped: lossy UTF-8, without its carriage return, cut at [`LINE_BYTES`].
fn shape(raw: &[u8]) -> String {
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    if raw.len() <= LINE_BYTES {
        return text(raw);
    }
    let mut line = text(&raw[..LINE_BYTES]);
    line.push_str(&format!(" … [line cut at {}]", size(LINE_BYTES as u64)));
    line
}

fn kept_at(whole: Option<&Path>) -> String {
    whole
        .map(|p| format!("; all of it is in {} on the cluster", p.display()))
        .unwrap_or_default()
}

/// Bytes in the largest binary unit that keeps them whole, or in bytes.
fn size(bytes: u64) -> String {
    for (shift, unit) in [(30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> OutputLimits {
        OutputLimits {
            head_bytes: 100,
            head_lines: 1_000,
            tail_bytes: 20,
        }
    }

    #[test]
    fn complete_lines_only_until_the_writer_ends() {
        let mut c = LogCursor::default();
        assert_eq!(c.take_new_lines("s", b"one\ntw", false), ["one"]);
        assert!(c.take_new_lines("s", b"one\ntw", false).is_empty());
        assert_eq!(
            c.take_new_lines("s", b"one\ntwo\r\nthr", true),
            ["two", "thr"]
        );
        assert!(!c.is_behind());
        // an invalid byte becomes U+FFFD; a NUL goes as it is (the store, which may be
        // PostgreSQL, whose text cannot hold one, replaces it)
        let mut nul = LogCursor::default();
        assert_eq!(
            nul.take_new_lines("s", b"a\0b\xff\n", false),
            ["a\0b\u{fffd}"]
        );
        assert_eq!((c.shipped_lines, c.shipped_bytes), (3, 12));
    }

    #[test]
    fn a_long_line_is_cut_and_the_next_one_starts_clean() {
        let mut c = LogCursor::default();
        let mut out = vec![b'x'; LINE_BYTES * 3];
        out.extend_from_slice(b"\nnext\n");
        let lines = c.take_new_lines("s", &out, false);
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with(&"x".repeat(LINE_BYTES)));
        assert!(
            lines[0].ends_with(" … [line cut at 16 KiB]"),
            "{}",
            &lines[0][LINE_BYTES..]
        );
        assert_eq!(lines[1], "next");
    }

    #[test]
    fn a_line_without_end_is_cut_and_its_rest_skipped_as_it_comes() {
        // a progress bar that never prints a newline
        let mut c = LogCursor::default();
        let mut out = vec![b'#'; LINE_BYTES + 10];
        let lines = c.take_new_lines("s", &out, false);
        assert_eq!(lines.len(), 1);
        assert!(lines[0].ends_with("[line cut at 16 KiB]"));
        out.extend(vec![b'#'; 5 * LINE_BYTES]);
        assert!(c.take_new_lines("s", &out, false).is_empty());
        out.extend_from_slice(b"###\ndone\n");
        assert_eq!(c.take_new_lines("s", &out, false), ["done"]);
    }

    #[test]
    fn a_big_output_is_read_a_bounded_piece_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout");
        let line = "a line of output that says the same again\n";
        let count = 3 * READ_BYTES / line.len();
        std::fs::write(&path, line.repeat(count)).unwrap();
        let mut c = LogCursor::default();
        let mut got = 0;
        let mut calls = 0;
        loop {
            let lines = c.read_new_lines(&path, "stdout", true);
            calls += 1;
            assert!(lines.len() <= READ_LINES);
            assert!(lines.iter().map(|l| l.len() + 1).sum::<usize>() <= READ_BYTES);
            got += lines.len();
            if !c.is_behind() {
                break;
            }
        }
        assert_eq!(got, count);
        assert!(calls >= 3, "{calls}");
        assert!(c.read_new_lines(&path, "stdout", true).is_empty());
    }

    #[test]
    fn past_the_head_a_stream_ships_its_tail_when_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout");
        let mut text: String = (0..100).map(|i| format!("line {i:03}\n")).collect();
        std::fs::write(&path, &text).unwrap();
        let mut c = LogCursor::new(small());
        // 100 bytes of head: 11 lines of 9 bytes and the 12th, which crosses it
        let head = c.read_new_lines(&path, "stdout", false);
        assert_eq!(head.len(), 12);
        assert_eq!(head[11], "line 011");
        let head = c.read_new_lines(&path, "stdout", false);
        assert_eq!(head.len(), 1);
        assert!(
            head[0].starts_with("[baygrid] output past the first 100 bytes"),
            "{head:?}"
        );
        assert!(head[0].contains(&format!("all of it is in {}", path.display())));
        assert!(c.read_new_lines(&path, "stdout", false).is_empty());
        text.push_str("the last line\n");
        std::fs::write(&path, &text).unwrap();
        let tail = c.read_new_lines(&path, "stdout", true);
        // left out: from line 012 to the end of line 099, the line the tail starts inside
        assert_eq!(
            tail[0],
            format!(
                "[baygrid] {} bytes of this stream left out here; all of it is in {} on the cluster",
                900 - 108,
                path.display()
            )
        );
        // the tail starts at the first whole line of its last 20 bytes
        assert_eq!(&tail[1..], ["the last line"]);
        assert!(!c.is_behind());
    }

    #[test]
    fn output_kept_whole_has_no_head() {
        let mut c = LogCursor::new(OutputLimits::whole());
        let text = "line\n".repeat(300_000);
        let mut got = 0;
        loop {
            let lines = c.take_new_lines("s", text.as_bytes(), true);
            assert!(lines.iter().all(|l| l == "line"));
            got += lines.len();
            if !c.is_behind() {
                break;
            }
        }
        assert_eq!(got, 300_000);
    }

    #[test]
    fn limits_are_kept_with_the_cursor() {
        let c = LogCursor::new(small());
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<LogCursor>(&text).unwrap(), c);
        // a cursor persisted before limits existed reads with the defaults
        let old: LogCursor = serde_json::from_str(r#"{"offsets":{"stdout":12}}"#).unwrap();
        assert_eq!(old.limits, OutputLimits::default());
        assert_eq!(old.offsets["stdout"], 12);
    }
}
