"""The kit inside any Ray job: a ``worker_process_setup_hook`` that records every worker's phases and system use.

    import ray
    from adapters import ray_hook

    with ray_hook.job("runs/my_ray_job") as env:       # the driver: meta.json, clock reference
        ray.init(runtime_env=env)                      # every worker runs ray_hook.setup at start-up
        ...                                            # in actors: with ray_hook.phase("generate", step=t): ...
        ray.shutdown()

Ray runs the hook (``RAY_WORKER_PROCESS_SETUP_HOOK`` in ``ray/_private/workers/default_worker.py``) in each
worker process before it takes tasks, never in the driver; a hook that raises makes Ray drain the worker, so
:func:`setup` catches everything and prints one warning line instead. In each worker it:

- claims a rank of the run (``ray/worker.<N>.json`` created exclusively; the driver is rank 0) with the
  worker's identity (pid, host, Ray node and worker ids, and once known its actor class as role);
- measures its clock offset to the driver NTP-style (docs/timeline.md "The shared clock"): the driver answers
  UDP pings with its wall clock, the round with the shortest round trip is kept, half of it is the uncertainty;
- starts the system sampler (``system.jsonl``, this rank) and, at the first :func:`phase`, a timeline file
  ``timeline.rank<N>.jsonl`` (role: the actor class, ``worker`` for plain tasks).

Why each phase end writes its step's line so far: Ray ends workers with SIGKILL (``ray.shutdown``,
``ray.kill``), so neither ``atexit`` nor a periodic flush sees the last step. One ``write`` per phase costs
~8 µs of CPU (measured) next to the hundreds of µs of a Ray call; a later line of a step replaces the earlier
one when read.

The run directory must be reachable by every node (one host, or a shared file system).
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from profiler.sampler import SystemSampler
from profiler.timeline import TimelineRecorder
from rlhf_core.runformat.clock import ClockOffset, ntp_offset, wall_ns
from rlhf_core.runformat.keys import sanitize
from rlhf_core.runformat.run_writer import JsonlAppender, RunWriter, write_json_atomic
from rlhf_core.runformat.timeline import read_timeline, timeline_files, union_ns

from .ray_timeline import CLASS_ROLES, METHOD_PHASES

__all__ = ["HOOK", "ClockServer", "Recorder", "finish", "job", "kit_phase", "measure_udp", "phase", "read_workers",
           "runtime_env", "setup"]

HOOK = "adapters.ray_hook.setup"
RUN_DIR_ENV = "RLHFKIT_RUN_DIR"
CLOCK_ENV = "RLHFKIT_RAY_CLOCK"  # "<ip>:<port>:<token hex>" of the driver's clock server
INTERVAL_ENV = "RLHFKIT_SYSTEM_INTERVAL_S"  # system sampler period in the workers; 0 turns it off
WORKERS_DIR = "ray"
KEEP_STEPS = 64  # steps whose phases are kept to rewrite their line when a late phase arrives
CLOCK_ROUNDS = 8
CLOCK_TIMEOUT_S = 0.2

# names people give their phases -> the kit's phase names (docs/timeline.md); Ray method names as the importer
PHASE_ALIASES = {
    **METHOD_PHASES,
    "generate": "rollout", "generation": "rollout", "rollout": "rollout", "sample": "rollout",
    "ref": "ref_logprobs", "reference": "ref_logprobs", "ref_logprobs": "ref_logprobs",
    "logprobs": "old_logprobs", "old_logprobs": "old_logprobs",
    "reward": "reward", "score": "reward", "rm": "reward",
    "critic": "values", "values": "values", "value": "values",
    "advantages": "advantages", "gae": "advantages",
    "train": "update", "update": "update", "fit": "update", "backward": "update",
    "optimizer": "optimizer", "optim": "optimizer", "optimizer_step": "optimizer",
    "sync": "weight_sync", "weight_sync": "weight_sync", "broadcast": "weight_sync",
    "logging": "logging",
}


def kit_phase(name: str) -> str:
    """The kit's name of a phase (``generate`` -> ``rollout``); a name it does not know is kept as given."""
    return PHASE_ALIASES.get(name, name)


def _warn(what: str, err: BaseException) -> None:
    """The one line a failure costs; the job goes on without the kit in this process."""
    msg = " ".join(f"{type(err).__name__}: {err}".split())[:300]
    try:
        print(f"rlhfkit: {what} (pid {os.getpid()}): {msg}; the job continues without it", file=sys.stderr,
              flush=True)
    except Exception:  # noqa: BLE001 - a closed stderr must not turn a warning into a failure
        pass


