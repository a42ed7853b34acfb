//! Host side: the guest program's raw terminal output, with the escape
//! sequences that reach beyond the terminal's screen taken out.
//!
//! `sbx run`/`sbx exec` pass a session's output through raw: it is a
//! terminal session, and agents' TUIs draw with colours, cursor moves,
//! titles and hyperlinks. But a few sequences make the user's terminal act
//! on the host, with data the guest chose or for the guest to read back:
//! - OSC 52 (xterm, most terminals) sets the host's clipboard — a command
//!   the user pastes later — or, as a query (`?`), sends the clipboard's
//!   content back as input, which sbx forwards to the guest; OSC 5522 is
//!   kitty's clipboard protocol.
//! - OSC 1337 (iTerm2: file downloads `File=`, clipboard copies, user
//!   variables), OSC 5113 (kitty file transfer), OSC 46 (xterm: change the
//!   log file, which xterm then writes), OSC 50 (xterm: set or query the
//!   font).
//! - DCS `tmux;` (passed by tmux to the terminal outside it, so the
//!   sequences inside escape this filter) and DCS `@kitty-cmd` (kitty's
//!   remote control).
//! - APC, PM and SOS strings (kitty's graphics protocol reads host files
//!   by path through APC `G`; no TUI an agent runs needs them).
//!
//! [`TerminalFilter`] removes exactly those, whole, from the byte stream
//! (split anywhere across writes) and passes everything else unchanged;
//! it holds at most [`MAX_HELD`] bytes between writes (the start of a
//! sequence whose kind is not known yet). Sequences are recognised in their
//! 7-bit form (`ESC ]`, `ESC P`, `ESC _`, `ESC ^`, `ESC X`) and as the
//! UTF-8 encodings of their C1 controls (U+009D, U+0090, U+009F, U+009E,
//! U+0098); they end at BEL (OSC only), ST (`ESC \` or U+009C), CAN or
//! SUB, as terminals end them. sbx filters only output that goes to a
//! terminal: piped or redirected output stays byte for byte the program's.

/// Bytes held back between writes while a sequence's kind is undecided
/// (an OSC number, a DCS's first bytes). Past it the sequence passes.
pub const MAX_HELD: usize = 32;

/// OSC numbers removed (see the module docs).
pub const DROPPED_OSC: &[&[u8]] = &[b"52", b"5522", b"1337", b"5113", b"46", b"50"];

/// DCS strings removed, by how they start.
pub const DROPPED_DCS: &[&[u8]] = &[b"tmux;", b"@kitty-cmd"];

const ESC: u8 = 0x1b;
const BEL: u8 = 0x07;
const CAN: u8 = 0x18;
const SUB: u8 = 0x1a;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Osc,
    Dcs,
    /// APC, PM, SOS: always removed.
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Plain output.
    Text,
    /// After ESC, at the start of the held bytes.
    Esc,
    /// After a 0xC2 lead byte (a C1 control may follow).
    C2,
    /// In a sequence whose kind is known, its first bytes held.
    Deciding(Kind),
    /// In a sequence being removed; `esc`: the last byte was ESC.
    Dropping { kind: Kind, esc: bool, c2: bool },
    /// In a sequence being passed; watching for its end only.
    Passing { kind: Kind, esc: bool, c2: bool },
}

/// The streaming filter: feed it output, write what it returns.
#[derive(Debug)]
pub struct TerminalFilter {
    state: State,
    /// Bytes not yet passed: the introducer and the start of the body.
    held: Vec<u8>,
    /// Length of the introducer in `held` (2 bytes in either form).
    intro: usize,
    dropped: u64,
}

impl Default for TerminalFilter {
    fn default() -> Self {
        TerminalFilter { state: State::Text, held: Vec::with_capacity(MAX_HELD + 2), intro: 0, dropped: 0 }
    }
}

fn kind_of(introducer: u8) -> Option<Kind> {
    match introducer {
        b']' => Some(Kind::Osc),
        b'P' => Some(Kind::Dcs),
        b'_' | b'^' | b'X' => Some(Kind::Other),
        _ => None,
    }
}

fn kind_of_c1(byte: u8) -> Option<Kind> {
    match byte {
        0x9d => Some(Kind::Osc),
        0x90 => Some(Kind::Dcs),
        0x9f | 0x9e | 0x98 => Some(Kind::Other),
        _ => None,
    }
}

