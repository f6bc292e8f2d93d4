"""The trained classifier on disk: written once by `python -m core.router.train` (`make models`), read by every
front at start in a few milliseconds instead of training for seconds.

A file is named by the hash of what it was trained from (the training texts and labels, the classifier's and the
fit's source, sklearn's version, the embedding table if any), so an edited corpus or config profile finds no file and
the front trains instead. The format is a plain `.npz` of numeric and text arrays, read with `allow_pickle=False`:
loading runs no code from the file, and a file that is corrupt, truncated, of another format or inconsistent is
refused with `Refused`.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.models.paths import MODELS
from core.router.classifier import DomainClassifier, Head, Model

DIRECTORY = MODELS / "router"
FORMAT = 2  # the layout of the arrays below
_CODE = tuple(Path(__file__).with_name(name) for name in ("classifier.py", "fit.py"))  # read, not imported: no sklearn
_SEPARATOR = "\0"  # between a vocabulary's terms, stored as one UTF-8 blob (a term holding it is refused at save)
_ARRAYS = {"format", "key", "classes", "words", "chars", "idf", "weights", "intercept", "beta"}
_HEAD = {"head_weights", "head_intercept"}


class Refused(Exception):
    """The stored file is missing, or is not one this code can trust for this corpus."""


def key(texts: Sequence[str], domains: Sequence[str], embedding_key: str | None) -> str:
    """The hash of everything the model depends on: the labelled texts, the code that fits and scores it, and the
    embedding table its head reads."""
    digest = hashlib.sha256(f"format {FORMAT}\nscikit-learn {importlib.metadata.version('scikit-learn')}\n"
                            f"embedding {embedding_key}\n".encode())
    for source in _CODE:
        digest.update(source.read_bytes())
    for text, domain in zip(texts, domains, strict=True):
        digest.update(f"{len(text)}:{text}{len(domain)}:{domain}".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:16]


def path(model_key: str, directory: Path | None = None) -> Path:
    return (directory or DIRECTORY) / f"router-{model_key}.npz"


def write_arrays(target: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write arrays as an .npz, atomically (a front starting meanwhile sees the old state or the new)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}-", suffix=".npz")
    try:
        with os.fdopen(handle, "wb") as out:
            np.savez(out, **arrays)
        os.chmod(temporary, 0o644)  # mkstemp makes it private; fronts of other users read it
        os.replace(temporary, target)
    except BaseException:
        os.unlink(temporary)
        raise
    return target


def read_arrays(source: Path, names: set[str], optional: set[str] = frozenset()) -> dict[str, np.ndarray]:
    """The named arrays of an .npz, without running anything in it; `Refused` if it is missing, damaged, or holds
    other arrays."""
    if not source.is_file():
        raise Refused(f"no trained router at {source}")
    try:
        with np.load(source, allow_pickle=False) as data:
            if not names <= set(data.files) <= names | optional:
                raise Refused(f"{source}: arrays {sorted(data.files)}, expected {sorted(names)}")
            return {name: data[name] for name in data.files}
    except Refused:
        raise
    except Exception as error:  # noqa: BLE001 - numpy and zipfile raise many kinds on a damaged file; all mean no
        raise Refused(f"{source}: unreadable ({type(error).__name__}: {error})") from error


def _blob(terms: Sequence[str]) -> np.ndarray:
    if any(_SEPARATOR in term for term in terms):
        raise ValueError("a vocabulary term holds the separator")
    return np.frombuffer(_SEPARATOR.join(terms).encode(), dtype=np.uint8)


def save(model: Model, head: Head | None, model_key: str, directory: Path | None = None) -> Path:
    """Write the model (and the embedding head, if any) under its key."""
    arrays = {"format": np.array(FORMAT), "key": np.array(model_key), "classes": np.array(model.classes),
              "words": _blob(model.words), "chars": _blob(model.chars), "idf": model.idf, "weights": model.weights,
              "intercept": model.intercept, "beta": np.array(model.beta)}
    if head is not None:
        arrays |= {"head_weights": head.weights, "head_intercept": head.intercept}
    return write_arrays(path(model_key, directory), arrays)


def load(model_key: str, directory: Path | None = None) -> tuple[DomainClassifier, Head | None]:
    """The stored classifier and embedding head for this key; `Refused` (saying why) if there is none or it cannot
    be trusted."""
    source = path(model_key, directory)
    arrays = read_arrays(source, _ARRAYS, _HEAD)
    try:
        model, head = _model(arrays, model_key)
    except UnicodeDecodeError as error:
        raise Refused(f"{source}: unreadable vocabulary ({error})") from error
    return DomainClassifier(model), head


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise Refused(f"stored router: {what}")


def _floats(arrays: dict[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    value = arrays[name]
    _expect(value.dtype == np.float64 and value.shape == shape and bool(np.isfinite(value).all()),
            f"bad {name}: {value.dtype} {value.shape}, expected finite float64 {shape}")
    return value


def _model(arrays: dict[str, np.ndarray], model_key: str) -> tuple[Model, Head | None]:
    """The model in the arrays, after checking every type, shape and value the scoring relies on."""
    fmt = arrays["format"]
    _expect(fmt.shape == () and fmt.dtype.kind == "i" and int(fmt) == FORMAT, "another format")
    _expect(arrays["key"].shape == () and arrays["key"].dtype.kind == "U" and str(arrays["key"]) == model_key,
            "trained from another corpus")
    classes = arrays["classes"]
    _expect(classes.ndim == 1 and classes.dtype.kind == "U" and len(set(classes.tolist())) == len(classes) >= 2,
            "bad classes")
    terms = []
    for name in ("words", "chars"):
        blob = arrays[name]
        _expect(blob.ndim == 1 and blob.dtype == np.uint8, f"bad {name}")
        found = tuple(blob.tobytes().decode().split(_SEPARATOR)) if len(blob) else ()
        _expect(len(set(found)) == len(found), f"repeated {name}")
        terms.append(found)
    features, columns = sum(map(len, terms)), 1 if len(classes) == 2 else len(classes)
    model = Model(tuple(classes.tolist()), *terms, _floats(arrays, "idf", (features,)),
                  _floats(arrays, "weights", (features, columns)), _floats(arrays, "intercept", (columns,)),
                  float(_floats(arrays, "beta", ())))
    if not _HEAD & arrays.keys():
        return model, None
    _expect(_HEAD <= arrays.keys(), "half an embedding head")
    weights = arrays["head_weights"]
    _expect(weights.ndim == 2, "bad head_weights")
    head = Head(_floats(arrays, "head_weights", (weights.shape[0], len(classes))),
                _floats(arrays, "head_intercept", (len(classes),)))
    return model, head
