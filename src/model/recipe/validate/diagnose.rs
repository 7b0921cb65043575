//! The TOML parser's errors (syntax, unknown keys, wrong types) as diagnostics that name the
//! dotted key, suggest the nearest valid key and say what the value should look like.

use toml::de::{DeTable, DeValue};

use crate::recipe::error::{list, nearest, Diagnostic, SourceMap, Span};

/// Converts a toml deserialization error in file `id` into a diagnostic naming the key.
pub(in crate::recipe) fn toml_diagnostic(sources: &SourceMap, id: usize, e: &toml::de::Error) -> Diagnostic {
    let range = e.span().unwrap_or(0..0);
    let span = Span { file: id, start: range.start, end: range.end };
    let text = &sources.files[id].text;
    let path: Vec<String> = match DeTable::parse(text) {
        Ok(t) => {
            let mut p = Vec::new();
            key_path_at(t.get_ref(), range.start, &mut p);
            p
        }
        // A syntax error: there is no table to find keys in.
        Err(_) => {
            let msg = e.message().trim_end().replace('\n', "; ");
            return sources.diagnostic(
                span,
                None,
                format!("invalid TOML: {msg}"),
                Some("see https://toml.io for the syntax".into()),
            );
        }
    };
    let key = (!path.is_empty()).then(|| path.join("."));
    let msg = e.message();
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        // serde's wording: unknown field `x`, expected one of `a`, `b` (or `a` or `b`).
        let names: Vec<&str> = rest.split('`').skip(2).step_by(2).collect();
        let field = rest.split('`').next().unwrap_or("");
        let (table, where_) = if path.len() > 1 {
            let t = table_name(&path[..path.len() - 1]);
            (t.clone(), format!("in {t}"))
        } else {
            ("the top level".to_string(), "at the top level".to_string())
        };
        let mut help = String::new();
        if let Some(s) = nearest(field, names.iter().copied()) {
            help.push_str(&format!("did you mean `{s}`? "));
        } else if let Some(section) = home_of(field, &table) {
            help.push_str(&format!("`{field}` belongs in {section}. "));
        }
        if names.is_empty() {
            help.push_str("this table takes no keys");
        } else {
            help.push_str(&format!("accepted keys in {table}: {}", list(&names)));
        }
        return sources.diagnostic(span, key, format!("unknown key `{field}` {where_}"), Some(help));
    }
    if let Some(rest) = msg.strip_prefix("invalid type: ") {
        let what = key.as_deref().map(|k| format!("wrong type for `{k}`: ")).unwrap_or_default();
        let rest = toml_words(rest);
        let hint = path.last().and_then(|k| type_hint(k.split('[').next().unwrap_or(k)));
        return sources.diagnostic(span, key, format!("{what}found {rest}"), hint.map(str::to_string));
    }
    let what = key.as_deref().map(|k| format!("`{k}`: ")).unwrap_or_default();
    sources.diagnostic(span, key, format!("{what}{}", msg.trim_end()), None)
}

/// serde's type names in TOML's words (`sequence` is an array, `map` a table, and a struct
/// of this module is a table too).
fn toml_words(serde_msg: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut words = serde_msg.split(' ').peekable();
    while let Some(w) = words.next() {
        let (core, tail) = w.split_at(w.trim_end_matches([',', '.']).len());
        let replaced = match core {
            "struct" if words.peek().is_some_and(|n| n.starts_with("Raw")) => {
                let next = words.next().unwrap_or_default();
                let punct = &next[next.trim_end_matches([',', '.']).len()..];
                out.push(format!("table{punct}"));
                continue;
            }
            "sequence" => "array",
            "map" => "table",
            "i64" => "an integer",
            _ => core,
        };
        out.push(format!("{replaced}{tail}"));
    }
    out.join(" ").replace("a array", "an array").replace("expected table", "expected a table")
}

