//! The layering holds: a module never imports a layer above its own (ARCHITECTURE.md, "The
//! layers"). Every `crate::<module>` path in a layer's source files is checked.

use std::path::{Path, PathBuf};

/// The layers from the bottom up; `error`, `io`, `rng`, `plot`, `failpoint` and `testing` sit
/// beside them and any layer may use them.
const LAYERS: [&str; 7] = ["gpu", "ops", "text", "model", "eval", "es2", "cli"];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The layers a file names through `crate::<layer>`.
fn named_layers(text: &str) -> Vec<&'static str> {
    LAYERS
        .into_iter()
        .filter(|layer| {
            let path = format!("crate::{layer}");
            text.match_indices(&path).any(|(i, _)| {
                let next = text[i + path.len()..].chars().next();
                !next.is_some_and(|c| c.is_alphanumeric() || c == '_')
            })
        })
        .collect()
}

#[test]
fn no_layer_imports_one_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut checked = 0;
    for (level, layer) in LAYERS.iter().enumerate() {
        let mut files = Vec::new();
        sources(&src.join(layer), &mut files);
        assert!(!files.is_empty(), "src/{layer} has no source files");
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for named in named_layers(&text) {
                let above = LAYERS.iter().position(|l| *l == named).unwrap() > level;
                assert!(
                    !above,
                    "{} (layer {layer}) imports crate::{named}, a layer above it",
                    file.display()
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 50, "only {checked} files checked");
}

#[test]
fn the_check_catches_an_upward_import() {
    assert_eq!(named_layers("use crate::es2::Trainer;"), vec!["es2"]);
    assert_eq!(
        named_layers("crate::model::Batch and crate::gpu"),
        vec!["gpu", "model"]
    );
    assert!(named_layers("use crate::gpux::X; // crate::textual").is_empty());
}
