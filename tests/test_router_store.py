"""The stored router: trained once by `python -m core.router.train`, loaded by fronts in milliseconds.

The loaded router must decide exactly as a freshly trained one; an edited corpus (a stale hash) must fall back to
training with one warning saying how to retrain; a damaged or tampered file must be refused without running any of
its content, and the front then trains instead of failing or routing with a broken model.
"""
from __future__ import annotations

import json
import logging
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests

from core.config import EMBEDDED_CONFIG, AppConfig, load_config
from core.protocol import ChatMessage
from core.router import Router, dataset, embedding, evaluation, policy, store
from tests.conftest import REPO, FakeUpstream, Server, make_config

TRAIN, HELDOUT = dataset.load(dataset.TRAIN), dataset.load(dataset.HELDOUT)


@pytest.fixture(scope="module")
def config() -> AppConfig:
    return load_config(EMBEDDED_CONFIG)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A store directory filled by the command `make models` runs, given the embedding table `make models` distilled
    (distilling it again takes minutes)."""
    directory = tmp_path_factory.mktemp("router-store")
    table = embedding.path(embedding.key())
    assert table.is_file(), f"{table} is missing: run `make models`"
    shutil.copy(table, directory)
    subprocess.run([sys.executable, "-m", "core.router.train", "--directory", str(directory)], cwd=REPO, check=True)
    return directory


@pytest.fixture
def store_at(monkeypatch):
    """Point the store at a directory and forget the process's cached classifiers (before and after)."""
    def forget() -> None:
        policy._trained.cache_clear()
        policy._embedding.cache_clear()

    def point(directory: Path) -> None:
        monkeypatch.setattr(store, "DIRECTORY", directory)
        forget()

    yield point
    forget()


def the_key(config: AppConfig, corpus=TRAIN) -> str:
    return store.key(*policy.training_set(policy.expert_profile(config.experts), corpus), embedding.key())


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == policy.__name__ and r.levelno == logging.WARNING]


def test_the_loaded_router_decides_exactly_as_the_freshly_trained_one(trained, store_at, config, caplog) -> None:
    store_at(trained)
    with caplog.at_level(logging.WARNING):
        loaded = Router.from_config(config)
    assert warnings(caplog) == []  # it loaded: it did not train
    assert loaded._head is not None and loaded._embedding is not None
    fresh = Router(config.experts, config.default_expert, config.router.threshold, corpus=TRAIN)
    assert fresh._head is not None
    conversations = [(ChatMessage(role="user", content=e.text),) for e in (*TRAIN, *HELDOUT)]
    conversations += [case.messages for path in evaluation.INDEPENDENT_SETS
                      for case in evaluation.load_independent(path)]
    for messages in conversations:
        a, b = loaded.route(messages), fresh.route(messages)
        assert (a.expert, a.scores, a.reason, a.stage, a.confidence) == \
               (b.expert, b.scores, b.reason, b.stage, b.confidence), messages


def test_training_again_finds_the_model_up_to_date(trained) -> None:
    before = {p: p.stat().st_mtime_ns for p in trained.iterdir()}
    out = subprocess.run([sys.executable, "-m", "core.router.train", "--directory", str(trained)], cwd=REPO,
                         check=True, capture_output=True, text=True).stdout
    assert "up to date" in out and {p: p.stat().st_mtime_ns for p in trained.iterdir()} == before