/// The byte range of whole lines that holds the entry at `offset` (its key or its value): a
/// `key = value` pair with all its lines, or a `[table]` / `[[array]]` header with its body up
/// to the next header. Blanking it lets the parser go on to the next problem with every other
/// position unchanged. None when `text` does not parse as TOML.
pub(in crate::recipe) fn entry_lines(text: &str, offset: usize) -> Option<std::ops::Range<usize>> {
    let table = DeTable::parse(text).ok()?;
    let (start, end, header) = entry_at(text, table.get_ref(), offset)?;
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let mut line_end = text[end..].find('\n').map_or(text.len(), |i| end + i + 1);
    if header {
        // The body runs to the next header line.
        while line_end < text.len() {
            let next = text[line_end..].find('\n').map_or(text.len(), |i| line_end + i + 1);
            if text[line_end..next].trim_start().starts_with('[') {
                break;
            }
            line_end = next;
        }
    }
    Some(line_start..line_end)
}

/// (start, end, is a header table) of the innermost entry holding `offset`. A key written in
/// a `[header]` line names a table (or an array of tables) whose body follows the header.
fn entry_at(text: &str, table: &DeTable<'_>, offset: usize) -> Option<(usize, usize, bool)> {
    for (k, v) in table.iter() {
        match v.get_ref() {
            DeValue::Table(t) => {
                if let Some(found) = entry_at(text, t, offset) {
                    return Some(found);
                }
            }
            DeValue::Array(a) => {
                for item in a.iter() {
                    if let DeValue::Table(t) = item.get_ref() {
                        if let Some(found) = entry_at(text, t, offset) {
                            return Some(found);
                        }
                    }
                }
            }
            _ => {}
        }
        let (ks, vs) = (k.span(), v.span());
        if ks.contains(&offset) || vs.contains(&offset) {
            let line = text[..ks.start].rfind('\n').map_or(0, |i| i + 1);
            if text[line..].trim_start().starts_with('[') {
                return Some((ks.start, ks.end, true));
            }
            return Some((ks.start.min(vs.start), ks.end.max(vs.end), false));
        }
    }
    None
}

/// `[image]`, `[ami.root_volume]`, or `[[files]] entry 2` for `files[1]`.
fn table_name(path: &[String]) -> String {
    let dotted = path.join(".");
    match dotted.rsplit_once('[') {
        Some((array, index)) if dotted.ends_with(']') => {
            let n: usize = index.trim_end_matches(']').parse().unwrap_or(0);
            format!("[[{array}]] entry {}", n + 1)
        }
        _ => format!("[{dotted}]"),
    }
}

/// Where a key belongs when it is written in the wrong table (`name = …` before `[image]`,
/// `extends` under `[image]`): the keys of the sections users most often mix up.
fn home_of(field: &str, current: &str) -> Option<&'static str> {
    let home = match field {
        "extends" => "the top level, before the first [section]",
        "name"
        | "os"
        | "arch"
        | "boot"
        | "size"
        | "base"
        | "mirror"
        | "snapshot"
        | "components"
        | "apt_mirror"
        | "apt_security_mirror"
        | "source_date_epoch" => "[image]",
        "include" | "exclude" | "local" => "[packages]",
        "path" | "content" | "source" | "symlink" | "dir" | "mode" | "owner" => "a [[files]] entry",
        "hostname" | "services" | "kernel_cmdline" | "timezone" | "locale" | "network" | "mount_esp" => "[system]",
        "regions" | "root_volume" | "ena" | "tpm" | "imds" | "boot_mode" | "launch_permissions" | "tags" => "[ami]",
        "pk" | "kek" | "db" | "dbx" => "[secure_boot]",
        _ => return None,
    };
    (!home.contains(current)).then_some(home)
}

