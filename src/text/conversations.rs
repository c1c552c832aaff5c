//! Conversation datasets for supervised fine-tuning: a JSON array or JSON Lines file whose rows
//! are `{"prompt": ..., "response": ...}` or `{"messages": [{"role": ..., "content": ...}]}`
//! (the chat format transformers and TRL use), or a CSV file with `prompt` and `response`
//! columns. Every error names the file, the row and the field.

use std::path::Path;

use serde_json::Value;

use super::chat::Message;
use super::dataset::{json_array_rows, json_lines_rows, read_dataset, Format, MAX_PROMPT_BYTES};
use crate::{Error, Result};

/// One training conversation: the messages in order. The model learns every assistant turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    /// The turns in order. A loaded conversation has at least one assistant turn, every role
    /// is `system`, `user` or `assistant`, and no content is blank.
    pub messages: Vec<Message>,
}

impl Conversation {
    /// A user prompt and the assistant's reply.
    pub fn pair(prompt: impl Into<String>, response: impl Into<String>) -> Self {
        Conversation {
            messages: vec![Message::user(prompt), Message::assistant(response)],
        }
    }
}

/// The roles a message may have.
const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// Reads the conversations of `path`; the format follows the extension (`.json`, `.jsonl`,
/// `.csv`).
pub fn load_conversations(path: &Path) -> Result<Vec<Conversation>> {
    let (text, format) = read_dataset(path)?;
    let rows = match format {
        Format::Json => parse_json(&text),
        Format::JsonLines => parse_json_lines(&text),
        Format::Csv => parse_csv(&text),
    }
    .map_err(|message| Error::format(path, message))?;
    if rows.is_empty() {
        return Err(Error::format(path, "the dataset holds no conversations"));
    }
    Ok(rows)
}

/// The conversations as JSON Lines that [`load_conversations`] reads back: a user prompt with
/// one reply as `{"prompt": ..., "response": ...}`, any other conversation as
/// `{"messages": [...]}`.
pub fn conversations_jsonl(conversations: &[Conversation]) -> String {
    let mut out = String::new();
    for c in conversations {
        let row = match c.messages.as_slice() {
            [user, reply] if user.role == "user" && reply.role == "assistant" => {
                serde_json::json!({"prompt": user.content, "response": reply.content})
            }
            messages => serde_json::json!({ "messages": messages }),
        };
        out.push_str(&row.to_string());
        out.push('\n');
    }
    out
}

/// Parses a JSON array of conversation rows.
pub fn parse_json(text: &str) -> std::result::Result<Vec<Conversation>, String> {
    json_array_rows(text, "conversations", conversation_of)
}

fn parse_json_lines(text: &str) -> std::result::Result<Vec<Conversation>, String> {
    json_lines_rows(text, conversation_of)
}

fn conversation_of(row: &Value) -> std::result::Result<Conversation, String> {
    let Value::Object(map) = row else {
        return Err(format!("expected an object, found {row}"));
    };
    if let Some(messages) = map.get("messages") {
        return messages_of(messages);
    }
    match (map.get("prompt"), map.get("response")) {
        (Some(prompt), Some(response)) => Ok(Conversation::pair(
            text_field("prompt", prompt)?,
            text_field("response", response)?,
        )),
        _ => Err(format!(
            "expected the fields \"prompt\" and \"response\", or \"messages\" (found: {})",
            map.keys().cloned().collect::<Vec<_>>().join(", ")
        )),
    }
}

fn messages_of(value: &Value) -> std::result::Result<Conversation, String> {
    let Value::Array(list) = value else {
        return Err(format!(
            "field \"messages\": expected a list, found {value}"
        ));
    };
    let messages = list
        .iter()
        .enumerate()
        .map(|(i, m)| message_of(m).map_err(|e| format!("field \"messages\"[{i}]: {e}")))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    if !messages.iter().any(|m| m.role == "assistant") {
        return Err("field \"messages\": no assistant message to learn".into());
    }
    Ok(Conversation { messages })
}

fn message_of(value: &Value) -> std::result::Result<Message, String> {
    let field = |name: &str| {
        value
            .get(name)
            .ok_or_else(|| format!("no \"{name}\""))
            .and_then(|v| text_field(name, v))
    };
    let role = field("role")?;
    if !ROLES.contains(&role.as_str()) {
        return Err(format!(
            "field \"role\": '{role}' is not one of {}",
            ROLES.join(", ")
        ));
    }
    Ok(Message {
        role,
        content: field("content")?,
    })
}

