"""Where a run's cells are computed: one after another in this process, or as Ray tasks on a cluster.

:meth:`Run.cell <xaiadv.evaluation.run.Run.cell>` reuses a cell finished on disk; an executor computes the
others and hands each outcome back to :meth:`Run.record`, which saves it atomically on the driver.

- :class:`LocalExecutor` computes each cell at once, in order (``[executor] kind = "local"``, the default).
- :class:`RayExecutor` submits each cell as a Ray task and returns a :class:`PendingCell` at once. The
  driver records each outcome as it arrives, so killing the driver loses no finished cell, and waits for all
  of them at each :meth:`~RayExecutor.barrier` (the run calls one after the attack cells and after each study:
  later studies read earlier cells). A study that reads a returned cell (``cell["status"]``) waits for that
  cell first, so a cell that depends on it is submitted only once it is saved.

Ray ships a task's closure with cloudpickle. The :class:`~xaiadv.evaluation.run.Run` it captures is reduced
to its small state (config, run folder, resume key, attack cells) and one object-store reference to the
data, the model and the sample, put once per run; a worker process fetches them once
(:func:`_worker_run`). Before any cell, one probe per node proves that the node can load them (the model's
class importable there: a user's ``factory`` module) and sees the run folder (workers read earlier cells'
arrays from it, so on several machines it must be a shared file system). A worker that dies is retried
(``max_retries``); a cell that raises is a failed cell, as with the local executor.
"""

from __future__ import annotations

import abc
import copy
import logging
import platform
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import ExecutorSpec, RunConfig, ray_address

if TYPE_CHECKING:
    from .run import Run

logger = logging.getLogger(__name__)

#: What a cell's computation returns: its JSON record and its arrays (saved as npz beside it).
Compute = Callable[[], tuple[dict[str, Any], Mapping[str, np.ndarray]]]

#: Seconds to wait for a TCP connection to a Ray address before calling it unreachable.
CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class CellTask:
    """One cell to compute: what names it, its resume key, its computation."""

    kind: str
    label: str
    key: str
    compute: Compute
    about: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """What computing a cell gave: its record and arrays, or the error it raised; the node that ran it."""

    record: dict[str, Any] | None
    arrays: Mapping[str, np.ndarray]
    error: str | None
    node: str | None


def seed_everything(seed: int) -> None:
    """Every cell starts from the same seed, so a cell's result does not depend on which cells ran before
    (or on which worker)."""
    torch.manual_seed(seed)
    np.random.seed(seed)  # ART's attacks draw from numpy's global generator


def compute_cell(compute: Compute, seed: int, node: str | None) -> Outcome:
    """Seed, compute; an Exception becomes the outcome's error (Ctrl-C and worker death pass)."""
    seed_everything(seed)
    try:
        record, arrays = compute()
    except Exception as error:  # a cell that raises fails alone, not the run
        return Outcome(None, {}, f"{type(error).__name__}: {error}", node)
    return Outcome(record, arrays, None, node)


class Executor(abc.ABC):
    """Computes the cells :meth:`Run.cell` does not find on disk; a context manager around one run."""

    kind: str

    def prepare(self, run: Run) -> None:
        """Called once the run is started, before its first cell; by default nothing to do."""
        del run

    @abc.abstractmethod
    def submit(self, run: Run, task: CellTask) -> Mapping[str, Any]:
        """Compute ``task`` (now or later); the cell as results.json shows it, plus its ``key``."""

    def barrier(self, run: Run) -> None:
        """Return once every submitted cell is recorded; by default they all are."""
        del run

    def shown(self) -> None:  # noqa: B027  (an optional hook)
        """A cell was recorded or reused (progress); by default nothing to show."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """What environment.json says of the executor."""

    def reduce_run(self, run: Run) -> tuple[Any, ...]:
        """How pickle ships ``run`` to a worker; only a Ray run has workers."""
        raise TypeError("a Run is shipped to Ray workers only ([executor] kind = 'ray')")

    def close(self) -> None:  # noqa: B027  (an optional hook)
        """Release what the executor holds (cancel pending work); by default nothing."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalExecutor(Executor):
    """Each cell computed at once, in this process, in the order the run asks for them."""

    kind = "local"

    def submit(self, run: Run, task: CellTask) -> Mapping[str, Any]:
        return run.record(task, compute_cell(task.compute, run.config.seed, platform.node()))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}


def open_executor(spec: ExecutorSpec, *, progress: bool = False) -> Executor:
    """The executor ``spec`` names; for Ray, connected (or a local instance started) before any work."""
    if spec.kind == "local":
        return LocalExecutor()
    return RayExecutor(spec, progress=progress)


