//! Step 1 of loading: `${VAR}` and `${VAR:-default}` in string values, expanded from the
//! environment before the YAML is parsed into the config, so one file (or one container image)
//! serves many deployments. Only values are expanded, never keys or comments; the YAML parser
//! finds them, and each expanded value is written back as one double-quoted scalar, so a value
//! can never change the document's structure. A value to expand must sit on one line, so lines
//! keep their numbers and later errors still point at the right line.

use saphyr_parser_bw::{Event, Parser, ScalarStyle};

/// One expansion, for `sluice check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expansion {
    pub line: usize,
    pub column: usize,
    /// The value as written, with its `${...}`.
    pub written: String,
    pub expanded: String,
    /// Under a key such as `password`: not to be printed.
    pub secret: bool,
}

/// `source` with every `${...}` in its values expanded by `lookup`, and what was expanded; or
/// why not, with where (`... at line L column C`).
pub fn expand(
    source: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<(String, Vec<Expansion>), String> {
    // Most files use no variables: then the YAML is parsed once, by the config step.
    if !source.contains("${") {
        return Ok((source.to_string(), Vec::new()));
    }
    let mut replacements = Vec::new(); // (byte start, byte end, new text)
    let mut expansions = Vec::new();
    let mut keys = KeyTracker::default();
    for event in Parser::new_from_str(source) {
        // A YAML syntax error is the parser's to report, with the same position, next step.
        let Ok((event, span)) = event else { break };
        let role = keys.role_of(&event);
        let Event::Scalar(value, style, _, _) = &event else {
            continue;
        };
        if role.is_key || !value.contains("${") {
            continue;
        }
        let (line, column) = (span.start.line(), span.start.col() + 1);
        let at = |e: String| format!("{e} at line {line} column {column}");
        let (start, end) = one_line_span(source, span.start.index(), span.end.index(), *style)
            .ok_or_else(|| {
                at(format!(
                    "{value:?}: a value with `${{...}}` must be on one line, not in a `|` or `>` block"
                ))
            })?;
        let expanded = expand_value(value, &lookup).map_err(at)?;
        replacements.push((start, end, quoted(&expanded)));
        let secret = role.under.as_deref().is_some_and(is_secret);
        let written = value.to_string();
        expansions.push(Expansion {
            line,
            column,
            written,
            expanded,
            secret,
        });
    }
    Ok((splice(source, &replacements), expansions))
}

/// The byte range of a scalar as written (the parser's marks are byte offsets), if it is on
/// one line and holds the `${`; `None` for block scalars and values over several lines.
fn one_line_span(
    source: &str,
    start: usize,
    end: usize,
    style: ScalarStyle,
) -> Option<(usize, usize)> {
    if matches!(style, ScalarStyle::Literal | ScalarStyle::Folded) {
        return None;
    }
    let raw = source.get(start..end)?.trim_end();
    (!raw.contains('\n') && raw.contains("${")).then_some((start, start + raw.len()))
}

/// Keys whose values `sluice check` does not print.
fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "token"]
        .iter()
        .any(|s| key.contains(s))
}

/// Follows mappings to tell keys from values: in a mapping, nodes alternate key, value.
#[derive(Default)]
struct KeyTracker {
    /// For each open collection: `Some(next is a key)` for a mapping, `None` for a sequence.
    stack: Vec<Option<bool>>,
    /// The last mapping key seen.
    last_key: Option<String>,
}

/// Where a node stands: a mapping key, or a value (under the last key, if any).
struct NodeRole {
    is_key: bool,
    under: Option<String>,
}

