#!/usr/bin/env python3
"""Stage-2 speed of the reference (taming-transformers 0.0.1) on CPU, with the shapes of
worker/benches/stage2.rs: training tokens/s of a 4-layer, 128-wide minGPT on 8x8 codes with
a class token (cross-entropy on the image positions, AdamW as configure_optimizers sets it
up), Net2NetTransformer.sample at 256 tokens (batch 1 and 16; it has no KV cache) and the
sliding-window loop of scripts/sample_conditional.py over a 32x48 grid (one full forward per
token). Random weights.

With --reference-src (a checkout of CompVis/taming-transformers at HEAD), also HEAD's cached
sampler: `sample_with_past` from its taming/modules/transformer/mingpt.py (loaded from the
checkout, nothing of it copied here) on a 12-layer, 8-head, 512-wide GPT (1025 tokens, SOS
1024), 256 tokens after the SOS token, batch 1 and 16, top_k 100, top_p 1.0 and temperature
1.0 as scripts/sample_fast.py passes them. Without `transformers` installed, the
`top_k_top_p_filtering` it imports is transformers 4.3.1's (HEAD's environment.yaml pin),
defined here. --large-only runs only that.

Usage: reference_stage2.py [--iters N] [--json] [--skip-window]
                           [--reference-src DIR [--large-only]]
"""
import argparse
import importlib.util
import json
import pathlib
import sys
import time
import types

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "fixtures"))
import reference  # noqa: E402,F401  (registers the torch._six shim)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# taming.main (imported by cond_transformer) needs a module newer pytorch-lightning dropped.
_dist = types.ModuleType("pytorch_lightning.utilities.distributed")
_dist.rank_zero_only = lambda f: f
sys.modules.setdefault("pytorch_lightning.utilities.distributed", _dist)
from taming.models.cond_transformer import Net2NetTransformer  # noqa: E402
from taming.modules.transformer.mingpt import GPT  # noqa: E402


def report(args, what, value, unit):
    if args.json:
        print(json.dumps({"impl": "reference", "what": what, unit: round(value, 3)}))
    else:
        print(f"reference  {what}: {value:.2f} {unit}")


