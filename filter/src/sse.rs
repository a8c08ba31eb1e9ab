//! An incremental Server-Sent Events parser that keeps partial lines across
//! chunks (LF, CRLF or CR line ends, comments, multi-line `data:`), and can drop
//! whole events from what is forwarded while passing every other byte as it came.

/// One complete event: its `data` lines joined by `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub data: String,
}

/// Incremental parser. `feed` takes each chunk as it arrives and returns the bytes
/// to forward; with `hold_partial` off it returns the chunk as it came.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of the current line not yet ended.
    line: Vec<u8>,
    /// `data` lines of the current event.
    data: Option<String>,
    /// Raw bytes of the current event (only kept when events may be dropped).
    raw: Vec<u8>,
    /// The previous chunk ended in CR: a LF at the start of the next is its pair.
    pending_cr: bool,
    /// When that CR ended an event: whether the event was kept, so its LF
    /// follows it out (or is dropped with it).
    cr_ended_event: Option<bool>,
    /// Whether events may be dropped, so the current event is held until complete.
    hold_partial: bool,
}

impl SseParser {
    /// `hold_partial`: buffer each event until its end so `keep` can drop it.
    pub fn new(hold_partial: bool) -> Self {
        Self { hold_partial, ..Self::default() }
    }

    /// Parses `chunk`; calls `keep` on each event completed in it. Returns the
    /// bytes to forward: complete events `keep` accepted, never the partial tail
    /// when holding.
    pub fn feed(&mut self, chunk: &[u8], keep: &mut dyn FnMut(&Event) -> bool) -> Vec<u8> {
        let mut out = Vec::new();
        if chunk.is_empty() {
            // Envoy ends streams with an empty chunk: it must not end a pending CR's line.
            return out;
        }
        let mut i = 0;
        if self.pending_cr {
            self.pending_cr = false;
            let ended = self.cr_ended_event.take();
            if chunk.first() == Some(&b'\n') {
                match ended {
                    Some(kept) => {
                        if kept && self.hold_partial {
                            out.push(b'\n');
                        }
                    }
                    None => self.raw_push(&chunk[..1]),
                }
                i = 1;
            }
        }
        while i < chunk.len() {
            let rest = &chunk[i..];
            match rest.iter().position(|&b| b == b'\n' || b == b'\r') {
                None => {
                    self.line.extend_from_slice(rest);
                    self.raw_push(rest);
                    break;
                }
                Some(p) => {
                    self.line.extend_from_slice(&rest[..p]);
                    let mut end = p + 1;
                    if rest[p] == b'\r' {
                        match rest.get(p + 1) {
                            Some(b'\n') => end += 1,
                            Some(_) => {}
                            None => self.pending_cr = true,
                        }
                    }
                    self.raw_push(&rest[..end]);
                    i += end;
                    let dispatched = self.end_line(&mut out, keep);
                    if self.pending_cr {
                        self.cr_ended_event = dispatched;
                    }
                }
            }
        }
        if self.hold_partial {
            out
        } else {
            chunk.to_vec()
        }
    }

    /// End of stream: an unterminated last line or event counts as complete.
    /// Returns the bytes still to forward.
    pub fn finish(&mut self, keep: &mut dyn FnMut(&Event) -> bool) -> Vec<u8> {
        let mut out = Vec::new();
        if !self.line.is_empty() {
            self.end_line(&mut out, keep);
        }
        if self.data.is_some() {
            let _kept = self.dispatch(&mut out, keep);
        }
        if self.hold_partial {
            out.append(&mut self.raw);
        }
        out
    }

    fn raw_push(&mut self, bytes: &[u8]) {
        if self.hold_partial {
            self.raw.extend_from_slice(bytes);
        }
    }