# ---------------------------------------------------------------------------------------------- the clock
_REQ = struct.Struct("!16sq8x")  # token, sequence number, padding: a request is longer than the reply
_REPLY = struct.Struct("!qqq")  # sequence number, t2, t3 (the driver's wall clock, ns)


class ClockServer:
    """The driver's wall clock over UDP, for the workers' NTP-style offsets (a daemon thread).

    Only requests carrying the job's random token are answered, and a reply is shorter than its request, so
    the socket can neither be used by others nor amplify traffic."""

    def __init__(self, token: bytes | None = None, bind: str = "0.0.0.0"):  # all interfaces: workers on other nodes
        self.token = token or secrets.token_bytes(16)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((bind, 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="rlhfkit-clock-server", daemon=True)
        self._thread.start()

    def address(self, host: str) -> str:
        return f"{host}:{self.port}:{self.token.hex()}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(64)
            except TimeoutError:
                continue
            except OSError:
                return
            t2 = wall_ns()
            if len(data) != _REQ.size:
                continue
            token, seq = _REQ.unpack(data)
            if token != self.token:
                continue
            try:
                self.sock.sendto(_REPLY.pack(seq, t2, wall_ns()), peer)
            except OSError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)
        self.sock.close()


def measure_udp(address: str, rounds: int = CLOCK_ROUNDS, timeout_s: float = CLOCK_TIMEOUT_S,
                now: Any = wall_ns) -> ClockOffset | None:
    """This process's offset to the clock server at ``address`` (``ip:port:token``), the shortest of ``rounds``
    round trips; None when no reply came. ``now`` is this process's clock (tests give it a skew)."""
    host, port, token = address.rsplit(":", 2)
    tok = bytes.fromhex(token)
    best: tuple[int, int] | None = None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout_s)
        for seq in range(rounds):
            t1 = now()
            sock.sendto(_REQ.pack(tok, seq), (host, int(port)))
            while True:  # a late reply to an earlier round is skipped, not matched to this one
                try:
                    data = sock.recv(64)
                except TimeoutError:
                    data = b""
                    break
                if len(data) == _REPLY.size and _REPLY.unpack(data)[0] == seq:
                    break
            t4 = now()
            if not data:
                continue
            _, t2, t3 = _REPLY.unpack(data)
            offset, unc = ntp_offset(t1, t2, t3, t4)
            if best is None or unc < best[1]:
                best = (offset, unc)
    return None if best is None else ClockOffset(best[0], best[1], "udp-ping-pong", 0)


# ---------------------------------------------------------------------------------------------- one process
def _claim_rank(run_dir: Path, rank: int | None) -> tuple[int, Path]:
    """``rank`` (the driver's 0, rewritten on a resume), or the lowest free worker rank: its
    ``ray/worker.<N>.json`` created exclusively (safe between processes and hosts sharing the directory)."""
    folder = run_dir / WORKERS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    if rank is not None:
        return rank, folder / f"worker.{rank}.json"
    rank = max(1, sum(1 for n in os.listdir(folder) if n.startswith("worker.")))  # a first guess, then upwards
    while True:
        path = folder / f"worker.{rank}.json"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return rank, path
        except FileExistsError:
            rank += 1


class _SystemFile:
    """The sampler's writer: this rank's lines in the run's shared ``system.jsonl``."""

    def __init__(self, run_dir: Path, rank: int):
        self._out = JsonlAppender(run_dir / "system.jsonl")
        self.rank = rank

    def system(self, record: Mapping[str, Any]) -> None:
        rec = {"time": time.time(), "rank": self.rank, **record}
        self._out.append(sanitize(rec)[0])

    def close(self) -> None:
        self._out.close()


