"""The Qwen2.5-VL wrapper: build or load the model, its tokenizer and its frame geometry.

Two sources, one `ModelBundle`:
  * `config.checkpoint` set (GPU preset): a local pretrained Qwen2.5-VL directory, loaded with
    `from_pretrained(local_files_only=True)`; its own tokenizer and preprocessor settings.
  * `config.checkpoint` None (CPU default): the stock `Qwen2_5_VLForConditionalGeneration` class
    built from a tiny config (sizes from `ModelConfig`) with a fixed-seed random initialisation, and
    the locally trained BPE tokenizer (`tokenizer.py`).

`save_model(bundle, dir)` writes weights, tokenizer and `marc_model.json` (the ModelConfig and the
frame geometry) into `dir`; `load_model(dir)` gives back the same bundle, so every later stage
(warmup, rollout, train, evaluate, answer) loads the same files. Nothing in `transformers` is
patched: compression happens outside the model and enters through `mm_encoder_outputs`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import (
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)

from data_contracts.config import ModelConfig
from stages.model import tokenizer as tok

BUNDLE_FILE = "marc_model.json"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
RUNTIME_FIELDS = ("teacher_frames", "compression_ratio", "merge_window", "target_frames",
                  "compression_backend", "dtype")
"""ModelConfig fields a caller may change on a saved model; the rest describe the saved architecture."""


@dataclass(frozen=True)
class FrameGeometry:
    """How frames become vision-tower patches and language-model tokens (Qwen2-VL's processor).

    A frame of H x W px is cut into 14 px patches; two consecutive frames share one temporal
    patch (a temporal group); 2x2 neighbouring patches merge into one LM token. So one temporal
    group of an H x W video is P = (H / 28) * (W / 28) LM tokens.
    """

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    frame_size: int | None = 112  # fixed square side (tiny model); None: aspect-preserving smart_resize
    min_pixels: int = 56 * 56
    max_pixels: int = 112 * 112

    @property
    def factor(self) -> int:  # side granularity: one LM token covers factor x factor px
        return self.patch_size * self.merge_size

    def frame_hw(self, height: int, width: int) -> tuple[int, int]:
        """Resized (H, W) of a source frame of height x width px."""
        if self.frame_size is not None:
            return self.frame_size, self.frame_size
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def grid_hw(self, frame_h: int, frame_w: int) -> tuple[int, int]:
        """Vision-tower patch grid (gh, gw) of one frame."""
        return frame_h // self.patch_size, frame_w // self.patch_size

    def tokens_per_group(self, frame_h: int, frame_w: int) -> int:
        """P: LM tokens of one temporal group."""
        gh, gw = self.grid_hw(frame_h, frame_w)
        return gh * gw // self.merge_size**2


@dataclass
class ModelBundle:
    """Everything a stage needs to run the model: weights, tokenizer, config, frame geometry."""

    model: Qwen2_5_VLForConditionalGeneration
    tokenizer: PreTrainedTokenizerBase
    config: ModelConfig
    geometry: FrameGeometry

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def video_token_id(self) -> int:
        return self.model.config.video_token_id

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids("<|im_end|>")

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def run_params(self) -> dict:
        """Model and frame settings to log with every run (MLflow params)."""
        h, w = self.geometry.frame_hw(self.config.frame_size, self.config.frame_size)
        return {
            "model.source": self.config.checkpoint or "tiny-random",
            "model.frame_hw": f"{h}x{w}" if self.geometry.frame_size else "smart_resize",
            "model.max_pixels": self.geometry.max_pixels,
            "model.tokens_per_group": self.geometry.tokens_per_group(h, w),
            "model.teacher_frames": self.config.teacher_frames,
            "model.parameters": sum(p.numel() for p in self.model.parameters()),
            "model.vocab": len(self.tokenizer),
        }


# --------------------------------------------------------------------------------------------
# The tiny model.
# --------------------------------------------------------------------------------------------


def tiny_qwen_config(config: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config at the sizes of `config`, wired to the local tokenizer's ids."""
    head_dim = config.hidden_size // config.num_heads
    half = head_dim // 2  # rotary frequencies per head, split over (temporal, height, width)
    mrope_section = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]  # Qwen: [16, 24, 24] of 64
    ids = tokenizer.convert_tokens_to_ids
    vocab = len(tokenizer)
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope_section},
            bos_token_id=None,
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=config.vision_depth,
            hidden_size=config.vision_hidden_size,
            intermediate_size=config.vision_intermediate_size,
            num_heads=config.vision_num_heads,
            out_hidden_size=config.hidden_size,  # the merger projects straight into the LM width
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,  # windowed blocks see 112 px squares, as in Qwen2.5-VL
            fullatt_block_indexes=[config.vision_depth - 1],  # last block attends over the whole frame
            tokens_per_second=2,  # as Qwen2.5-VL-3B: temporal M-RoPE position = 2 per second of video
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,  # as the 3B; saves a vocab x hidden matrix
    )


