//! Training: loss, optimiser, schedules, configuration, checkpoints and the loop.

pub mod checkpoint;
pub mod config;
pub mod linear_ce;
pub mod loss;
pub mod loss_scale;
pub mod optim;
pub mod reproduce;
pub mod schedule;
pub mod trainer;
