"""Config presets: YAML files under `infra/presets/`, each one `PipelineConfig`."""

from __future__ import annotations

from pathlib import Path

import yaml

from data_contracts.config import PipelineConfig

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
DEFAULT_PRESET = "cpu-tiny"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name_or_path: str = DEFAULT_PRESET) -> PipelineConfig:
    """Load a shipped preset by name, or any YAML file by path; raises naming the file on error."""
    shipped = PRESETS_DIR / f"{name_or_path}.yaml"
    path = shipped if shipped.is_file() else Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"no preset {name_or_path!r}: {path} does not exist (shipped: {', '.join(preset_names())})")
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        return PipelineConfig.model_validate(raw)
    except Exception as exc:  # pydantic's message lists every bad field; add the file
        raise ValueError(f"{path}: invalid preset:\n{exc}") from exc