def build_tiny(config: ModelConfig) -> ModelBundle:
    """The CPU default: tokenizer trained here, model randomly initialised with `config.seed`."""
    tokenizer = tok.build_tokenizer(config.vocab_size)
    qwen_config = tiny_qwen_config(config, tokenizer)
    torch.manual_seed(config.seed)
    model = Qwen2_5_VLForConditionalGeneration(qwen_config).to(DTYPES[config.dtype])
    geometry = FrameGeometry(frame_size=config.frame_size, max_pixels=config.frame_size**2)
    return _finish(ModelBundle(model, tokenizer, config, geometry))


# --------------------------------------------------------------------------------------------
# A pretrained checkpoint.
# --------------------------------------------------------------------------------------------


def _checkpoint_geometry(path: Path, config: ModelConfig) -> FrameGeometry:
    """Frame geometry from the checkpoint's preprocessor_config.json, max_pixels from the preset."""
    pre = {}
    if (path / "preprocessor_config.json").is_file():
        pre = json.loads((path / "preprocessor_config.json").read_text())
    size = pre.get("size") or {}
    min_pixels = pre.get("min_pixels") or size.get("shortest_edge") or 56 * 56
    max_pixels = config.max_pixels or pre.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280
    return FrameGeometry(
        patch_size=pre.get("patch_size", 14),
        merge_size=pre.get("merge_size", 2),
        temporal_patch_size=pre.get("temporal_patch_size", 2),
        image_mean=tuple(pre.get("image_mean", OPENAI_CLIP_MEAN)),
        image_std=tuple(pre.get("image_std", OPENAI_CLIP_STD)),
        frame_size=None,
        min_pixels=int(min_pixels),
        max_pixels=int(max_pixels),
    )


def load_checkpoint(config: ModelConfig) -> ModelBundle:
    """The GPU preset: a local Qwen2.5-VL checkpoint directory; nothing is downloaded."""
    path = Path(config.checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"model.checkpoint {path} is not a directory (nothing is downloaded)")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(path), local_files_only=True, dtype=DTYPES[config.dtype]
    )
    tokenizer = tok.load_tokenizer(path)
    return _finish(ModelBundle(model, tokenizer, config, _checkpoint_geometry(path, config)))


def build_model(config: ModelConfig) -> ModelBundle:
    """The model a preset names: the checkpoint if set, else the tiny random model."""
    return load_checkpoint(config) if config.checkpoint else build_tiny(config)


# --------------------------------------------------------------------------------------------
# Save / load.
# --------------------------------------------------------------------------------------------


def save_model(bundle: ModelBundle, directory: str | Path) -> Path:
    """Weights + tokenizer + marc_model.json into `directory` (written aside, then swapped in)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    bundle.model.save_pretrained(tmp)
    bundle.tokenizer.save_pretrained(tmp)
    meta = {"model_config": bundle.config.model_dump(mode="json"), "geometry": asdict(bundle.geometry)}
    (tmp / BUNDLE_FILE).write_text(json.dumps(meta, indent=2))
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def load_model(directory: str | Path, config: ModelConfig | None = None) -> ModelBundle:
    """A bundle saved by `save_model`. `config` (optional) replaces the saved ModelConfig for the
    run-time fields (compression ratio, window, target frames, backend); the architecture and the
    geometry always come from the files."""
    directory = Path(directory)
    meta = json.loads((directory / BUNDLE_FILE).read_text())
    saved = ModelConfig.model_validate(meta["model_config"])
    if config is not None:
        config = saved.model_copy(update={k: getattr(config, k) for k in RUNTIME_FIELDS})
    config = config or saved
    geometry = meta["geometry"]
    geometry = FrameGeometry(**{**geometry, "image_mean": tuple(geometry["image_mean"]),
                                "image_std": tuple(geometry["image_std"])})
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(directory), local_files_only=True, dtype=DTYPES[config.dtype]
    )
    return _finish(ModelBundle(model, tok.load_tokenizer(directory), config, geometry))


def _finish(bundle: ModelBundle) -> ModelBundle:
    """Generation defaults shared by every path: stop at <|im_end|>, pad with <|endoftext|>."""
    gen = bundle.model.generation_config
    gen.eos_token_id = bundle.eos_token_id
    gen.pad_token_id = bundle.pad_token_id
    gen.bos_token_id = None
    bundle.model.eval()
    return bundle


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "FrameGeometry", "ModelBundle", "build_model", "build_tiny", "load_checkpoint", "load_model",
    "save_model", "tiny_qwen_config", "parameter_count",
]
