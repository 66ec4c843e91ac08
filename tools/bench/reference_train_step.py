#!/usr/bin/env python3
"""One full stage-1 training iteration of the reference (taming-transformers 0.0.1) on CPU,
as its VQModel.training_step runs it: generator step (autoencoder forward, VQLPIPSWithDiscriminator
with optimizer_idx 0, backward, Adam) then discriminator step (a second autoencoder forward,
optimizer_idx 1, backward, Adam). Same config as worker/benches/train_step.rs; LPIPS is the
`lpips` package's VGG16 LPIPS with random weights (the reference's own would download them).

Usage: reference_train_step.py [--iters N] [--json]
"""
import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "fixtures"))
import reference as ref  # noqa: E402
import lpips  # noqa: E402
import torch  # noqa: E402
from taming.modules.discriminator.model import NLayerDiscriminator, weights_init  # noqa: E402
from taming.modules.losses import vqperceptual  # noqa: E402

DD = dict(double_z=False, z_channels=64, resolution=64, in_channels=3, out_ch=3, ch=64,
          ch_mult=[1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[8], dropout=0.0)


def loss_module():
    cls = vqperceptual.VQLPIPSWithDiscriminator
    mod = cls.__new__(cls)
    torch.nn.Module.__init__(mod)
    mod.codebook_weight, mod.pixel_weight = 1.0, 1.0
    mod.perceptual_loss = lpips.LPIPS(pretrained=False, net="vgg", pnet_rand=True, verbose=False).eval()
    mod.perceptual_weight = 1.0
    mod.discriminator = NLayerDiscriminator(input_nc=3, ndf=64, n_layers=3).apply(weights_init)
    mod.discriminator_iter_start = 0
    mod.disc_loss = vqperceptual.hinge_d_loss
    mod.disc_factor, mod.discriminator_weight = 1.0, 0.8
    mod.disc_conditional = False
    return mod


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    torch.manual_seed(0)
    model = ref.VQModel(DD, 512, 64)
    loss = loss_module()
    lr = 4.5e-6 * 4
    opt_ae = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(loss.discriminator.parameters(), lr=lr, betas=(0.5, 0.9))
    x = torch.rand(4, 3, 64, 64) * 2 - 1

    def forward():
        _, pre = model.pre_quant(x)
        z_q, qloss, _ = model.quantize(pre)
        return model.decode(z_q), qloss

    def iteration(step):
        xrec, qloss = forward()
        aeloss, _ = loss(qloss, x, xrec, 0, step, last_layer=model.decoder.conv_out.weight, split="train")
        opt_ae.zero_grad()
        aeloss.backward()
        opt_ae.step()
        xrec, qloss = forward()
        dloss, _ = loss(qloss, x, xrec, 1, step, last_layer=model.decoder.conv_out.weight, split="train")
        opt_d.zero_grad()
        dloss.backward()
        opt_d.step()

    iteration(0)
    start = time.perf_counter()
    for i in range(a.iters):
        iteration(i + 1)
    secs = (time.perf_counter() - start) / a.iters
    name = f"reference (torch {torch.__version__}, {torch.get_num_threads()} threads)"
    if a.json:
        print(json.dumps({"impl": name, "seconds_per_iteration": round(secs, 4), "iters": a.iters}))
    else:
        print(f"{name}: {secs:.3f} s per training iteration (G + D)")


if __name__ == "__main__":
    main()
