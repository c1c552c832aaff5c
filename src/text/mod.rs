//! Layer 4: tokenizer, chat templates and prompt datasets.

pub mod chat;
pub mod conversations;
pub mod dataset;
pub mod tokenizer;

pub use chat::{ChatTemplate, Message};
pub use conversations::{conversations_jsonl, load_conversations, Conversation};
pub use dataset::load_prompts;
pub use tokenizer::{TextStream, Tokenizer, TokenizerFiles};
