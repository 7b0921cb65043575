//! Recipe errors that point into the recipe: file, line, column, the offending line with a
//! caret under the value, what is accepted, and the nearest valid key.
//!
//! Every span in a parsed recipe carries the id of the file it came from (recipes extend other
//! recipes), so a message about a value inherited from a base recipe names the base file and
//! says which recipe extended it.

use std::fmt;
use std::path::{Path, PathBuf};

/// Index into [`SourceMap::files`].
pub type FileId = usize;

/// A byte range in one recipe file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Span {
    pub file: FileId,
    pub start: usize,
    pub end: usize,
}

/// One recipe file as read.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// The path as the user would write it (the command-line path, or an extended recipe's
    /// path joined onto the directory of the recipe that names it).
    pub display: PathBuf,
    /// Canonical path: extends cycles are found by it, and relative paths resolve against its
    /// directory.
    pub canonical: PathBuf,
    pub text: String,
    /// The recipe whose `extends` names this one.
    pub extended_by: Option<FileId>,
}

impl SourceFile {
    pub fn dir(&self) -> &Path {
        self.canonical.parent().unwrap_or(Path::new("/"))
    }
}

/// Every recipe file of one load, the leaf recipe first.
#[derive(Debug, Clone, Default)]
pub struct SourceMap {
    pub files: Vec<SourceFile>,
}

/// Where a diagnostic points, resolved to human coordinates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    /// The whole offending line, without its newline.
    pub line_text: String,
    /// Characters to underline from `column` (at least one).
    pub width: usize,
}

/// One problem in a recipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// None only when there is no file to point into.
    pub position: Option<Position>,
    /// Dotted key the problem is about (`image.size`, `files[2].source`), when there is one.
    pub key: Option<String>,
    pub message: String,
    /// What is accepted, or what to do.
    pub help: Option<String>,
    /// Recipes that extend the file the problem is in, nearest first.
    pub extended_by: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("cannot read recipe {}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}", render_all(diagnostics))]
    Invalid { diagnostics: Vec<Diagnostic> },
}

impl RecipeError {
    /// The problems found, empty for a recipe that could not be read at all.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            RecipeError::Read { .. } => &[],
            RecipeError::Invalid { diagnostics } => diagnostics,
        }
    }
}

fn render_all(diags: &[Diagnostic]) -> String {
    let mut out = String::new();
    for (i, d) in diags.iter().enumerate() {
        if i > 0 {
            out.push_str("\n\n");
        }
        out.push_str(&d.to_string());
    }
    if diags.len() > 1 {
        out.push_str(&format!("\n\nthe recipe has {} errors", diags.len()));
    }
    out
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(p) = &self.position else {
            write!(f, "{}", self.message)?;
            if let Some(h) = &self.help {
                write!(f, "\n  = help: {h}")?;
            }
            return Ok(());
        };
        writeln!(f, "{}:{}:{}: {}", p.file.display(), p.line, p.column, self.message)?;
        let gutter = p.line.to_string().len();
        let pad = " ".repeat(gutter);
        writeln!(f, "{pad} |")?;
        writeln!(f, "{} | {}", p.line, p.line_text)?;
        // Tabs before the caret keep their width so the caret lines up in a terminal.
        let lead: String = p.line_text.chars().take(p.column - 1).map(|c| if c == '\t' { '\t' } else { ' ' }).collect();
        write!(f, "{pad} | {lead}{}", "^".repeat(p.width.max(1)))?;
        if let Some(h) = &self.help {
            write!(f, "\n{pad} = help: {h}")?;
        }
        for by in &self.extended_by {
            write!(f, "\n{pad} = note: {} is extended by {}", p.file.display(), by.display())?;
        }
        Ok(())
    }
}

impl SourceMap {
    /// Resolves a span to a position and the chain of recipes extending its file.
    pub fn locate(&self, span: Span) -> (Position, Vec<PathBuf>) {
        let file = &self.files[span.file];
        let text = &file.text;
        let start = floor_char_boundary(text, span.start.min(text.len()));
        let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
        let line_text = text[line_start..line_end].trim_end_matches('\r').to_string();
        let line = text[..line_start].matches('\n').count() + 1;
        let column = text[line_start..start].chars().count() + 1;
        // Underline to the end of the span, or the end of the line for multi-line spans.
        // (`max` last: a span starting on a CRLF line's `\r` lies past the trimmed line.)
        let end = floor_char_boundary(text, span.end.min(line_start + line_text.len()).max(start));
        let width = text[start..end].chars().count().max(1);
        let mut chain = Vec::new();
        let mut by = file.extended_by;
        while let Some(id) = by {
            chain.push(self.files[id].display.clone());
            by = self.files[id].extended_by;
        }
        (Position { file: file.display.clone(), line, column, line_text, width }, chain)
    }