class Recorder:
    """One process of the job: its rank and identity, clock offset, system sampler and phase intervals."""

    def __init__(self, run_dir: str | os.PathLike, *, rank: int | None = None, role: str | None = None,
                 clock: ClockOffset | None = None, system_interval_s: float | None = 1.0,
                 identity: Mapping[str, Any] | None = None):
        """``rank`` None claims the next free worker rank; ``role`` None is found at the first phase."""
        self.run_dir = Path(run_dir)
        self.pid = os.getpid()
        self.host = socket.gethostname()
        self.rank, self.info_path = _claim_rank(self.run_dir, rank)
        self.role = role
        self._auto_role = role is None  # found from Ray at the first phase (and again while it is "worker")
        self.clock = clock or ClockOffset()
        self.identity = {"rank": self.rank, "pid": self.pid, "host": self.host, "role": role or "worker",
                         "clock": self.clock.as_dict(), "start_time": time.time(), **(identity or {})}
        write_json_atomic(self.info_path, self.identity)
        self._lock = threading.Lock()
        self._timeline: TimelineRecorder | None = None
        self._failed = False
        self._steps: dict[int, list[tuple[str, float, float]]] = {}
        self._dropped = -(2 ** 62)  # the latest step whose phases were let go (KEEP_STEPS)
        self._current: int | None = None  # the step of phases given without one
        self._opener: str | None = None  # the phase that opened that step: when it starts again, a step begins
        self._system = _SystemFile(self.run_dir, self.rank)
        self.sampler: SystemSampler | None = None
        if system_interval_s:
            self.sampler = SystemSampler(self._system, system_interval_s).start()

    # -- phases
    def step_of(self, name: str, step: int | None) -> int:
        """The step a phase belongs to: the one given, else this process's own count (a new step begins when
        the phase that opened the current one starts again)."""
        with self._lock:
            if step is not None:
                self._current, self._opener = int(step), None
                return int(step)
            if self._current is None:
                self._current, self._opener = 1, name
            elif self._opener is None:
                self._opener = name
            elif name == self._opener:
                self._current += 1
            return self._current

    def add(self, name: str, step: int, start: float, end: float) -> None:
        """One finished phase occurrence (``perf_counter`` times): its step's line is rewritten at once."""
        if self._failed:
            return
        try:
            with self._lock:
                rec = self._timeline or self._open_timeline()
                if step not in self._steps:
                    if step <= self._dropped:
                        return  # its earlier phases are no longer kept: a line of this phase alone would replace them
                    if self._auto_role and self.role == "worker" and _ray_role() != "worker":
                        rec = self._open_timeline()  # Ray made this task worker an actor: a new header says so
                    if self._steps and step > max(self._steps):
                        rec.anchor()  # one (wall, perf_counter) pair per step, as the recorder's other users
                    if len(self._steps) >= KEEP_STEPS:
                        oldest = min(self._steps)
                        if step < oldest:
                            return
                        self._dropped = max(self._dropped, oldest)
                        del self._steps[oldest]
                    self._steps[step] = []
                spans = self._steps[step]
                spans.append((name, start, end))
                rec.record_step(step, min(s for _, s, _ in spans), max(e for _, _, e in spans), spans)
                rec.flush()
        except Exception as err:  # noqa: BLE001 - recording must never fail the user's task
            self._failed = True
            _warn("phase recording stopped", err)

    def _open_timeline(self) -> TimelineRecorder:
        """The timeline file, opened (or, after a role change, given a new header: the last one counts)."""
        role = _ray_role() if self._auto_role else (self.role or "worker")
        self.role = role
        if self._timeline is not None:
            self._timeline.close()
        if self.identity.get("role") != role:
            self.identity["role"] = role
            write_json_atomic(self.info_path, self.identity)
        node = str(self.identity.get("node_id") or "")
        self._timeline = TimelineRecorder(self.run_dir, rank=self.rank, world_size=0, role=role, clock=self.clock,
                                          source="ray_hook", name=f"{self.host}:{self.pid}"
                                          + (f" node {node[:8]}" if node else ""))
        return self._timeline

    def close(self) -> None:
        """Stop the sampler (it writes a last reading) and close the files. Safe to call twice."""
        if self.sampler is not None:
            self.sampler.stop()
            self.sampler = None
        self._system.close()
        with self._lock:
            if self._timeline is not None:
                try:
                    self._timeline.close()
                except OSError:
                    pass
                self._timeline = None
            self._failed = True  # phases after close are not recorded


def _ray_role() -> str:
    """The actor class of this worker (the importer's role names for OpenRLHF/veRL classes), else ``worker``."""
    ray = sys.modules.get("ray")  # a Ray worker has imported it; anywhere else importing it costs a second
    try:
        if ray is None or not ray.is_initialized():  # get_runtime_context() would start a Ray instance
            return "worker"
        ctx = ray.get_runtime_context()
        if ctx.get_actor_id() is None:
            return "worker"
        cls = (ctx.get_task_name() or "").rpartition(".")[0]  # "<Class>.<method>" in an actor
        return CLASS_ROLES.get(cls, cls) or "worker"
    except Exception:  # noqa: BLE001 - outside Ray, or an older Ray without these calls
        return "worker"


def _ray_identity() -> dict[str, Any]:
    """This worker's Ray node, worker and job ids (best effort: the recording does not need them)."""
    try:
        import ray

        if not ray.is_initialized():  # get_runtime_context() would start a Ray instance
            return {}
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "worker_id": ctx.get_worker_id(), "job_id": ctx.get_job_id()}
    except Exception:  # noqa: BLE001 - an older Ray without these calls
        return {}


