"""What a plan costs against training every candidate at full size (METHOD.md section 7).

FLOPs are 6·N·D with N the non-embedding parameters (Kaplan's convention, the
number presets are named by). The naive alternative trains every candidate at the
last stage's proxy size and tokens; with a declared target model it is METHOD.md's
``naive = N·Ct`` against ``total = N·C1 + k·C2 + Ct``.
"""

from __future__ import annotations

from typing import Any


def non_embedding_params(stage) -> int:
    """Non-embedding parameters of a stage's proxy (independent of the vocabulary)."""
    from rbridge.proxy.config import count_params  # a leaf: no torch, no transformers (status stays quick)

    return count_params(stage.proxy.llama_values(stage.training.seq_len), vocab_size=256)[1]


def plan_compute(stages: list[dict[str, Any]], n_candidates: int, last_stage: tuple[int, int] | None,
                 target: tuple[float, float] | None = None) -> dict[str, Any]:
    """Compute spent per stage and in all, the naive spend, and the reduction factors.

    ``stages``: per stage, ``train_flops``, ``score_flops`` and its runs'
    ``non_embedding_params`` and ``tokens_target`` (as in ``plan_status``).
    ``last_stage``: (non-embedding params, tokens) of the last proxy stage's proxy. Target stages
    (``role: target``) are listed but not spent: ``target_stage_flops`` is what they cost, and
    ``target_stage_ratio`` that over the proxies' spend.
    ``target``: (params, tokens) of the target model, when the spec declares one.
    """
    per_stage = []
    for st in stages:
        runs = st["candidates"]
        per_stage.append({"stage": st["name"], "role": st.get("role", "proxy"), "runs": len(runs),
                          "train_flops": st["train_flops"], "score_flops": st["score_flops"],
                          "flops": st["train_flops"] + st["score_flops"], "wall_s": st["wall_s"]})
    # Target stages check the plan's decision; they are not part of its cost (reported apart).
    proxy = [s for s in per_stage if s["role"] != "target"]
    checks = [s for s in per_stage if s["role"] == "target"]
    spent = sum(s["flops"] for s in proxy)
    out: dict[str, Any] = {"stages": per_stage, "spent_flops": spent,
                           "train_flops": sum(s["train_flops"] for s in proxy),
                           "score_flops": sum(s["score_flops"] for s in proxy),
                           "wall_s": sum(s["wall_s"] for s in proxy)}
    if checks:
        out["target_stage_flops"] = sum(s["flops"] for s in checks)
        out["target_stage_wall_s"] = sum(s["wall_s"] for s in checks)
        out["target_stage_ratio"] = out["target_stage_flops"] / spent if spent else None
    if last_stage is not None:
        params, tokens = last_stage
        naive = n_candidates * 6.0 * params * tokens
        out["naive_flops"] = naive
        out["naive_basis"] = (f"{n_candidates} candidates x 6 x {params:,} params x {tokens:,} tokens "
                              "(every candidate at the last stage's proxy size and tokens)")
        out["reduction"] = naive / spent if spent else None
    if target is not None:
        ct = 6.0 * target[0] * target[1]
        out["target_flops"] = ct
        out["target_naive_flops"] = n_candidates * ct
        out["target_total_flops"] = spent + ct
        out["target_reduction"] = n_candidates * ct / (spent + ct)
        out["target_fraction"] = (spent + ct) / (n_candidates * ct)
    return out
