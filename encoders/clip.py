"""CLIP backbones from open_clip: a registered model by name with weights from a hub tag or a local file,
or a tiny config (tests, the demo), plus its tokenizer, preprocessing and default adapter targets.

open_clip's towers keep q/k/v packed inside ``nn.MultiheadAttention``; ``mm.attach`` splits them, so the
targets "q_proj", "k_proj", "v_proj" reach the attention of both towers (CLIP-LoRA's choice).

``LadderCLIP`` puts a QLadder (``mm.qladder``) beside the frozen vision tower: forward pre-hooks on the
vision blocks hand the ladder each block's input, and the pooled ladder queries, mapped into the joint
space by the tower's own ``ln_post`` and ``proj``, are added to the image feature through a zero-init gate.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mm.errors import MMTuneError
from mm.qladder import QLadder, QLadderConfig

#: Adapter targets: q, k, v of every attention layer of both towers.
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj"]
VISION_PREFIX, TEXT_PREFIX = "visual.", "transformer."

_TEXT_TINY = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
#: Small random-init configs (open_clip model_cfg dicts) with the real BPE tokenizer's vocabulary.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-test": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
        "text_cfg": _TEXT_TINY,
    },
    "tiny-digits": {  # 8x8 digits, 2x2 patches: the model `make demo` pretrains
        "embed_dim": 64,
        "vision_cfg": {"image_size": 8, "patch_size": 2, "width": 64, "layers": 4, "head_width": 16,
                       "mlp_ratio": 2.0},
        "text_cfg": {**_TEXT_TINY, "width": 64, "heads": 4, "layers": 2, "mlp_ratio": 2.0},
    },
}
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


class CheckpointError(MMTuneError, ValueError):
    """A local checkpoint is missing, unreadable or does not fit the model; the message names the file."""


class UnknownClipError(MMTuneError, KeyError):
    """An unknown CLIP model name or pretrained tag; the message lists close or known names."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class PretrainedUnavailableError(MMTuneError, RuntimeError):
    """A pretrained tag needs the hub, which is not reachable; the message says to pass a local path."""


@dataclass
class ClipBundle:
    """A CLIP model with what using it needs. ``tokenizer(list_of_str) -> LongTensor (n, context)``."""

    model: nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    preprocess: Callable[[Any], torch.Tensor]
    name: str
    pretrained: str | None
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1])

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())


def clip_names() -> list[str]:
    import open_clip

    return sorted(TINY_CONFIGS) + open_clip.list_models()


def _is_path(pretrained: str) -> bool:
    return os.path.exists(pretrained) or "/" in pretrained or os.sep in pretrained or (
        pretrained.endswith(CHECKPOINT_SUFFIXES))


def create_clip(name: str, pretrained: str | None = None, *, device: str | torch.device = "cpu",
                seed: int | None = None) -> ClipBundle:
    """The open_clip model ``name`` (or a tiny config) in eval mode.

    ``pretrained``: None (random init, ``seed`` makes it reproducible), a local checkpoint file
    (safetensors, or a torch file read with ``weights_only=True``), or an open_clip tag such as
    "openai", which needs the network to download.
    """
    import open_clip

    if name not in TINY_CONFIGS and name not in open_clip.list_models():
        close = difflib.get_close_matches(name, clip_names(), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownClipError(f"unknown CLIP model {name!r}.{hint} Tiny configs: {', '.join(sorted(TINY_CONFIGS))}; "
                       "open_clip models: see open_clip.list_models()")
    if seed is not None:
        torch.manual_seed(seed)
    if pretrained is not None and not _is_path(pretrained):
        model, preprocess = _from_tag(name, pretrained)
    elif name in TINY_CONFIGS:
        model = open_clip.CLIP(**copy.deepcopy(TINY_CONFIGS[name]))
        size = model.visual.image_size
        preprocess = open_clip.image_transform(size[0] if isinstance(size, tuple) else size, is_train=False)
    else:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    if pretrained is not None and _is_path(pretrained):
        load_clip_weights(model, pretrained)
    context = model.context_length if name in TINY_CONFIGS else None
    tokenizer = (open_clip.SimpleTokenizer(context_length=context) if name in TINY_CONFIGS
                 else open_clip.get_tokenizer(name))
    model.to(device).eval()
    return ClipBundle(model=model, tokenizer=tokenizer, preprocess=preprocess, name=name, pretrained=pretrained)


def _from_tag(name: str, tag: str) -> tuple[nn.Module, Callable]:
    import open_clip

    if name in TINY_CONFIGS:
        raise PretrainedUnavailableError(f"{name!r} is a tiny random config: it has no pretrained tags; "
                                         "pass a local checkpoint path as pretrained")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if tag not in tags:
        raise UnknownClipError(f"unknown pretrained tag {tag!r} for {name!r}; known tags: {', '.join(tags) or '(none)'}; "
                       "or pass a local checkpoint path")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag)
    except Exception as err:  # hub errors come in many types (OSError, HTTP, offline mode)
        raise PretrainedUnavailableError(
            f"could not fetch pretrained weights {tag!r} for {name!r} from the hub ({type(err).__name__}: "
            f"{err}); on an offline machine pass a local checkpoint file as pretrained") from err
    return model, preprocess


