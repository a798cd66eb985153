"""The memory tab's what-if: re-plan the selected run's deployment with other GPUs, ZeRO stage, micro-batch and
engine utilisation, and draw per-GPU bytes per phase, the run's plan next to the changed one.

Why from ``memory.json``'s ``deployment``: the TRL adapter stores the exact deployment its prediction was made
for (:mod:`memory.deploy_json`), so the what-if starts from the run's own plan and differs only in the knobs
turned; one :func:`memory.deploy.plan_deployment` call takes milliseconds, so every change is recomputed.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import plotly.graph_objects as go

from memory.advise import with_every_role
from memory.deploy import Deployment, DeploymentPlan, plan_deployment
from memory.deploy_json import deployment_from_dict
from memory.planner import human

NO_DEPLOYMENT = ("this run's memory.json has no deployment to re-plan (the TRL adapter writes one at train "
                 "start; the kit's runner writes a single-device prediction)")


@dataclass
class WhatIf:
    """The run's plan and the changed one on the actor's GPU group (bytes per GPU per phase)."""

    phases: list[str]
    base: dict[str, int]
    changed: dict[str, int]
    base_peak: tuple[str, int]
    peak: tuple[str, int]
    gpu_memory: int
    fits: bool
    changes: list[str]
    run_settings: str = ""


def deployment_of(report: dict[str, Any] | None) -> Deployment | None:
    """The deployment stored in a run's memory.json, or None when it holds none."""
    if not isinstance(report, dict) or not isinstance(report.get("deployment"), dict):
        return None
    return deployment_from_dict(report["deployment"])


def _num(value: Any) -> float | None:
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def changed_deployment(dep: Deployment, gpus: Any = None, zero: Any = None, micro_batch: Any = None,
                       engine_util: Any = None) -> tuple[Deployment, list[str]]:
    """The deployment with the given knobs applied (None or empty: as the run); a list of what changed.
    Out-of-range values raise ValueError with the control's name."""
    changes: list[str] = []
    group = dep.actor.group
    g = _num(gpus)
    if g is not None and int(g) != dep.groups[group]:
        if g < 1 or g != int(g):
            raise ValueError(f"GPUs must be a whole number >= 1; got {gpus}")
        dep = dep.with_(groups={**dep.groups, group: int(g)})
        changes.append(f"GPUs {int(g)}")
    z = _num(zero)
    if z is not None and f"zero{int(z)}" != dep.sharding.kind:
        if int(z) not in (0, 1, 2, 3):
            raise ValueError(f"ZeRO stage must be 0-3; got {zero}")
        dep = with_every_role(dep, kind=f"zero{int(z)}")  # DeepSpeed-Chat's critic too, as its flags set both
        changes.append(f"ZeRO-{int(z)}")
    m = _num(micro_batch)
    if m is not None and int(m) != dep.micro_batch:
        if m < 1 or m != int(m):
            raise ValueError(f"micro-batch must be a whole number >= 1; got {micro_batch}")
        dep = dep.with_(micro_batch=int(m))
        changes.append(f"micro-batch {int(m)}")
    u = _num(engine_util)
    if u is not None and dep.engine.kind != "hf" and u != dep.engine.gpu_memory_utilization:
        if not 0 < u <= 1:
            raise ValueError(f"engine utilisation must be in (0, 1]; got {engine_util}")
        dep = dep.with_(engine=replace(dep.engine, gpu_memory_utilization=u))
        changes.append(f"engine utilisation {u:g}")
    return dep, changes


def _totals(plan: DeploymentPlan, group: str, phases: list[str]) -> dict[str, int]:
    g = next(p for p in plan.groups if p.name == group)
    return {ph: g.totals[ph] for ph in phases}


def what_if(report: dict[str, Any] | None, gpus: Any = None, zero: Any = None, micro_batch: Any = None,
            engine_util: Any = None) -> WhatIf | None:
    """Per-GPU bytes per phase of the run's plan and of the plan with the knobs changed (None: no deployment).
    Phases are those of the run's prediction (no generation for trainers that do not generate)."""
    dep = deployment_of(report)
    if dep is None or report is None:
        return None
    new, changes = changed_deployment(dep, gpus, zero, micro_batch, engine_util)
    pred = (report.get("prediction") or {}).get("phases") or {}
    group = dep.actor.group
    base_plan = plan_deployment(dep)
    phases = [ph for ph in next(p for p in base_plan.groups if p.name == group).totals if not pred or ph in pred]
    base = _totals(base_plan, group, phases)
    changed = _totals(plan_deployment(new), group, phases)
    bp = max(phases, key=lambda ph: base[ph])
    cp = max(phases, key=lambda ph: changed[ph])
    eng = f", {dep.engine.kind} utilisation {dep.engine.gpu_memory_utilization:g}" if dep.engine.kind != "hf" else ""
    settings = f"{dep.groups[group]} GPUs, {dep.sharding.kind}, micro-batch {dep.micro_batch}{eng}"
    return WhatIf(phases, base, changed, (bp, base[bp]), (cp, changed[cp]), dep.gpu_memory,
                  changed[cp] <= dep.gpu_memory, changes, settings)


def summary(w: WhatIf) -> str:
    """One line: the changed peak, whether it fits, against the run's own plan."""
    what = ", ".join(w.changes) if w.changes else "the run's settings"
    verdict = "fits" if w.fits else "does NOT fit"
    return (f"with {what}: peak {human(w.peak[1])} per GPU in {w.peak[0]}, {verdict} in {human(w.gpu_memory)} "
            f"(the run's plan, {w.run_settings}: {human(w.base_peak[1])} in {w.base_peak[0]})")


def whatif_figure(w: WhatIf) -> go.Figure:
    """Per-GPU GiB per phase: the run's plan and the what-if side by side, the device memory as a line."""
    gib = 2.0**-30
    fig = go.Figure()
    fig.add_trace(go.Bar(x=w.phases, y=[w.base[p] * gib for p in w.phases], name="run's plan",
                         marker_color="#9aa9bd", hovertemplate="%{x}: %{y:.3f} GiB<extra>run's plan</extra>"))
    fig.add_trace(go.Bar(x=w.phases, y=[w.changed[p] * gib for p in w.phases], name="what-if",
                         marker_color="#1f77b4" if w.fits else "#d62728",
                         hovertemplate="%{x}: %{y:.3f} GiB<extra>what-if</extra>"))
    if max(max(w.base.values()), max(w.changed.values())) >= 0.05 * w.gpu_memory:  # else the bars vanish
        fig.add_hline(y=w.gpu_memory * gib, line_dash="dash", line_color="#444",
                      annotation_text="device memory", annotation_position="top left")
    fig.update_layout(title_text="What-if: per-GPU memory per phase (GiB)", barmode="group", height=340,
                      margin=dict(l=50, r=20, t=50, b=40), yaxis_title="GiB per GPU", hovermode="closest",
                      legend=dict(orientation="h", y=-0.15))
    return fig
