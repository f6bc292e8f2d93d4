"""Train the router once and store it, so that fronts load it at start: ``python -m core.router.train``.

Run by `make models`, and by hand after editing `core/router/corpus/train.jsonl` or an expert's routing profile in a
config. Trains one model per distinct routing profile among the configs given (by default the embedded
and the production config); a profile whose model is stored and sound is skipped.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from core.config import EMBEDDED_CONFIG, PRODUCTION_CONFIG, load_config
from core.router import dataset, fit, store
from core.router.policy import expert_profile, training_set


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("configs", nargs="*", type=Path, default=[EMBEDDED_CONFIG, PRODUCTION_CONFIG])
    parser.add_argument("--directory", type=Path, default=store.DIRECTORY)
    parser.add_argument("--corpus", type=Path, default=dataset.TRAIN)
    args = parser.parse_args(argv)
    corpus = dataset.load(args.corpus)
    for config in args.configs:
        profile = expert_profile(load_config(config).experts)
        if len({domain for domain, _ in profile}) < 2:
            print(f"{config.name}: one domain, nothing to train")
            continue
        texts, domains = training_set(profile, corpus)
        model_key = store.key(texts, domains)
        target = store.path(model_key, args.directory)
        try:
            store.load(model_key, args.directory)
            print(f"{config.name}: {target} is up to date")
            continue
        except store.Refused as refused:
            if target.exists():
                print(f"{config.name}: replacing it: {refused}")
        started = time.perf_counter()
        fitted = fit.fit(texts, domains)
        store.save(fitted.model(), model_key, args.directory)
        print(f"{config.name}: trained on {len(texts)} texts in {time.perf_counter() - started:.1f} s -> {target}")


if __name__ == "__main__":
    main()
