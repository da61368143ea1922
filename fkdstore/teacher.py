"""The teacher: building it from ``"module:factory"``, loading its weights safely, fingerprinting it,
and running it on uint8 crops.

* :func:`load_teacher` imports a factory, calls it and loads a state dict (``.pt``/``.pth`` through
  ``torch.load(weights_only=True)``, which executes no code from the file; ``.safetensors`` when that
  package is installed). Loading is strict: missing or unexpected keys are an error.
* :func:`file_sha256` and :func:`state_sha256` are the provenance hashes the runner stores in ``meta``.
* :class:`~fkdstore.transforms.Replay` is what the teacher sees (crop size, normalisation, resampling filter), and
  :class:`TeacherForward` runs the teacher on a batch of uint8 crops as the runner does: normalise on
  the device, channels_last and autocast on CUDA, and return float32 logits ``(B, C)``.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Mapping
from typing import Any

import torch

from .errors import ValidationError
from .transforms import Replay, normalize

__all__ = ["load_teacher", "file_sha256", "state_sha256", "TeacherForward", "to_channels_last"]

STATE_DICT_WRAPPERS = ("state_dict", "model", "model_state_dict")  # common checkpoint layouts


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def state_sha256(module: torch.nn.Module) -> str:
    """Hex sha256 of a module's state dict (names, dtypes, shapes and bytes, in name order): a fingerprint
    of the teacher's weights that does not depend on the device or memory format."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _load_state_dict(path: str | os.PathLike) -> dict:
    """A state dict from ``path``, loaded without executing code from the file.

    ``.safetensors`` through the ``safetensors`` package; anything else through
    ``torch.load(map_location="cpu", weights_only=True)``, unwrapping ``{"state_dict"|"model"|
    "model_state_dict": ...}`` checkpoints and the ``module.`` prefix DistributedDataParallel adds.
    """
    p = os.fspath(path)
    if p.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file  # noqa: PLC0415 - optional dependency
        except ImportError:
            raise ValidationError(f"{p}: loading .safetensors needs the 'safetensors' package") from None
        return load_file(p)
    sd = torch.load(p, map_location="cpu", weights_only=True)
    for key in STATE_DICT_WRAPPERS:
        if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
            sd = sd[key]
            break
    if not isinstance(sd, Mapping):
        raise ValidationError(f"{p} must hold a state dict. Got {type(sd).__name__}.")
    if sd and all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def resolve_factory(spec: str):
    """The callable named by ``"module:factory"`` (``factory`` may be dotted), imported but not called:
    :class:`ValidationError` for a malformed spec, a module that does not import, a missing attribute or one
    that is not callable."""
    if not isinstance(spec, str):
        raise TypeError(f"teacher must be a 'MODULE:FACTORY' string. Got {type(spec).__name__}.")
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise ValidationError(f"teacher must be 'MODULE:FACTORY', e.g. 'fkdstore.testing:tiny_cnn'. Got {spec!r}.")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValidationError(f"cannot import teacher module {mod_name!r}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValidationError(f"module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValidationError(f"teacher factory {spec!r} must be callable. Got {type(obj).__name__}.")
    return obj


def load_teacher(spec: str, weights: str | os.PathLike | None = None,
                 kwargs: Mapping | None = None) -> torch.nn.Module:
    """Build a teacher from ``"module:factory"`` (:func:`resolve_factory`), calling it with ``kwargs``,
    and load ``weights`` (.pt/.pth/.safetensors state dict, strict) when given."""
    obj = resolve_factory(spec)
    model = obj(**dict(kwargs or {}))
    if not isinstance(model, torch.nn.Module):
        raise ValidationError(f"teacher factory {spec!r} must return a torch.nn.Module. Got {type(model).__name__}.")
    if weights:
        missing, unexpected = model.load_state_dict(_load_state_dict(weights), strict=False)
        if missing or unexpected:
            raise ValidationError(
                f"weights {weights} do not fit teacher {spec!r}: missing keys {list(missing)[:5]}, "
                f"unexpected keys {list(unexpected)[:5]}"
            )
    return model


def to_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with its 4-d parameters and buffers in channels_last memory format (in place, as
    ``Module.to(memory_format=torch.channels_last)``); returns it."""
    # torch's Module.to overloads omit memory_format, which Module.to accepts (documented) and passes on
    return module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def _logits(out: Any) -> torch.Tensor:
    """Accept a tensor, a tuple/list whose first item is the logits, or an object with ``.logits``."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValidationError(f"teacher must return a logits tensor (B, C). Got {type(out).__name__}.")


class TeacherForward:
    """``forward(uint8 crops [B, 3, S, S]) -> float32 logits [B, C]`` on ``device``.

    Puts ``teacher`` in eval mode and moves it to ``device`` (in place, as ``Module.to`` does); on CUDA
    it also uses channels_last and, with ``amp``, autocast in bf16 (fp16 where bf16 is unsupported).
    Call it under :func:`torch.inference_mode`.
    """

    def __init__(self, teacher: torch.nn.Module, inputs: Replay, device: torch.device, amp: bool = True):
        if not isinstance(teacher, torch.nn.Module):
            raise TypeError(f"teacher must be a torch.nn.Module. Got {type(teacher).__name__}.")
        self.teacher, self.inputs, self.device = teacher, inputs, device
        self.use_cuda = device.type == "cuda"
        teacher.eval()
        teacher.to(device)
        if self.use_cuda:
            to_channels_last(teacher)
        self.amp_dtype = None
        if self.use_cuda and amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def __call__(self, x_uint8: torch.Tensor) -> torch.Tensor:
        x = normalize(x_uint8.to(self.device, non_blocking=True), self.inputs.mean, self.inputs.std)
        if self.use_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            return _logits(self.teacher(x)).float()

    def num_classes(self) -> int:
        """The teacher's output width, measured on a batch of 2 black crops (nothing is written)."""
        with torch.inference_mode():
            out = self(torch.zeros((2, 3, *self.inputs.input_size), dtype=torch.uint8))
        if out.ndim != 2 or out.shape[0] != 2 or out.shape[1] < 1:
            raise ValidationError(
                f"teacher must return logits of shape (B, C). For a batch of 2 it returned {tuple(out.shape)}."
            )
        return int(out.shape[1])
