"""Argument checks shared by the public Python API: one rule and one wording everywhere
(SPEC 4: TypeError for the wrong kind of value, ValueError for a value out of range; the
message names the argument, what was expected and what was given)."""

from __future__ import annotations

import math
import operator

import numpy as np

from . import _arrays


def is_bool(value) -> bool:
    """A Python, numpy or torch bool (scalar or 0-d array): never an int nor a number here,
    though Python and torch would let it pass as one."""
    if isinstance(value, (bool, np.bool_)):
        return True
    dtype = getattr(value, "dtype", None)
    return dtype is not None and str(dtype) in ("bool", "torch.bool")


def as_int(value, name: str, low: int, high: int | None = None) -> int:
    """An int (numpy/torch integer scalars too, not bool) in ``[low, high]``."""
    if is_bool(value):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if n < low or (high is not None and n > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{name} must be {bound}, got {n}")
    return n


def as_shape(shape, name: str = "shape") -> tuple[int, ...]:
    """A shape: a sequence of ints >= 0 (``shape[i]`` named in errors), or one int."""
    if hasattr(shape, "__index__") and not is_bool(shape) and getattr(shape, "ndim", 0) == 0:
        shape = (shape,)
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        raise TypeError(f"{name} must be a sequence of ints, got {type(shape).__name__}")
    return tuple(as_int(n, f"{name}[{i}]", 0) for i, n in enumerate(shape))


def as_scale(scale, default_dim: int | None = None, name: str = "scale") -> float:
    """A finite float > 0; None gives ``1 / sqrt(default_dim)`` when a dim is given."""
    if scale is None and default_dim is not None:
        return _arrays.default_scale(default_dim)
    if is_bool(scale):
        raise TypeError(f"{name} must be a number, got bool")
    if isinstance(scale, (str, bytes)) or not hasattr(scale, "__float__"):
        raise TypeError(f"{name} must be a number, got {type(scale).__name__}")
    s = float(scale)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {s}")
    return s


def as_flag(value, name: str) -> bool:
    """A bool (numpy bools too): ``normalize="no"`` must not silently mean True."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def as_dtype(dtype, name: str = "dtype", allowed: tuple[str, ...] = _arrays.FLOAT_DTYPES) -> str:
    """A dtype in ``allowed`` (default: the float ones) given as a name, a numpy dtype or a
    torch dtype, as its name."""
    if isinstance(dtype, str):
        text = dtype
    elif type(dtype).__module__ == "torch":
        text = _arrays.torch_dtype_name(dtype)
    else:
        try:
            text = np.dtype(dtype).name
        except TypeError:
            text = str(dtype)
    if text not in allowed:
        raise TypeError(f"{name} must be one of {', '.join(allowed)}, got {text}")
    return text


def same_setting(name: str, given, held, owner: str) -> None:
    """A setting passed to a call must agree with the one its state carries (SPEC 3).
    Floats compare to within 1e-12 relative, so ``D ** -0.5`` matches ``1 / sqrt(D)``."""
    if given is None:
        return
    equal = math.isclose(given, held, rel_tol=1e-12, abs_tol=0.0) if isinstance(held, float) else given == held
    if not equal:
        raise ValueError(f"{name}={given!r} disagrees with the {owner}'s {name} {held!r}; a {owner} carries the "
                         f"{name} it was built with (pass {name}=None to use it)")
