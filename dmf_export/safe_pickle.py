"""What a pickle from elsewhere may rebuild: the one policy for dataset pickles and
checkpoints, so that a file never runs code.

A pickle builds containers, numbers and strings by itself; anything else it names as a
global (a function to call, a class to build), and that is where code would run. Two
readers, two lists of admitted globals, both here:

- dataset pickles (``data.load_pickle``) go through ``RestrictedUnpickler`` with
  ``ARRAY_GLOBALS``: numpy arrays, dtypes and scalars of any dtype (an object array's
  items are themselves unpickled under this list), ``_codecs.encode`` for latin-1
  only and ``bytes()`` with no argument (how protocol-2 pickles written by Python 3
  spell bytes, and empty bytes);
- checkpoints go through ``torch.load(weights_only=True)``, torch's own restricted
  unpickler (it knows torch's tensor reconstruction), with ``NUMBER_GLOBALS`` admitted
  beyond torch's own: numpy scalars of a plain number's dtype (bool, integers, floats),
  as training scripts store ``acc``/``epoch``, and nothing that wraps an object.

The lists stay apart on purpose: a checkpoint has no business holding arrays, and the
wrapped scalar of ``NUMBER_GLOBALS`` would refuse the numpy strings a dataset may hold.
"""
from __future__ import annotations

import pickle

import numpy as np

# where numpy 1.x (numpy.core) and 2.x (numpy._core) keep the reconstruction functions;
# a pickle names the one of the numpy that wrote it
NUMPY_CORES = ("numpy.core", "numpy._core")
# the functions numpy's own __reduce__ names, found through numpy rather than by a module
# path, so they are this numpy's whichever name the pickle uses
_reconstruct = np.zeros(1).__reduce__()[0]
_scalar = np.float64(0).__reduce__()[0]
_frombuffer = np.zeros(1).__reduce_ex__(5)[0]


# -- dataset pickles -------------------------------------------------------------------

def _latin1_encode(text, encoding="latin1"):
    # protocol-2 pickles written by Python 3 spell bytes as _codecs.encode(str, "latin1")
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _empty_bytes(*args):
    # protocol-2 pickles written by Python 3 spell b"" as bytes() (an empty array's
    # data); bytes(n) would allocate n bytes, so nothing but the empty call is admitted
    if args:
        raise pickle.UnpicklingError("refusing bytes() with arguments")
    return b""


ARRAY_GLOBALS: dict[tuple[str, str], object] = {
    ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): _empty_bytes, ("builtins", "bytes"): _empty_bytes,
    **{key: value for core in NUMPY_CORES for key, value in (
        ((f"{core}.multiarray", "_reconstruct"), _reconstruct),
        ((f"{core}.multiarray", "scalar"), _scalar),
        ((f"{core}.numeric", "_frombuffer"), _frombuffer))},
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only the globals of ``admitted`` ((module, name) → object);
    any other global and any persistent reference is refused before anything runs."""

    def __init__(self, file, admitted: dict[tuple[str, str], object] = ARRAY_GLOBALS,
                 **kwargs):
        super().__init__(file, **kwargs)
        self.admitted = admitted

    def find_class(self, module, name):
        found = self.admitted.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return found

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing a persistent reference")


# -- checkpoints -----------------------------------------------------------------------

# numpy scalars of these kinds only (bool, integers, floats): what a metric or a counter
# is; an object dtype would hand back whatever it wraps.
_NUMBER_KINDS = "biuf"


def _plain_number(dtype) -> bool:
    return (isinstance(dtype, np.dtype) and dtype.kind in _NUMBER_KINDS
            and dtype.names is None and dtype.subdtype is None and not dtype.hasobject)


def _number_dtype(spec, align=False, copy=True):
    dtype = np.dtype(spec) if isinstance(spec, str) else None
    if not _plain_number(dtype) or not isinstance(align, bool) or not isinstance(copy, bool):
        raise pickle.UnpicklingError(f"numpy dtype {spec!r} is not a plain number's")
    return np.dtype(spec, align, copy)


def _number_scalar(dtype, data):
    if not _plain_number(dtype) or not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError(f"numpy scalar of dtype {dtype!r} is not a plain number")
    return _scalar(dtype, data)


# What rebuilds a numpy number, e.g. ``np.float64(0.68)``: pickled as
# ``scalar(dtype('f8', False, True) + BUILD state, raw bytes)``. Both callables are
# wrapped to refuse anything but a plain number's dtype; the dtype classes are needed for
# the BUILD step only. In ``torch.serialization.safe_globals``' form: (callable, name) or
# a class.
NUMBER_GLOBALS: tuple = (
    (_number_dtype, "numpy.dtype"),
    *((_number_scalar, f"{core}.multiarray.scalar") for core in NUMPY_CORES),
    *sorted({type(np.dtype(code)) for code in "?bBhHiIlLqQefd"}, key=str),
)
