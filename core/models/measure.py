"""What the quality gate measures of one model: greedy answers to fixed questions, and teacher-forced next-token
log-probabilities over a fixed text, given as token ids so both sides score exactly the same tokens.

The reference (float32) runs in transformers in this process: it is the plain computation, it runs while the
candidate's engine imports, and it is kept (per CPU path) so that later gates measure the candidate alone. The candidate runs in vLLM, in a child process (`python -m core.models.measure`), with
the kernels and activation dtype the host would serve it with; a child, so a kernel that crashes fails the gate
instead of ending `make models`. It runs eagerly: compiling fuses elementwise ops but keeps the int8 GEMMs, and
skips a warm-up that would double the gate's time.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ANSWER_TOKENS = 24
TOP_K = 20  # vLLM's default max_logprobs: the candidate's distribution is known on its top 20 and the lump beyond
REFERENCE_TOP_K = 256  # the reference keeps more, so the candidate's top 20 are almost always among them


@dataclass(frozen=True)
class Scored:
    """One side's view of the fixed text: for each predicted position, the log-probability of the true next token,
    and the top TOP_K token ids with their log-probabilities (rank order)."""

    true_logprob: np.ndarray  # (positions,)
    top_ids: np.ndarray  # (positions, TOP_K)
    top_logprobs: np.ndarray  # (positions, TOP_K)


def reference(folder: Path, chunks: list[list[int]], prompts: list[list[int]], tokenizer_eos: int
              ) -> tuple[list[list[int]], Scored]:
    """Float32 in transformers: greedy answers (token ids) and, over the chunks, the true token's log-probability
    and the top REFERENCE_TOP_K of each next-token distribution."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    true, top_ids, top_logprobs = [], [], []
    with torch.inference_mode():
        for chunk in chunks:
            logprobs = torch.log_softmax(model(torch.tensor([chunk])).logits[0, :-1].float(), -1)
            true.append(logprobs.gather(1, torch.tensor(chunk[1:])[:, None])[:, 0])
            top = logprobs.topk(REFERENCE_TOP_K, dim=1)
            top_ids.append(top.indices)
            top_logprobs.append(top.values)
        width = max(map(len, prompts))
        ids = torch.tensor([[tokenizer_eos] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=ANSWER_TOKENS, do_sample=False,
                             pad_token_id=tokenizer_eos)
    scored = Scored(torch.cat(true).double().numpy(), torch.cat(top_ids).numpy(),
                    torch.cat(top_logprobs).double().numpy())
    return [_until_eos(row[width:].tolist(), tokenizer_eos) for row in out], scored


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos)] if eos in ids else ids


def candidate(folder: str, dtype: str, chunks: list[list[int]], prompts: list[list[int]], engine: dict) -> dict:
    """The candidate in vLLM (this process) with the runner's engine settings `engine`: greedy answers and prompt
    log-probabilities, as plain data."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=folder, dtype=dtype, seed=0, distributed_executor_backend="uni", max_logprobs=TOP_K, **engine)
    answers = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0, max_tokens=ANSWER_TOKENS), use_tqdm=False)
    scored = llm.generate([{"prompt_token_ids": c} for c in chunks],
                          SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=TOP_K), use_tqdm=False)
    texts = []
    for chunk, result in zip(chunks, scored):
        positions = result.prompt_logprobs[1:]  # the first token has no context
        true = [entry[token].logprob for entry, token in zip(positions, chunk[1:])]
        tops = [sorted(((lp.rank, tid, lp.logprob) for tid, lp in entry.items() if lp.rank <= TOP_K))[:TOP_K]
                for entry in positions]
        texts.append({"true": true, "ids": [[t[1] for t in top] for top in tops],
                      "logprobs": [[t[2] for t in top] for top in tops]})
    return {"answers": [list(a.outputs[0].token_ids) for a in answers], "texts": texts}


def scored_of(texts: list[dict]) -> Scored:
    """The candidate's chunks, read back from the child's JSON, as one run of positions."""
    return Scored(np.concatenate([np.asarray(t["true"], np.float64) for t in texts]),
                  np.concatenate([np.asarray(t["ids"], np.int64) for t in texts]),
                  np.concatenate([np.asarray(t["logprobs"], np.float64) for t in texts]))


def main() -> None:
    parser = argparse.ArgumentParser(description="the quality gate's candidate side (run by core.models.quality_gate)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", required=True)
    parser.add_argument("--engine", type=json.loads, required=True, help="JSON: the runner's engine settings")
    parser.add_argument("--inputs", type=Path, required=True, help="JSON: {chunks, prompts} as token ids")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    inputs = json.loads(args.inputs.read_text())
    result = candidate(args.model, args.dtype, inputs["chunks"], inputs["prompts"], args.engine)
    args.output.write_text(json.dumps(result))
    os._exit(0)  # vLLM's engine threads can hold the interpreter's exit for seconds


if __name__ == "__main__":
    main()
