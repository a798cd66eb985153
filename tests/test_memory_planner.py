"""memory.planner: batches that fit a budget, ranked suggestions, and their savings measured on a real step."""
import pytest

from memory.calibrate import shape
from memory.estimator import StepSpec, predict
from memory.planner import largest_rollout_batch, largest_train_batch, parse_bytes, plan, render
from memory.probe_step import measure_step

SPEC = StepSpec(shape(3, 96, 12000, heads=3), batch_size=6, prompt_len=12, gen_len=12)


@pytest.fixture(scope="module")
def base_update_peak():
    return measure_step(SPEC)["update"].peak_bytes


def test_parse_bytes():
    assert parse_bytes("16GiB") == 16 * 2**30
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("8GB") == 8 * 10**9
    assert parse_bytes("1e9") == 10**9
    for bad in ("lots", "16 parsecs", "-1GiB", "0"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_largest_batches_are_the_edge_of_the_budget():
    budget = predict(SPEC).peak_bytes
    n = largest_train_batch(SPEC, budget)
    assert n >= SPEC.train_batch_size

    def update_total(k):
        return predict(SPEC.with_(batch_size=max(k, SPEC.batch_size), train_batch_size=k)).phases["update"]["total"]

    assert update_total(n) <= budget < update_total(n + 1)
    r = largest_rollout_batch(SPEC, budget)
    assert predict(SPEC.with_(batch_size=r + 1, rollout_batch_size=r + 1)).phases["rollout"]["total"] > budget
    tiny_budget = predict(SPEC).phases["update"]["weights"]  # not even the weights and optimizer fit
    assert largest_train_batch(SPEC, tiny_budget) == 0


def test_plan_ranks_suggestions_with_flags():
    p = plan(SPEC, 2**30)
    assert p.fits
    savings = [s.saving_bytes for s in p.suggestions]
    assert savings == sorted(savings, reverse=True)
    flags = {s.flag for s in p.suggestions}
    assert {"--gradient_checkpointing", "--dtype bf16", "--logprob_impl chunked", "--ref_device cpu"} <= flags
    text = render(p)
    assert "update" in text and "suggestions" in text and "--gradient_checkpointing" in text
    small = plan(SPEC, predict(SPEC).peak_bytes // 2)
    assert not small.fits and "DOES NOT FIT" in render(small)


@pytest.mark.parametrize("change", [dict(gradient_checkpointing=True), dict(logprob_impl="chunked"),
                                    dict(dtype="bf16")])
def test_suggestion_saving_is_measured(change, base_update_peak):
    """Apply the suggestion to a real step: the measured update peak drops by about the predicted saving."""
    base, new = SPEC, SPEC.with_(**change)
    before, after = base_update_peak, measure_step(new)["update"].peak_bytes
    measured = before - after
    predicted = predict(base).phases["update"]["total"] - predict(new).phases["update"]["total"]
    assert measured > 0.05 * before, (change, before, after)
    assert abs(predicted - measured) <= 0.25 * measured, (change, predicted, measured)


def test_gpu_names_read_as_what_nvml_reports():
    """--gpu_memory H100 is the 81,559 MiB nvidia-smi reports, not 80e9 bytes; spellings of the A100 variants
    agree; an unknown name is a one-line error that lists the known ones."""
    from memory.planner import GPU_MEMORY_MIB, parse_bytes

    assert parse_bytes("H100") == 81_559 * 2**20 > parse_bytes("80GB")
    assert parse_bytes("a100-80gb") == parse_bytes("A100 80G") == parse_bytes("A100_80GB") == parse_bytes("80GiB")
    assert parse_bytes("A100-40GB") == 40 * 2**30
    with pytest.raises(ValueError, match="H100") as err:
        parse_bytes("B200")
    assert "\n" not in str(err.value) and all(name in str(err.value) for name in GPU_MEMORY_MIB)
