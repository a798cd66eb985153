"""TRL producers of the corpus: GRPO, RLOO and DPO on the kit's tiny GPT-2, recorded by ``adapters.trl``.

GRPO/RLOO get the optimised reward plus a held-out reward function of weight 0 (``reward_weights``), which
TRL logs per function as ``rewards/heldout/mean`` (→ ``reward/heldout/mean``) without optimising it; the
optimised reward function also logs the batch's text statistics through TRL's ``log_metric`` hook
(→ ``text/distinct2``, ``text/identical_frac``). DPO learns from a small preference set built here and
gets a probe (:class:`DPOProbe`) that measures what DPO itself does not log: the policy's per-token entropy
and its exact per-token KL to the reference on a fixed batch of chosen responses.
"""
from __future__ import annotations

import logging
import os
import random
import warnings
from pathlib import Path
from typing import Any

from .textstats import DISTINCT2_KEY, IDENTICAL_KEY, distinct2, identical_frac, reward_fn, word_variety_reward


def quiet() -> None:
    """Silence library chatter so the progress bar stays readable."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    for name in ("transformers", "trl", "accelerate", "datasets", "adapters.trl", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import datasets

    datasets.utils.logging.disable_progress_bar()


def _prompt_dataset(seed: int):
    from datasets import Dataset

    from rlhf_core.train.prompts import BUILTIN_PROMPTS

    prompts = list(BUILTIN_PROMPTS)
    random.Random(seed).shuffle(prompts)
    return Dataset.from_list([{"prompt": p} for p in prompts * 40])


def _optimised(name: str):
    """TRL reward function for the reward ``name``; also logs the batch's text statistics."""
    fn = reward_fn(name)

    def optimised(prompts, completions, log_metric=None, **kwargs: Any) -> list[float]:
        if log_metric is not None:
            log_metric(DISTINCT2_KEY, distinct2(completions))
            log_metric(IDENTICAL_KEY, identical_frac(completions))
        return [float(s) for s in fn(prompts, completions)]

    optimised.__name__ = name
    return optimised


def heldout(prompts, completions, **kwargs: Any) -> list[float]:
    """The held-out reward (weight 0): logged by TRL as ``rewards/heldout/mean``, never optimised."""
    return word_variety_reward(prompts, completions)


def _common_args(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    return dict(output_dir=str(out), learning_rate=spec["lr"], max_steps=spec["steps"], seed=spec["seed"],
                logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                max_grad_norm=spec.get("max_grad_norm", 1.0), lr_scheduler_type="constant", warmup_steps=0)


def run_online(spec: dict[str, Any], run_dir: Path) -> None:
    """One GRPO or RLOO run (``spec["trainer"]`` = grpo | rloo)."""
    quiet()
    import torch
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from adapters.trl import profile_trainer
    from rlhf_core.tiny_model import tiny_model_path

    torch.set_num_threads(1)
    model = str(tiny_model_path())
    Config, Trainer = {"grpo": (GRPOConfig, GRPOTrainer), "rloo": (RLOOConfig, RLOOTrainer)}[spec["trainer"]]
    args = Config(**_common_args(spec, run_dir.parent / f"_trl_{run_dir.name}"),
                  per_device_train_batch_size=8, num_generations=4, max_completion_length=spec["max_new_tokens"],
                  beta=spec["beta"], reward_weights=[1.0, 0.0], temperature=1.0)
    trainer = Trainer(model=model, args=args, train_dataset=_prompt_dataset(spec["seed"]),
                      processing_class=AutoTokenizer.from_pretrained(model),
                      reward_funcs=[_optimised(spec["reward"]), heldout])
    # no live alerts: the benchmark diagnoses the recorded run later, with the rules of its own day
    profile_trainer(trainer, run_dir=run_dir, overwrite=True, system_interval_s=None, alerts=False)
    trainer.train()


_GOOD = ("good", "great", "wonderful", "nice", "fun", "pleasant", "amazing", "perfect")
_BAD = ("bad", "boring", "awful", "slow", "dull", "poor", "sad", "broken")
_ENDS = ("thank you.", "have a nice day.", "see you soon.", "and i loved it.")


def preference_pairs(seed: int, n: int = 256) -> list[dict[str, str]]:
    """A small preference set in the tiny model's vocabulary: positive, politely ended continuations are
    chosen over negative ones (the built-in sentiment/preference rewards agree with every pair)."""
    from rlhf_core.train.prompts import BUILTIN_PROMPTS

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = rng.choice(BUILTIN_PROMPTS)
        rows.append({"prompt": prompt,
                     "chosen": f" {rng.choice(_GOOD)} and {rng.choice(_GOOD)}, {rng.choice(_ENDS)}",
                     "rejected": f" {rng.choice(_BAD)} and {rng.choice(_BAD)}, not for me."})
    return rows


class DPOProbe:
    """A ``TrainerCallback`` that adds, to each logged step, the policy's exact per-token KL to the reference
    (sum over the vocabulary of p·log(p/q)) on a fixed batch of chosen responses, as ``probe/kl_exact``
    (→ ``src/probe/kl_exact``). DPO logs no KL; the corpus labels need one. Registered before the kit's
    callback, which then records the key with TRL's own."""

    def __init__(self, model_path: str, texts: list[str]):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_path)
        tok.pad_token = tok.pad_token or tok.eos_token
        self.enc = tok(texts, return_tensors="pt", padding=True)
        self.ref = AutoModelForCausalLM.from_pretrained(model_path).eval().requires_grad_(False)
        with torch.no_grad():
            self.ref_logp = torch.log_softmax(self.ref(**self.enc).logits[:, :-1].float(), -1)
        self.mask = self.enc.attention_mask[:, 1:].float()

    def callback(self):
        from transformers import TrainerCallback

        probe = self

        class _Cb(TrainerCallback):
            def on_log(self, args, state, control, logs=None, model=None, **kwargs):
                if logs is not None and model is not None and "loss" in logs:
                    logs["probe/kl_exact"] = probe.kl(model)

        return _Cb()

    def kl(self, model) -> float:
        import torch

        was_training = model.training
        model.eval()
        with torch.no_grad():
            logp = torch.log_softmax(model(**self.enc).logits[:, :-1].float(), -1)
        model.train(was_training)
        per_tok = (logp.exp() * (logp - self.ref_logp)).sum(-1)
        return float((per_tok * self.mask).sum() / self.mask.sum())


def run_dpo(spec: dict[str, Any], run_dir: Path) -> None:
    """One DPO run on :func:`preference_pairs`."""
    quiet()
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from adapters.trl import profile_trainer
    from rlhf_core.tiny_model import tiny_model_path

    torch.set_num_threads(1)
    model = str(tiny_model_path())
    pairs = preference_pairs(spec["seed"])
    probe = DPOProbe(model, [p["prompt"] + p["chosen"] for p in preference_pairs(10_000, 16)])
    args = DPOConfig(**_common_args(spec, run_dir.parent / f"_trl_{run_dir.name}"),
                     per_device_train_batch_size=8, beta=spec["beta"], max_length=64)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs),
                         processing_class=AutoTokenizer.from_pretrained(model), callbacks=[probe.callback()])
    # no live alerts: the benchmark diagnoses the recorded run later, with the rules of its own day
    profile_trainer(trainer, run_dir=run_dir, overwrite=True, system_interval_s=None, alerts=False)
    trainer.train()
