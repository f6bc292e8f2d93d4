"""The fast sampler (core/host/top_k_top_p.py, core/host/fast_sampler.py) against vLLM's own CPU path.

Three kinds of evidence: the kept set equals vLLM's reference mask; draws follow the same distribution (chi-square
on fixed logits, many draws, several p, k, temperatures and vocabularies, with a control that the test rejects a
wrong p); and through the real runner, seeded first tokens follow the distribution the runner's own logprobs give.
"""
import numpy as np
import pytest
import requests
import torch
from scipy.stats import chi2_contingency, chisquare

import vllm._custom_ops  # noqa: F401 - registers torch.ops._C.fused_gumbel_argmax
from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler, apply_top_k_top_p_pytorch

from core.host import fast_sampler
from core.host.top_k_top_p import apply_top_k_top_p, nuclei

VLLM_FORWARD = TopKTopPSampler.forward_cpu  # before any patch in this process
ALPHA = 1e-3  # a p-value below this rejects "same distribution"; draws are seeded, so a result never flakes
# Draws per distribution, in the tests and in their control (which shows that this many tell p=0.8 from p=0.9);
# which tokens are kept is tested exactly above, so these test only how the kept ones are drawn.
DRAWS = 2_048


def language_like(rows: int, vocab: int, temperature: float, seed: int, spread: float = 3.3) -> torch.Tensor:
    """Logits with a peaked head and a long Zipf tail, as a language model gives; `spread` lower is flatter."""
    generator = torch.Generator().manual_seed(seed)
    base = -spread * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    noise = torch.randn(rows, vocab, generator=generator) * 0.5
    order = torch.stack([torch.randperm(vocab, generator=generator) for _ in range(rows)])
    return (base + noise).gather(1, order) / temperature


def reference_mask(logits, k, p):
    return apply_top_k_top_p_pytorch(logits.clone(), k, p, allow_cpu_sync=True).isinf()


@pytest.mark.parametrize("vocab", [1000, 49152, 262144])
@pytest.mark.parametrize("k,p", [(None, 0.9), (None, 0.95), (None, 0.5), (40, None), (40, 0.9), (5, 0.99),
                                 (None, 1.0)])
def test_the_kept_set_is_vllms(vocab, k, p):
    logits = language_like(6, vocab, 0.8, seed=vocab + (k or 0))
    ks = None if k is None else torch.full((6,), k, dtype=torch.int32)
    ps = None if p is None else torch.full((6,), p)
    ours = apply_top_k_top_p(logits.clone(), ks, ps).isinf()
    assert torch.equal(ours, reference_mask(logits, ks, ps))


def test_rows_with_mixed_settings_and_flat_rows_that_need_the_whole_row():
    """A flat row holds less than p in its first selections, so it is settled by the sort; the others are not."""
    peaked = language_like(3, 49152, 0.8, seed=1)
    flat = language_like(3, 49152, 2.0, seed=2, spread=0.3)
    logits = torch.cat([peaked, flat])
    ks = torch.tensor([49152, 40, 49152, 49152, 3000, 49152], dtype=torch.int32)  # vocab: no top-k for that row
    ps = torch.tensor([0.9, 0.95, 1.0, 0.9, 0.8, 0.99])
    widths = {nucleus.logits.shape[1] for nucleus in nuclei(logits.clone(), ks, ps)}
    assert 49152 in widths and min(widths) < 49152
    assert torch.equal(apply_top_k_top_p(logits.clone(), ks, ps).isinf(), reference_mask(logits, ks, ps))


def test_ties_with_the_last_token_kept_are_all_kept():
    logits = torch.full((1, 5000), -20.0)
    logits[0, :3] = torch.tensor([5.0, 3.0, 3.0])  # p=0.8 needs one of the tied tokens; both stay
    kept = ~apply_top_k_top_p(logits.clone(), None, torch.tensor([0.8])).isinf()
    assert kept[0, :3].tolist() == [True, True, True] and int(kept.sum()) == 3
    ties = torch.zeros((1, 200))  # a tie across the first selection's edge is followed past it
    kept = ~apply_top_k_top_p(ties.clone(), torch.tensor([10], dtype=torch.int32), None).isinf()
    assert int(kept.sum()) == 200


def draws(forward, logits: torch.Tensor, k, p, times: int, generators=None) -> np.ndarray:
    sampler = TopKTopPSampler()
    torch.manual_seed(1234)
    rows = logits.shape[0]
    ks = None if k is None else torch.full((rows,), k, dtype=torch.int32)
    ps = None if p is None else torch.full((rows,), p)
    tokens = [forward(sampler, logits.clone(), generators or {}, ks, ps)[0] for _ in range(times)]
    return torch.cat(tokens).numpy()


def counts(tokens: np.ndarray, support: np.ndarray) -> np.ndarray:
    return np.array([(tokens == token).sum() for token in support])


def binned(tokens: np.ndarray, support: np.ndarray, frequent: np.ndarray) -> np.ndarray:
    """Counts per frequent token, then one bin for the rare rest (so that every expected count is at least 5)."""
    observed = counts(tokens, support)
    return np.append(observed[frequent], observed[~frequent].sum())


@pytest.mark.parametrize("vocab,temperature,k,p", [(1000, 0.8, None, 0.9), (1000, 1.5, 50, 0.95),
                                                   (49152, 0.8, None, 0.95), (49152, 1.0, 40, None),
                                                   (49152, 0.7, 20, 0.8), (262144, 0.8, None, 0.9)])
