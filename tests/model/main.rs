//! Model-layer tests: checkpoints load, the forward matches transformers on fixtures written
//! by `scripts/make_model_fixtures.py`, tokenisation matches, generation is exact.

mod backward;
mod bad_adapter;
mod bad_input;
mod decode;
mod embed;
mod embedded;
mod f16_weights;
mod fixtures;
mod forward;
mod fuzz;
mod generation;
mod head;
mod hooks;
mod tokenizer;
