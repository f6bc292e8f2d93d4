"""Train the router once and store it, so that fronts load it at start: ``python -m core.router.train``.

Run by `make models`, and by hand after editing `core/router/corpus/train.jsonl` or an expert's routing profile in a
config. First the embedding table (distilled from all-MiniLM-L6-v2 once: about two minutes on two cores), then one
classifier per distinct routing profile among the configs given (by default the embedded and the production config).
What is stored and sound is skipped.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from core.config import EMBEDDED_CONFIG, PRODUCTION_CONFIG, load_config
from core.router import dataset, embedding, fit, store
from core.router.policy import expert_profile, training_set


def stored_embedding(directory: Path) -> embedding.StaticEmbedding:
    """The embedding table, distilled now if it is not stored yet."""
    table_key = embedding.key()
    try:
        table = embedding.load(table_key, directory)
        print(f"{embedding.path(table_key, directory)} is up to date")
        return table
    except store.Refused as refused:
        print(f"distilling the embedding table ({refused}) ...", flush=True)
    from core.router import distill  # torch and transformers: only here
    started = time.perf_counter()
    table = distill.distill()
    target = embedding.save(table, table_key, directory)
    print(f"distilled in {time.perf_counter() - started:.0f} s -> {target}")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("configs", nargs="*", type=Path, default=[EMBEDDED_CONFIG, PRODUCTION_CONFIG])
    parser.add_argument("--directory", type=Path, default=store.DIRECTORY)
    parser.add_argument("--corpus", type=Path, default=dataset.TRAIN)
    args = parser.parse_args(argv)
    corpus = dataset.load(args.corpus)
    table = stored_embedding(args.directory)
    for config in args.configs:
        profile = expert_profile(load_config(config).experts)
        if len({domain for domain, _ in profile}) < 2:
            print(f"{config.name}: one domain, nothing to train")
            continue
        texts, domains = training_set(profile, corpus)
        model_key = store.key(texts, domains, embedding.key())
        target = store.path(model_key, args.directory)
        try:
            store.load(model_key, args.directory)
            print(f"{config.name}: {target} is up to date")
            continue
        except store.Refused as refused:
            if target.exists():
                print(f"{config.name}: replacing it: {refused}")
        started = time.perf_counter()
        fitted = fit.fit(texts, domains, table)
        store.save(fitted.model(), fitted.head(), model_key, args.directory)
        print(f"{config.name}: trained on {len(texts)} texts in {time.perf_counter() - started:.1f} s -> {target}")


if __name__ == "__main__":
    main()