_recorder: Recorder | None = None


class _Phase:
    """``with phase(...)``: a class, not a generator, so the no-kit case costs one attribute check."""

    __slots__ = ("name", "step", "_t0", "_rec", "_at")

    def __init__(self, name: str, step: int | None):
        self.name, self.step = kit_phase(name), step

    def __enter__(self) -> None:
        rec = _recorder
        self._rec = rec if rec is not None and rec.pid == os.getpid() else None  # not in a forked child
        if self._rec is not None:
            self._at = self._rec.step_of(self.name, self.step)
        self._t0 = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        if self._rec is not None:
            self._rec.add(self.name, self._at, self._t0, time.perf_counter())


def phase(name: str, step: int | None = None) -> _Phase:
    """``with phase("generate", step=t):`` times a phase of step ``t`` in this process (an actor, a task, the
    driver). The name becomes the kit's (:func:`kit_phase`); without ``step`` the process counts its steps
    itself. Does nothing where the kit is not running (no hook, or the hook failed)."""
    return _Phase(name, step)


# ---------------------------------------------------------------------------------------------- the worker
def setup() -> None:
    """The ``worker_process_setup_hook``: start the kit in this worker (one warning line if it cannot)."""
    global _recorder
    run_dir = os.environ.get(RUN_DIR_ENV)
    if not run_dir or _recorder is not None:
        return
    try:
        clock = ClockOffset(0, 0, "ray-node-clock", 0)
        address = os.environ.get(CLOCK_ENV)
        if address:
            try:
                measured = measure_udp(address)
                if measured is None:
                    raise TimeoutError(f"no reply from the driver's clock at {address.rsplit(':', 1)[0]}")
                clock = measured
            except (OSError, ValueError) as err:
                _warn("clock offset not measured (node clock kept)", err)
        try:
            interval = float(os.environ.get(INTERVAL_ENV) or 1.0)
        except ValueError:
            interval = 1.0
        _recorder = Recorder(run_dir, clock=clock, system_interval_s=interval if interval > 0 else None,
                             identity=_ray_identity())
        atexit.register(_recorder.close)  # runs when an actor ends with exit_actor(); Ray's kills skip it
    except Exception as err:  # noqa: BLE001 - a failing hook would make Ray drain the worker
        _recorder = None
        _warn(f"Ray setup hook off ({run_dir})", err)


# ---------------------------------------------------------------------------------------------- the driver
class _Driver:
    def __init__(self, writer: RunWriter, server: ClockServer | None, recorder: Recorder):
        self.writer, self.server, self.recorder = writer, server, recorder


_driver: _Driver | None = None
_exit_hooked = False


def runtime_env(run_dir: str | os.PathLike, *, base: Mapping[str, Any] | None = None,
                config: Mapping[str, Any] | None = None, system_interval_s: float | None = 1.0,
                overwrite: bool = False, resume: bool = False, clock: bool = True) -> dict[str, Any]:
    """Open the run in the driver and return the ``runtime_env`` for ``ray.init`` (``base`` merged in).

    The driver becomes rank 0 (role ``driver``: its :func:`phase` calls and system use are recorded too) and
    the reference clock the workers measure against (``clock=False``: no clock server; the workers keep their
    node's clock, ``ray-node-clock``). ``meta.json`` says ``running`` until :func:`finish`; a driver that exits
    without it leaves ``interrupted``. A bad run directory raises here, before the job starts."""
    global _driver, _recorder, _exit_hooked
    if _driver is not None:
        raise RuntimeError(f"a Ray run is already open in this driver ({_driver.writer.run_dir}); finish() it first")
    env = dict(base or {})
    if env.get("worker_process_setup_hook") not in (None, HOOK):
        raise ValueError(f"runtime_env already has a worker_process_setup_hook ({env['worker_process_setup_hook']!r});"
                         f" call {HOOK} from it instead")
    interval = system_interval_s if system_interval_s and system_interval_s > 0 else None
    writer = RunWriter(run_dir, source="generic", config=config, tensorboard=False, overwrite=overwrite,
                       resume=resume, extra_meta={"adapter": {"name": "adapters.ray_hook"},
                                                  "ray": {"system_interval_s": interval}})
    server = None
    try:
        recorder = Recorder(writer.run_dir, rank=0, role="driver", clock=ClockOffset(0, 0, "reference", 0),
                            system_interval_s=interval)
        server = ClockServer() if clock else None
    except BaseException:
        writer.close("failed", "the Ray hook could not start in the driver")
        raise
    _driver = _Driver(writer, server, recorder)
    _recorder = recorder
    if not _exit_hooked:
        atexit.register(_finish_at_exit)
        _exit_hooked = True
    env_vars = {str(k): str(v) for k, v in (env.get("env_vars") or {}).items()}
    env_vars[RUN_DIR_ENV] = str(writer.run_dir.resolve())
    env_vars[INTERVAL_ENV] = str(interval or 0)
    if server is not None:
        env_vars[CLOCK_ENV] = server.address(_node_ip())
    env["env_vars"] = env_vars
    env["worker_process_setup_hook"] = HOOK
    return env


