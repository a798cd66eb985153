"""The memory tab's what-if: a run's stored deployment re-planned with other GPUs, ZeRO stage, micro-batch and
engine utilisation (data level, then once in headless Chromium)."""
from __future__ import annotations

import os

import pytest

from adapters.trl_memory import deployment_report
from dashboard.whatif import NO_DEPLOYMENT, changed_deployment, deployment_of, summary, what_if, whatif_figure
from memory.arch import load_arch
from memory.deploy import Deployment, Engine, Role, Sharding, plan_deployment

GiB = 2**30


def qwen7b_grpo(gpus: int = 8, zero: int = 2, util: float = 0.5) -> Deployment:
    """Qwen2.5-7B GRPO with a colocated vLLM on 80 GB GPUs (the README's question)."""
    arch = load_arch("Qwen2.5-7B")
    return Deployment(actor=Role("actor", arch, trained=True, group="train"),
                      reference=Role("reference", arch, group="train"), groups={"train": gpus},
                      gpu_memory=80 * GiB, sharding=Sharding(f"zero{zero}"),
                      engine=Engine("vllm", group="train", gpu_memory_utilization=util), micro_batch=4,
                      prompt_len=512, response_len=1024)


def report_of(dep: Deployment) -> dict:
    return deployment_report(dep, {"model": dep.actor.arch.name}, "cuda", "test")


def test_what_if_replans_the_stored_deployment():
    report = report_of(qwen7b_grpo())
    assert deployment_of(report) == qwen7b_grpo()  # lossless round trip through memory.json's JSON
    same = what_if(report)
    assert same.changes == [] and same.base == same.changed
    assert same.base_peak[1] == report["prediction"]["peak_bytes"]
    w = what_if(report, gpus=16, zero=3, micro_batch="2", engine_util=0.3)  # its time: bench_memory_plan_time
    assert w.changes == ["GPUs 16", "ZeRO-3", "micro-batch 2", "engine utilisation 0.3"]
    direct = plan_deployment(qwen7b_grpo(gpus=16, zero=3, util=0.3).with_(micro_batch=2)).groups[0].totals
    assert w.changed == {ph: direct[ph] for ph in w.phases}
    assert w.peak[1] < w.base_peak[1] and w.gpu_memory == 80 * GiB
    assert w.fits == (w.peak[1] <= 80 * GiB)
    # more vLLM share leaves less for training: 0.95 of 80 GB plus the actor's states does not fit
    assert what_if(report, engine_util=0.95).fits is False
    line = summary(what_if(report, engine_util=0.95))
    assert "does NOT fit" in line and "8 GPUs, zero2, micro-batch 4, vllm utilisation 0.5" in line
    fig = whatif_figure(w)
    assert [t.name for t in fig.data] == ["run's plan", "what-if"] and len(fig.data[0].x) == 5


def test_what_if_rejects_bad_knobs_and_runs_without_a_deployment():
    dep = qwen7b_grpo()
    for kw, needle in (({"gpus": 0}, "GPUs"), ({"zero": 5}, "ZeRO"), ({"micro_batch": 1.5}, "micro-batch"),
                       ({"engine_util": 1.5}, "utilisation")):
        with pytest.raises(ValueError, match=needle):
            changed_deployment(dep, **kw)
    hf = dep.with_(engine=Engine("hf", group="train"))
    assert changed_deployment(hf, engine_util=0.3)[1] == []  # HF generate has no utilisation knob
    runner_report = {"prediction": {"phases": {"update": {"total": 1}}}, "measured": None}
    assert what_if(runner_report) is None and deployment_of(None) is None and "no deployment" in NO_DEPLOYMENT
    # a trainer that does not generate keeps its prediction's phases (no generation bar)
    no_gen = deployment_report(dep, {}, generating=False)
    assert what_if(no_gen).phases == ["scoring", "update", "optimizer_step", "weight_sync"]


def test_what_if_zero_stage_moves_every_model_the_flags_name():
    """DeepSpeed-Chat sets the actor's and the critic's stage with one pair of flags each; the what-if's ZeRO control
    moves both (a critic with its own stage used to stay where it was)."""
    from memory.deploy import role_sharding
    from memory.inputs import from_deepspeed_chat

    dep = from_deepspeed_chat("deepspeed --num_gpus 8 main.py --actor_model_name_or_path facebook/opt-1.3b "
                              "--critic_model_name_or_path facebook/opt-350m --actor_zero_stage 2 "
                              "--critic_zero_stage 2", gpu_memory=40 * GiB)
    new, changes = changed_deployment(dep, zero=3)
    assert changes == ["ZeRO-3"]
    assert {role_sharding(r, new).kind for r in new.roles() if r.trained} == {"zero3"}
    # the reward model (a frozen critic copy) is ZeRO-3 exactly when the critic is (get_eval_ds_config)
    assert (role_sharding(dep.reward, dep).kind, role_sharding(new.reward, new).kind) == ("zero0", "zero3")


@pytest.mark.browser
def test_memory_tab_what_if_recomputes_in_the_browser(tmp_path):
    from test_dashboard_data import write_run

    from dashboard.app import create_app
    from devtools.headless import ServerThread, browser_paths, chromium, wait_for

    chrome, driver_path = browser_paths()
    if not (chrome and driver_path):
        if os.environ.get("RLHFKIT_REQUIRE_BROWSER"):
            pytest.fail("headless Chromium/chromedriver not found and RLHFKIT_REQUIRE_BROWSER is set")
        pytest.skip("headless Chromium/chromedriver not found")
    write_run(tmp_path / "grpo7b", 5).write_memory(report_of(qwen7b_grpo()))
    write_run(tmp_path / "runner", 5).write_memory({"prediction": {"phases": {"update": {"total": 2**20}}}})

    def text(driver, element_id):
        return driver.execute_script(f"const e = document.getElementById('{element_id}'); "
                                     "return e ? e.innerText : '';")

    def wait_text(driver, element_id, needle):
        return wait_for(lambda: (lambda t: t if needle in t else None)(text(driver, element_id)), 60)

    with ServerThread(create_app(tmp_path).server) as server, chromium() as driver:
        driver.get(server.url + "/?run=grpo7b")
        wait_for(lambda: driver.find_elements("xpath", "//*[text()='Memory']"), 60)[0].click()
        wait_text(driver, "whatif-summary", "with the run's settings")
        wait_text(driver, "fig-whatif", "what-if")
        util = driver.find_element("id", "whatif-util")
        util.send_keys("0.95\n")
        line = wait_text(driver, "whatif-summary", "engine utilisation 0.95")
        assert "does NOT fit" in line
        gpus = driver.find_element("id", "whatif-gpus")
        gpus.send_keys("16\n")
        wait_text(driver, "whatif-summary", "GPUs 16, engine utilisation 0.95")
        assert driver.execute_script("return document.querySelectorAll('.cb-error .error').length") == 0
        driver.save_screenshot(str(tmp_path / "whatif.png"))
        driver.get(server.url + "/?run=runner")
        wait_for(lambda: driver.find_elements("xpath", "//*[text()='Memory']"), 60)[0].click()
        wait_text(driver, "fig-whatif", "no deployment to re-plan")