    pub fn diagnostic(&self, span: Span, key: Option<String>, message: String, help: Option<String>) -> Diagnostic {
        let (position, extended_by) = self.locate(span);
        Diagnostic { position: Some(position), key, message, help, extended_by }
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The accepted value nearest to `got`, when one is near enough to be a likely typo.
pub fn nearest<'a>(got: &str, accepted: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    // Jaro-Winkler favours shared prefixes, which is how key typos usually look
    // (`pakages`, `kernel_cmd_line`); 0.8 keeps unrelated words out.
    let got_lower = got.to_ascii_lowercase();
    accepted
        .into_iter()
        .map(|a| (strsim::jaro_winkler(&got_lower, &a.to_ascii_lowercase()), a))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, a)| a)
}

/// "`a`, `b` or `c`".
pub fn list(items: &[&str]) -> String {
    join(items, "or")
}

/// "`a`, `b` and `c`".
pub fn list_and(items: &[&str]) -> String {
    join(items, "and")
}

fn join(items: &[&str], conj: &str) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("`{s}`")).collect();
    match quoted.len() {
        0 => String::new(),
        1 => quoted[0].clone(),
        n => format!("{} {conj} {}", quoted[..n - 1].join(", "), quoted[n - 1]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(text: &str) -> SourceMap {
        let file = |name: &str, by| SourceFile {
            display: name.into(),
            canonical: format!("/r/{name}").into(),
            text: text.into(),
            extended_by: by,
        };
        SourceMap { files: vec![file("child.toml", None), file("base.toml", Some(0))] }
    }

    #[test]
    fn columns_count_characters_and_carets_keep_tabs() {
        let text = "[image]\n\tname = \"été-x\" # é\n";
        let m = map(text);
        let start = text.find("\"été").unwrap();
        let end = start + "\"été-x\"".len();
        let d = m.diagnostic(Span { file: 1, start, end }, Some("image.name".into()), "bad".into(), Some("fix".into()));
        let p = d.position.clone().unwrap();
        assert_eq!((p.line, p.column, p.width), (2, 9, 7));
        assert_eq!(
            d.to_string(),
            "base.toml:2:9: bad\n  |\n2 | \tname = \"été-x\" # é\n  | \t       ^^^^^^^\n  = help: fix\n  = note: base.toml is extended by child.toml"
        );
    }

    #[test]
    fn spans_past_the_end_or_across_lines_stay_on_one_line() {
        let m = map("a = 1\nb = [\n  2,\n]\n");
        let (p, _) = m.locate(Span { file: 0, start: 10, end: 20 });
        assert_eq!((p.line, p.column, p.width, p.line_text.as_str()), (2, 5, 1, "b = ["));
        let (p, _) = m.locate(Span { file: 0, start: 999, end: 999 });
        assert_eq!((p.line, p.width), (5, 1));
        // CRLF: a span on the `\r` itself (an unterminated string at the end of a line).
        let m = map("a = \"x\r\nb = 1\r\n");
        let (p, _) = m.locate(Span { file: 0, start: 6, end: 7 });
        assert_eq!((p.line, p.column, p.width, p.line_text.as_str()), (1, 7, 1, "a = \"x"));
    }

    #[test]
    fn nearest_and_lists() {
        assert_eq!(nearest("pakages", ["image", "packages", "files"]), Some("packages"));
        assert_eq!(nearest("kernel_cmd_line", ["kernel_cmdline", "hostname"]), Some("kernel_cmdline"));
        assert_eq!(nearest("zzz", ["image", "packages"]), None);
        assert_eq!(list(&["a"]), "`a`");
        assert_eq!(list(&["a", "b", "c"]), "`a`, `b` or `c`");
        assert_eq!(list_and(&["a", "b"]), "`a` and `b`");
    }
}
