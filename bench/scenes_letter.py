"""Diagnostic (issue #5): can the tiny LM learn the last hop of EventQA - answer word -> option letter - in
isolation? Synthetic sequences in the EventQA option layout, "A. w1\\nB. w2\\nC. w3\\nD. w4\\n then wq" ->
letter of wq, with the words drawn from EventQA's colour/shape/direction words (the tokenizer's own ids).
The model is the preset's tiny Qwen2.5-VL LM, random init, text only.

    .venv/bin/python bench/scenes_letter.py [--preset cpu-tiny-scenes] [--lr 5e-4] [--steps 1500] [--batch 64]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from infra.presets import load_preset
from stages import sample_data as eq
from stages.model.qwen import build_model


class LetterTask:
    """Synthetic option-letter sequences: `task(n, gen)` -> (ids [n, 18], target letter ids [n])."""

    def __init__(self, tok):
        enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        words = [enc(" " + w) for w in [*eq.PALETTE, *eq.SHAPES, *eq.DIRECTIONS]]
        self.words = torch.tensor([w[0] for w in words if len(w) == 1])
        self.letters = torch.tensor([enc(x)[0] for x in "ABCD"])
        self.dot, self.nl, self.then = enc(".")[0], enc("\n")[0], enc(" then")[0]

    def __call__(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.words
        opts = torch.stack([w[torch.randperm(len(w), generator=gen)[:4]] for _ in range(n)])  # [n, 4]
        pick = torch.randint(0, 4, (n,), generator=gen)
        cols = []
        for k in range(4):
            cols += [self.letters[k].expand(n), torch.full((n,), self.dot), opts[:, k], torch.full((n,), self.nl)]
        cols += [torch.full((n,), self.then), opts[torch.arange(n), pick]]
        return torch.stack(cols, 1), self.letters[pick]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-tiny-scenes")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=100)
    args = p.parse_args()
    config = load_preset(args.preset)
    torch.set_num_threads(config.warmup.threads)
    torch.manual_seed(0)
    bundle = build_model(config.model)
    model, tok = bundle.model, bundle.tokenizer
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    gen = torch.Generator().manual_seed(1)
    batch = LetterTask(tok)
    print(f"{len(batch.words)} single-token words, lr {args.lr}, batch {args.batch}", flush=True)

    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, step / 30)
        ids, target = batch(args.batch, gen)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                       mm_token_type_ids=torch.zeros_like(ids, dtype=torch.int32), use_cache=False).logits[:, -1]
        loss = F.cross_entropy(logits.float(), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % args.eval_every == 0:
            with torch.no_grad():
                ids, target = batch(512, gen)
                acc = (model(input_ids=ids, attention_mask=torch.ones_like(ids),
                             mm_token_type_ids=torch.zeros_like(ids, dtype=torch.int32),
                             use_cache=False).logits[:, -1].argmax(-1) == target).float().mean().item()
            print(f"step {step} {time.perf_counter() - t0:.0f} s loss={loss.item():.3f} held-out letter acc={acc:.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
