"""Which install extra a missing module belongs to, for a one-line hint instead of a traceback.

``pip install slimrank`` is the slim server install: ``serve``, ``query`` and ``bundle`` run
on it. Training, compression, the pipeline and the reports import modules of the ``train``
extra (``--engine ray`` those of ``ray``); without them the CLI prints
:func:`install_hint` and exits 2.
"""

from __future__ import annotations

TRAIN_EXTRA = "train"
# Top-level modules that only the offline commands import, by the extra that installs them.
EXTRA_OF_MODULE = {
    "torch": TRAIN_EXTRA,
    "pandas": TRAIN_EXTRA,
    "pyarrow": TRAIN_EXTRA,
    "onnx": TRAIN_EXTRA,
    "onnxscript": TRAIN_EXTRA,
    "matplotlib": TRAIN_EXTRA,
    "ray": "ray",
    "implicit": "peers",  # ALS, a peer of the catalog-scale comparison
}


def missing_extra(err: ModuleNotFoundError) -> str | None:
    """Return the extra that installs the module ``err`` could not find, or None."""
    return EXTRA_OF_MODULE.get((err.name or "").partition(".")[0])


def install_hint(err: ModuleNotFoundError) -> str | None:
    """Return one line naming the missing module and the pip command, or None if no extra has it."""
    extra = missing_extra(err)
    if extra is None:
        return None
    return (
        f"this command needs {err.name}, which the slim install leaves out: "
        f"pip install 'slimrank[{extra}]'"
    )
