//! taming-rs trainers. `stage1` trains a VQGAN with the reference's objective.

pub mod agent;
pub mod defaults;
pub mod distributed;
pub mod stage1;
