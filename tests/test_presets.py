"""Every shipped preset loads and validates; every config field carries a docstring."""

import pytest
import yaml
from pydantic import BaseModel

from data_contracts.config import PipelineConfig
from infra.presets import PRESETS_DIR, load_preset, preset_names


def test_both_presets_ship():
    assert {"cpu-tiny", "gpu-qwen2.5-vl-3b"} <= set(preset_names())


@pytest.mark.parametrize("name", preset_names())
def test_preset_loads_and_round_trips(name):
    config = load_preset(name)
    assert config.name == name
    # A preset holds only known keys: re-validating its dump gives the same config.
    assert PipelineConfig.model_validate(config.model_dump()) == config


def test_gpu_preset_is_the_paper_setting():
    gpu = load_preset("gpu-qwen2.5-vl-3b")
    assert gpu.model.checkpoint and gpu.model.max_pixels == 128 * 28 * 28
    assert (gpu.retrieve.fps, gpu.retrieve.max_frames, gpu.retrieve.top_k) == (1.0, 64, 3)
    assert (gpu.train.group_size, gpu.train.tau, gpu.train.beta) == (8, 0.6, 0.04)
    assert gpu.train.zero_stage == 3 and gpu.train.bf16 and gpu.model.dtype == "bfloat16"


def test_cpu_preset_fits_the_default_machine():
    cpu = load_preset("cpu-tiny")
    assert cpu.model.checkpoint is None and cpu.train.zero_stage == 2 and not cpu.train.bf16
    assert cpu.train.workers == 2


def _sections(model: type[BaseModel]):
    yield model
    for field in model.model_fields.values():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _sections(field.annotation)


def test_every_field_has_a_docstring():
    missing = [f"{m.__name__}.{n}" for m in _sections(PipelineConfig) for n, f in m.model_fields.items()
               if not (f.description or "").strip()]
    assert not missing, f"fields without a docstring: {missing}"


def test_unknown_key_names_the_file(tmp_path):
    bad = yaml.safe_load((PRESETS_DIR / "cpu-tiny.yaml").read_text())
    bad["train"]["gropu_size"] = 4
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError) as err:
        load_preset(str(path))
    assert str(path) in str(err.value) and "gropu_size" in str(err.value)


def test_odd_frame_cap_is_refused():
    raw = load_preset("cpu-tiny").model_dump()
    raw["retrieve"]["max_frames"] = 63
    with pytest.raises(ValueError, match="even"):
        PipelineConfig.model_validate(raw)


def test_prefect_yaml_has_a_deployment_per_stage():
    from flows.marc import STAGES

    spec = yaml.safe_load((PRESETS_DIR.parents[1] / "prefect.yaml").read_text())
    names = {d["name"] for d in spec["deployments"]}
    assert names == {"full-pipeline", *STAGES}
    for d in spec["deployments"]:
        assert d["entrypoint"] == "flows/marc.py:marc" and d["work_pool"]["name"] == "marc-local"
        assert d["parameters"]["stages"] in (None, [d["name"]])


def test_ci_preset_is_valid():
    from pathlib import Path

    config = load_preset(str(Path(__file__).parent / "presets" / "ci-tiny.yaml"))
    assert config.train.steps <= 5 and config.warmup.caption_steps <= 5
