"""pyproject.toml declares what the product imports, once: a core plus extras, none of them dead, and the
dashboard extra installs no torch, TRL or triton."""
import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("rlhf_core", "profiler", "dashboard", "memory", "adapters")
SELF = "rlhf-systems-kit"
# import name -> distribution, where they differ (flask is dash's own dependency, pinned by it)
DIST = {"yaml": "pyyaml", "pynvml": "nvidia-ml-py", "flask": "dash"}
# test tooling that still lives in a product package (devtools/headless.py drives the browser tests)
DEV_ONLY = {"devtools/headless.py": {"selenium", "werkzeug"}}
HEAVY = {"torch", "transformers", "trl", "triton", "accelerate", "peft", "tokenizers"}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(reqs: list[str]) -> set[str]:
    return {Requirement(r).name.lower() for r in reqs}


def _closure(extras: set[str]) -> set[str]:
    """Distributions that core + ``extras`` declare, following the package's references to its own extras."""
    project = _project()
    out, todo, seen = _names(project["dependencies"]), list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in project["optional-dependencies"][extra]:
            req = Requirement(text)
            if req.name == SELF:
                todo.extend(req.extras)
            else:
                out.add(req.name.lower())
    return out


def _third_party_imports() -> dict[str, set[str]]:
    """Distribution -> product files importing it (module level or inside functions)."""
    found: dict[str, set[str]] = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module]
                else:
                    continue
                for mod in mods:
                    top = mod.split(".")[0]
                    if top in sys.stdlib_module_names or top in PACKAGES or top in DEV_ONLY.get(rel, ()):
                        continue
                    found.setdefault(DIST.get(top, top).lower(), set()).add(rel)
    return found


def test_every_import_of_the_product_is_declared():
    extras = set(_project()["optional-dependencies"])
    declared = _closure(extras)
    missing = {dist: sorted(files) for dist, files in _third_party_imports().items() if dist not in declared}
    assert not missing, f"imported but not in pyproject.toml: {missing}"


def test_no_declared_dependency_is_dead():
    """Each declared distribution is imported by the product (safetensors never was; datasets and peft only by
    tests and benchmarks, so requirements-dev.txt installs them)."""
    used = set(_third_party_imports())
    declared = _closure(set(_project()["optional-dependencies"]))
    assert not declared - used, declared - used
    assert not {"datasets", "safetensors", "peft"} & declared


def test_the_dashboard_extra_installs_no_torch_trl_or_triton():
    assert not _closure({"dashboard"}) & HEAVY
    assert not _names(_project()["dependencies"]) & HEAVY
    for extra in ("train", "trl", "triton"):
        assert "torch" in _closure({extra}), extra


def test_the_core_commands_work_with_no_extra_installed(tmp_path):
    """With every extra's packages unimportable, a run is written and read, reported and diagnosed."""
    blocked = {"torch", "transformers", "trl", "triton", "accelerate", "tokenizers", "peft", "tensorboard",
               "tqdm", "dash", "flask", "plotly", "pyarrow", "tsdownsample"}
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {sorted(blocked)!r}:
            raise ImportError("not installed: " + name)
sys.meta_path.insert(0, Block())
from rlhf_core.runformat.run_writer import RunWriter
from rlhf_core.cli import diagnose as diagnose_cli
from profiler import report
with RunWriter({str(tmp_path / "r")!r}, source="generic", tensorboard=False) as w:
    for step in range(1, 4):
        w.log(step, {{"loss/total": 1.0 / step, "reward/mean": 0.1 * step, "time/step": 0.5}})
assert report.main([{str(tmp_path / "r")!r}]) == 0
assert diagnose_cli.main([{str(tmp_path / "r")!r}]) in (0, 1)
print("core ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "core ok" in out.stdout, out.stderr[-2000:]


def test_all_is_every_extra_and_make_installs_it():
    extras = _project()["optional-dependencies"]
    assert _closure({"all"}) == _closure(set(extras) - {"all"})
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements-dev.txt").read_text().splitlines()]
    assert "-e .[all]" in lines
    assert not (ROOT / "requirements.txt").exists()  # one list, in pyproject.toml


def test_transformers_range_starts_where_the_cache_keyword_does():
    """rlhf_core/train/sampling.py passes ``cache=``, which transformers has taken since 5.24."""
    from transformers import LlamaForCausalLM

    spec = next(Requirement(r) for r in _project()["optional-dependencies"]["train"]
                if Requirement(r).name == "transformers")
    assert spec.specifier.contains("5.24.0") and not spec.specifier.contains("5.23.0")
    assert not spec.specifier.contains("6.0.0")
    assert "cache" in inspect.signature(LlamaForCausalLM.forward).parameters
    source = (ROOT / "rlhf_core" / "train" / "sampling.py").read_text()
    assert "cache=" in source and not re.search(r"past_key_values\s*=", source)