def test_a_front_loads_the_stored_router_without_importing_sklearn(trained) -> None:
    """Importing sklearn alone costs a front 1.2 s at start; the stored router needs only numpy."""
    probe = (f"import sys, pathlib\nfrom core.router import Router, store\nfrom core.config import load_config\n"
             f"store.DIRECTORY = pathlib.Path({str(trained)!r})\n"
             f"router = Router.from_config(load_config({str(EMBEDDED_CONFIG)!r}))\n"
             f"print(router.route_prompt('Write a Python function that reverses a list.').reason)\n"
             f"print('sklearn' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, check=True, capture_output=True, text=True)
    assert result.stdout.split() == ["classifier", "False"], result.stderr
    assert "training the router now" not in result.stderr


def test_an_edited_corpus_trains_with_one_warning_until_retrained(trained, store_at, config, caplog, monkeypatch,
                                                                  tmp_path) -> None:
    edited = tmp_path / "train.jsonl"
    edited.write_text(dataset.TRAIN.read_text() + json.dumps(
        {"text": "How do I rotate the TLS certificate on our ingress?", "domain": "technical", "lang": "en"}) + "\n")
    monkeypatch.setattr(dataset, "TRAIN", edited)
    directory = tmp_path / "store"
    shutil.copytree(trained, directory)
    store_at(directory)
    with caplog.at_level(logging.WARNING):
        router = Router.from_config(config)
    [warning] = warnings(caplog)
    assert "no trained router" in warning and "python -m core.router.train" in warning
    assert router.route_prompt("Write a Python function that reverses a list.").reason == "classifier"

    subprocess.run([sys.executable, "-m", "core.router.train", "--directory", str(directory), "--corpus", str(edited)],
                   cwd=REPO, check=True)
    caplog.clear()
    store_at(directory)
    with caplog.at_level(logging.WARNING):
        Router.from_config(config)
    assert warnings(caplog) == []


class _Payload:
    """Pickled into a tampered file: unpickling it would create `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _rewrite(path: Path, change) -> None:
    """Load every array of a stored file, let `change` edit the dict, save it back under the same name."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    change(arrays)
    with path.open("wb") as out:
        np.savez(out, **arrays)


def _truncate(path: Path, _: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path, _: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the weights: only the zip's CRC can tell
    path.write_bytes(bytes(data))


def _pickle_inside(path: Path, marker: Path) -> None:
    def change(arrays: dict) -> None:
        arrays["classes"] = np.array([_Payload(marker), "general"], dtype=object)
    _rewrite(path, change)


def _whole_file_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_Payload(marker)))


def _fewer_weights(path: Path, _: Path) -> None:
    _rewrite(path, lambda arrays: arrays.update(weights=arrays["weights"][:-1]))


def _not_a_number(path: Path, _: Path) -> None:
    def change(arrays: dict) -> None:
        arrays["weights"] = arrays["weights"].copy()
        arrays["weights"][5, 0] = np.nan
    _rewrite(path, change)


def _another_key(path: Path, _: Path) -> None:
    _rewrite(path, lambda arrays: arrays.update(key=np.array("0123456789abcdef")))


def _an_extra_array(path: Path, _: Path) -> None:
    _rewrite(path, lambda arrays: arrays.update(extra=np.zeros(3)))


def _bad_utf8(path: Path, _: Path) -> None:
    _rewrite(path, lambda arrays: arrays.update(
        words=np.concatenate((arrays["words"], np.array([0xFF], dtype=np.uint8)))))


def _zip_of_text(path: Path, _: Path) -> None:
    with zipfile.ZipFile(path, "w") as out:
        out.writestr("weights.npy", "not an array")


@pytest.mark.parametrize("damage", [_truncate, _flip_a_byte, _pickle_inside, _whole_file_pickle, _fewer_weights,
                                    _not_a_number, _another_key, _an_extra_array, _bad_utf8, _zip_of_text])
def test_a_damaged_or_tampered_file_is_refused_without_running_it(trained, config, tmp_path, damage) -> None:
    directory = tmp_path / "store"
    shutil.copytree(trained, directory)
    model_key = the_key(config)
    marker = tmp_path / "pickle-ran"
    damage(store.path(model_key, directory), marker)
    with pytest.raises(store.Refused):
        store.load(model_key, directory)
    assert not marker.exists()


def test_a_refused_file_makes_the_front_train_and_say_why(trained, store_at, config, tmp_path, caplog) -> None:
    directory = tmp_path / "store"
    shutil.copytree(trained, directory)
    _fewer_weights(store.path(the_key(config), directory), tmp_path)
    store_at(directory)
    with caplog.at_level(logging.WARNING):
        router = Router.from_config(config)
    [warning] = warnings(caplog)
    assert "bad weights" in warning and "training the router now" in warning
    assert router.route_prompt("Write a Python function that reverses a list.").expert == "qwen_coder"


