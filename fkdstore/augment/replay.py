"""Replay of augmented slots: the one function the teacher-runner and ``TorchDataset`` both call.

:func:`replay_slots` turns an image, its slots' boxes/flips and their stored (or freshly sampled) params
into the final uint8 pixels, following the replay equation of ``spec/format-v4.md`` section 6.1::

    x = crop(image_i, box[i, s], flip[i, s]); x = premix(x, params[i, s])
    for each mixing policy P with partner j != -1 (the partner's slot is s itself):
        x = P.apply(x, params[i, s], premix(crop(image_j, box[j, s], flip[j, s]), params[j, s]))

(with a ``partner_crop`` policy the partner's box, flip and pre-mix params are the slot's own
``partner_crop_*`` columns instead of slot ``(j, s)``'s).

The partners' inputs come from a caller-supplied ``partner`` callable, so the runner can *sample* them and
the dataset can *read* them from the store. :func:`mix_weights` gives the label weights of the result.
numpy + Pillow only (no torch).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from fkdstore.augment.crop import crop
from fkdstore.augment.pipeline import Pipeline, slot_params

__all__ = ["Partner", "replay_slots", "mix_weights"]


class Partner(NamedTuple):
    """What replay needs of a partner slot ``(j, t)``: its decoded image (PIL), box, flip and params."""

    image: Any
    box: Sequence[int]
    flip: bool
    params: Mapping[str, Any]


def replay_slots(pipeline: Pipeline, image, slots: Sequence[int], boxes: np.ndarray, flips: np.ndarray,
                 params: Mapping[str, np.ndarray], size: tuple[int, int], interpolation: str,
                 partner: Callable[[int, int], Partner] | None = None,
                 partner_image: Callable[[int], Any] | None = None) -> np.ndarray:
    """The final pixels of slots ``slots`` of one image: uint8 ``(m, H, W, 3)``.

    ``boxes``, ``flips`` and every pipeline column of ``params`` have leading dim ``m`` (row ``k`` = slot
    ``slots[k]``); ``partner(j, s)`` returns a :class:`Partner` for slot ``s`` of a mixed slot's partner
    image ``j`` (called once per distinct ``(j, s)``; the caller may cache decoded images). ``size`` is
    ``(H, W)``. A pipeline with a ``partner_crop`` policy takes the partner's crop and pre-mix params from
    the slot itself and only needs the partner's decoded image: ``partner_image(j)`` (default
    ``partner(j, s).image``).
    """
    m = len(boxes)
    out = np.empty((m, size[0], size[1], 3), dtype=np.uint8)
    cache: dict[tuple[int, int], np.ndarray] = {}
    carried = pipeline.partner_crop
    for k in range(m):
        prm = slot_params(params, k)
        x = crop(image, [int(v) for v in boxes[k]], bool(flips[k]), size, interpolation)
        pairs = pipeline.partners(prm) if pipeline.mixing else {}
        t = int(slots[k])
        ys: dict[str, np.ndarray] = {}
        if carried is not None and pairs:
            j = next(iter(pairs.values()))  # Pipeline.validate: every mixing policy of the slot names j
            if partner_image is not None:
                img = partner_image(j)
            elif partner is not None:
                img = partner(j, t).image
            else:
                raise ValueError("replay_slots needs a partner or partner_image callable for mixed slots")
            pbox, pflip = carried.crop_of(prm)
            y = carried.premix(crop(img, pbox, pflip, size, interpolation), prm)
            out[k] = pipeline.apply(x, prm, partners={name: y for name in pairs})
            continue
        for name, j in pairs.items():
            if (j, t) not in cache:
                if partner is None:
                    raise ValueError("replay_slots needs a partner callable for a pipeline with mixing policies")
                src = partner(j, t)
                cache[(j, t)] = pipeline.premix(crop(src.image, [int(v) for v in src.box], bool(src.flip), size,
                                                     interpolation), src.params)
            ys[name] = cache[(j, t)]
        out[k] = pipeline.apply(x, prm, partners=ys)
    return out


def mix_weights(pipeline: Pipeline, params: Mapping[str, np.ndarray], size: tuple[int, int]):
    """Label weights of ``m`` replayed slots: ``(lam (m,), partner_index (m, P), partner_weight (m, P))``.

    ``P`` = number of mixing policies, in pipeline order. Applying them in order, policy ``p`` keeps the share
    ``l_p`` of the pixels so far and brings in ``1 - l_p`` of its partner, so the own image weighs
    ``lam = prod_p l_p`` and partner ``p`` weighs ``(1 - l_p) * prod_{q > p} l_q``; the weights sum to 1.
    ``partner_index`` is -1 (weight 0) where a policy did not mix the slot.
    """
    mixing = pipeline.mixing
    m = len(next(iter(params.values()))) if params else 0
    lam = np.ones(m, np.float64)
    pidx = np.full((m, len(mixing)), -1, np.int64)
    pw = np.zeros((m, len(mixing)), np.float64)
    for k in range(m):
        prm = slot_params(params, k)
        for p, pol in enumerate(mixing):
            info = pol.mix_info(prm, size)
            pw[k, :p] *= info.lam
            lam[k] *= info.lam
            if info.partner != -1:
                pidx[k, p] = info.partner
                pw[k, p] = 1.0 - info.lam
    return lam, pidx, pw
