//! taming-rs's CPU kernels for burn's Flex backend, the operations that dominate a VQGAN
//! step on a CPU:
//!
//! - [`conv`]: 2-d convolution forward and backward, Winograd F(2x2, 3x3) for 3x3 kernels and
//!   im2col GEMMs for the rest;
//! - [`norm`]: GroupNorm fused with the swish that follows it;
//! - [`adam`]: Adam updating the moments and the parameter in one pass;
//! - [`linear`]: a Linear layer on a few rows (KV-cached sampling) streaming its weights;
//! - [`cpu`]: the switch between these and burn's own operations (other backends always run
//!   burn's), and the helpers they share.
//!
//! Every kernel is tested against burn's operations on the same inputs.

pub mod adam;
pub mod conv;
pub mod cpu;
mod fastmath;
pub mod linear;
pub mod norm;
