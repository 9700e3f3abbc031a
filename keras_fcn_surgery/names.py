"""Names the package gives models and layers, valid for every runtime that reads them.

TensorFlow takes a model's name as a root name scope (``^[A-Za-z0-9.][A-Za-z0-9_.\\/>-]*$``: no leading
underscore), ONNX, TFLite and OpenVINO take node and signature names from the same strings. A Keras
model named after a class ``_Net`` is ``__net``; its FCN must not be ``__net_fcn``.
"""

from __future__ import annotations

import re

_OTHER_CHARACTERS = re.compile(r"[^A-Za-z0-9_.-]")
_LEADING = re.compile(r"^[^A-Za-z0-9]+")


def runtime_name(*parts: str) -> str:
    """``parts`` joined by ``_`` as a name every runtime accepts.

    Characters other than letters, digits, ``_``, ``.`` and ``-`` become
    ``_``; the name starts with a letter or digit (leading others dropped);
    an empty result is ``model``.

    Example:
        ```python
        assert runtime_name("__net", "fcn") == "net_fcn"
        ```
    """
    joined = _OTHER_CHARACTERS.sub("_", "_".join(str(p) for p in parts if str(p)))
    return _LEADING.sub("", joined) or "model"