# --- the embedding stage ------------------------------------------------------------------------


def test_without_the_embedding_table_the_router_trains_tfidf_alone_and_says_so(trained, store_at, config, tmp_path,
                                                                               caplog) -> None:
    directory = tmp_path / "store"
    shutil.copytree(trained, directory)
    embedding.path(embedding.key(), directory).unlink()
    store_at(directory)
    with caplog.at_level(logging.WARNING):
        router = Router.from_config(config)
    [warning] = warnings(caplog)
    assert "without the embedding stage" in warning and "make models" in warning
    assert router._head is None
    assert {router.route_prompt(e.text).stage for e in HELDOUT[::7]} <= {policy.RULES, policy.TFIDF}


def test_an_unsure_classifier_asks_the_embedding_and_says_so(trained, store_at, config) -> None:
    store_at(trained)
    router = Router.from_config(config)
    decisions = [router.route_prompt(e.text) for e in HELDOUT]
    blended = [d for d in decisions if d.stage == policy.EMBEDDING]
    assert blended and len(blended) < len(decisions) / 2  # asked only when TF-IDF is unsure
    for decision in decisions:
        assert decision.confidence == decision.scores[decision.expert] or decision.stage == policy.RULES
        assert sum(decision.scores.values()) == pytest.approx(1.0, abs=1e-5)


def test_an_embedding_vector_is_the_unit_mean_of_its_tokens(trained) -> None:
    table = embedding.load(embedding.key(), trained)
    vector = table.vector("which folders are hogging my drive")
    assert vector.shape == (embedding.EMBEDDING_DIMS,) and float(vector @ vector) == pytest.approx(1.0)
    assert not table.vector("").any() and not table.vector("\u2603\u2603").any()  # no known token: zeros


def _table_rows_cut(path: Path, _: Path) -> None:
    _rewrite(path, lambda arrays: arrays.update(table=arrays["table"][:-1]))


def _table_as_float64(path: Path, _: Path) -> None:
    _rewrite(path, lambda arrays: arrays.update(table=arrays["table"].astype(np.float64)))


def _tokenizer_garbage(path: Path, _: Path) -> None:
    _rewrite(path, lambda arrays: arrays.update(tokenizer=np.frombuffer(b"{not json", dtype=np.uint8)))


def _table_pickled(path: Path, marker: Path) -> None:
    _rewrite(path, lambda arrays: arrays.update(table=np.array([_Payload(marker)], dtype=object)))


@pytest.mark.parametrize("damage", [_truncate, _flip_a_byte, _table_pickled, _table_rows_cut, _table_as_float64,
                                    _tokenizer_garbage, _another_key])
def test_a_damaged_embedding_table_is_refused_without_running_it(trained, tmp_path, damage) -> None:
    directory = tmp_path / "store"
    shutil.copytree(trained, directory)
    marker = tmp_path / "pickle-ran"
    damage(embedding.path(embedding.key(), directory), marker)
    with pytest.raises(store.Refused):
        embedding.load(embedding.key(), directory)
    assert not marker.exists()


def test_v1_route_says_when_the_embedding_stage_decided(tmp_path) -> None:
    """A real front on the stored router (as `make models` left it): /v1/route names the stage and its confidence."""
    upstream = FakeUpstream(models=("echo",))
    server = None
    try:
        config, _ = make_config(tmp_path, engine="fake", upstream=upstream.url)
        server = Server("standard", config, tmp_path / "front.log").wait_healthy()
        route = requests.post(server.url + "/v1/route", timeout=30,
                              json={"messages": [{"role": "user", "content": "which folders are hogging my drive"}]})
        assert route.status_code == 200, route.text
        decision = route.json()
        assert decision["stage"] == policy.EMBEDDING and decision["expert"] == "qwen_coder"
        assert 0.0 < decision["confidence"] < policy.EMBEDDING_BELOW
        assert decision["confidence"] == decision["scores"]["qwen_coder"] == max(decision["scores"].values())
        assert "training the router now" not in (tmp_path / "front.log").read_text()
    finally:
        if server is not None:
            server.stop()
        upstream.stop()
