"""Model families: which code turns pixels into a .nic payload and back.

Every .nic file names its family by the container's model id, and every weights file
by its config's ``model_id``. A family is a module named after it, with

* ``MODEL_ID``, ``NAME`` and ``FORMAT_VERSION`` (the container version it writes),
* ``from_arrays(arrays)`` / ``to_arrays(model, half)``: the trainable model (torch) from
  and to a weights file's named arrays (:mod:`nic.weights`), ValueError on anything
  inconsistent, and optionally ``load(arrays)``: the model that codes, without torch
  (else the trainable one codes),
* ``compress(model, source, quality, effort, progress, spill_bytes)``: the substreams
  (:class:`nic.container.Substream`) of a uint8 image or of rows read strip by strip,
* ``decompress(model, quality, height, width, gray, substreams, sink, progress,
  spill_bytes, on_latents)``: calls ``on_latents(store)`` once every substream is
  decoded (the caller opens its output there), then hands pixel rows to ``sink``, top
  to bottom; FormatError for a payload that does not fit the family (names, shapes,
  corrupt streams: :func:`expect_substreams`),

optionally ``step_for(quality, weights_hash)``: (trained quality, step) for a quality
between two trained ones, which ``compress`` and ``decompress`` then take as ``step=``
(the file's critical STEP section; without it a fractional quality falls to the trained
one below),
and its model object has ``qualities`` and ``latent_channels``. Training is each
family's own (``model.forward``, :mod:`nic.train`). :mod:`nic.api` only dispatches.

| model id | family        | module              | what it is                                      |
|---------:|---------------|---------------------|-------------------------------------------------|
| 1        | ``factorized``  | :mod:`nic.factorized` | Ballé et al. 2017: a learned density per channel |
| 2        | ``hyperprior``  | :mod:`nic.hyperprior` | mean-scale hyperprior with an integer h_s        |
| 3        | ``pixels``      | :mod:`nic.pixels`     | no model: the pixels, each within a step (no weights) |

A family without weights (``pixels``) has a ``MODEL`` in its module and writes the
weights hash ``NO_WEIGHTS``: :func:`builtin`.

Nothing here imports numpy or torch until a family is asked for (``nic info`` stays light).
"""

from __future__ import annotations

import importlib
import json
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported where it is used: nic info stays light
    import numpy as np

MODULES = {1: "factorized", 2: "hyperprior", 3: "pixels"}
"""Model id → family module (and name), for every family this nic reads."""

NAMES = {name: model_id for model_id, name in MODULES.items()}

DEFAULT = "hyperprior"
"""The family ``nic encode`` uses without ``--model`` (nic.api then also tries ``pixels``)."""

WEIGHTLESS = ("pixels",)
"""Families that code without a weights file."""


def model_id_named(name: str) -> int:
    """The model id of a family name; ValueError for a name this nic does not know."""
    if name not in NAMES:
        raise ValueError(f"unknown model family {name!r} (this nic knows {', '.join(NAMES)})")
    return NAMES[name]


def name_of(model_id: int) -> str:
    """The family's name for a model id, or "unknown (N)"."""
    return MODULES.get(model_id, f"unknown ({model_id})")


def family(model_id: int) -> ModuleType:
    """The family module of a model id; ValueError for an id this nic does not know."""
    if model_id not in MODULES:
        raise ValueError(f"unknown model family id {model_id} (this nic knows "
                         + ", ".join(f"{i} = {n}" for i, n in MODULES.items()) + ")")
    return importlib.import_module(f"nic.{MODULES[model_id]}")


def builtin(model_id: int):
    """(model, weights hash) of a family that has no weights file, else None."""
    if MODULES.get(model_id) not in WEIGHTLESS:
        return None
    module = family(model_id)
    return module.MODEL, module.NO_WEIGHTS


def _config_fields(arrays: dict[str, np.ndarray]) -> dict:
    """A weights file's config, parsed; ValueError if it has none."""
    import numpy as np

    try:
        fields = json.loads(bytes(arrays["config"].astype(np.uint8)).decode())
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"weights have no valid config ({exc})") from None
    if not isinstance(fields, dict):
        raise ValueError("weights have no valid config (not a JSON object)")
    return fields


