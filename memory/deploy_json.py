"""A :class:`memory.deploy.Deployment` to and from plain JSON, so a run's ``memory.json`` carries the exact
deployment its prediction was made for and the dashboard can re-plan it with other knobs (what-if).

Why a separate module: the planner's dataclasses stay free of I/O; every field is plain data (ints, floats,
strings, nested frozen dataclasses), so ``asdict`` is lossless and the reader only rebuilds the nesting.
"""
from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from .arch import Arch
from .deploy import Deployment, Engine, HybridEngine, Role, Sharding


def deployment_to_dict(dep: Deployment) -> dict[str, Any]:
    """Every field of the deployment, roles with their full architecture."""
    return asdict(dep)


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _role(data: dict[str, Any] | None) -> Role | None:
    if not data:
        return None
    arch = Arch(**_known(Arch, dict(data["arch"])))
    sh = data.get("sharding")  # a role's own ZeRO stage / FSDP (None: the deployment's)
    return Role(**{**_known(Role, data), "arch": arch,
                   "sharding": Sharding(**_known(Sharding, dict(sh))) if sh else None})


def deployment_from_dict(data: dict[str, Any]) -> Deployment:
    """The inverse of :func:`deployment_to_dict` (unknown keys from newer writers are ignored)."""
    if not isinstance(data, dict) or not isinstance(data.get("actor"), dict):
        raise ValueError("not a serialized deployment (no actor)")
    actor = _role(data["actor"])
    assert actor is not None
    kw = _known(Deployment, data)
    kw.update(actor=actor, critic=_role(data.get("critic")), reference=_role(data.get("reference")),
              reward=_role(data.get("reward")),
              sharding=Sharding(**_known(Sharding, dict(data.get("sharding") or {}))),
              engine=Engine(**_known(Engine, dict(data.get("engine") or {}))),
              groups={str(k): int(v) for k, v in dict(data.get("groups") or {"all": 1}).items()},
              hybrid_engine=HybridEngine(**_known(HybridEngine, dict(data["hybrid_engine"])))
              if data.get("hybrid_engine") else None)
    return Deployment(**kw)
