"""Top-p's cost: our nucleus sampler against vLLM's CPU path, alone and through the standard front (8082's kind).

1. The sampler alone, in this process: vLLM 0.32's `TopKTopPSampler.forward_cpu` (sort, then a draw over the whole
   vocabulary) against ours (`core.host.fast_sampler`), top_p 0.9 at temperature 0.8 on language-like logits, for
   vocabularies of 49k (SmolLM2), 152k (Qwen2.5) and 262k (Gemma 3, Aya) and batches of 1, 8 and 32. Median ms.
   "mask only" is vLLM's draw over the whole vocabulary after our mask: why ours draws over the nucleus.
2. Through the front: two configs that differ only in engine.fast_sampler, each with its own host and runner.
   The same streamed chat requests (128 tokens, ignore_eos) with the expert's default sampling (temperature 0.7,
   top_p 0.9), and with `top_p: 1.0`, in alternating rounds. Prints tokens/s and the ratios.

    .venv/bin/python -m bench.bench_sampling [--rounds 2] [--requests 16] [--max-tokens 128] [--no-servers]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from bench.suite import Run, bench_config, fronts, load, messages, wait_ready

EXPERT = "phi4_fast"
VOCABULARIES = (49_152, 151_936, 262_144)
BATCHES = (1, 8, 32)


def language_like(rows: int, vocab: int, temperature: float) -> torch.Tensor:
    """A peaked head and a Zipf tail with noise, shuffled per row, as a language model's logits look."""
    base = -1.2 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    rows_ = [(base + torch.randn(vocab) * 0.5)[torch.randperm(vocab)] for _ in range(rows)]
    return torch.stack(rows_) / temperature


def median_ms(step, repeats: int) -> float:
    step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def sampler_alone() -> None:
    import vllm._custom_ops  # noqa: F401 - registers the Gumbel-max kernel both paths draw with
    from vllm.v1.sample.ops import topk_topp_sampler as ops
    from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler

    from core.host import fast_sampler
    from core.host.top_k_top_p import apply_top_k_top_p

    vllm_forward = TopKTopPSampler.forward_cpu
    ours = fast_sampler._nucleus_forward(vllm_forward, ())
    sampler = TopKTopPSampler()
    print(f"threads {torch.get_num_threads()}; top_p 0.9, temperature 0.8; median ms per sampling step")
    print(f"{'vocab':>8}{'batch':>7}{'vLLM no top_p':>15}{'vLLM top_p':>12}{'mask only':>11}{'ours top_p':>12}"
          f"{'speed-up':>10}")
    for vocab in VOCABULARIES:
        for batch in BATCHES:
            logits = language_like(batch, vocab, 0.8)
            p = torch.full((batch,), 0.9)
            repeats = 20 if vocab * batch < 4_000_000 else 6
            plain = median_ms(lambda: vllm_forward(sampler, logits.clone(), {}, None, None), repeats)
            theirs = median_ms(lambda: vllm_forward(sampler, logits.clone(), {}, None, p), repeats)
            mine = median_ms(lambda: ours(sampler, logits.clone(), {}, None, p), repeats)
            vllm_mask, ops.apply_top_k_top_p = ops.apply_top_k_top_p, apply_top_k_top_p
            try:
                mask = median_ms(lambda: vllm_forward(sampler, logits.clone(), {}, None, p), repeats)
            finally:
                ops.apply_top_k_top_p = vllm_mask
            print(f"{vocab:>8}{batch:>7}{plain:>15.2f}{theirs:>12.2f}{mask:>11.2f}{mine:>12.2f}"
                  f"{theirs / mine:>9.1f}x")


async def through_the_front(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        configs = {"vllm": bench_config(directory, warmup=[EXPERT], experts=[EXPERT],
                                          engine={"fast_sampler": False}, name="vllm-sampler.json"),
                   "ours": bench_config(directory, warmup=[EXPERT], experts=[EXPERT], name="fast-sampler.json")}
        urls = {}
        with ExitStack() as stack:
            for name, config in configs.items():  # one at a time, so neither start slows the other
                logs = config.with_suffix("")
                logs.mkdir()
                (front,) = stack.enter_context(fronts(config, ("standard",), log_dir=logs))
                await wait_ready(front.url, [EXPERT], timeout=900)
                urls[name] = front.url
            body = {"default sampling": lambda i: {"model": EXPERT, "messages": messages(i),
                                                   "max_tokens": args.max_tokens, "ignore_eos": True},
                    "top_p 1.0": lambda i: {"model": EXPERT, "messages": messages(i), "top_p": 1.0,
                                            "max_tokens": args.max_tokens, "ignore_eos": True}}
            for url in urls.values():
                await load(url, body["default sampling"], 2, 2)  # warm-up
            print(f"\nthrough the standard front: {args.rounds} alternating rounds of streamed chat, "
                  f"{args.max_tokens} tokens each, expert {EXPERT} (temperature 0.7, top_p 0.9 by default)")
            print(f"{'streams':>8}{'sampler':>9}{'default tok/s':>15}{'top_p 1.0 tok/s':>17}{'default/1.0':>13}")
            for concurrency in (1, 8):
                runs: dict[tuple[str, str], list[Run]] = {(s, b): [] for s in urls for b in body}
                requests = args.requests if concurrency > 1 else max(2, args.requests // 4)
                for _ in range(args.rounds):
                    for (sampler, kind), results in runs.items():
                        results.append(await load(urls[sampler], body[kind], requests, concurrency))
                rate = {key: sum(r.tokens for r in rs) / sum(r.wall_s for r in rs) for key, rs in runs.items()}
                for sampler in urls:
                    default, plain = rate[(sampler, "default sampling")], rate[(sampler, "top_p 1.0")]
                    print(f"{concurrency:>8}{sampler:>9}{default:>15.1f}{plain:>17.1f}{default / plain:>13.2f}")
                speed_up = rate[("ours", "default sampling")] / rate[("vllm", "default sampling")]
                print(f"{concurrency:>8}{'ours/vllm':>9}{speed_up:>15.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--no-servers", action="store_true", help="the sampler alone, no runners")
    args = parser.parse_args()
    sampler_alone()
    if not args.no_servers:
        asyncio.run(through_the_front(args))


if __name__ == "__main__":
    main()
