//! Prompt datasets: a JSON array, JSON Lines or CSV file whose rows carry the prompt in a field
//! named `instruction`, `prompt`, `goal`, `behavior` or `text` (or a JSON array of strings).

use std::path::Path;

use serde_json::Value;

use crate::{Error, Result};

/// Field names that hold the prompt, in the order they are tried.
pub const PROMPT_FIELDS: [&str; 5] = ["instruction", "prompt", "goal", "behavior", "text"];

/// The longest prompt accepted, in bytes of text. Training keeps a prompt's last `--max-len`
/// tokens, so a longer one would only cost time and memory to tokenise (a 10 MB prompt takes
/// some 20 s and 2 GB); one this long is nearly always a broken file, such as a CSV quote
/// left open that swallows the rest of the file.
pub const MAX_PROMPT_BYTES: usize = 1 << 20;

/// Reads the prompts of `path`; the format follows the extension (`.json`, `.jsonl`, `.csv`).
pub fn load_prompts(path: &Path) -> Result<Vec<String>> {
    let (text, format) = read_dataset(path)?;
    let prompts = match format {
        Format::Json => parse_json_array(&text),
        Format::JsonLines => parse_json_lines(&text),
        Format::Csv => parse_csv(&text),
    }
    .map_err(|message| Error::format(path, message))?;
    if prompts.is_empty() {
        return Err(Error::format(path, "the dataset holds no prompts"));
    }
    Ok(prompts)
}

/// How a dataset file is written, told by its extension.
pub(crate) enum Format {
    /// `.json`: one array of rows.
    Json,
    /// `.jsonl` or `.ndjson`: one row per line.
    JsonLines,
    /// `.csv`, with a header row.
    Csv,
}

/// The text of dataset file `path` and its format, or an error naming the file: one that
/// cannot be read, is not UTF-8 (where it stops being so), or has an unknown extension.
pub(crate) fn read_dataset(path: &Path) -> Result<(String, Format)> {
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let format = match extension.as_str() {
        "json" => Format::Json,
        "jsonl" | "ndjson" => Format::JsonLines,
        "csv" => Format::Csv,
        other => {
            return Err(Error::format(
                path,
                format!(
                    "unknown dataset format '.{other}': expected .json (an array), .jsonl or .csv"
                ),
            ))
        }
    };
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = utf8(bytes).map_err(|message| Error::format(path, message))?;
    Ok((text, format))
}

/// The file's text, or where it stops being UTF-8.
fn utf8(bytes: Vec<u8>) -> std::result::Result<String, String> {
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let bytes = e.as_bytes();
        let line = 1 + bytes[..at].iter().filter(|&&b| b == b'\n').count();
        format!(
            "not UTF-8 text: byte {at} (line {line}) is 0x{:02X}; save the file as UTF-8",
            bytes[at]
        )
    })
}

/// Parses prompts from in-memory JSON-array text (for datasets embedded in the binary).
pub fn parse_json_array(text: &str) -> std::result::Result<Vec<String>, String> {
    json_array_rows(text, "prompts", prompt_of)
}

fn parse_json_lines(text: &str) -> std::result::Result<Vec<String>, String> {
    json_lines_rows(text, prompt_of)
}

/// The rows of a JSON array of `what`, each read by `row_of`; an error names the row.
pub(crate) fn json_array_rows<T>(
    text: &str,
    what: &str,
    row_of: impl Fn(&Value) -> std::result::Result<T, String>,
) -> std::result::Result<Vec<T>, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let Value::Array(rows) = value else {
        return Err(format!("expected a JSON array of {what}"));
    };
    rows.iter()
        .enumerate()
        .map(|(i, row)| row_of(row).map_err(|e| format!("row {}: {e}", i + 1)))
        .collect()
}

/// The rows of JSON Lines text (blank lines skipped), each read by `row_of`; an error names
/// the line.
pub(crate) fn json_lines_rows<T>(
    text: &str,
    row_of: impl Fn(&Value) -> std::result::Result<T, String>,
) -> std::result::Result<Vec<T>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            let row: Value = serde_json::from_str(line)
                .map_err(|e| format!("line {}: not valid JSON: {e}", i + 1))?;
            row_of(&row).map_err(|e| format!("line {}: {e}", i + 1))
        })
        .collect()
}

