//! Text for people: an error as its chain of causes, each said once, with anything an input
//! put there (a file's bytes in a parser's message) escaped and cut short.

use std::error::Error;

/// The longest line a message keeps; the rest is cut with an ellipsis.
pub const MAX_LINE_CHARS: usize = 400;

/// `outer: cause: root cause`, leaving out a cause whose text an outer message already holds
/// (errors that quote their source and also return it from `source()`), escaped.
pub fn render<'a>(chain: impl IntoIterator<Item = &'a (dyn Error + 'static)>) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in chain {
        let text = cause.to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(text.as_str())) {
            parts.push(text);
        }
    }
    escape(&parts.join(": "))
}

/// [`render`] over an error and its `source()` chain.
pub fn render_error(err: &(dyn Error + 'static)) -> String {
    render(chain(err))
}

/// An error and its causes, outermost first.
pub fn chain<'a>(err: &'a (dyn Error + 'static)) -> Vec<&'a (dyn Error + 'static)> {
    let mut out = Vec::new();
    let mut cur = Some(err);
    while let Some(e) = cur {
        out.push(e);
        cur = e.source();
    }
    out
}

/// Control characters (but newline and tab) as `\xNN` or `\u{N}`, each line cut to
/// [`MAX_LINE_CHARS`]: a message never moves the cursor, rings the bell or floods the terminal.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let mut width = 0;
        for c in line.chars() {
            if width >= MAX_LINE_CHARS {
                out.push('…');
                break;
            }
            let start = out.len();
            match c {
                '\t' => out.push('\t'),
                c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
                c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
                c => out.push(c),
            }
            width += out[start..].chars().count();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct E(String, Option<Box<E>>);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl Error for E {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|e| e as &(dyn Error + 'static))
        }
    }

    #[test]
    fn each_cause_once_in_order() {
        let root = E("No such file or directory (os error 2)".into(), None);
        let lib = E(format!("cannot read recipe /x.toml: {root}"), Some(Box::new(root)));
        let top = E("building /x.toml".into(), Some(Box::new(lib)));
        assert_eq!(
            render(chain(&top)),
            "building /x.toml: cannot read recipe /x.toml: No such file or directory (os error 2)"
        );
        let plain = E("a".into(), Some(Box::new(E("b".into(), None))));
        assert_eq!(render(chain(&plain)), "a: b");
    }

    #[test]
    fn control_bytes_escaped_and_long_lines_cut() {
        let raw = String::from_utf8_lossy(b"cksum for \x7fELF\x02\x01\x01\x1b[2J\x07 done").into_owned();
        let e = escape(&raw);
        assert_eq!(e, "cksum for \\x7fELF\\x02\\x01\\x01\\x1b[2J\\x07 done");
        assert_eq!(escape("two\nlines\tkept"), "two\nlines\tkept");
        assert_eq!(escape("\u{85}"), "\\u{85}");
        let long = escape(&"x".repeat(10_000));
        assert_eq!(long.chars().count(), MAX_LINE_CHARS + 1);
        assert!(long.ends_with('…'));
    }
}
