"""A plain, hand-written REINFORCE loop recorded through ``adapters.generic``: the corpus's "any PyTorch loop".

Each step samples completions for a batch of prompts, scores them with the optimised reward, subtracts the
batch mean as baseline and a per-sequence KL penalty (``kl_coef``·Σ(log π − log π_ref)), and takes one AdamW
step with gradient clipping. It logs what such a loop typically logs (loss, reward, KL estimates, entropy)
plus the held-out reward (``reward/heldout``, never optimised) and the batch's text statistics.
"""
from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

from .textstats import reward_fn, text_stats, word_variety_reward
from .trl_runs import quiet


def run_reinforce(spec: dict[str, Any], run_dir: Path) -> None:
    quiet()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import adapters.generic as kit
    from rlhf_core.tiny_model import tiny_model_path
    from rlhf_core.train.prompts import BUILTIN_PROMPTS

    torch.set_num_threads(1)
    torch.manual_seed(spec["seed"])
    rng = random.Random(spec["seed"])
    path = tiny_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    policy = AutoModelForCausalLM.from_pretrained(path)
    if spec.get("dtype", "fp32") == "fp16":  # pure fp16 weights and optimizer state, no loss scaling or master copy
        policy = policy.half()
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=spec["lr"], eps=spec.get("adam_eps", 1e-8))
    optimised = reward_fn(spec["reward"])
    config = {k: spec[k] for k in ("lr", "kl_coef", "reward", "seed", "steps", "max_grad_norm")}
    config.update({k: spec[k] for k in ("dtype", "adam_eps") if k in spec})
    # the benchmark diagnoses later; no system sampler, as in the TRL corpus runs
    with kit.run(run_dir, config=config, overwrite=True, alerts=False, system_interval_s=None) as run:
        for step in range(1, spec["steps"] + 1):
            prompts = [rng.choice(BUILTIN_PROMPTS) for _ in range(8)]
            with run.phase("rollout"):
                enc = tok(prompts, return_tensors="pt", padding=True)
                with torch.no_grad():
                    seq = policy.generate(**enc, max_new_tokens=spec["max_new_tokens"], do_sample=True, top_k=0,
                                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
                resp = seq[:, enc.input_ids.shape[1]:]
                done = (resp == tok.eos_token_id).long().cumsum(-1)
                mask = ((done == 0) | ((done == 1) & (resp == tok.eos_token_id))).float()
                attn = torch.cat([enc.attention_mask, mask.long()], 1)
            with run.phase("reward"):
                texts = tok.batch_decode(resp * mask.long(), skip_special_tokens=True)
                scores = torch.tensor(optimised(prompts, texts), dtype=torch.float32)
                held = word_variety_reward(prompts, texts)
            with run.phase("ref_logprobs"), torch.no_grad():
                n = resp.shape[1]
                ref_logp = torch.log_softmax(ref(seq, attention_mask=attn).logits[:, -n - 1:-1].float(), -1)
                ref_logp = ref_logp.gather(-1, resp[..., None])[..., 0]
            with run.phase("update"):
                logits = policy(seq, attention_mask=attn).logits[:, -n - 1:-1].float()
                logp_all = torch.log_softmax(logits, -1)
                logp = logp_all.gather(-1, resp[..., None])[..., 0]
                entropy = -(logp_all.exp() * logp_all).sum(-1)
                seq_kl = ((logp.detach() - ref_logp) * mask).sum(-1)
                shaped = scores - spec["kl_coef"] * seq_kl
                adv = shaped - shaped.mean()
                loss = -(adv * (logp * mask).sum(-1)).mean() / max(float(mask.sum(-1).mean()), 1.0)
                opt.zero_grad()
                loss.backward()
                run.capture_grads(policy)
                torch.nn.utils.clip_grad_norm_(policy.parameters(), spec["max_grad_norm"])
                opt.step()
            tokens = mask.sum().clamp(min=1.0)
            metrics = {"loss/total": loss.item(), "reward/mean": scores.mean().item(),
                       "reward/std": scores.std().item(), "reward/heldout": sum(held) / len(held),
                       "policy/entropy": float((entropy.detach() * mask).sum() / tokens),
                       "response/length_mean": float(mask.sum(-1).mean()), "grad/max_norm": spec["max_grad_norm"],
                       "kl/coef": spec["kl_coef"], "lr": spec["lr"],
                       **kit.kl_estimates(logp.detach(), ref_logp, mask), **text_stats(texts)}
            run.log(step, metrics, model=policy, ref_model=ref)