def _node_ip() -> str:
    try:
        import ray.util

        return str(ray.util.get_node_ip_address())
    except Exception:  # noqa: BLE001 - without Ray's helper, the workers of this host still reach it
        return "127.0.0.1"


def finish(status: str = "finished", reason: str | None = None) -> dict[str, Any] | None:
    """Close the run in the driver: stop the clock server and the driver's recording, write ``metrics.jsonl``
    from the timeline (per step ``time/step``, the window over all processes, and ``time/<phase>``, the time
    any process ran it, as the Ray-timeline importer does), count the processes into ``meta.json``
    (``ray.workers``, ``ray.timeline_processes``) and record ``status``. Call it once the workers are done
    (after ``ray.shutdown()``, or after the last ``ray.get``). Returns the ``ray`` summary (None when no run
    was open)."""
    global _driver, _recorder
    d = _driver
    if d is None:
        return None
    _driver = None
    if _recorder is d.recorder:
        _recorder = None
    if d.server is not None:
        d.server.close()
    d.recorder.close()
    run_dir = d.writer.run_dir
    try:
        try:
            steps: int | None = _step_times(d.writer)
        except Exception as err:  # noqa: BLE001 - the status still gets written; the timeline files are intact
            steps = None
            _warn("metrics.jsonl from the timeline not written", err)
        summary = {**(d.writer.meta.get("ray") or {}), "workers": sum(1 for r in read_workers(run_dir) if r > 0),
                   "timeline_processes": len(timeline_files(run_dir)), "steps": steps}
        d.writer.meta["ray"] = summary
    finally:
        d.writer.close(status, reason)
    return summary


def _step_times(writer: RunWriter) -> int:
    """One ``metrics.jsonl`` record per step of the timeline; returns how many."""
    tl = read_timeline(writer.run_dir)
    for step in tl.step_numbers():
        spans = [by_step[step] for by_step in tl.steps.values() if step in by_step]
        by_phase: dict[str, list[tuple[int, int]]] = {}
        for span in spans:
            for name, start, dur in span.phases:
                by_phase.setdefault(name, []).append((start, start + dur))
        record = {"time/step": (max(s.end for s in spans) - min(s.t0 for s in spans)) / 1e9}
        record.update({f"time/{name}": union_ns(iv) / 1e9 for name, iv in sorted(by_phase.items())})
        writer.log(step, record)
    return len(tl.step_numbers())


def _finish_at_exit() -> None:
    if _driver is not None:
        finish("interrupted", "the driver exited without adapters.ray_hook.finish()")


@contextlib.contextmanager
def job(run_dir: str | os.PathLike, **options: Any) -> Iterator[dict[str, Any]]:
    """``with job(run_dir) as env: ray.init(runtime_env=env); ...``: :func:`runtime_env`, then :func:`finish`
    with ``finished``, ``failed`` (the exception, one line) or ``interrupted`` (Ctrl-C)."""
    env = runtime_env(run_dir, **options)
    try:
        yield env
    except KeyboardInterrupt:
        finish("interrupted", "KeyboardInterrupt")
        raise
    except SystemExit as err:
        finish(*(("finished", None) if err.code in (None, 0) else ("failed", f"SystemExit: {err.code}")))
        raise
    except BaseException as err:
        finish("failed", " ".join(f"{type(err).__name__}: {err}".split())[:500])
        raise
    finish()


def read_workers(run_dir: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """{rank: identity} of the processes the hook started in (rank 0: the driver)."""
    out = {}
    for p in (Path(run_dir) / WORKERS_DIR).glob("worker.*.json"):
        try:
            info = json.loads(p.read_text() or "{}")
        except (OSError, ValueError):
            continue
        digits = p.name[len("worker."): -len(".json")]
        if digits.isdigit():
            out[int(digits)] = info
    return dict(sorted(out.items()))
