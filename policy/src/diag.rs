//! Diagnostics: stable codes, positions, compiler-style rendering and a JSON form.

use std::fmt;

use serde::{Serialize, Serializer};

/// Whether a diagnostic stops the policy from loading.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The policy is rejected (the agent keeps the policy it runs with).
    Error,
    /// The policy loads; the admin should look.
    Warning,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        })
    }
}

macro_rules! codes {
    ($($(#[$doc:meta])* $variant:ident = ($id:literal, $name:literal, $sev:ident),)*) => {
        /// Stable diagnostic codes. The id (`E0003`) and the name (`relative-path`) never change
        /// meaning; new codes are only ever appended.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Code {
            $($(#[$doc])* $variant,)*
        }

        impl Code {
            /// Every code, in id order.
            pub const ALL: &'static [Code] = &[$(Code::$variant,)*];

            /// `E0003`, `W0001`, ...
            pub const fn id(self) -> &'static str {
                match self { $(Code::$variant => $id,)* }
            }

            /// `relative-path`, `path-missing`, ...
            pub const fn name(self) -> &'static str {
                match self { $(Code::$variant => $name,)* }
            }

            /// Errors reject the policy; warnings do not.
            pub const fn severity(self) -> Severity {
                match self { $(Code::$variant => Severity::$sev,)* }
            }
        }
    };
}

codes! {
    /// A key the format does not know (often a typo).
    UnknownKey = ("E0001", "unknown-key", Error),
    /// A value of the wrong TOML type (a string where a number goes, ...).
    WrongType = ("E0002", "wrong-type", Error),
    /// A path that does not start with `/`.
    RelativePath = ("E0003", "relative-path", Error),
    /// A duration that is not an integer followed by `ms`, `s`, `m` or `h`, or is zero.
    BadDuration = ("E0004", "bad-duration", Error),
    /// A target that is also a protected root or a data directory.
    TargetConflict = ("E0005", "target-conflict", Error),
    /// A rule, exemption or exception that can never match a process.
    MatchesNothing = ("E0006", "matches-nothing", Error),
    /// The file is not valid TOML.
    TomlSyntax = ("E0007", "toml-syntax", Error),
    /// A value outside its documented set (`action = "stop"`).
    BadEnumValue = ("E0008", "bad-enum-value", Error),
    /// A budget below 0 or above the maximum.
    BudgetOutOfRange = ("E0009", "budget-out-of-range", Error),
    /// More job rules than the kernel tables have bits for.
    TooManyRules = ("E0010", "too-many-rules", Error),
    /// A glob other than `*` as a whole path component, or a glob where none is allowed.
    BadGlob = ("E0011", "bad-glob", Error),
    /// The same name, or the same process identity, declared twice where only one can win.
    Duplicate = ("E0012", "duplicate", Error),
    /// A required key is absent.
    MissingKey = ("E0013", "missing-key", Error),
    /// A malformed address or URL in `[alerts]`.
    BadAddress = ("E0014", "bad-address", Error),
    /// A policy file could not be read.
    ReadError = ("E0015", "read-error", Error),
    /// A path with `.`, `..` or NUL in it, or empty.
    BadPath = ("E0016", "bad-path", Error),
    /// Another malformed value (e.g. a syslog app name with spaces).
    BadValue = ("E0017", "bad-value", Error),
    /// A target that is `/` or holds a protected root or a data directory.
    TargetTooWide = ("E0018", "target-too-wide", Error),
    /// A duration above its documented maximum.
    DurationTooLong = ("E0019", "duration-too-long", Error),
    /// A declared path (or glob) that does not exist on this host.
    PathMissing = ("W0001", "path-missing", Warning),
    /// A protected root below a target. No longer emitted: that is E0018 since targets may not
    /// hold protected roots; the code keeps its meaning for old reports.
    ProtectedInTarget = ("W0002", "protected-in-target", Warning),
    /// Every budget is 0: no job may delete anything outside its targets.
    NoDeletionBudget = ("W0003", "no-deletion-budget", Warning),
    /// An exemption that covers arbitrary commands (root, the root cgroup, a shell, ...).
    ExemptionTooWide = ("W0004", "exemption-too-wide", Warning),
    /// A metrics listener on a non-loopback address.
    NotLoopback = ("W0005", "not-loopback", Warning),
    /// A user name this host does not know.
    UnknownUser = ("W0006", "unknown-user", Warning),
    /// `/` is not among the protected roots.
    RootUnprotected = ("W0007", "root-unprotected", Warning),
    /// A declared path, or a glob match, left out because a user could have redirected it: a
    /// symlink root does not control, or a glob match owned by someone other than root or the
    /// matched user; or a glob match that is `/` or holds a protected root or data directory.
    UnsafePath = ("W0008", "unsafe-path", Warning),
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

impl Serialize for Code {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.id())
    }
}

