//! Layer 6 (beside `es2`): what a defence buys, measured. Refusal judges by keyword
//! ([`judge`]), linear probes of the embeddings ([`probe`]), the geometry of harmful and harmless
//! embeddings per layer ([`geometry`]) and the report that puts them side by side for a base and
//! a hardened model ([`report`]).
//!
//! Everything here works on host copies of pooled embeddings in f64: a layer's embeddings of a
//! group of prompts are a [`Rows`] view. It uses `gpu`, `ops`, `text` and `model`, never `es2`.

pub mod judge;
