"""adapters.generic: a hand-written PyTorch loop becomes a kit run with phases, probes, alerts and traces."""
import copy
import json
import math

import pytest
import torch

import adapters.generic as kit
from rlhf_core.runformat.run_reader import Run


@pytest.fixture(scope="module")
def policy_and_ref(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return policy, copy.deepcopy(policy).eval().requires_grad_(False)


def _loop(policy, ref, run, steps=3, nan_at=None):
    opt = torch.optim.SGD(policy.parameters(), lr=0.1)
    ids = torch.randint(0, policy.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    for step in range(1, steps + 1):
        with run.phase("rollout"), torch.no_grad():
            out = policy.generate(ids[:, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
        with run.phase("ref_logprobs"), torch.no_grad():
            ref_logp = torch.log_softmax(ref(out).logits, -1)
        with run.phase("update"):
            logits = policy(out).logits
            logp = torch.log_softmax(logits, -1)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), out[:, 1:].flatten())
            loss.backward()
            run.capture_grads(policy)
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 0.5)
            opt.step()
            opt.zero_grad()
        tok = out[:, 1:, None]
        kl = kit.kl_estimates(logp[:, :-1].gather(-1, tok).squeeze(-1), ref_logp[:, :-1].gather(-1, tok).squeeze(-1))
        metrics = {"loss/total": float("nan") if step == nan_at else loss.item(), "my/score": step * 0.5, **kl}
        run.log(step, metrics, model=policy, ref_model=ref)


def test_generic_loop_writes_phases_probes_kl_and_trace(policy_and_ref, tmp_path):
    policy, ref = policy_and_ref
    with kit.run(tmp_path / "run", config={"lr": 0.1}, trace_steps=1,
                 trace_options={"with_stack": False, "profile_memory": False}, system_interval_s=0.1) as run:
        _loop(policy, ref, run)
    r = Run(tmp_path / "run")
    assert r.meta["source"] == "generic" and r.meta["status"] == "finished" and r.meta["config"] == {"lr": 0.1}
    recs = r.metrics()
    assert [x["step"] for x in recs] == [1, 2, 3]
    for rec in recs:
        for key in ("time/step", "time/rollout", "time/ref_logprobs", "time/update", "grad/norm", "drift/rel",
                    "kl/ref_k1", "kl/ref_k3", "loss/total", "grad/layer/h.0", "drift/layer/h.1"):
            assert math.isfinite(rec[key]), key
        assert rec["src/my/score"] == rec["step"] * 0.5  # non-canonical names kept under src/
        blocks = [v for k, v in rec.items() if k.startswith("grad/layer/")]
        assert math.sqrt(sum(v * v for v in blocks)) == pytest.approx(rec["grad/norm"], rel=1e-4)
        assert rec["grad/norm"] > 0.5  # captured before clip_grad_norm_(…, 0.5)
        assert rec["time/rollout"] + rec["time/ref_logprobs"] + rec["time/update"] <= rec["time/step"] + 1e-6
    assert recs[0]["kl/ref_k3"] >= 0 and recs[-1]["drift/rel"] > recs[0]["drift/rel"] > 0
    assert r.traces() and r.system()


def test_nan_metric_alerts_and_a_crash_marks_the_run_failed(policy_and_ref, tmp_path):
    policy, ref = policy_and_ref
    with pytest.raises(RuntimeError, match="boom"), kit.run(tmp_path / "run") as run:
        _loop(copy.deepcopy(policy), ref, run, steps=2, nan_at=2)
        raise RuntimeError("boom")
    r = Run(tmp_path / "run")
    assert r.meta["status"] == "failed"
    assert "loss/total" in r.metrics()[1]["nonfinite"]
    alerts = [e for e in r.events() if e["kind"] == "alert"]
    assert alerts[0]["rule"] == "nonfinite" and alerts[0]["step"] == 2
    assert run.alerts and run.alerts[0].rule == "nonfinite"


def test_drift_without_a_reference_is_against_the_first_snapshot(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    with kit.run(tmp_path / "run") as run:
        run.snapshot(model)
        run.log(0, {}, model=model)
        with torch.no_grad():
            model[0].weight.mul_(2.0)
        rec = run.log(1, {}, model=model)
    assert rec["drift/layer/0"] == pytest.approx(model[0].weight.norm().item() / 2 / (
        torch.cat([model[0].weight.flatten() / 2, model[0].bias]).norm().item()), rel=1e-5)
    assert rec["drift/layer/1"] == 0.0


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown mapping"), kit.run(tmp_path / "a", mapping="nope"):
        pass
    with pytest.raises(ValueError, match="trace_steps"), kit.run(tmp_path / "b", trace_steps=0):
        pass
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_rank_and_world_size_come_from_the_launcher_environment(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    with kit.run(run_dir):  # rank 0 creates meta.json
        pass
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = torch.nn.Linear(2, 2)
    with kit.run(run_dir, resume=True) as run:
        run.log(1, {"loss/total": 1.0}, model=model)
    assert (run_dir / "metrics.rank1.jsonl").exists() and not (run_dir / "events.jsonl").exists()
    assert json.loads((run_dir / "metrics.rank1.jsonl").read_text())["rank"] == 1
