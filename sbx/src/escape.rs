//! Host side: guest-controlled text made safe to print on the user's terminal.
//!
//! The guest is hostile and root: what it writes to the kernel console,
//! the reasons guest-init reports, the host names and file names in the
//! audit log are its to choose. Printed raw, an escape sequence in them
//! would drive the user's terminal — set the clipboard (OSC 52), retitle
//! the window, move the cursor to overwrite or hide text, reorder it with
//! bidi overrides. So sbx prints such text through [`escape`]: C0 controls,
//! DEL and C1 controls (U+0080–U+009F) become `\xNN` or `\u{NN}`, Unicode's
//! bidi controls `\u{202e}`, bytes that are not UTF-8 `\xNN`; everything
//! else, including any other language's text, passes unchanged. The output
//! is for reading: a literal `\x1b` in the input looks the same as an
//! escaped ESC.
//!
//! Not escaped: a program's own output in `sbx run`/`sbx exec`, which is a
//! terminal session the user asked for.

use std::fmt::Write as _;

/// What is kept of the text's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One line (a reason or an error from the guest): only tabs are kept,
    /// newlines are escaped too, so the guest cannot add a line that looks
    /// like sbx's own.
    Line,
    /// A log, line by line: newlines, tabs and CR LF line ends (the serial
    /// console's) are kept; a lone CR, which would let a line overwrite
    /// the one before, is escaped.
    Lines,
    /// JSON lines (the audit log): as `Lines`, but characters are escaped
    /// the JSON way (`\u009b`), so every line still parses to the same
    /// value. (A verified log has no other control characters: JSON
    /// strings cannot hold them raw.)
    JsonLines,
}

/// Unicode's Bidi_Control characters: the embeddings, overrides and
/// isolates that reorder text as displayed (U+202A–U+202E,
/// U+2066–U+2069), and the invisible direction marks (U+061C, U+200E,
/// U+200F).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// The most bytes held back between pieces: an incomplete UTF-8 sequence
/// (at most 3 bytes) or one CR.
const MAX_HELD: usize = 3;

/// Escapes text that arrives in pieces (a console, a file read in
/// chunks): a UTF-8 sequence or a CR LF split between two pieces is
/// escaped exactly as if it had come whole.
#[derive(Debug)]
pub struct Escaper {
    layout: Layout,
    held: Vec<u8>,
}

impl Escaper {
    pub fn new(layout: Layout) -> Escaper {
        Escaper { layout, held: Vec::with_capacity(MAX_HELD) }
    }

    /// Escapes `bytes` onto `out`, holding back an incomplete UTF-8
    /// sequence or a CR at the end until the next piece shows what
    /// follows it.
    pub fn push(&mut self, bytes: &[u8], out: &mut String) {
        self.run(bytes, out, false);
    }

    /// The text has ended: escapes what was held back.
    pub fn finish(&mut self, out: &mut String) {
        self.run(&[], out, true);
    }

    fn run(&mut self, bytes: &[u8], out: &mut String, end: bool) {
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(bytes);
        let mut chunks = buf.utf8_chunks().peekable();
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            let invalid = chunk.invalid();
            let mut chars = chunk.valid().chars().peekable();
            while let Some(c) = chars.next() {
                if c == '\r' && self.layout != Layout::Line {
                    match chars.peek() {
                        Some('\n') => {
                            out.push('\r');
                            continue;
                        }
                        None if last && invalid.is_empty() && !end => {
                            self.held.push(b'\r');
                            continue;
                        }
                        _ => {}
                    }
                }
                self.char(c, out);
            }
            // An incomplete sequence at the very end may be completed by
            // the next piece; anything else is not UTF-8.
            let incomplete = std::str::from_utf8(invalid).err().is_some_and(|e| e.error_len().is_none());
            if last && !end && incomplete {
                self.held.extend_from_slice(invalid);
            } else {
                for b in invalid {
                    let _ = write!(out, "\\x{b:02x}");
                }
            }
        }
        debug_assert!(self.held.len() <= MAX_HELD);
    }

    fn char(&self, c: char, out: &mut String) {
        let keep = match c {
            '\n' => self.layout != Layout::Line,
            '\t' => true,
            c => !c.is_control() && !is_bidi_control(c),
        };
        if keep {
            out.push(c);
            return;
        }
        let n = c as u32;
        let _ = match self.layout {
            Layout::JsonLines => write!(out, "\\u{n:04x}"),
            _ if n < 0x80 => write!(out, "\\x{n:02x}"),
            _ => write!(out, "\\u{{{n:x}}}"),
        };
    }
}