/// Whether OSC number `digits` is removed: terminals read it as a number,
/// so leading zeros do not make another one (`0052` is 52).
fn osc_dropped(digits: &[u8]) -> bool {
    let first = digits.iter().position(|&d| d != b'0').unwrap_or(digits.len());
    DROPPED_OSC.contains(&&digits[first..])
}

/// Whether a sequence whose body starts with `body` is removed; None while
/// `body` is too short to say.
fn verdict(kind: Kind, body: &[u8]) -> Option<bool> {
    match kind {
        Kind::Other => Some(true),
        Kind::Osc => {
            // The number runs to ';' or the end of the sequence.
            let digits = body.iter().take_while(|b| b.is_ascii_digit()).count();
            if digits == body.len() {
                return None;
            }
            Some(osc_dropped(&body[..digits]))
        }
        Kind::Dcs => {
            let mut undecided = false;
            for p in DROPPED_DCS {
                if body.starts_with(p) {
                    return Some(true);
                }
                if p.starts_with(body) {
                    undecided = true;
                }
            }
            (!undecided).then_some(false)
        }
    }
}

impl TerminalFilter {
    /// How many sequences were removed so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Filters `data`; returns the bytes to write now.
    pub fn feed(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len() + self.held.len());
        for &b in data {
            self.step(b, &mut out);
        }
        out
    }

    /// What is held, at the end of the output (an unfinished sequence
    /// being removed stays removed).
    pub fn finish(&mut self) -> Vec<u8> {
        let out = match self.state {
            State::Dropping { .. } => Vec::new(),
            State::Passing { esc: true, .. } => vec![ESC],
            State::Passing { c2: true, .. } => vec![0xc2],
            _ => std::mem::take(&mut self.held),
        };
        self.held.clear();
        self.state = State::Text;
        out
    }

    fn start(&mut self, kind: Kind, intro: &[u8]) {
        self.held.clear();
        self.held.extend_from_slice(intro);
        self.intro = intro.len();
        self.state = State::Deciding(kind);
        if kind == Kind::Other {
            self.decide(kind, true);
        }
    }

    fn decide(&mut self, kind: Kind, drop: bool) {
        if drop {
            self.dropped += 1;
            self.held.clear();
            self.state = State::Dropping { kind, esc: false, c2: false };
        } else {
            self.state = State::Passing { kind, esc: false, c2: false };
        }
    }

    fn step(&mut self, b: u8, out: &mut Vec<u8>) {
        match self.state {
            State::Text => match b {
                ESC | 0xc2 => {
                    self.held.clear();
                    self.held.push(b);
                    self.state = if b == ESC { State::Esc } else { State::C2 };
                }
                _ => out.push(b),
            },
            State::Esc | State::C2 => {
                let kind = if self.state == State::Esc { kind_of(b) } else { kind_of_c1(b) };
                match kind {
                    Some(kind) => {
                        let intro = [self.held[0], b];
                        self.start(kind, &intro);
                    }
                    None => {
                        out.append(&mut self.held);
                        self.state = State::Text;
                        self.step(b, out);
                    }
                }
            }
            State::Deciding(kind) => {
                if ends(kind, b) || b == ESC || b == 0xc2 {
                    // Ended (or cut) before its kind was known: judge it
                    // by what it had.
                    let body = &self.held[self.intro..];
                    let drop = match kind {
                        Kind::Osc => osc_dropped(body),
                        _ => verdict(kind, body).unwrap_or(false),
                    };
                    if drop {
                        self.dropped += 1;
                        self.held.clear();
                    } else {
                        out.append(&mut self.held);
                    }
                    let (esc, c2) = (b == ESC, b == 0xc2);
                    self.state = match (esc || c2, drop) {
                        (false, _) => State::Text,
                        (true, true) => State::Dropping { kind, esc, c2 },
                        (true, false) => State::Passing { kind, esc, c2 },
                    };
                    if !drop && !esc && !c2 {
                        out.push(b);
                    }
                    return;
                }
                self.held.push(b);
                match verdict(kind, &self.held[self.intro..]) {
                    Some(drop) => {
                        if !drop {
                            out.append(&mut self.held);
                        }
                        self.decide(kind, drop);
                    }
                    None if self.held.len() - self.intro >= MAX_HELD => {
                        // No sequence anyone uses has a number this long:
                        // an OSC is removed (it could still be 52 to the
                        // terminal), a DCS cannot be one of ours any more.
                        let drop = kind == Kind::Osc;
                        if !drop {
                            out.append(&mut self.held);
                        }
                        self.decide(kind, drop);
                    }
                    None => {}
                }
            }
            State::Dropping { kind, esc, c2 } | State::Passing { kind, esc, c2 } => {
                let passing = matches!(self.state, State::Passing { .. });
                // In a string, ESC and 0xC2 are held (not yet written) until
                // the next byte says whether they end it.
                if esc {
                    if b == ESC && !passing {
                        // tmux doubles the ESCs inside its passthrough; a
                        // string being removed goes on to its ST either way.
                        self.state = self.with_flags(false, false);
                    } else if b == b'\\' {
                        if passing {
                            out.extend_from_slice(&[ESC, b]);
                        }
                        self.state = State::Text;
                    } else {
                        // ESC ends the string and starts something new.
                        // A passed string gets its proper end first, so the
                        // terminal ends it even if what follows is removed.
                        if passing {
                            out.extend_from_slice(&[ESC, b'\\']);
                        }
                        self.held.clear();
                        self.held.push(ESC);
                        self.state = State::Esc;
                        self.step(b, out);
                    }
                    return;
                }
                if c2 {
                    if passing {
                        out.extend_from_slice(&[0xc2, b]);
                    }
                    self.state = if b == 0x9c { State::Text } else { self.with_flags(false, false) };
                    return;
                }
                match b {
                    ESC => self.state = self.with_flags(true, false),
                    0xc2 => self.state = self.with_flags(false, true),
                    _ => {
                        if passing {
                            out.push(b);
                        }
                        if ends(kind, b) {
                            self.state = State::Text;
                        }
                    }
                }
            }
        }
    }

    fn with_flags(&self, esc: bool, c2: bool) -> State {
        match self.state {
            State::Dropping { kind, .. } => State::Dropping { kind, esc, c2 },
            State::Passing { kind, .. } => State::Passing { kind, esc, c2 },
            other => other,
        }
    }
}

