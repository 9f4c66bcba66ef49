"""Diagnostic for the scene-count curriculum (issue #5): can the tiny LM do the text-only hops of EventQA -
find the scene, read the slot, and map the answer word to its option letter - when it sees the scenes as
text (the `textqa` task, `textqa_scenes` scenes per prompt)? No video, no vision tower: this separates
"cannot map word -> letter" from "cannot read the visual tokens".

    .venv/bin/python bench/scenes_textqa.py [--preset cpu-tiny-scenes] [--scenes 1] [--steps 1500]
                                            [--eval-every 250] [--lr 0.002] [--think keyed]

Prints, per evaluation, greedy accuracy on held-out text-QA prompts (videos of warmup.synthetic_seed + 1)
per family, and how often the word the think ends with ("then {word}") is the right option word.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from pathlib import Path
from collections import defaultdict

import torch
import torch.nn.functional as F

from infra.presets import load_preset
from stages.model.inputs import left_pad
from stages.model.qwen import build_model
from stages.warmup.data import (ExampleStream, _chat_ids, answer_letter, examples_of, option_word, textqa_prompt,
                                with_window)
from stages.warmup.evaluate import parse
from stages.warmup.train import heldout_videos, text_nll

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scenes_letter import LetterTask  # noqa: E402  (bench/ is not a package)


@torch.no_grad()
def evaluate(bundle, examples, batch: int = 32) -> dict[str, float]:
    bundle.model.eval()
    hits, words, counts = defaultdict(int), defaultdict(int), defaultdict(int)
    for s in range(0, len(examples), batch):
        chunk = examples[s:s + batch]
        ids, mask = left_pad([_chat_ids(bundle, textqa_prompt(bundle, ex), None) for ex in chunk], bundle.pad_token_id)
        out = bundle.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=48, do_sample=False,
                                    pad_token_id=bundle.pad_token_id)
        texts = bundle.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=False)
        for ex, text in zip(chunk, texts):
            text = text.split("<|im_end|>")[0]
            _, letter, think = parse(text)
            f = ex.family
            counts[f] += 1
            hits[f] += int(letter == answer_letter(ex.question))
            m = re.search(r"then (.+)$", think or "")
            words[f] += int(m is not None and m.group(1).strip() == option_word(ex.question, answer_letter(ex.question)))
    bundle.model.train()
    out = {f"acc/{f}": hits[f] / counts[f] for f in sorted(counts)}
    out.update({f"word/{f}": words[f] / counts[f] for f in sorted(counts)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-tiny-scenes")
    p.add_argument("--scenes", type=int, default=1)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--think", default="keyed")
    p.add_argument("--per-family", type=int, default=32)
    p.add_argument("--letter-aux", type=int, default=0,
                   help="synthetic option -> letter sequences (bench/scenes_letter.py) mixed into each step")
    p.add_argument("--prompt-loss", type=float, default=0.0,
                   help="weight of next-token loss on the prompt tokens too (in-context copying signal)")
    args = p.parse_args()
    config = load_preset(args.preset)
    w = config.warmup
    torch.set_num_threads(w.threads)
    torch.manual_seed(w.seed)
    bundle = build_model(config.model)
    model = bundle.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=w.weight_decay)
    stream = ExampleStream("textqa", [], w.synthetic_seed, w.seed * 1000 + 1, think=args.think, window=args.scenes)
    rng = random.Random(0)
    taken: dict[str, int] = defaultdict(int)
    held = []
    for v in heldout_videos(w, 48):
        for ex in examples_of(v, {"textqa"}, args.think):
            if taken[ex.family] < args.per_family:
                taken[ex.family] += 1
                held.append(with_window(ex, args.scenes, rng))
    print(f"preset {args.preset}, {args.scenes}-scene text QA, think {args.think}, lr {args.lr}, "
          f"prompt loss {args.prompt_loss}, letter aux {args.letter_aux}, "
          f"{len(held)} held-out questions", flush=True)
    letter, gen = LetterTask(bundle.tokenizer), torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    losses = []
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / 30)
        for g in opt.param_groups:
            g["lr"] = lr
        exs = stream.take(args.batch)
        ids, mask = left_pad([_chat_ids(bundle, textqa_prompt(bundle, ex), None) for ex in exs], bundle.pad_token_id)
        comps = [bundle.tokenizer(ex.target + "<|im_end|>", add_special_tokens=False)["input_ids"] for ex in exs]
        loss = text_nll(bundle, {"input_ids": ids, "attention_mask": mask}, comps)
        if args.prompt_loss > 0:  # plain LM loss on the prompt (scenes, question, options): left-padded
            logits = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=torch.zeros_like(ids, dtype=torch.int32),
                           use_cache=False).logits[:, :-1].float()
            tgt = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            (loss + args.prompt_loss * torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)).backward()
        else:
            loss.backward()
        if args.letter_aux:
            aux_ids, aux_target = letter(args.letter_aux, gen)
            F.cross_entropy(model(input_ids=aux_ids, attention_mask=torch.ones_like(aux_ids),
                                  mm_token_type_ids=torch.zeros_like(aux_ids, dtype=torch.int32),
                                  use_cache=False).logits[:, -1].float(), aux_target).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            res = evaluate(bundle, held)
            print(f"step {step} {(time.perf_counter() - t0) / 60:.2f} min loss={sum(losses) / len(losses):.3f} "
                  + " ".join(f"{k}={v:.2f}" for k, v in res.items()), flush=True)
            losses = []


if __name__ == "__main__":
    main()
