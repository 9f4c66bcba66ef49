"""Stage train: C-GRPO training of the compressed-input student (issue #6).

Rooms, in reading order:

- `rewards`  — reward plug-ins addressed by name (`format`, `accuracy`), each returning a dict of
  named sub-scores, and `score_group`, which adds the C-GRPO retention bonus
  r_c = alpha * max(0, a_comp / a_full - tau) to the correct answers of one question's group.
- `cgrpo`    — group-normalised advantages and the per-token clipped surrogate with the k3 KL to
  a frozen reference (the hot path; one screen).
- `engine`   — the training loop, generic over a `Policy` (what a model must provide), on a
  DeepSpeed ZeRO engine (stage 0-3, gloo on CPU), with atomic checkpoints every N steps and an
  exact resume: data and sampling of each step come from (seed, step, rank) only.
- `toy`      — a tiny categorical policy on a synthetic multiple-choice task that runs a real
  C-GRPO step with the real rewards and loss; used by tests and `launch --toy`.
- `launch`   — runs the loop inside Ray Train `TorchTrainer` with N workers (or in-process).

Nothing here imports Prefect or `flows`; metrics leave through an `on_metrics(step, dict)`
callback on rank 0 and a `metrics.jsonl` file in the run folder.
"""