def import_ray() -> ModuleType:
    """The ray module, or an ImportError naming the extra that installs it."""
    try:
        import ray
    except ImportError as error:
        raise ImportError("[executor] kind = 'ray' needs Ray: pip install 'xaiadv[ray]'") from error
    return ray


class PendingCell(Mapping[str, Any]):
    """A cell submitted to Ray: reading it waits until it is recorded, then reads the recorded cell."""

    def __init__(self, executor: RayExecutor, run: Run, ref: Any) -> None:
        self._executor, self._run, self._ref = executor, run, ref

    def _cell(self) -> Mapping[str, Any]:
        return self._executor.resolve(self._run, self._ref)

    def __getitem__(self, key: str) -> Any:
        return self._cell()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._cell())

    def __len__(self) -> int:
        return len(self._cell())

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("a pending cell stays on the driver; read it (which waits for it) to ship its record")


@dataclass(frozen=True)
class _RunState:
    """What a worker rebuilds a Run from: small values, and the object-store reference to the heavy parts."""

    config: RunConfig
    root: str
    base_key: str
    attacks: dict[str, dict[str, Any]]
    bundle: Any  # ray.ObjectRef to (data, model on CPU, sample), put once per run


class RayExecutor(Executor):
    """Each cell a Ray task (``spec``'s CPUs, GPUs, retries); outcomes recorded on the driver as they come."""

    kind = "ray"

    def __init__(self, spec: ExecutorSpec, *, progress: bool = False) -> None:
        self._ray = import_ray()
        self.spec = spec
        self._progress = progress
        self._started = _connect(self._ray, spec.address)
        self._task = self._ray.remote(_run_task).options(
            num_cpus=spec.num_cpus,
            num_gpus=spec.num_gpus,
            max_retries=spec.max_retries,
            retry_exceptions=False,
        )
        self._pending: dict[Any, CellTask] = {}
        self._done: dict[Any, Mapping[str, Any]] = {}
        self._bundle: Any = None
        self._bar: Any = None

    def prepare(self, run: Run) -> None:
        """Put the data, the model and the sample in the object store once; probe every node with them."""
        from .run import cell_count

        model = copy.deepcopy(run.model).cpu()  # the caller's model stays on its device
        self._bundle = self._ray.put((run.data, model, run.sample))
        _probe_nodes(self._ray, self._bundle, run.config, str(run.directory.root.resolve()))
        self._bar = tqdm(total=cell_count(run.config), desc="cells", disable=not self._progress)

    def submit(self, run: Run, task: CellTask) -> Mapping[str, Any]:
        ref = self._task.remote(task.compute, run.config.seed)
        self._pending[ref] = task
        return PendingCell(self, run, ref)

    def resolve(self, run: Run, ref: Any) -> Mapping[str, Any]:
        """The recorded cell of task ``ref``, recording arrivals until it is among them."""
        while ref not in self._done:
            self._record_next(run)
        return self._done[ref]

    def barrier(self, run: Run) -> None:
        while self._pending:
            self._record_next(run)

    def _record_next(self, run: Run) -> None:
        """Wait for the next task to finish and record it; a task Ray gave up on is a failed cell."""
        ready, _ = self._ray.wait(list(self._pending), num_returns=1)
        ref = ready[0]
        task = self._pending.pop(ref)
        try:
            outcome = self._ray.get(ref)
        except self._ray.exceptions.RayError as error:  # worker died max_retries + 1 times, or similar
            outcome = Outcome(None, {}, f"{type(error).__name__}: {error}", None)
        self._done[ref] = run.record(task, outcome)

    def shown(self) -> None:
        if self._bar is not None:
            self._bar.update()

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "address": self.spec.address,
            "started_local_instance": self._started,
            "per_cell": {"num_cpus": self.spec.num_cpus, "num_gpus": self.spec.num_gpus},
            "max_retries": self.spec.max_retries,
            "cluster_resources": self._ray.cluster_resources(),
            "nodes": sorted(node["NodeManagerAddress"] for node in self._ray.nodes() if node["Alive"]),
        }

    def reduce_run(self, run: Run) -> tuple[Any, ...]:
        if self._bundle is None:
            raise RuntimeError("RayExecutor.prepare(run) puts the run's data and model before any task")
        root = str(run.directory.root.resolve())
        # while the attack cells are submitted, the earlier ones are still pending: no attack cell reads them
        attacks = {label: cell for label, cell in run.attacks.items() if not isinstance(cell, PendingCell)}
        state = _RunState(run.config, root, run.base_key, attacks, self._bundle)
        return _worker_run, (state,)

    def close(self) -> None:
        """Cancel the tasks still running (Ctrl-C, an error); shut Ray down when this executor started it."""
        for ref in self._pending:
            self._ray.cancel(ref, force=True)
        self._pending.clear()
        if self._bar is not None:
            self._bar.close()
        if self._started:
            self._ray.shutdown()


