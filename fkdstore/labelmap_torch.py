"""Making label maps with torch: a spatial class-map teacher and the top-K selection of its maps.

A label-map teacher maps a batch of whole images ``[B, 3, h_in, w_in]`` (at the teacher's input size) to
class maps ``[B, C, S, S]`` of raw scores, one score vector per cell of its last feature map. ReLabel (and
TokenLabeling's ``generate_label.py``) obtain it from a classifier by applying the final linear layer as a
1x1 convolution to the last feature map *before* global pooling (:class:`SpatialClassifier`); for a
network whose head is ``fc(mean over cells of features)``, the mean of the class map over its cells is
then exactly the network's logits. Any module with that input/output contract is a teacher.

:func:`spatial_teacher` finds the feature extractor and the classifier of common classifiers (an
``nn.Sequential`` ending in global pooling and a linear layer, torchvision's ResNet family, timm models) and
wraps them in a :class:`SpatialClassifier`. :func:`topk_maps` keeps the top ``K`` classes of every cell, in
the order of the codecs' selection rule.

Imports torch (this module is only imported by code that runs a teacher).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .codecs import _array as A
from .codecs.base import check_num_classes
from .errors import ValidationError
from .labelmap import parse_k, parse_size
from .transforms import parse_input_size

__all__ = ["SpatialClassifier", "spatial_teacher", "class_map_shape", "topk_maps"]


class SpatialClassifier(nn.Module):
    """A classifier's head applied at every cell of its last feature map: ``forward(x) -> [B, C, h, w]``.

    ``features``: a module mapping images to the last feature map, ``[B, D, h, w]`` (e.g. a torchvision
    ResNet without its pooling and fc: ``nn.Sequential(*list(resnet.children())[:-2])``), or tokens
    ``[B, N, D]`` of a ViT-like model with ``N = h * h`` (or ``h * h + 1``: the first token, the class
    token, is dropped), reshaped to ``[B, D, h, h]`` row-major as TokenLabeling does. ``fc``: the trained
    ``nn.Linear(D, C)`` (used as a 1x1 convolution with its own weight and bias, not copied) or an
    ``nn.Conv2d(D, C, 1)``.
    """

    def __init__(self, features: nn.Module, fc: nn.Module) -> None:
        super().__init__()
        if not isinstance(features, nn.Module):
            raise TypeError(f"features must be an nn.Module. Got {type(features).__name__}.")
        if isinstance(fc, nn.Conv2d):
            if fc.kernel_size != (1, 1):
                raise ValidationError(f"fc must be an nn.Linear or a 1x1 nn.Conv2d. Got kernel {fc.kernel_size}.")
        elif not isinstance(fc, nn.Linear):
            raise TypeError(f"fc must be an nn.Linear or a 1x1 nn.Conv2d. Got {type(fc).__name__}.")
        self.features = features
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        if f.dim() == 3:
            B, N, D = f.shape
            h = round(N ** 0.5)
            if h * h + 1 == N:
                f, N = f[:, 1:], N - 1
            elif h * h != N:
                raise ValidationError(f"token features must have N = h*h or h*h + 1 tokens. Got N={N}.")
            f = f.transpose(1, 2).reshape(B, D, h, h)
        if f.dim() != 4:
            raise ValidationError(f"features must return [B, D, h, w] or tokens [B, N, D]. Got {tuple(f.shape)}.")
        if isinstance(self.fc, nn.Conv2d):
            return self.fc(f)
        w = self.fc.weight
        return F.conv2d(f, w.reshape(w.shape[0], w.shape[1], 1, 1), self.fc.bias)


class _ForwardFeatures(nn.Module):
    """``model.forward_features`` as a module (timm's feature extractor: maps or tokens before pooling)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # nn.Module.__getattr__ is typed Tensor | Module in torch's stubs; forward_features is the model's method
        return self.model.forward_features(x)  # type: ignore[operator]


def _is_global_pool(m: nn.Module) -> bool:
    return isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and m.output_size in (1, (1, 1))


def spatial_teacher(model: nn.Module, *, passthrough: bool = False) -> nn.Module:
    """A classifier as a label-map teacher: its classifier applied at every cell of its last feature map
    (:class:`SpatialClassifier`, sharing the model's modules and weights). Recognised, in this order:

    1. a :class:`SpatialClassifier`: returned as is;
    2. an ``nn.Sequential`` ending in global average pooling (``AdaptiveAvgPool2d(1)``), optionally
       ``nn.Flatten``, and an ``nn.Linear`` (e.g. :func:`fkdstore.testing.tiny_cnn`): features = the modules
       before the pooling;
    3. a module whose last two children are ``avgpool`` (global pooling) and ``fc`` (``nn.Linear``) and whose
       ``forward`` runs its children in order (torchvision's ResNet / ResNeXt / Wide ResNet): features = the
       children before ``avgpool``;
    4. a module with ``forward_features`` and ``get_classifier()`` returning an ``nn.Linear`` (timm): features
       = ``forward_features`` (maps ``[B, D, h, w]``, or ViT tokens, see :class:`SpatialClassifier`).

    For any other module: :class:`TypeError` naming it (build ``SpatialClassifier(features, fc)`` yourself), or,
    with ``passthrough=True``, the module unchanged (taken to return class maps already; the runner checks the
    shape). Max pooling heads are recognised too, but then the class map's mean is not the model's logits.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module. Got {type(model).__name__}.")
    if isinstance(model, SpatialClassifier):
        return model
    if isinstance(model, nn.Sequential) and len(model) >= 3 and isinstance(model[-1], nn.Linear):
        tail = -2 if isinstance(model[-2], nn.Flatten) else -1
        if _is_global_pool(model[tail - 1]):
            return SpatialClassifier(model[:tail - 1], model[-1])
    children = dict(model.named_children())
    if list(children)[-2:] == ["avgpool", "fc"]:
        avgpool, fc = children["avgpool"], children["fc"]
        if _is_global_pool(avgpool) and isinstance(fc, nn.Linear):
            return SpatialClassifier(nn.Sequential(*list(children.values())[:-2]), fc)
    get_classifier = getattr(model, "get_classifier", None)
    if hasattr(model, "forward_features") and callable(get_classifier):
        head = get_classifier()
        if isinstance(head, nn.Linear):
            return SpatialClassifier(_ForwardFeatures(model), head)
    if passthrough:
        return model
    raise TypeError(f"cannot find the feature extractor and classifier of {type(model).__name__}; build "
                    f"SpatialClassifier(features, fc) (features: images -> last feature map, fc: its nn.Linear).")


def class_map_shape(teacher: nn.Module, input_size) -> tuple[int, int, int]:
    """``(C, h, w)`` of ``teacher``'s output for images of ``input_size`` (an int or ``(height, width)``),
    measured on 2 black images on the teacher's device in eval mode (ValidationError when the output is not
    class maps ``[B, C, h, w]``)."""
    size = parse_input_size(input_size)
    p = next(teacher.parameters(), None)
    teacher.eval()
    with torch.inference_mode():
        out = teacher(torch.zeros((2, 3, *size), device=p.device if p is not None else "cpu"))
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValidationError(f"a label-map teacher must return class maps [B, C, h, w]. For 2 images of "
                              f"{size[0]} x {size[1]} it returned {got}.")
    return int(out.shape[1]), int(out.shape[2]), int(out.shape[3])


def topk_maps(class_maps: torch.Tensor, k: int, *, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``k`` classes of every cell of ``class_maps`` ``[B, C, h, w]``: ``(indices, scores)``, both
    ``[B, K, S, S]`` on the input's device, ``indices`` int32 (a store holds them as uint16 up to 65536
    classes), ``scores`` float32, classes in descending score order with ties broken by
    the lower class index (the codecs' selection rule).

    ``size=None`` requires square maps (``S = h = w``). ``size=S`` with maps of another size average-pools
    them to ``S x S`` first (``adaptive_avg_pool2d``: exact block means when ``S`` divides ``h`` and ``w``)
    -- an explicit choice, never done silently.
    """
    A.check_array(class_maps, "class_maps")
    if not A.is_torch(class_maps) or class_maps.dim() != 4 or not class_maps.is_floating_point():
        raise ValidationError(f"class_maps must be a floating torch tensor [B, C, h, w]. "
                              f"Got {type(class_maps).__name__} {tuple(class_maps.shape)}.")
    _, C, h, w = class_maps.shape
    kk = parse_k(k)
    c = check_num_classes(int(C))
    if kk > c:
        raise ValidationError(f"k must be <= the number of classes {c}. Got {kk}.")
    if size is None:
        if h != w:
            raise ValidationError(f"class_maps must be square (h == w) unless size is given. Got {h} x {w}.")
        parse_size(int(h))
        maps = class_maps
    else:
        s = parse_size(size)
        maps = class_maps if (h, w) == (s, s) else F.adaptive_avg_pool2d(class_maps, (s, s))
    z = maps.detach().float().permute(0, 2, 3, 1)  # [B, S, S, C]: the selection runs over the last axis
    idx = A.topk_indices(z, kk)
    scores = torch.gather(z, -1, idx)
    return idx.permute(0, 3, 1, 2).to(torch.int32).contiguous(), scores.permute(0, 3, 1, 2).contiguous()