def model_id_of(arrays: dict[str, np.ndarray]) -> int:
    """The model id in a weights file's config; ValueError if it has none."""
    try:
        model_id = _config_fields(arrays)["model_id"]
    except KeyError as exc:
        raise ValueError(f"weights have no valid config ({exc})") from None
    if not isinstance(model_id, int) or isinstance(model_id, bool):
        raise ValueError("weights have no valid config (model_id is not an integer)")
    return model_id


def base_of(arrays: dict[str, np.ndarray]) -> bytes | None:
    """The weights hash of the file whose arrays this one's ``base.*`` are (its config's
    ``base``: a hyperprior file that shares the factorized weights' transforms instead of
    holding a copy), or None where the file holds everything itself."""
    return _named_weights(arrays, "base")


def extends_of(arrays: dict[str, np.ndarray]) -> bytes | None:
    """The weights hash of the earlier weights of the same family that this file extends
    (its config's ``extends``: it holds only what it changed, and every other array is
    the earlier file's), or None."""
    return _named_weights(arrays, "extends")


def _named_weights(arrays: dict[str, np.ndarray], field: str) -> bytes | None:
    try:
        value = _config_fields(arrays).get(field, "")
    except ValueError:
        return None  # the family's loader says what is wrong with the config
    if not value:
        return None
    try:
        digest = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        digest = b""
    if len(digest) != 8:
        raise ValueError(f"weights name an invalid {field} {value!r} (expected a weights hash)")
    return digest


def from_arrays(arrays: dict[str, np.ndarray]):
    """The model of a weights file, built by the family its config names."""
    return family(model_id_of(arrays)).from_arrays(arrays)


def load(arrays: dict[str, np.ndarray]):
    """The model that codes files with a weights file's arrays (its family's ``load``,
    numpy only, where the family has one; else its trainable model)."""
    module = family(model_id_of(arrays))
    loader = module.load if defines(module, "load") else module.from_arrays
    return loader(arrays)


def reads_lazily(arrays) -> bool:
    """Whether the family of these weights codes from arrays read as it uses them (its
    ``load`` does); else the whole file is read at once."""
    return defines(family(model_id_of(arrays)), "load")


def defines(module, name: str) -> bool:
    """Whether a family module defines ``name`` itself. ``hasattr`` would ask its
    ``__getattr__`` (:func:`trainable_names`), which imports the torch twin to answer."""
    return name in vars(module)


NEEDS_TORCH = "this needs PyTorch (training, effort 2..4, bench), which is not installed: pip install 'nic[train]'"


def import_with_torch(module: str):
    """A module that imports torch (a family's torch twin, ``nic.quantization``), imported;
    where torch is missing, a ModuleNotFoundError (name "torch") that says what to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != "torch":
            raise
        raise ModuleNotFoundError(NEEDS_TORCH, name="torch") from None


def trainable_names(module: str, owner: str):
    """A module ``__getattr__`` for a family module (``owner``) that coding imports without
    torch: names it lacks (the trainable network's: ``Codec``, ``from_arrays``, …) come
    from ``module``, its torch twin, imported on first use."""
    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return getattr(import_with_torch(module), name)
        except AttributeError:
            raise AttributeError(f"module {owner!r} has no attribute {name!r}") from None

    return __getattr__


def expect_substreams(substreams: list, expected: list[tuple[bytes, tuple[int, int, int]]]) -> list:
    """The substreams (:class:`nic.container.Substream`) in the order and shapes a family
    expects; FormatError naming the difference otherwise."""
    from .container import FormatError

    names = [s.name for s in substreams]
    if names != [name for name, _ in expected]:
        found = ", ".join(n.decode("ascii", "replace") for n in names)
        wanted = ", ".join(n.decode() for n, _ in expected)
        raise FormatError(f"payload has substreams {found}; this model family needs {wanted}")
    for stream, (name, shape) in zip(substreams, expected):
        if tuple(stream.shape) != tuple(shape):
            raise FormatError(f"substream {name.decode()} has shape {'x'.join(map(str, stream.shape))}, "
                              f"expected {'x'.join(map(str, shape))}")
    return substreams
