//! Prompt files a user may get wrong: each is refused with an error that names the file and
//! what is wrong (and where), or, for prompts longer than `--max-len`, truncated as
//! documented.

use std::path::{Path, PathBuf};

use es2_wgpu::es2::data::tokenize_prompts;
use es2_wgpu::es2::{TrainConfig, Trainer};
use es2_wgpu::model::open_model;
use es2_wgpu::testing::gpu;
use es2_wgpu::text::dataset::{MAX_PROMPT_BYTES, PROMPT_FIELDS};
use es2_wgpu::text::load_prompts;

use super::run::Messages;

/// A scratch folder of dataset files, removed when dropped.
pub(crate) struct Files(pub PathBuf);

impl Files {
    pub(crate) fn new(tag: &str) -> Files {
        let dir = std::env::temp_dir().join(format!("es2-data-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Files(dir)
    }

    pub(crate) fn write(&self, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The error reading `path` gives; it must name the file and each of `parts`.
fn assert_refused(path: &Path, parts: &[&str]) {
    let err = load_prompts(path).unwrap_err().to_string();
    assert!(
        err.contains(&*path.to_string_lossy()),
        "no file name: {err}"
    );
    for part in parts {
        assert!(err.contains(part), "error does not mention {part:?}: {err}");
    }
}

#[test]
fn empty_datasets_are_refused() {
    let files = Files::new("empty");
    for (name, text) in [
        ("empty.json", ""),
        ("none.json", "[]"),
        ("blank.jsonl", "\n\n  \n"),
        ("header-only.csv", "goal,target\n"),
    ] {
        let path = files.write(name, text);
        let want = if text.is_empty() {
            "not valid JSON"
        } else {
            "holds no prompts"
        };
        assert_refused(&path, &[want]);
    }
    let path = files.write("empty.csv", "");
    assert_refused(&path, &["no prompt column", PROMPT_FIELDS[0]]);
}

#[test]
fn wrong_fields_name_the_row_the_fields_found_and_those_accepted() {
    let files = Files::new("fields");
    let accepted = PROMPT_FIELDS.join(", ");
    let cases = [
        (
            "rows.json",
            r#"[{"prompt": "ok"}, {"question": "q", "answer": "a"}]"#,
            "row 2",
        ),
        (
            "rows.jsonl",
            "{\"goal\": \"ok\"}\n{\"question\": \"q\", \"answer\": \"a\"}\n",
            "line 2",
        ),
        ("rows.csv", "question,answer\nq,a\n", "prompt column"),
    ];
    for (name, text, row) in cases {
        let path = files.write(name, text);
        assert_refused(&path, &[row, "question", "answer", &accepted]);
    }
    let path = files.write("number.json", r#"[{"prompt": 5}]"#);
    assert_refused(&path, &["row 1", "not a string"]);
    let path = files.write("format.txt", "a prompt");
    assert_refused(&path, &["unknown dataset format '.txt'"]);
}

#[test]
fn text_that_is_not_utf8_names_the_byte_and_line() {
    let files = Files::new("utf8");
    let mut bytes = b"goal\nfine\ncaf".to_vec();
    bytes.extend_from_slice(&[0xE9, b'\n']); // Latin-1 "é"
    let path = files.write("latin1.csv", bytes);
    assert_refused(&path, &["not UTF-8", "byte 13 (line 3) is 0xE9"]);
}

#[test]
fn a_10_mb_row_is_refused_with_its_size_not_tokenised() {
    let files = Files::new("huge");
    // An unclosed quote makes the rest of a CSV one cell.
    let mut text = String::from("goal\n\"broken quote\nfine\n");
    text.push_str(&"more text, ".repeat(1_000_000));
    let path = files.write("quote.csv", &text);
    assert!(text.len() > 10_000_000);
    assert_refused(
        &path,
        &["row 2", &format!("over the {MAX_PROMPT_BYTES} accepted")],
    );
    let path = files.write("huge.jsonl", format!("{:?}\n", "x".repeat(10 << 20)));
    assert_refused(&path, &["line 1", "10485760 bytes long"]);
}

#[test]
fn prompts_longer_than_max_len_keep_their_last_tokens_and_are_counted() {
    let (_, tok) = open_model(gpu(), "tiny-llama", &Default::default()).unwrap();
    let long = "a long prompt that ends here ".repeat(4);
    let prompts = vec![long.clone(), "short".to_owned()];
    let (ids, truncated) = tokenize_prompts(&tok, &prompts, false, 16).unwrap();
    let full = tok.encode(&long).unwrap();
    assert!(full.len() > 16);
    assert_eq!(truncated, 1);
    assert_eq!(ids[0], full[full.len() - 16..]);
    assert_eq!(ids[1], tok.encode("short").unwrap());

    // A run says how many it truncated.
    let files = Files::new("long");
    let rows: Vec<String> = (0..6).map(|i| format!("{i} {long}")).collect();
    let harmful = files.write("long.json", serde_json::to_string(&rows).unwrap());
    let harmless = files.write("short.json", r#"["hi", "hello", "hey", "yo", "ok", "so"]"#);
    let config = TrainConfig {
        harmful: Some(harmful),
        harmless: Some(harmless),
        out: files.0.join("out"),
        max_len: 16,
        steps: 1,
        chat: false,
        base_prompts: 4,
        eval_prompts: 2,
        ..TrainConfig::for_model("tiny-llama").unwrap()
    };
    let mut messages = Messages::default();
    Trainer::new(gpu(), config, &mut messages).unwrap();
    let line = messages.0.iter().find(|m| m.contains("--max-len"));
    assert!(
        line.is_some_and(|l| l.starts_with("6 prompts are longer than --max-len 16 tokens")),
        "{:?}",
        messages.0
    );
}