/// `bytes` (guest-controlled, perhaps not UTF-8) made safe to print.
pub fn escape(bytes: &[u8], layout: Layout) -> String {
    let mut out = String::with_capacity(bytes.len());
    let mut e = Escaper::new(layout);
    e.push(bytes, &mut out);
    e.finish(&mut out);
    out
}

/// Guest-controlled text made safe to print inside one line of sbx's own.
pub fn line(text: &str) -> String {
    escape(text.as_bytes(), Layout::Line)
}

/// A writer that escapes what it is given before passing it on (for a
/// copy of the guest's console on the user's terminal).
pub struct EscapingWriter<W: std::io::Write> {
    escaper: Escaper,
    out: W,
}

impl<W: std::io::Write> EscapingWriter<W> {
    pub fn new(layout: Layout, out: W) -> EscapingWriter<W> {
        EscapingWriter { escaper: Escaper::new(layout), out }
    }
}

impl<W: std::io::Write> std::io::Write for EscapingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut text = String::new();
        self.escaper.push(buf, &mut text);
        self.out.write_all(text.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(b: &[u8]) -> String {
        escape(b, Layout::Lines)
    }

    #[test]
    fn terminal_escape_sequences_are_made_visible() {
        assert_eq!(lines(b"\x1b[31mred\x1b[0m\n"), "\\x1b[31mred\\x1b[0m\n");
        // OSC 52: write the user's clipboard; OSC 0: the window title.
        assert_eq!(lines(b"\x1b]52;c;cm0gLXJmIH4=\x07"), "\\x1b]52;c;cm0gLXJmIH4=\\x07");
        assert_eq!(lines(b"\x1b]0;pwned\x1b\\"), "\\x1b]0;pwned\\x1b\\");
        // Cursor movement and erasing, backspace, NUL, DEL.
        assert_eq!(lines(b"ok\x1b[1A\x1b[2Kfake\x08\x00\x7f"), "ok\\x1b[1A\\x1b[2Kfake\\x08\\x00\\x7f");
        for b in (0u8..0x20).chain([0x7f]).filter(|b| !matches!(b, b'\n' | b'\t' | b'\r')) {
            assert_eq!(lines(&[b]), format!("\\x{b:02x}"));
        }
    }

    #[test]
    fn c1_controls_are_escaped_as_characters_and_as_raw_bytes() {
        // U+009B is CSI on its own: "\u{9b}2J" clears the screen.
        assert_eq!(lines("\u{9b}2J".as_bytes()), "\\u{9b}2J");
        assert_eq!(lines("\u{9d}52;c;x\u{9c}".as_bytes()), "\\u{9d}52;c;x\\u{9c}");
        for c in '\u{80}'..='\u{9f}' {
            assert_eq!(lines(c.to_string().as_bytes()), format!("\\u{{{:x}}}", c as u32));
        }
        // The raw 8-bit forms are not UTF-8.
        assert_eq!(lines(b"\x9b2J"), "\\x9b2J");
        assert_eq!(lines(b"\x9d52;c;x\x07"), "\\x9d52;c;x\\x07");
    }

    #[test]
    fn invalid_utf8_is_shown_byte_by_byte_and_text_is_kept() {
        assert_eq!(lines(b"ok\xff\xfe!"), "ok\\xff\\xfe!");
        assert_eq!(lines(b"\xe2\x28\xa1"), "\\xe2(\\xa1");
        assert_eq!(lines(b"cut \xe2\x82"), "cut \\xe2\\x82", "incomplete at the end");
        assert_eq!(lines(b"\xc0\xaf"), "\\xc0\\xaf", "overlong");
        let text = "Grüße, 日本語, emoji 🦀, tab\tend\n";
        assert_eq!(lines(text.as_bytes()), text);
        assert_eq!(lines(b""), "");
    }

    #[test]
    fn bidi_controls_are_escaped() {
        // Trojan Source: an override makes "admin" display reversed.
        assert_eq!(lines("a\u{202e}nimda\u{202c}b".as_bytes()), "a\\u{202e}nimda\\u{202c}b");
        for c in ['\u{061c}', '\u{200e}', '\u{200f}', '\u{202a}', '\u{202d}', '\u{2066}', '\u{2067}', '\u{2069}'] {
            assert_eq!(lines(c.to_string().as_bytes()), format!("\\u{{{:x}}}", c as u32));
        }
        // Right-to-left text itself is kept.
        assert_eq!(lines("שלום مرحبا".as_bytes()), "שלום مرحبا");
    }

    #[test]
    fn layouts_keep_or_escape_line_structure() {
        assert_eq!(lines(b"a\r\nb\n\tc\n"), "a\r\nb\n\tc\n", "the serial console's CR LF");
        assert_eq!(lines(b"secret\rdecoy\n"), "secret\\x0ddecoy\n", "a lone CR overwrites");
        assert_eq!(lines(b"end\r"), "end\\x0d");
        assert_eq!(line("boom\nsbx: all fine\r\n\tx"), "boom\\x0asbx: all fine\\x0d\\x0a\tx");
        assert_eq!(line("mount: \u{1b}[8mhidden"), "mount: \\x1b[8mhidden");
    }

    #[test]
    fn json_lines_stay_json_with_the_same_value() {
        let raw = "{\"host\":\"a\u{9b}b\u{7f}\u{202e}c\",\"n\":1}\n";
        let out = escape(raw.as_bytes(), Layout::JsonLines);
        assert_eq!(out, "{\"host\":\"a\\u009bb\\u007f\\u202ec\",\"n\":1}\n");
        let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(parsed, serde_json::from_str::<serde_json::Value>(raw).unwrap());
        // serde_json's own escapes pass through as text.
        let own = serde_json::json!({ "path": "x\u{1b}]52;c;y\u{7}" }).to_string();
        assert_eq!(escape(own.as_bytes(), Layout::JsonLines), own);
        assert!(own.contains("\\u001b"));
    }

    #[test]
    fn pieces_escape_exactly_like_the_whole() {
        let sample: &[u8] = b"a\r\nb\xe2\x82\xac\xf0\x9f\xa6\x80\r\xc2\x9b\xff\x1b]52;c;x\x07\r\n\xe2\x80\xaeq\xe2\x82";
        for layout in [Layout::Line, Layout::Lines, Layout::JsonLines] {
            let whole = escape(sample, layout);
            for cut in 0..=sample.len() {
                let mut e = Escaper::new(layout);
                let mut out = String::new();
                e.push(&sample[..cut], &mut out);
                e.push(&sample[cut..], &mut out);
                e.finish(&mut out);
                assert_eq!(out, whole, "{layout:?} cut at {cut}");
            }
            let mut e = Escaper::new(layout);
            let mut out = String::new();
            for b in sample {
                e.push(&[*b], &mut out);
                assert!(e.held.len() <= MAX_HELD);
            }
            e.finish(&mut out);
            assert_eq!(out, whole, "{layout:?} a byte at a time");
        }
        assert_eq!(
            escape(sample, Layout::Lines),
            "a\r\nb€🦀\\x0d\\u{9b}\\xff\\x1b]52;c;x\\x07\r\n\\u{202e}q\\xe2\\x82"
        );
    }
}
