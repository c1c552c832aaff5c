//! Evaluation-layer tests: refusal judges on known strings. All host-side: no GPU needed.

mod judge;