    /// Ends the current line; `Some(kept)` when it was blank and ended an event.
    fn end_line(&mut self, out: &mut Vec<u8>, keep: &mut dyn FnMut(&Event) -> bool) -> Option<bool> {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            return Some(self.dispatch(out, keep));
        }
        if line[0] == b':' {
            return None; // comment
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(p) => {
                let v = &line[p + 1..];
                (&line[..p], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (&line[..], &b""[..]),
        };
        if field == b"data" {
            let value = String::from_utf8_lossy(value);
            match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(&value);
                }
                None => self.data = Some(value.into_owned()),
            }
        }
        None
    }

    /// A blank line ends the event.
    fn dispatch(&mut self, out: &mut Vec<u8>, keep: &mut dyn FnMut(&Event) -> bool) -> bool {
        let raw = std::mem::take(&mut self.raw);
        let kept = match self.data.take() {
            Some(data) => keep(&Event { data }),
            None => true, // comments and blank lines pass through
        };
        if kept && self.hold_partial {
            out.extend_from_slice(&raw);
        }
        kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &[u8], split: &[usize], hold: bool, drop_if: &str) -> (Vec<String>, Vec<u8>) {
        let mut p = SseParser::new(hold);
        let mut seen = Vec::new();
        let mut out = Vec::new();
        let mut keep = |e: &Event| {
            seen.push(e.data.clone());
            !e.data.contains(drop_if) || drop_if.is_empty()
        };
        let mut last = 0;
        for &s in split.iter().chain(std::iter::once(&input.len())) {
            out.extend(p.feed(&input[last..s], &mut keep));
            last = s;
        }
        out.extend(p.finish(&mut keep));
        (seen, out)
    }

    const STREAM: &[u8] = b": keep-alive\n\ndata: {\"a\":1}\n\ndata: line1\ndata: line2\n\r\ndata: {\"usage\":{}}\r\n\r\nevent: x\ndata:[DONE]\r\rdata: tail";

    fn expected() -> Vec<String> {
        vec![r#"{"a":1}"#.into(), "line1\nline2".into(), r#"{"usage":{}}"#.into(), "[DONE]".into(), "tail".into()]
    }

    #[test]
    fn split_at_every_byte_gives_the_same_events() {
        for at in 0..=STREAM.len() {
            let (seen, out) = run(STREAM, &[at], false, "");
            assert_eq!(seen, expected(), "split at {at}");
            assert_eq!(out, STREAM, "untouched passthrough, split at {at}");
        }
    }

    #[test]
    fn split_into_single_bytes() {
        let splits: Vec<usize> = (1..STREAM.len()).collect();
        let (seen, out) = run(STREAM, &splits, true, "");
        assert_eq!(seen, expected());
        assert_eq!(out, STREAM, "holding and keeping everything reproduces the input");
    }

    #[test]
    fn dropping_removes_exactly_that_event() {
        let mut want = STREAM.to_vec();
        let dropped = b"data: {\"usage\":{}}\r\n\r\n";
        let pos = want.windows(dropped.len()).position(|w| w == dropped).unwrap();
        want.drain(pos..pos + dropped.len());
        for at in 0..=STREAM.len() {
            let (seen, out) = run(STREAM, &[at], true, "usage");
            assert_eq!(seen, expected(), "split at {at}");
            assert_eq!(out, want, "split at {at}");
        }
    }

    #[test]
    fn an_empty_chunk_between_cr_and_lf_changes_nothing() {
        let mut p = SseParser::new(true);
        let mut seen = Vec::new();
        let mut out = p.feed(b"data: a\r\n\r", &mut |e| {
            seen.push(e.data.clone());
            true
        });
        out.extend(p.feed(b"", &mut |_| true));
        out.extend(p.feed(b"\ndata: b\r\n\r\n", &mut |e| {
            seen.push(e.data.clone());
            true
        }));
        assert_eq!(seen, ["a", "b"]);
        assert_eq!(out, b"data: a\r\n\r\ndata: b\r\n\r\n");
    }

    #[test]
    fn data_without_space_and_field_without_colon() {
        let (seen, _) = run(b"data:x\ndata\n\n", &[], false, "");
        assert_eq!(seen, vec!["x\n".to_owned()]);
    }
}