/// A field's text: a string, not blank, and not over [`MAX_PROMPT_BYTES`] (longer is nearly
/// always a broken file, such as a CSV quote left open).
fn text_field(name: &str, value: &Value) -> std::result::Result<String, String> {
    match value.as_str() {
        Some(s) if s.len() > MAX_PROMPT_BYTES => Err(format!(
            "field \"{name}\" is {} bytes long, over the {MAX_PROMPT_BYTES} accepted (a CSV \
             quote left open?)",
            s.len()
        )),
        Some(s) if !s.trim().is_empty() => Ok(s.to_owned()),
        Some(_) => Err(format!("field \"{name}\" is empty")),
        None => Err(format!("field \"{name}\" is not a string: {value}")),
    }
}

fn parse_csv(text: &str) -> std::result::Result<Vec<Conversation>, String> {
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .map_err(|e| format!("cannot read the CSV header: {e}"))?
        .clone();
    let column = |name: &str| {
        headers
            .iter()
            .position(|h| h.trim().eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                format!(
                    "no \"{name}\" column; expected prompt and response (found: {})",
                    headers.iter().collect::<Vec<_>>().join(", ")
                )
            })
    };
    let (prompt, response) = (column("prompt")?, column("response")?);
    reader
        .records()
        .enumerate()
        .map(|(i, record)| {
            // Row numbers count the header as row 1, as a spreadsheet shows them.
            let row = i + 2;
            let record = record.map_err(|e| format!("row {row}: {e}"))?;
            let cell = |index: usize, name: &str| {
                let value = record.get(index).unwrap_or_default();
                text_field(name, &Value::String(value.to_owned()))
                    .map_err(|e| format!("row {row}: {e}"))
            };
            Ok(Conversation::pair(
                cell(prompt, "prompt")?,
                cell(response, "response")?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_and_message_lists_in_json_and_jsonl() {
        let rows = r#"[{"prompt": "hi", "response": "hello"},
            {"messages": [{"role": "system", "content": "be nice"},
                          {"role": "user", "content": "a"},
                          {"role": "assistant", "content": "b"}]}]"#;
        let parsed = parse_json(rows).unwrap();
        assert_eq!(parsed[0], Conversation::pair("hi", "hello"));
        assert_eq!(parsed[1].messages.len(), 3);
        assert_eq!(parsed[1].messages[2].role, "assistant");
        let lines = "{\"prompt\": \"p\", \"response\": \"r\"}\n\n";
        assert_eq!(parse_json_lines(lines).unwrap().len(), 1);
    }

    #[test]
    fn bad_rows_name_the_row_and_the_field() {
        let err = parse_json(r#"[{"prompt": "a", "response": "b"}, {"prompt": "a"}]"#).unwrap_err();
        assert!(
            err.starts_with("row 2:") && err.contains("\"response\""),
            "{err}"
        );
        let err = parse_json(r#"[{"prompt": "a", "response": 3}]"#).unwrap_err();
        assert!(err.contains("field \"response\" is not a string"), "{err}");
        let err = parse_json(
            r#"[{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}]"#,
        )
        .unwrap_err();
        assert!(
            err.contains("messages\"[1]") && err.contains("'bot'"),
            "{err}"
        );
        let err = parse_json(r#"[{"messages": [{"role": "user", "content": "a"}]}]"#).unwrap_err();
        assert!(err.contains("no assistant message"), "{err}");
        let err = parse_json_lines("{\"prompt\": \"a\", \"response\": \"\"}").unwrap_err();
        assert!(
            err.starts_with("line 1") && err.contains("\"response\" is empty"),
            "{err}"
        );
        let long = "x".repeat(MAX_PROMPT_BYTES + 1);
        let err = parse_json(&format!(r#"[{{"prompt": "a", "response": "{long}"}}]"#)).unwrap_err();
        assert!(
            err.starts_with("row 1:") && err.contains("field \"response\" is 1048577 bytes long"),
            "{err}"
        );
    }

    #[test]
    fn jsonl_written_reads_back() {
        let rows = vec![
            Conversation::pair("a \"quoted\"\nline", "b"),
            Conversation {
                messages: vec![
                    Message {
                        role: "system".into(),
                        content: "s".into(),
                    },
                    Message::user("u"),
                    Message::assistant("r"),
                ],
            },
        ];
        let text = conversations_jsonl(&rows);
        assert!(text.starts_with("{\"prompt\":"), "{text}");
        assert_eq!(parse_json_lines(&text).unwrap(), rows);
    }

    #[test]
    fn csv_with_prompt_and_response_columns() {
        let csv = "prompt,response\n\"Hi, you\",Hello\nq,a\n";
        let parsed = parse_csv(csv).unwrap();
        assert_eq!(parsed[0], Conversation::pair("Hi, you", "Hello"));
        let err = parse_csv("prompt,answer\nq,a\n").unwrap_err();
        assert!(
            err.contains("no \"response\" column") && err.contains("answer"),
            "{err}"
        );
        let err = parse_csv("prompt,response\nq,\n").unwrap_err();
        assert!(
            err.starts_with("row 2") && err.contains("\"response\" is empty"),
            "{err}"
        );
    }
}
