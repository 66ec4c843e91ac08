//! Support shared by the stage-1 tests.

use taming_model::config::DdConfig;

/// A small VQGAN shape for 32x32 RGB images: 32 base channels, two levels (f2), one residual
/// block per level, attention at `attn_resolutions`.
pub fn small_ddconfig(z_channels: usize, attn_resolutions: Vec<usize>) -> DdConfig {
    DdConfig {
        ch: 32,
        out_ch: 3,
        ch_mult: vec![1, 2],
        num_res_blocks: 1,
        attn_resolutions,
        dropout: 0.0,
        resamp_with_conv: true,
        in_channels: 3,
        resolution: 32,
        z_channels,
        double_z: false,
    }
}