def adamw(gpt):
    """The reference's configure_optimizers: decay on Linear weights only."""
    decay, no_decay = set(), set()
    for mn, m in gpt.named_modules():
        for pn, _ in m.named_parameters(recurse=False):
            fpn = f"{mn}.{pn}" if mn else pn
            if pn.endswith("weight") and isinstance(m, torch.nn.Linear):
                decay.add(fpn)
            else:
                no_decay.add(fpn)
    params = dict(gpt.named_parameters())
    groups = [
        {"params": [params[n] for n in sorted(decay)], "weight_decay": 0.01},
        {"params": [params[n] for n in sorted(no_decay)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=4.8e-4, betas=(0.9, 0.95))


def train(args):
    gpt = GPT(vocab_size=266, block_size=64, n_layer=4, n_head=4, n_embd=128)
    opt = adamw(gpt)
    codes = torch.tensor([[(i * 31 + t * 7) % 256 for t in range(64)] for i in range(32)])
    labels = torch.tensor([[256 + i % 10] for i in range(32)])
    cz = torch.cat([labels, codes], dim=1)

    def step():
        logits, _ = gpt(cz[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), codes.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    secs = time.perf_counter() - start
    report(args, "train batch 32 x 64 tokens", args.iters * 32 * 64 / secs, "tokens_per_s")


def sampling_model():
    torch.manual_seed(0)
    gpt = GPT(vocab_size=1025, block_size=256, n_layer=4, n_head=4, n_embd=128).eval()
    shim = types.SimpleNamespace(transformer=gpt, pkeep=1.0)
    shim.top_k_logits = types.MethodType(Net2NetTransformer.top_k_logits, shim)
    return gpt, shim


@torch.no_grad()
def sample(args):
    _, shim = sampling_model()
    for batch in (1, 16):
        c = torch.full((batch, 1), 1024, dtype=torch.long)
        x = torch.zeros((batch, 0), dtype=torch.long)
        start = time.perf_counter()
        Net2NetTransformer.sample(shim, x, c, steps=256, sample=True, top_k=100)
        secs = time.perf_counter() - start
        report(args, f"sample 256 tokens batch {batch} no cache", batch * 256 / secs,
               "tokens_per_s")


@torch.no_grad()
def window(args):
    """scripts/sample_conditional.py's loop, unconditional (one SOS token)."""
    gpt, shim = sampling_model()
    H, W = 32, 48
    idx = torch.zeros((1, H, W), dtype=torch.long)
    c = torch.full((1, 1), 1024, dtype=torch.long)
    start = time.perf_counter()
    for i in range(H):
        local_i = i if i <= 8 else (16 - (H - i) if H - i < 8 else 8)
        for j in range(W):
            local_j = j if j <= 8 else (16 - (W - j) if W - j < 8 else 8)
            i0, j0 = i - local_i, j - local_j
            patch = idx[:, i0:i0 + 16, j0:j0 + 16].reshape(1, -1)
            cz = torch.cat((c, patch), dim=1)
            logits, _ = gpt(cz[:, :-1])
            logits = logits[:, local_i * 16 + local_j, :]
            logits = shim.top_k_logits(logits, 100)
            probs = F.softmax(logits, dim=-1)
            idx[:, i, j] = torch.multinomial(probs, num_samples=1)[:, 0].clamp(max=1023)
    report(args, "sliding window 32x48 grid Plain", time.perf_counter() - start, "seconds")


def filtering_shim():
    """transformers 4.3.1's top_k_top_p_filtering, for HEAD's mingpt.py to import."""
    def top_k_top_p_filtering(logits, top_k=0, top_p=1.0, filter_value=-float("Inf"),
                              min_tokens_to_keep=1):
        if top_k > 0:
            top_k = min(max(top_k, min_tokens_to_keep), logits.size(-1))
            indices_to_remove = logits < torch.topk(logits, top_k)[0][..., -1, None]
            logits[indices_to_remove] = filter_value
        if top_p < 1.0:
            sorted_logits, sorted_indices = torch.sort(logits, descending=True)
            cumulative_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
            sorted_indices_to_remove = cumulative_probs > top_p
            if min_tokens_to_keep > 1:
                sorted_indices_to_remove[..., :min_tokens_to_keep] = 0
            sorted_indices_to_remove[..., 1:] = sorted_indices_to_remove[..., :-1].clone()
            sorted_indices_to_remove[..., 0] = 0
            indices_to_remove = sorted_indices_to_remove.scatter(
                1, sorted_indices, sorted_indices_to_remove)
            logits[indices_to_remove] = filter_value
        return logits

    module = types.ModuleType("transformers")
    module.top_k_top_p_filtering = top_k_top_p_filtering
    return module


def head_mingpt_module(reference_src):
    """The reference's taming/modules/transformer/mingpt.py at HEAD, from a checkout."""
    if importlib.util.find_spec("transformers") is None:
        sys.modules.setdefault("transformers", filtering_shim())
    path = pathlib.Path(reference_src) / "taming/modules/transformer/mingpt.py"
    spec = importlib.util.spec_from_file_location("head_mingpt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def sample_large(args):
    """HEAD's sample_with_past (KV cache) on a 12-layer, 512-wide GPT."""
    mingpt = head_mingpt_module(args.reference_src)
    torch.manual_seed(0)
    gpt = mingpt.GPT(vocab_size=1025, block_size=256, n_layer=12, n_head=8, n_embd=512).eval()
    for batch in (1, 16):
        c = torch.full((batch, 1), 1024, dtype=torch.long)
        start = time.perf_counter()
        mingpt.sample_with_past(c, gpt, steps=256, temperature=1.0, sample_logits=True,
                                top_k=100, top_p=1.0)
        secs = time.perf_counter() - start
        report(args, f"sample 256 tokens batch {batch} kv-cache 12x512",
               batch * 256 / secs, "tokens_per_s")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.add_argument("--skip-window", action="store_true")
    p.add_argument("--reference-src", type=pathlib.Path,
                   help="checkout of CompVis/taming-transformers at HEAD (cached sampler)")
    p.add_argument("--large-only", action="store_true",
                   help="only the cached sampler on the 12x512 GPT (needs --reference-src)")
    args = p.parse_args()
    if args.large_only and args.reference_src is None:
        p.error("--large-only needs --reference-src")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if not args.large_only:
        train(args)
        sample(args)
        if not args.skip_window:
            window(args)
    if args.reference_src is not None:
        sample_large(args)


if __name__ == "__main__":
    main()
