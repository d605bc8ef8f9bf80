//! Training: the causal-LM loss and the optimiser.

pub mod loss;
pub mod optim;