def test_draws_follow_vllms_distribution(vocab, temperature, k, p):
    """Our draws fit the exact distribution of vLLM's mask; where vLLM's own sort-based path is cheap enough to
    draw from many times (vocabularies below 100k), they also match its draws."""
    row = language_like(1, vocab, temperature, seed=7, spread=1.2)
    rows = 256 if vocab < 100_000 else 32
    logits = row.expand(rows, vocab).contiguous()
    ours = draws(fast_sampler._nucleus_forward(VLLM_FORWARD, ()), logits, k, p, times=DRAWS // rows)
    masked = apply_top_k_top_p_pytorch(row.clone(), None if k is None else torch.tensor([k]),
                                       None if p is None else torch.tensor([p]), allow_cpu_sync=True)
    expected = masked.softmax(dim=-1)[0].numpy().astype(np.float64)
    support = np.flatnonzero(expected > 0)
    assert len(support) >= 5, "a nucleus of a few tokens tests little"
    assert set(np.unique(ours)) <= set(support)
    frequent = expected[support] * len(ours) >= 5
    fit_expected = np.append(expected[support][frequent], expected[support][~frequent].sum()) * len(ours)
    fit_observed = binned(ours, support, frequent)
    keep = fit_expected > 0
    assert chisquare(fit_observed[keep], fit_expected[keep] * len(ours) / fit_expected[keep].sum()).pvalue > ALPHA
    if vocab < 100_000:
        theirs = draws(VLLM_FORWARD, logits[:64], k, p, times=DRAWS // 64)
        table = np.array([fit_observed, binned(theirs, support, frequent)])
        assert chi2_contingency(table[:, table.sum(axis=0) > 0]).pvalue > ALPHA


def test_the_chi_square_check_rejects_a_wrong_nucleus():
    """The control: draws with p=0.8 against vLLM's at p=0.9 are told apart, so the test above can fail."""
    row = language_like(1, 49152, 0.8, seed=7, spread=1.2)
    logits = row.expand(64, 49152).contiguous()
    wrong = draws(fast_sampler._nucleus_forward(VLLM_FORWARD, ()), logits, None, 0.8, times=DRAWS // 64)
    right = draws(VLLM_FORWARD, logits, None, 0.9, times=DRAWS // 64)
    support = np.union1d(np.unique(wrong), np.unique(right))
    assert chi2_contingency(np.array([counts(wrong, support), counts(right, support)])).pvalue < ALPHA


def test_a_seeded_row_draws_the_same_token_again():
    logits = language_like(4, 49152, 0.8, seed=3)
    fast = fast_sampler._nucleus_forward(VLLM_FORWARD, ())
    first = draws(fast, logits, None, 0.9, 1, {1: torch.Generator().manual_seed(42)})
    again = draws(fast, logits, None, 0.9, 1, {1: torch.Generator().manual_seed(42)})
    assert first[1] == again[1]


def test_the_patch_still_applies_to_this_vllm():
    """The one sampler patch we make: fails when vLLM renames or moves what it replaces."""
    from vllm.v1.sample.ops import topk_topp_sampler as ops

    assert fast_sampler.apply()
    assert ops.apply_top_k_top_p is apply_top_k_top_p
    assert ops.TopKTopPSampler.forward_cpu.fast_sampler
    # forward_cpu and forward_native look the mask up by this module-level name, and draw with this kernel.
    assert "apply_top_k_top_p" in VLLM_FORWARD.__code__.co_names
    assert "apply_top_k_top_p" in ops.TopKTopPSampler.forward_native.__code__.co_names
    assert hasattr(torch.ops._C, "fused_gumbel_argmax")


# ---------------------------------------------------------------- through the real runner


def test_seeded_first_tokens_through_the_runner_follow_its_own_logprobs(vllm_server):
    """Seeded requests through 8082's front: the first token's distribution is the nucleus of the runner's own raw
    logprobs at the request's temperature and top_p (the runner samples with the fast sampler by default)."""
    body = {"model": "phi4_fast", "max_tokens": 1, "temperature": 1.0,
            "messages": [{"role": "user", "content": "Name one animal that lives on a farm. One word."}]}
    probe = requests.post(vllm_server.url + "/v1/chat/completions",
                          json={**body, "logprobs": True, "top_logprobs": 20}, timeout=60)
    assert probe.status_code == 200, probe.text
    top = {t["token"]: t["logprob"] for t in probe.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]}
    tokens = sorted(top, key=top.get, reverse=True)
    probs = np.exp([top[token] for token in tokens])
    # top_p halfway into the third token's probability: exactly three tokens kept, far from either boundary.
    body["top_p"] = float(probs[:2].sum() + probs[2] / 2)
    kept = (np.cumsum(probs) - probs) < body["top_p"]
    assert kept.sum() == 3
    nucleus = probs[kept] / probs[kept].sum()
    draws = 300
    seen: dict[str, int] = {}
    for seed in range(draws):
        answer = requests.post(vllm_server.url + "/v1/chat/completions", json={**body, "seed": seed}, timeout=60)
        text = answer.json()["choices"][0]["message"]["content"]
        seen[text] = seen.get(text, 0) + 1
    kept_tokens = [token for token, keep in zip(tokens, kept) if keep]
    assert set(seen) <= set(kept_tokens), f"drew outside the nucleus: {set(seen) - set(kept_tokens)}"
    observed = np.array([seen.get(token, 0) for token in kept_tokens])
    frequent = nucleus * draws >= 5
    fit_observed = np.append(observed[frequent], observed[~frequent].sum())
    fit_expected = np.append(nucleus[frequent], nucleus[~frequent].sum()) * draws
    keep = fit_expected > 0
    assert chisquare(fit_observed[keep], fit_expected[keep]).pvalue > ALPHA, (seen, dict(zip(kept_tokens, nucleus)))
    repeat = {**body, "seed": 7, "max_tokens": 16}
    first, second = (requests.post(vllm_server.url + "/v1/chat/completions", json=repeat, timeout=60).json()
                     for _ in range(2))
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