impl KeyTracker {
    /// `event`'s role; updates the state for the node it starts or ends.
    fn role_of(&mut self, event: &Event<'_>) -> NodeRole {
        let is_node = matches!(
            event,
            Event::Scalar(..)
                | Event::Alias(..)
                | Event::MappingStart(..)
                | Event::SequenceStart(..)
        );
        let mut is_key = false;
        if is_node {
            if let Some(Some(next_key)) = self.stack.last_mut() {
                is_key = *next_key;
                *next_key = !*next_key;
            }
        }
        if let (true, Event::Scalar(key, ..)) = (is_key, event) {
            self.last_key = Some(key.to_string());
        }
        match event {
            Event::MappingStart(..) => self.stack.push(Some(true)),
            Event::SequenceStart(..) => self.stack.push(None),
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
        let under = self.last_key.clone();
        NodeRole { is_key, under }
    }
}

/// Expands every `${VAR}` and `${VAR:-default}` in one value. As in the shell, an empty
/// variable takes the default too.
fn expand_value(value: &str, lookup: &impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("{value:?}: `${{` without a closing `}}`"))?;
        let inner = &after[..end];
        if inner.contains("${") {
            return Err(format!(
                "{value:?}: a default cannot hold another `${{...}}`"
            ));
        }
        let (name, default) = match inner.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (inner, None),
        };
        if !is_variable_name(name) {
            return Err(format!(
                "{value:?}: {name:?} is not an environment variable name (letters, digits, `_`)"
            ));
        }
        match (lookup(name).filter(|v| !v.is_empty()), default) {
            (Some(set), _) => out.push_str(&set),
            (None, Some(default)) => out.push_str(default),
            (None, None) => {
                return Err(format!(
                    "environment variable {name} is not set, and `${{{name}}}` has no default \
                     (write `${{{name}:-default}}` for one)"
                ))
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `value` as a double-quoted YAML scalar. Numbers, durations and booleans read from a quoted
/// scalar as from a plain one, and quoting keeps a word like `null` a string.
fn quoted(value: &str) -> String {
    let mut quoted = String::from("\"");
    for c in value.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\n' => quoted.push_str("\\n"),
            '\t' => quoted.push_str("\\t"),
            c if c.is_control() => quoted.push_str(&format!("\\u{:04x}", c as u32)),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

/// `source` with the byte ranges in `replacements` (in document order) replaced.
fn splice(source: &str, replacements: &[(usize, usize, String)]) -> String {
    let mut out = String::with_capacity(source.len());
    let mut copied = 0;
    for (start, end, text) in replacements {
        out.push_str(&source[copied..*start]);
        out.push_str(text);
        copied = *end;
    }
    out.push_str(&source[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "ADDR" => Some("0.0.0.0:50051".into()),
            "PORT" => Some("9901".into()),
            "TRICKY" => Some("a: b # \"c\"".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn values_are_expanded_and_keys_and_comments_are_not() {
        // In a flow collection (`[...]`, `{...}`), braces are syntax: quote the value there.
        let source = "a: ${ADDR}  # ${NOT_SET} in a comment\n${PORT}: x\nb: \"${MISSING:-def}\"\nc: [\"${PORT}\"]\n";
        let (text, done) = expand(source, env).unwrap();
        assert_eq!(
            text,
            "a: \"0.0.0.0:50051\"  # ${NOT_SET} in a comment\n${PORT}: x\nb: \"def\"\nc: [\"9901\"]\n"
        );
        assert_eq!(done.len(), 3);
        assert_eq!((done[0].line, done[0].column), (1, 4));
        assert_eq!(done[0].written, "${ADDR}");
    }

    #[test]
    fn offsets_hold_after_non_ascii_text() {
        let source = "# Zürich — the office\nlisten: ${ADDR}\nnext: 1\n";
        let (text, _) = expand(source, env).unwrap();
        assert_eq!(
            text,
            "# Zürich — the office\nlisten: \"0.0.0.0:50051\"\nnext: 1\n"
        );
    }

    #[test]
    fn a_value_cannot_change_the_structure_and_empty_takes_the_default() {
        let (text, _) = expand("a: ${TRICKY}\nb: ${EMPTY:-x}\n", env).unwrap();
        assert_eq!(text, "a: \"a: b # \\\"c\\\"\"\nb: \"x\"\n");
    }

    #[test]
    fn secrets_are_marked() {
        let (_, done) = expand("etcd:\n  password: ${PORT}\n  username: ${PORT}\n", env).unwrap();
        assert_eq!((done[0].secret, done[1].secret), (true, false));
    }

    #[test]
    fn what_cannot_be_expanded_is_an_error_naming_it_and_where() {
        let error = expand("x:\n  y: pre-${NOPE}\n", env).unwrap_err();
        assert!(error.ends_with(" at line 2 column 6"), "{error}");
        assert!(
            error.contains("environment variable NOPE is not set"),
            "{error}"
        );
        let error = expand("x: ${1BAD}\n", env).unwrap_err();
        assert!(
            error.contains("not an environment variable name"),
            "{error}"
        );
        let error = expand("x: ${OPEN\n", env).unwrap_err();
        assert!(error.contains("without a closing"), "{error}");
        let error = expand("x: ${A:-${B}}\n", env).unwrap_err();
        assert!(error.contains("cannot hold another"), "{error}");
        let error = expand("x: |\n  a ${PORT}\ny: 1\n", env).unwrap_err();
        assert!(error.contains("must be on one line"), "{error}");
        let error = expand("x: \"a\n  ${PORT}\"\n", env).unwrap_err();
        assert!(error.contains("must be on one line"), "{error}");
    }
}
