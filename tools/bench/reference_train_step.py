#!/usr/bin/env python3
"""One full stage-1 training iteration of the reference (taming-transformers 0.0.1) on CPU,
as its VQModel.training_step runs it: generator step (autoencoder forward, VQLPIPSWithDiscriminator
with optimizer_idx 0, backward, Adam) then discriminator step (a second autoencoder forward,
optimizer_idx 1, backward, Adam). Same config as worker/benches/train_step.rs; LPIPS is the
`lpips` package's VGG16 LPIPS with random weights (the reference's own would download them).

With --config FILE (a taming-rs stage-1 config such as configs/stage1/imagenet_f16_1024.yaml)
the model and discriminator come from it, at its resolution, with batch --batch; --device
cuda runs on the GPU (synchronized before the clock is read).

Usage: reference_train_step.py [--iters N] [--json] [--config FILE --batch B] [--device D]
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


def chosen(a):
    """(ddconfig, n_embed, embed_dim, discriminator kwargs, batch) of the run."""
    if not a.config:
        return DD, 512, 64, dict(input_nc=3, ndf=64, n_layers=3), 4
    import yaml
    with open(a.config) as f:
        cfg = yaml.safe_load(f)
    model, disc = cfg["model"], cfg["loss"].get("discriminator", {})
    kwargs = dict(input_nc=disc.get("in_channels", 3), ndf=disc.get("ndf", 64),
                  n_layers=disc.get("n_layers", 3))
    return model["ddconfig"], model["n_embed"], model["embed_dim"], kwargs, a.batch or cfg["batch_size"]


def loss_module(disc_kwargs):
    cls = vqperceptual.VQLPIPSWithDiscriminator
    mod = cls.__new__(cls)
    torch.nn.Module.__init__(mod)
    mod.codebook_weight, mod.pixel_weight = 1.0, 1.0
    mod.perceptual_loss = lpips.LPIPS(pretrained=False, net="vgg", pnet_rand=True, verbose=False).eval()
    mod.perceptual_weight = 1.0
    mod.discriminator = NLayerDiscriminator(**disc_kwargs).apply(weights_init)
    mod.discriminator_iter_start = 0
    mod.disc_loss = vqperceptual.hinge_d_loss
    mod.disc_factor, mod.discriminator_weight = 1.0, 0.8
    mod.disc_conditional = False
    return mod


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.add_argument("--config")
    p.add_argument("--batch", type=int)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    torch.manual_seed(0)
    dd, n_embed, embed_dim, disc_kwargs, batch = chosen(a)
    device = torch.device(a.device)
    model = ref.VQModel(dd, n_embed, embed_dim).to(device)
    loss = loss_module(disc_kwargs).to(device)
    lr = 4.5e-6 * batch
    opt_ae = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(loss.discriminator.parameters(), lr=lr, betas=(0.5, 0.9))
    size = dd["resolution"]
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

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
    sync()
    start = time.perf_counter()
    for i in range(a.iters):
        iteration(i + 1)
    sync()
    secs = (time.perf_counter() - start) / a.iters
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    name = f"reference (torch {torch.__version__}, {where})"
    if a.json:
        print(json.dumps({"impl": name, "seconds_per_iteration": round(secs, 4), "iters": a.iters,
                          "batch": batch, "size": size}))
    else:
        print(f"{name}: {secs:.3f} s per training iteration (G + D), batch {batch} at {size}x{size}")


if __name__ == "__main__":
    main()