/// A writer that filters what goes to a terminal (when `filter` is on);
/// for the program's serial port, which the guest can write raw.
pub struct Filtered<W: std::io::Write> {
    out: W,
    filter: Option<TerminalFilter>,
}

impl<W: std::io::Write> Filtered<W> {
    /// `terminal`: whether `out` is a terminal (filtered) or not (passed).
    pub fn new(out: W, terminal: bool) -> Self {
        Filtered { out, filter: terminal.then(TerminalFilter::default) }
    }
}

impl<W: std::io::Write> std::io::Write for Filtered<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.filter {
            Some(f) => self.out.write_all(&f.feed(buf))?,
            None => self.out.write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

fn ends(kind: Kind, b: u8) -> bool {
    b == CAN || b == SUB || (kind == Kind::Osc && b == BEL)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Filters `input` in pieces of every size from 1 to its length: the
    /// result must not depend on where writes split.
    fn filtered(input: &[u8]) -> Vec<u8> {
        let mut whole = TerminalFilter::default();
        let mut expect = whole.feed(input);
        expect.extend(whole.finish());
        for size in 1..=input.len().max(1) {
            let mut f = TerminalFilter::default();
            let mut got = Vec::new();
            for piece in input.chunks(size) {
                got.extend(f.feed(piece));
            }
            got.extend(f.finish());
            assert_eq!(got, expect, "split every {size} bytes of {:?}", String::from_utf8_lossy(input));
        }
        expect
    }

    #[test]
    fn clipboard_and_file_transfer_sequences_are_removed_whole() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"a\x1b]52;c;cm0gLXJmIH4K\x07b", b"ab"),
            (b"a\x1b]52;c;?\x1b\\b", b"ab"),
            (b"a\xc2\x9d52;c;eA==\xc2\x9cb", b"ab"),
            (b"a\x1b]1337;File=name=eA==;inline=0:AAAA\x07b", b"ab"),
            (b"a\x1b]5522;type=write\x1b\\b", b"ab"),
            (b"a\x1b]46;/home/u/.bashrc\x07b", b"ab"),
            (b"a\x1b]50;?\x07b", b"ab"),
            (b"a\x1bPtmux;\x1b\x1b]52;c;eA==\x07\x1b\\b", b"ab"),
            (b"a\x1bP@kitty-cmd{\"cmd\":\"launch\"}\x1b\\b", b"ab"),
            (b"a\x1b_Ga=T,t=f;L2V0Yy9zaGFkb3c=\x1b\\b", b"ab"),
            (b"a\x1b^private\x1b\\b", b"ab"),
            // Ended by CAN, and a bare number (no ';') ended by BEL.
            (b"a\x1b]52;c;eA==\x18b", b"ab"),
            (b"a\x1b]52\x07b", b"ab"),
            // ST right after a removed sequence goes with it.
            (b"a\x1b]52;c;eA==\x1b\\b", b"ab"),
        ];
        for (input, want) in cases {
            assert_eq!(filtered(input), *want, "{:?}", String::from_utf8_lossy(input));
        }
        let mut f = TerminalFilter::default();
        f.feed(b"\x1b]52;c;eA==\x07\x1b]52;c;?\x07");
        assert_eq!(f.dropped(), 2);
    }

    #[test]
    fn everything_a_tui_draws_with_passes_unchanged() {
        let keep: &[&[u8]] = &[
            b"plain text, \xc3\xa9t\xc3\xa9, \xe4\xb8\xad\xe6\x96\x87, \xc2\xa9\r\n",
            b"\x1b[1;31mred\x1b[0m \x1b[2J\x1b[H\x1b[?1049h\x1b[?2026h\x1b[?25l",
            b"\x1b]0;window title\x07\x1b]2;title\x1b\\",
            b"\x1b]8;;https://example.com\x1b\\link\x1b]8;;\x1b\\",
            b"\x1b]11;?\x07\x1b]4;1;rgb:ff/00/00\x07\x1b]133;A\x07\x1b]521;x\x07",
            b"\x1bP$q\"p\x1b\\\x1bP+q544e\x1b\\",
            b"\x1b7\x1b8\x1bc\x1b(B\x1b=",
            b"\x1b]",
        ];
        for input in keep {
            assert_eq!(filtered(input), *input, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn the_serial_writer_filters_only_a_terminal() {
        use std::io::Write;
        let mut on = Filtered::new(Vec::new(), true);
        let mut off = Filtered::new(Vec::new(), false);
        for b in b"x\x1b]52;c;eA==\x07y" {
            on.write_all(&[*b]).unwrap();
            off.write_all(&[*b]).unwrap();
        }
        assert_eq!(on.out, b"xy");
        assert_eq!(off.out, b"x\x1b]52;c;eA==\x07y");
    }

    #[test]
    fn held_bytes_stay_bounded_and_no_number_hides_52() {
        let mut f = TerminalFilter::default();
        let mut input = b"\x1b]".to_vec();
        input.extend(std::iter::repeat_n(b'0', 10_000));
        input.extend(b"52;c;eA==\x07after");
        assert_eq!(f.feed(&input), b"after", "a number too long to judge is removed");
        assert!(f.held.len() <= MAX_HELD + 2, "{}", f.held.len());
        assert_eq!(filtered(b"\x1b]0052;c;eA==\x07x"), b"x", "leading zeros");
        assert_eq!(filtered(b"\x1b]000;title\x07"), b"\x1b]000;title\x07");
        let mut f = TerminalFilter::default();
        let mut dcs = b"\x1bP".to_vec();
        dcs.extend(std::iter::repeat_n(b'x', 1000));
        let out = f.feed(&dcs);
        assert!(f.held.len() <= MAX_HELD + 2);
        assert_eq!(out.len() + f.held.len(), dcs.len(), "a DCS that is not ours passes");
        // A removed sequence that never ends holds nothing.
        let mut f = TerminalFilter::default();
        let mut input = b"\x1b]52;c;".to_vec();
        input.extend(std::iter::repeat_n(b'A', 1 << 20));
        assert!(f.feed(&input).is_empty());
        assert!(f.held.is_empty());
        assert_eq!(f.feed(b"\x07after"), b"after");
        let mut f = TerminalFilter::default();
        assert!(f.feed(b"\x1b]52;c;AAAA").is_empty());
        assert!(f.finish().is_empty(), "an unfinished removed sequence stays removed");
    }

    #[test]
    fn a_removed_string_cut_by_a_new_sequence_lets_that_one_through() {
        assert_eq!(filtered(b"\x1b]52;c;eA==\x1b[31mred"), b"\x1b[31mred");
        assert_eq!(filtered(b"\x1b]0;t\x1b[31mred"), b"\x1b]0;t\x1b\\\x1b[31mred");
        assert_eq!(filtered(b"\x1b]0;t\x1b]52;c;eA==\x07x"), b"\x1b]0;t\x1b\\x");
    }
}