/// What a key's value should look like, for wrong-type errors.
fn type_hint(key: &str) -> Option<&'static str> {
    Some(match key {
        "size" => "sizes are strings with a unit, like \"2GiB\" or \"512MiB\", or \"auto\"",
        "mode" => "write the mode as an octal string, like \"0644\" (a TOML integer cannot tell 644 from 0o644)",
        "owner" => "write the owner as \"user:group\", like \"root:root\" or \"0:0\"",
        "include" | "exclude" | "enable" | "disable" | "kernel_cmdline" | "regions" | "accounts" | "commands"
        | "allow" | "local" | "suites" | "groups" | "authorized_keys" | "kek" | "db" => {
            "this is a list of strings, like [\"a\", \"b\"]"
        }
        "repositories" => "repositories are an array of tables: write each as a [[repositories]] section",
        "users" => "users are an array of tables: write each as a [[users]] section",
        "steps" => "steps are an array of tables: write each as a [[steps]] section",
        "uid" => "a user id, as an integer like 1500",
        "files" => "files are an array of tables: write each entry as a [[files]] section",
        "volumes" => "volumes are an array of tables: write each as an [[ami.volumes]] section",
        "account" => "write the account id as a string of 12 digits, like \"123456789012\" (ids may start with 0)",
        "source_date_epoch" => "seconds since 1970-01-01 UTC, as an integer",
        "extends" => "the path of one recipe, relative to this one, like \"base.toml\"",
        "image" | "packages" | "system" | "ami" | "bundle" | "test" | "audit" | "secure_boot" => {
            "this is a table: write it as a [section] header (not [[section]]) with keys under it"
        }
        "services" => "`services` is a table: write `services.enable = [\"ssh\"]` (and `services.disable`)",
        "root_volume" => "`root_volume` is a table, like { size = \"8GiB\", type = \"gp3\" }",
        "launch_permissions" => {
            "`launch_permissions` is a table, like { accounts = [\"123456789012\"], public = false }"
        }
        "base" => "`base` is a table, like { tarball = \"rootfs.tar\" }",
        "tags" => "`tags` is a table of strings, like { team = \"platform\" }",
        _ => return None,
    })
}

/// Finds the dotted key whose key or value contains `offset`.
fn key_path_at(table: &DeTable<'_>, offset: usize, path: &mut Vec<String>) -> bool {
    for (k, v) in table.iter() {
        let name = k.get_ref().to_string();
        if k.span().contains(&offset) {
            path.push(name);
            return true;
        }
        match v.get_ref() {
            DeValue::Table(t) => {
                path.push(name.clone());
                if key_path_at(t, offset, path) {
                    return true;
                }
                path.pop();
            }
            DeValue::Array(a) => {
                for (i, item) in a.iter().enumerate() {
                    path.push(format!("{name}[{i}]"));
                    if let DeValue::Table(t) = item.get_ref() {
                        if key_path_at(t, offset, path) {
                            return true;
                        }
                    }
                    if item.span().contains(&offset) {
                        return true;
                    }
                    path.pop();
                }
            }
            _ => {}
        }
        if v.span().contains(&offset) {
            path.push(name);
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names() {
        assert_eq!(table_name(&["image".into()]), "[image]");
        assert_eq!(table_name(&["ami".into(), "root_volume".into()]), "[ami.root_volume]");
        assert_eq!(table_name(&["files[1]".into()]), "[[files]] entry 2");
        assert_eq!(table_name(&["ami".into(), "volumes[0]".into()]), "[[ami.volumes]] entry 1");
        assert_eq!(home_of("extends", "[image]"), Some("the top level, before the first [section]"));
        assert_eq!(home_of("hostname", "the top level"), Some("[system]"));
        assert_eq!(home_of("name", "[image]"), None);
    }

    #[test]
    fn serde_words_become_toml_words() {
        assert_eq!(toml_words("string \"x\", expected struct RawImage"), "string \"x\", expected a table");
        assert_eq!(toml_words("sequence, expected a string"), "array, expected a string");
        assert_eq!(toml_words("string \"1\", expected i64"), "string \"1\", expected an integer");
        assert_eq!(toml_words("map, expected a sequence"), "table, expected an array");
    }
}
