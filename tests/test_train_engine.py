"""The training machinery on the toy policy: DeepSpeed ZeRO-2/3, Ray Train with 2 workers, a real crash
(a worker SIGKILLs itself), resume from the last complete checkpoint, and exact equality with an
uninterrupted run of the same seed."""

from pathlib import Path

import pytest
import torch

from stages.train import engine
from stages.train.engine import complete_checkpoints, deepspeed_config, read_metrics, shard_indices, step_seed
from stages.train.launch import launch, toy_config
from stages.train.toy import ToyLM, ToyPolicy

# every metric of a step except wall-clock ones must be identical between a resumed and an uninterrupted run
TIMING = {"step_time", "samples_per_second"}


def _same_history(a: Path, b: Path, steps: int) -> None:
    ra, rb = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, steps + 1))
    for x, y in zip(ra, rb):
        assert set(x) == set(y)
        for k in set(x) - TIMING:
            assert y[k] == pytest.approx(x[k], abs=1e-6, nan_ok=True), (x["step"], k)
    wa = torch.load(a / "final" / "model.pt")
    wb = torch.load(b / "final" / "model.pt")
    shapes = {k: v.shape for k, v in ToyLM(16, 8).state_dict().items()}  # full weights, also under ZeRO-3
    assert {k: v.shape for k, v in wa.items()} == {k: v.shape for k, v in wb.items()} == shapes
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ------------------------------------------------------------------------------ fast, no Ray


def test_helpers():
    conf = deepspeed_config(toy_config(zero_stage=3, bf16=True, learning_rate=0.5))
    assert conf["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}
    assert conf["optimizer"]["params"] == {"lr": 0.5, "weight_decay": 0.0, "torch_adam": True}
    assert conf["bf16"] == {"enabled": False}  # bf16 only on GPU
    assert deepspeed_config(toy_config(bf16=True), use_gpu=True)["bf16"] == {"enabled": True}
    # data order: every item once per epoch across (step, rank), the same for the same seed
    seen = [i for step in (1, 2) for rank in (0, 1) for i in shard_indices(8, 2, seed=3, step=step, rank=rank,
                                                                           world_size=2)]
    assert sorted(seen) == list(range(8))
    assert shard_indices(8, 2, seed=3, step=5, rank=1, world_size=2) == shard_indices(8, 2, seed=3, step=5, rank=1,
                                                                                     world_size=2)
    assert len({step_seed(0, s, r) for s in range(50) for r in range(4)}) == 200


def test_single_process_killed_mid_save_resumes_exactly(tmp_path, monkeypatch):
    cfg = toy_config(steps=6, checkpoint_every=2, workers=1)
    got = []
    ref = launch(ToyPolicy(cfg), cfg, tmp_path / "ref", use_ray=False, on_metrics=lambda s, m: got.append((s, m)))
    assert ref["step"] == 6 and ref["resumed_from"] == 0 and [s for s, _ in got] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "kl", "clip_ratio", "reward", "reward_std", "frac_reward_zero_std", "completion_length",
            "reward/format/mean", "reward/accuracy/mean", "reward/retention/mean", "eta/mean", "step_time",
            "samples_per_second", "lr"} <= set(got[0][1])

    run = tmp_path / "run"
    publish = engine._publish

    def killed_while_saving(tmp, final):  # the process dies after writing step 6's files, before the rename
        if final.name == "step_000006":
            raise KeyboardInterrupt("killed mid-save")
        publish(tmp, final)

    monkeypatch.setattr(engine, "_publish", killed_while_saving)
    with pytest.raises(KeyboardInterrupt):
        launch(ToyPolicy(cfg), cfg, run, use_ray=False)
    monkeypatch.undo()
    assert [s for s, _ in complete_checkpoints(run)] == [2, 4]
    assert (run / "checkpoints" / ".tmp-step_000006" / "deepspeed").is_dir()  # the half-done save is there...
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]

    seen = []
    res = launch(ToyPolicy(cfg), cfg, run, use_ray=False, on_metrics=lambda s, m: seen.append(s))
    assert res["resumed_from"] == 4 and res["step"] == 6 and seen == [5, 6]  # the step counter continues
    assert not list((run / "checkpoints").glob(".tmp-*"))  # ...and ignored, then removed
    assert [s for s, _ in complete_checkpoints(run)] == [4, 6]  # keep_checkpoints = 2
    _same_history(tmp_path / "ref", run, 6)

    again = launch(ToyPolicy(cfg), cfg, run, use_ray=False)  # a rerun of a finished run trains nothing
    assert again["resumed_from"] == 6 and again["metrics"] == {} and len(read_metrics(run)) == 6


def test_several_updates_per_batch(tmp_path):
    cfg = toy_config(steps=3, checkpoint_every=3, workers=1, updates_per_batch=3, learning_rate=0.05)
    res = launch(ToyPolicy(cfg), cfg, tmp_path, use_ray=False)
    rows = read_metrics(tmp_path)
    assert res["step"] == 3 and len(rows) == 3
    assert all(0.0 <= r["clip_ratio"] <= 1.0 and r["kl"] >= 0.0 for r in rows)
    assert any(r["clip_ratio"] > 0 for r in rows)  # later updates move off the sampling policy and get clipped


# ------------------------------------------------------------------------------ Ray Train, 2 workers


@pytest.mark.integration
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_ray_train_worker_killed_then_resumed(local_ray, tmp_path, zero_stage):
    from ray.train import TrainingFailedError

    cfg = toy_config(steps=6, checkpoint_every=2, workers=2, zero_stage=zero_stage)
    ref = launch(ToyPolicy(cfg), cfg, tmp_path / "ref")
    assert ref["step"] == 6

    run = tmp_path / "run"
    with pytest.raises(TrainingFailedError):  # rank 1 SIGKILLs itself as step 6 begins; max_failures = 0
        launch(ToyPolicy(cfg, crash_at=(6, 1)), cfg, run)
    assert [s for s, _ in complete_checkpoints(run)] == [2, 4]
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5]  # step 5 finished, never checkpointed

    res = launch(ToyPolicy(cfg), cfg, run)
    assert res["resumed_from"] == 4 and res["step"] == 6
    _same_history(tmp_path / "ref", run, 6)  # step 5 recomputed identically, step 6 as uninterrupted

    if zero_stage == 2:  # a checkpoint of 2 workers refuses to load into 1
        with pytest.raises(RuntimeError, match="written by 2 workers, this run has 1"):
            launch(ToyPolicy(cfg), toy_config(steps=8, checkpoint_every=2, workers=1), run, use_ray=False)
