"""memory.estimator and memory.measure: exact persistent terms, calibrated transient terms, measurement."""
import pytest
import torch

from memory.calibrate import shape
from memory.estimator import COMPONENTS, PHASES, ModelShape, StepSpec, accelerate_rule, predict, shape_from_config
from memory.measure import measure_peak, tensor_bytes, track_peak
from memory.probe_step import build_models, measure_step


def test_weights_and_optimizer_are_exact_for_the_built_models():
    spec = StepSpec(shape(2, 64, 1000), batch_size=2, prompt_len=8, gen_len=8)
    m = build_models(spec)
    pred = predict(spec)
    weights = tensor_bytes(m.policy, m.value_head, m.reference)
    assert pred.phases["rollout"]["weights"] == weights
    for p in list(m.policy.parameters()) + list(m.value_head.parameters()):
        m.optimizer.state[p] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    assert pred.phases["rollout"]["optimizer"] == tensor_bytes(m.optimizer)


def test_shape_from_any_transformers_config_counts_parameters_on_meta():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=500)
    s = shape_from_config(cfg)
    model = AutoModelForCausalLM.from_config(cfg)
    assert s.params == sum(p.numel() for p in model.parameters())
    assert (s.layers, s.hidden, s.intermediate, s.vocab_size) == (2, 64, 160, 500)
    with pytest.raises(ValueError, match="cannot estimate"):
        shape_from_config({"vocab_size": 10})


def test_phases_components_and_known_terms():
    spec = StepSpec(shape(4, 128, 8000, heads=4), batch_size=8, prompt_len=8, gen_len=56)
    pred = predict(spec)
    assert set(pred.phases) == set(PHASES)
    for comp in pred.phases.values():
        assert set(comp) == set(COMPONENTS) | {"total"}
        assert all(v >= 0 for v in comp.values()) and comp["total"] == sum(v for k, v in comp.items() if k != "total")
    assert pred.peak_bytes == max(c["total"] for c in pred.phases.values())
    assert pred.phases[pred.peak_phase]["total"] == pred.peak_bytes
    assert pred.phases["rollout"]["kv_cache"] == 2 * 4 * 8 * 64 * 128 * 4  # 2·layers·b·s·h·bytes, exact
    bf16 = predict(spec.with_(dtype="bf16"))
    assert bf16.phases["update"]["weights"] * 2 == pred.phases["update"]["weights"]
    assert predict(spec.with_(gradient_checkpointing=True)).phases["update"]["activations"] < \
        pred.phases["update"]["activations"]
    assert predict(spec.with_(logprob_impl="chunked")).phases["update"]["logits"] < pred.phases["update"]["logits"]
    assert predict(spec.with_(ref_device="cpu", device="cuda")).phases["update"]["weights"] < \
        predict(spec.with_(device="cuda")).phases["update"]["weights"]
    lora = predict(spec.with_(policy_training="lora", share_reference=True))
    assert lora.phases["update"]["optimizer"] < pred.phases["update"]["optimizer"] / 10
    assert accelerate_rule(spec) == 16 * (spec.model.params + 129) + 4 * spec.model.params


def test_bad_specs_are_clear_value_errors():
    with pytest.raises(ValueError, match="dtype"):
        StepSpec(shape(1, 8, 10), dtype="fp8")
    with pytest.raises(ValueError, match="batch_size"):
        StepSpec(shape(1, 8, 10), batch_size=0)
    with pytest.raises(ValueError, match="logprob_impl"):
        StepSpec(shape(1, 8, 10), logprob_impl="fast")
    with pytest.raises(ValueError, match="layers"):
        ModelShape(layers=0, hidden=8, heads=1, vocab_size=10, intermediate=32)


def test_track_peak_counts_region_allocations_and_ignores_earlier_blocks():
    keep = [torch.empty(1 << 20, dtype=torch.uint8)]
    with track_peak("cpu", baseline_bytes=tensor_bytes(keep)) as first:
        a = torch.empty(3 << 20, dtype=torch.uint8)
        b = torch.empty(2 << 20, dtype=torch.uint8)
        del a
    assert first.delta_peak_bytes == 5 << 20 and first.end_delta_bytes == 2 << 20
    assert first.peak_bytes == 6 << 20 and "torch.profiler" in first.method
    held = [b]
    del b
    _, second = measure_peak(lambda: held[0].mul_(1), "cpu")  # in place: nothing new
    held.clear()  # freed outside any region
    with track_peak("cpu") as third:
        keep.append(torch.empty(1 << 20, dtype=torch.uint8))
    assert second.delta_peak_bytes < 4096 and third.delta_peak_bytes == 1 << 20


def test_cpu_peaks_by_range_reads_each_range_at_its_own_allocations():
    """Bytes alive during each named range: what the profile allocated before it and still holds counts, what it
    freed does not; two ranges of one name pool into one peak."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from memory.measure import cpu_peaks_by_range

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("phase:a"):
            x = torch.empty(4 << 20, dtype=torch.uint8)
        y = torch.empty(1 << 20, dtype=torch.uint8)
        with record_function("phase:b"):
            z = torch.empty(2 << 20, dtype=torch.uint8)
        del x, z
        with record_function("phase:a"):
            w = torch.empty(1 << 20, dtype=torch.uint8)
    peaks = cpu_peaks_by_range(prof, "phase:", baseline_bytes=100)
    assert peaks == {"a": 100 + (4 << 20), "b": 100 + (7 << 20)}
    del y, w


def test_prediction_within_10_percent_of_a_measured_step():
    spec = StepSpec(shape(2, 96, 6000, heads=3), batch_size=4, prompt_len=12, gen_len=12)
    measured = measure_step(spec)
    pred = predict(spec)
    for phase, res in measured.items():
        assert abs(pred.phases[phase]["total"] / res.peak_bytes - 1) < 0.10, (phase, pred.phases[phase], res)