/// One finding about a policy file, positioned at the offending key or value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// Stable code (`E0003`); serialized as the id string.
    pub code: Code,
    /// Stable name of the code (`relative-path`).
    pub name: &'static str,
    pub severity: Severity,
    /// The file as it was named to the checker.
    pub file: String,
    /// 1-based line of the offending text.
    pub line: usize,
    /// 1-based column (in characters) of the offending text.
    pub column: usize,
    /// The offending text as written (a key, a value with its quotes, ...); may be empty.
    pub text: String,
    pub message: String,
    pub hint: String,
    /// The whole source line, for rendering.
    #[serde(skip)]
    pub source_line: String,
    /// Length of the underline on `source_line`, in characters.
    #[serde(skip)]
    pub underline: usize,
}

impl Diagnostic {
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}[{}]: {}", self.severity, self.code, self.message)?;
        let num = self.line.to_string();
        let w = num.len();
        writeln!(
            f,
            "{}--> {}:{}:{}",
            " ".repeat(w + 1),
            self.file,
            self.line,
            self.column
        )?;
        if !self.source_line.is_empty() || self.line > 0 {
            writeln!(f, "{}|", " ".repeat(w + 2))?;
            writeln!(f, " {num} | {}", self.source_line)?;
            writeln!(
                f,
                "{}| {}{}",
                " ".repeat(w + 2),
                " ".repeat(self.column.saturating_sub(1)),
                "^".repeat(self.underline.max(1))
            )?;
        }
        write!(f, "{}= hint: {}", " ".repeat(w + 2), self.hint)
    }
}

/// The files of one check, laid end to end in one offset space so a span alone says which file
/// it is in.
#[derive(Clone, Debug, Default)]
pub(crate) struct SourceMap {
    files: Vec<SourceFile>,
    next_base: usize,
}

#[derive(Clone, Debug)]
struct SourceFile {
    name: String,
    text: String,
    base: usize,
}

impl SourceMap {
    /// Adds a file and returns its base offset.
    pub(crate) fn add(&mut self, name: &str, text: &str) -> usize {
        let base = self.next_base;
        // One byte of gap so an empty span at the end of a file still belongs to it.
        self.next_base += text.len() + 1;
        self.files.push(SourceFile {
            name: name.to_string(),
            text: text.to_string(),
            base,
        });
        base
    }

    pub(crate) fn file_index(&self, offset: usize) -> usize {
        self.files
            .iter()
            .rposition(|f| f.base <= offset)
            .unwrap_or(0)
    }

    /// The text a global span covers.
    pub(crate) fn slice(&self, span: &std::ops::Range<usize>) -> &str {
        let Some(file) = self.files.get(self.file_index(span.start)) else {
            return "";
        };
        let start = span.start.saturating_sub(file.base).min(file.text.len());
        let end = span
            .end
            .saturating_sub(file.base)
            .clamp(start, file.text.len());
        file.text.get(start..end).unwrap_or("")
    }

    pub(crate) fn diagnostic(
        &self,
        code: Code,
        span: &std::ops::Range<usize>,
        message: String,
        hint: String,
    ) -> Diagnostic {
        let (file_name, line, column, source_line, underline, text) =
            match self.files.get(self.file_index(span.start)) {
                None => (
                    "<policy>".to_string(),
                    1,
                    1,
                    String::new(),
                    1,
                    String::new(),
                ),
                Some(file) => {
                    let start = span.start.saturating_sub(file.base).min(file.text.len());
                    let end = span
                        .end
                        .saturating_sub(file.base)
                        .clamp(start, file.text.len());
                    let start = floor_char(&file.text, start);
                    let end = floor_char(&file.text, end);
                    let before = &file.text[..start];
                    let line = before.matches('\n').count() + 1;
                    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
                    let line_end = file.text[start..]
                        .find('\n')
                        .map(|i| start + i)
                        .unwrap_or(file.text.len());
                    let column = file.text[line_start..start].chars().count() + 1;
                    let source_line = file.text[line_start..line_end].trim_end_matches('\r');
                    let text = &file.text[start..end];
                    let underline = file.text[start..end.min(line_end)].chars().count();
                    (
                        file.name.clone(),
                        line,
                        column,
                        source_line.to_string(),
                        underline,
                        text.to_string(),
                    )
                }
            };
        Diagnostic {
            code,
            name: code.name(),
            severity: code.severity(),
            file: file_name,
            line,
            column,
            text,
            message,
            hint,
            source_line,
            underline,
        }
    }
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Collects diagnostics against a source map.
pub(crate) struct Sink<'a> {
    pub(crate) map: &'a SourceMap,
    pub(crate) out: Vec<Diagnostic>,
}

impl<'a> Sink<'a> {
    pub(crate) fn new(map: &'a SourceMap) -> Self {
        Sink {
            map,
            out: Vec::new(),
        }
    }

    pub(crate) fn push(
        &mut self,
        code: Code,
        span: &std::ops::Range<usize>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) {
        let d = self.map.diagnostic(code, span, message.into(), hint.into());
        self.out.push(d);
    }

    pub(crate) fn has_errors(&self) -> bool {
        self.out.iter().any(Diagnostic::is_error)
    }
}