def _connect(ray: ModuleType, address: str | None) -> bool:
    """Join the cluster at ``address`` or start a local instance (None); True when this started one.

    A process already connected (``ray.init`` called before, as a test or notebook does) keeps its
    connection when no address is given. An unreachable address is refused within seconds, naming it.
    """
    if address is not None:
        _reachable(address)
        if ray.is_initialized():
            raise ValueError(
                f"executor.address: this process is already connected to Ray (ray.init was called), so "
                f"{address!r} cannot be joined; leave address out to use that connection"
            )
    elif ray.is_initialized():
        return False
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ValueError(f"executor.address: cannot join the Ray cluster at {address!r}: {error}") from error
    return address is None


def _reachable(address: str) -> None:
    """A TCP connection to ``address``'s host and port (``"auto"`` reads the local cluster's file instead)."""
    host_port = ray_address(address)
    if host_port is None:
        return
    try:
        socket.create_connection(host_port, timeout=CONNECT_TIMEOUT).close()
    except OSError as error:
        raise ValueError(
            f"executor.address: no Ray cluster answers at {address!r} ({error.strerror or error}); start one "
            "with `ray start --head`, or leave address out to start a local instance"
        ) from error


def _probe_nodes(ray: ModuleType, bundle: Any, config: RunConfig, root: str) -> None:
    """On every alive node, load the bundle as a worker will and look for the run folder; before any cell.

    A node that cannot is a ValueError naming it and the reason (most often the model's factory module is
    not importable there, or the run folder is not on a file system it shares).
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(_probe)
    refs = {
        node["NodeManagerAddress"]: probe.options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote([bundle], config.model.factory, config.folder, root)
        for node in ray.nodes()
        if node["Alive"]
    }
    for node, ref in refs.items():
        problem = ray.get(ref)
        if problem is not None:
            raise ValueError(f"executor: Ray node {node} cannot run this run's cells: {problem}")


def _probe(boxed: list[Any], factory: str | None, folder: str, root: str) -> str | None:
    """On one node: None when the model loads and the run folder is there, else what is wrong."""
    import ray

    try:
        _import_factory(factory, folder)
        ray.get(boxed[0])
    except Exception as error:  # what the worker would fail with, said before any cell runs
        where = f"model.factory {factory!r}" if factory else "the run's model"
        return (
            f"{where} cannot be loaded on the workers ({type(error).__name__}: {error}); make its module "
            "importable there (install it on every node, or give ray.init runtime_env={'py_modules': [...]})"
        )
    if not (Path(root) / "config.json").is_file():
        return f"the run folder {root} is not visible there; put output on a file system every node shares"
    return None


def _import_factory(factory: str | None, folder: str) -> None:
    """Import a user's factory module from the config's folder first, as the driver did, so that the model
    (pickled with its class by reference) unpickles on a worker too."""
    if factory is not None:
        from .models import import_factory

        import_factory(factory, Path(folder))


#: Per worker process: the data, the model (on the run's device) and the sample of each bundle it has seen.
_WORKER_PARTS: dict[str, tuple[Any, torch.nn.Module, Any]] = {}


def _worker_run(state: _RunState) -> Run:
    """The Run a cell's closure captured, rebuilt on a worker: the heavy parts fetched once per process."""
    import ray

    from .run import Run
    from .rundir import RunDirectory

    device = torch.device(state.config.device)
    name = state.bundle.hex()
    if name not in _WORKER_PARTS:
        _import_factory(state.config.model.factory, state.config.folder)
        data, model, sample = ray.get(state.bundle)
        _WORKER_PARTS[name] = (data, model.to(device).eval(), sample)
    data, model, sample = _WORKER_PARTS[name]
    return Run(
        state.config,
        device,
        RunDirectory(state.root),
        data,
        model,
        sample,
        results={},
        base_key=state.base_key,
        executor=LocalExecutor(),
        attacks=state.attacks,
    )


def _run_task(compute: Compute, seed: int) -> Outcome:
    """The Ray task of one cell: compute it on this worker, naming the node that did."""
    import ray

    node = f"{socket.gethostname()} ({ray.get_runtime_context().get_node_id()[:12]})"
    return compute_cell(compute, seed, node)