def _checkpoint_file(path: Path) -> Path:
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix in CHECKPOINT_SUFFIXES)
        if len(found) != 1:
            raise CheckpointError(f"{path}: expected exactly one checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}) "
                                  f"in the folder, found {[p.name for p in found]}")
        return found[0]
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    return path


def load_clip_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a full CLIP checkpoint (strict) through open_clip's converter; errors name the file."""
    import open_clip

    file = _checkpoint_file(Path(path))
    try:
        open_clip.load_checkpoint(model, str(file), strict=True, weights_only=True)
    except Exception as err:  # safetensors / torch / load_state_dict each raise their own types
        raise CheckpointError(f"{file}: cannot load into {type(model).__name__} "
                              f"({type(err).__name__}: {str(err)[:600]})") from err


def save_clip_weights(model: nn.Module, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """The full model state dict as safetensors (atomic), loadable by ``create_clip(name, path)``."""
    from safetensors.torch import save_file

    from mm.state import atomic_write

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"format": "open_clip.state_dict", **{k: json.dumps(v) for k, v in (metadata or {}).items()}}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def tower_of(module_name: str) -> str:
    """'vision' or 'text' for a module name inside an open_clip CLIP."""
    return "vision" if module_name.startswith(VISION_PREFIX) else "text"


@contextlib.contextmanager
def vision_block_inputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects the input (batch, tokens, width) of every vision block during the forwards inside."""
    transformer = model.visual.transformer
    batch_first = getattr(transformer, "batch_first", True)
    captured: list[torch.Tensor] = []

    def keep(_module: nn.Module, args: tuple) -> None:
        captured.append(args[0] if batch_first else args[0].transpose(0, 1))

    handles = [block.register_forward_pre_hook(keep) for block in transformer.resblocks]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class LadderCLIP(nn.Module):
    """An open_clip CLIP with a QLadder beside its vision tower. The CLIP may carry adapters too."""

    def __init__(self, clip: nn.Module, ladder: QLadder) -> None:
        super().__init__()
        depth = len(clip.visual.transformer.resblocks)
        if ladder.depth != depth or ladder.width != clip.visual.transformer.width:
            raise CheckpointError(f"QLadder built for depth {ladder.depth}, width {ladder.width}; the vision tower "
                             f"has depth {depth}, width {clip.visual.transformer.width}")
        self.clip, self.ladder = clip, ladder

    @classmethod
    def build(cls, clip: nn.Module, config: QLadderConfig) -> LadderCLIP:
        transformer = clip.visual.transformer
        heads = transformer.resblocks[0].attn.num_heads
        ladder = QLadder(config, width=transformer.width, depth=len(transformer.resblocks), heads=heads)
        return cls(clip, ladder.to(next(clip.parameters()).device))

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        visual = self.clip.visual
        with vision_block_inputs(self.clip) as hidden_states:
            frozen = self.clip.encode_image(images)
        pooled = visual.ln_post(self.ladder.output(hidden_states).mean(dim=1))
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        features = self.ladder.fuse(frozen, pooled)
        return nn.functional.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.clip.encode_text(text, normalize=normalize)
