//! Step 1 of loading: `${VAR}` and `${VAR:-default}` in string values, expanded from the
//! environment before the YAML is parsed into the config, so one file (or one container image)
//! serves many deployments. Only values are expanded, never keys or comments; the YAML parser
//! finds them, and each expanded value is written back as a scalar of its own (quoted when it
//! would not read back as the same plain scalar), so a value can never change the document's
//! structure. Lines keep their numbers, so later errors still point at the right line.

use saphyr_parser_bw::{Event, Parser, ScalarStyle};

/// One expansion, for `sluice check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expansion {
    pub line: usize,
    pub column: usize,
    /// The value as written, with its `${...}`.
    pub written: String,
    pub expanded: String,
}

/// `source` with every `${...}` in its values expanded by `lookup`, and what was expanded; or
/// why not, with where (`... at line L column C`).
pub fn expand(
    source: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<(String, Vec<Expansion>), String> {
    let mut replacements = Vec::new(); // (char start, char end, new text)
    let mut expansions = Vec::new();
    let mut keys = KeyTracker::default();
    for event in Parser::new_from_str(source) {
        // A YAML syntax error is the parser's to report, with the same position, next step.
        let Ok((event, span)) = event else { break };
        let is_key = keys.next_is_key(&event);
        let Event::Scalar(value, style, _, _) = &event else {
            continue;
        };
        if is_key || !value.contains("${") {
            continue;
        }
        let (line, column) = (span.start.line(), span.start.col() + 1);
        let at = |e: String| format!("{e} at line {line} column {column}");
        let expanded = expand_value(value, &lookup).map_err(at)?;
        let text = scalar_text(&expanded, *style);
        replacements.push((span.start.index(), span.end.index(), text));
        expansions.push(Expansion {
            line,
            column,
            written: value.to_string(),
            expanded,
        });
    }
    Ok((splice(source, &replacements), expansions))
}

/// Follows mappings to tell keys from values: in a mapping, nodes alternate key, value.
#[derive(Default)]
struct KeyTracker {
    /// For each open collection: `Some(next is a key)` for a mapping, `None` for a sequence.
    stack: Vec<Option<bool>>,
}

impl KeyTracker {
    /// Whether `event` is a mapping key; updates the state for the node it starts or ends.
    fn next_is_key(&mut self, event: &Event<'_>) -> bool {
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
        match event {
            Event::MappingStart(..) => self.stack.push(Some(true)),
            Event::SequenceStart(..) => self.stack.push(None),
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
        is_key
    }
}

/// Expands every `${VAR}` and `${VAR:-default}` in one value.
fn expand_value(value: &str, lookup: &impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("{:?}: `${{` without a closing `}}`", value))?;
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (inner, None),
        };
        if !is_variable_name(name) {
            return Err(format!(
                "{:?}: {name:?} is not an environment variable name (letters, digits, `_`)",
                value
            ));
        }
        match (lookup(name), default) {
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

/// The YAML text of a scalar holding `value`: plain if the value reads back the same way
/// plain (so `${PORT}` can fill a number), double-quoted otherwise.
fn scalar_text(value: &str, style: ScalarStyle) -> String {
    let plain_safe = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/:@+,=".contains(c))
        && !value.starts_with(['-', ':', ',', '@'])
        && !value.contains(": ")
        && !value.ends_with(':');
    if style == ScalarStyle::Plain && plain_safe {
        return value.to_string();
    }
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

/// `source` with the char ranges in `replacements` (in document order) replaced.
fn splice(source: &str, replacements: &[(usize, usize, String)]) -> String {
    if replacements.is_empty() {
        return source.to_string();
    }
    let byte_at = |char_index: usize| {
        source
            .char_indices()
            .nth(char_index)
            .map_or(source.len(), |(byte, _)| byte)
    };
    let mut out = String::with_capacity(source.len());
    let mut copied = 0;
    for (start, end, text) in replacements {
        let (start, end) = (byte_at(*start), byte_at(*end));
        out.push_str(&source[copied..start]);
        out.push_str(text);
        copied = end;
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
            "a: 0.0.0.0:50051  # ${NOT_SET} in a comment\n${PORT}: x\nb: \"def\"\nc: [\"9901\"]\n"
        );
        assert_eq!(done.len(), 3);
        assert_eq!((done[0].line, done[0].column), (1, 4));
        assert_eq!(done[0].written, "${ADDR}");
    }

    #[test]
    fn a_value_cannot_change_the_structure() {
        let (text, _) = expand("a: ${TRICKY}\nb: 1\n", env).unwrap();
        assert_eq!(text, "a: \"a: b # \\\"c\\\"\"\nb: 1\n");
    }

    #[test]
    fn a_missing_variable_is_an_error_naming_it_and_where() {
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
    }
}