fn prompt_of(row: &Value) -> std::result::Result<String, String> {
    let text = match row {
        Value::String(s) => s.clone(),
        Value::Object(map) => {
            let field = PROMPT_FIELDS
                .iter()
                .find_map(|f| map.get(*f))
                .ok_or_else(|| {
                    format!(
                        "no prompt field; expected one of {} (found: {})",
                        PROMPT_FIELDS.join(", "),
                        map.keys().cloned().collect::<Vec<_>>().join(", ")
                    )
                })?;
            field
                .as_str()
                .ok_or_else(|| format!("the prompt field is not a string: {field}"))?
                .to_owned()
        }
        other => return Err(format!("expected a string or an object, found {other}")),
    };
    non_empty(text)
}

/// A usable prompt: not blank, not over [`MAX_PROMPT_BYTES`].
fn non_empty(text: String) -> std::result::Result<String, String> {
    if text.trim().is_empty() {
        return Err("the prompt is empty".into());
    }
    if text.len() > MAX_PROMPT_BYTES {
        return Err(format!(
            "the prompt is {} bytes long, over the {MAX_PROMPT_BYTES} accepted (a CSV quote \
             left open?); training keeps only a prompt's last --max-len tokens anyway",
            text.len()
        ));
    }
    Ok(text)
}

fn parse_csv(text: &str) -> std::result::Result<Vec<String>, String> {
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .map_err(|e| format!("cannot read the CSV header: {e}"))?
        .clone();
    let column = PROMPT_FIELDS
        .iter()
        .find_map(|f| {
            headers
                .iter()
                .position(|h| h.trim().eq_ignore_ascii_case(f))
        })
        .ok_or_else(|| {
            format!(
                "no prompt column; expected one of {} (found: {})",
                PROMPT_FIELDS.join(", "),
                headers.iter().collect::<Vec<_>>().join(", ")
            )
        })?;
    reader
        .records()
        .enumerate()
        .map(|(i, record)| {
            // Row numbers count the header as row 1, as a spreadsheet shows them.
            let record = record.map_err(|e| format!("row {}: {e}", i + 2))?;
            let cell = record
                .get(column)
                .ok_or_else(|| format!("row {}: the prompt column is missing", i + 2))?;
            non_empty(cell.to_owned()).map_err(|e| format!("row {}: {e}", i + 2))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_arrays_of_strings_and_objects() {
        assert_eq!(parse_json_array(r#"["a", "b"]"#).unwrap(), vec!["a", "b"]);
        let rows = r#"[{"instruction": "x", "category": null}, {"goal": "y"}]"#;
        assert_eq!(parse_json_array(rows).unwrap(), vec!["x", "y"]);
        let err = parse_json_array(r#"[{"instruction": "x"}, {"question": "y"}]"#).unwrap_err();
        assert!(
            err.starts_with("row 2: no prompt field") && err.contains("question"),
            "{err}"
        );
        assert!(parse_json_array(r#"{"a": 1}"#)
            .unwrap_err()
            .contains("expected a JSON array"));
        assert!(parse_json_array(r#"["ok", "  "]"#)
            .unwrap_err()
            .contains("row 2: the prompt is empty"));
    }

    #[test]
    fn json_lines_and_csv() {
        let lines = "{\"prompt\": \"p1\"}\n\n\"p2\"\n";
        assert_eq!(parse_json_lines(lines).unwrap(), vec!["p1", "p2"]);
        assert!(parse_json_lines("{\"prompt\": 1}\n{")
            .unwrap_err()
            .starts_with("line 1"));
        let csv = "goal,target\n\"Write, then stop\",Sure\nsecond,x\n";
        assert_eq!(parse_csv(csv).unwrap(), vec!["Write, then stop", "second"]);
        assert!(parse_csv("a,b\n1,2\n")
            .unwrap_err()
            .contains("no prompt column"));
        assert!(parse_csv("goal\n\"\"\n").unwrap_err().contains("row 2"));
    }
}
