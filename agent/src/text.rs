//! Text the agent did not write (command lines, file names, process and unit names, an SSH
//! client address from a job's environment) on its way to a sink people read: a terminal, the
//! journal, a syslog line, an Alertmanager annotation. Every such sink goes through here.
//!
//! Escaping, not removal: an admin must still see that a command contained an escape sequence
//! or a right-to-left override, and the visible form (`\x1b`, `\u{202e}`) says exactly what it
//! was. A backslash is left as it is, so escaping twice changes nothing (a summary built from
//! escaped fields can be escaped again as a whole) and ordinary commands read unchanged.
use std::fmt::Write as _;

/// Commands in summaries, syslog lines and annotations: enough to recognise the job; the event
/// log keeps the whole command line.
pub const COMMAND_MAX: usize = 512;
/// Reasons name a path (a protected root, a data directory) that a job chose.
pub const REASON_MAX: usize = 1024;

/// Whether `c` must never reach a human-readable sink raw: C0 controls (a newline would forge a
/// second journal entry or syslog line, ESC starts terminal sequences), DEL, C1 controls (CSI
/// and OSC on terminals that honour 8-bit controls), and the bidirectional and zero-width
/// format characters that make text read differently from what it is (CVE-2021-42574).
pub fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{2069}'
                | '\u{feff}'
        )
}

/// One line: every unsafe character written as a visible escape.
pub fn escape_line(s: &str) -> String {
    if !s.chars().any(is_unsafe) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x80 && is_unsafe(c) => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if is_unsafe(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// `s` escaped and cut to at most `max` bytes (on a character boundary, never inside an escape),
/// then `…` and the original length: `rm -rf /srv/a /srv/b … (104857 bytes)`.
pub fn cap(s: &str, max: usize) -> String {
    let escaped = escape_line(s);
    if escaped.len() <= max {
        return escaped;
    }
    let mut end = 0;
    let mut chars = s.chars();
    let mut out = String::with_capacity(max + 24);
    // Walk the original, so an escape is either whole or left out.
    for c in chars.by_ref() {
        let piece = escape_line(c.encode_utf8(&mut [0; 4]));
        if end + piece.len() > max {
            break;
        }
        end += piece.len();
        out.push_str(&piece);
    }
    let _ = write!(out, "… ({} bytes)", s.len());
    out
}

/// A command line for a summary, a syslog line or an annotation.
pub fn cap_command(cmd: &str) -> String {
    cap(cmd, COMMAND_MAX)
}

/// Strategies for the property tests of every formatter.
#[cfg(test)]
pub(crate) mod strategies {
    use proptest::prelude::*;

    /// `n` cases by default (fast in CI); `PROPTEST_CASES=100000` for a long run.
    pub(crate) fn config(n: u32) -> ProptestConfig {
        let cases = std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(n);
        ProptestConfig::with_cases(cases)
    }

    /// Text a job controls: arbitrary strings mixed with terminal escapes (erase line, OSC 52
    /// clipboard write), C1 CSI, bidi overrides, line breaks, syslog/SD/JSON metacharacters;
    /// one case in five repeated to a 100 KB command line.
    pub(crate) fn hostile() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            3 => any::<String>(),
            1 => Just("\x1b[2K\r".to_string()),
            1 => Just("\x1b]52;c;aGVsbG8=\x07".to_string()),
            1 => Just("\u{202e}\u{2066}\u{200f}\u{61c}".to_string()),
            1 => Just("\n<13>1 forged - - - - -\n".to_string()),
            1 => Just("\u{9b}31m\u{85}\u{7f}\0".to_string()),
            1 => Just("\"]\\ }{\"".to_string()),
            1 => Just("données ✓".to_string()),
        ];
        (
            proptest::collection::vec(piece, 0..6),
            prop_oneof![4 => Just(false), 1 => Just(true)],
        )
            .prop_map(|(v, big)| {
                let s = v.concat();
                if big {
                    let s = if s.is_empty() {
                        "rm -rf /x/ ".to_string()
                    } else {
                        s
                    };
                    s.repeat(100_000 / s.len() + 1)
                } else {
                    s
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn escapes_are_visible_and_exact() {
        assert_eq!(escape_line("a\nb"), "a\\nb");
        assert_eq!(escape_line("\x1b[2K\x07"), "\\x1b[2K\\x07");
        assert_eq!(escape_line("x\u{202e}y\u{2066}"), "x\\u{202e}y\\u{2066}");
        assert_eq!(escape_line("\u{9b}\u{7f}"), "\\u{9b}\\x7f");
        assert_eq!(escape_line("rm -rf ./données"), "rm -rf ./données");
    }

    #[test]
    fn long_commands_are_cut_with_their_length() {
        let cmd = format!("rm -rf {}", "/srv/x/f".repeat(13_000));
        let c = cap_command(&cmd);
        assert!(c.len() <= COMMAND_MAX + 24, "{}", c.len());
        assert!(c.ends_with(&format!("… ({} bytes)", cmd.len())), "{c}");
        assert!(c.starts_with("rm -rf /srv/x/f"));
        assert_eq!(cap_command("ls"), "ls");
    }

    proptest! {
        #![proptest_config(strategies::config(256))]

        #[test]
        fn escaped_lines_hold_no_unsafe_char(s in strategies::hostile()) {
            let e = escape_line(&s);
            prop_assert!(!e.chars().any(is_unsafe), "{:?}", e);
            prop_assert_eq!(escape_line(&e), e.clone(), "escaping twice changes nothing");
        }

        #[test]
        fn capped_text_is_bounded_and_safe(s in ".{0,2000}", max in 0usize..700) {
            let c = cap(&s, max);
            prop_assert!(c.len() <= max + "… ( bytes)".len() + 20, "{} > {}", c.len(), max);
            prop_assert!(!c.chars().any(is_unsafe));
        }
    }
}
