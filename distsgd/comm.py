"""Gradient communication on the DDP engine, as ``trainer.comm_hook`` chooses it, with torch's own
DDP communication hooks and model averager:

- ``none``: DDP's all-reduce, the exact mean of the ranks' fp32 gradients.
- ``fp16`` / ``bf16``: ``fp16_compress_hook`` / ``bf16_compress_hook``. Each bucket is cast to half
  precision, divided by the world size, summed over the ranks in that precision and cast back:
  the averaged gradient is rounded. The loss and stop flag, which travel in DDP's buckets under
  ``none`` (step.WithStepStats), take their own all-reduce in full precision under this hook and
  PowerSGD, whose rounding and error feedback would change them (a loss above fp16's 65504 would
  become inf).
- ``powersgd``: ``powerSGD_hook`` (Vogels et al. 2019). After ``powersgd_warmup_steps`` plain
  steps, each gradient tensor viewed as a matrix M (shape[0] x the rest) is replaced by a rank-r
  approximation P Q^T, one power-iteration step warm-started from the last step's Q; only P and Q
  are all-reduced. What the approximation misses of each rank's gradient (error feedback) is kept
  on that rank and added to its next gradient. Vectors, and matrices too small for r (n + m) to
  save half of n m, are all-reduced as they are.
- ``local_sgd``: ``post_localSGD_hook`` and ``PeriodicModelAverager`` (Lin et al. 2018, post-local
  SGD). After ``local_sgd_warmup_steps`` synchronous steps, each rank steps on its own gradient
  with its own optimizer state, and the parameters are averaged after every ``local_sgd_period``-th
  step. Validation and checkpoints see the average of the ranks' parameters (``averaged``);
  training goes on from each rank's own.

What differs between the ranks (PowerSGD's error feedback; local SGD's parameters and optimizer
state) is checkpointed per rank (``rank_state``), so that a resume on as many processes is exact.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, post_localSGD_hook, powerSGD_hook
from torch.distributed.algorithms.model_averaging import averagers
from torch.distributed.algorithms.model_averaging.utils import average_parameters

from distsgd.config import ConfigError, DiagnosticsConfig, TrainerConfig

log = logging.getLogger("distsgd")

# torch's default: a matrix is compressed only where P and Q take less than half of it.
MIN_COMPRESSION_RATE = 2.0
# What the step all-reduces apart from the gradients where they cannot carry it (local SGD after
# its warm-up; the hooks that round the mean): the loss, the stop flag and the gradient norm
# (float32), so that every rank still reaches the same verdict on exact numbers.
STEP_STATS_BYTES = 3 * 4


# What PowerSGD and LocalSGD below read and write of torch's hook states beyond their constructors,
# to checkpoint them and to rebuild them per DDP bucket: fields torch does not document (2.13).
# These two classes alone touch them; each checks on construction that torch still has them, and
# tests/test_comm.py checks it too, so that a torch that renames one fails by name.
TORCH_STATE_FIELDS = {
    powerSGD_hook.PowerSGDState: ("iter", "start_powerSGD_iter", "rng", "error_dict", "p_memory_dict",
                                  "q_memory_dict"),
    post_localSGD_hook.PostLocalSGDState: ("iter",),
}


def check_torch_fields(state) -> None:
    missing = [name for name in TORCH_STATE_FIELDS[type(state)] if not hasattr(state, name)]
    if missing:
        raise RuntimeError(f"torch {torch.__version__}'s {type(state).__name__} has no {', '.join(missing)}, which "
                           "distsgd reads to checkpoint the hook's state: this torch is too new for distsgd's "
                           "comm hooks (tested with torch 2.13); use trainer.comm_hook=none")


def build(tc: TrainerConfig, diagnostics: DiagnosticsConfig, params: list[torch.nn.Parameter],
          optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> "Communication":
    """The communication of ``trainer.comm_hook`` for a model with ``params``, trained by
    ``optimizer`` and ``scaler`` (restored already, when resuming); ``register`` attaches it to DDP."""
    if tc.comm_hook != "none" and diagnostics.noise_scale:
        # The noise scale needs each rank's own gradient in DDP's hook, and an exact average.
        raise ConfigError("diagnostics.noise_scale=true measures the gradient noise scale with DDP's plain "
                          f"all-reduce; it cannot be combined with trainer.comm_hook={tc.comm_hook} "
                          "(set one of them off)")
    match tc.comm_hook:
        case "none":
            return Communication(tc, params)
        case "fp16" | "bf16":
            return Compression(tc, params)
        case "powersgd":
            return PowerSGD(tc, params, scaler)
        case "local_sgd":
            return LocalSGD(tc, params, optimizer, scaler)
    raise AssertionError(tc.comm_hook)  # config.py lets no other value through


class Communication:
    """``none``: DDP's own all-reduce. The other hooks override what they change of a step."""

    # Whether DDP's all-reduce under this hook is the exact mean of what the ranks send, so that
    # the step's loss and stop flag may travel in its buckets (step.WithStepStats).
    exact_mean = True

    def __init__(self, tc: TrainerConfig, params: list[torch.nn.Parameter]) -> None:
        self.tc, self.params = tc, params
        # Bytes all-reduced per step with none, and with this hook once its warm-up is over.
        self.full_bytes = sum(p.numel() * p.element_size() for p in params)
        self.hook_bytes = bytes_per_step(tc, params)

    def ddp_options(self) -> dict:
        """Arguments for DistributedDataParallel."""
        return {}

    def register(self, ddp: torch.nn.parallel.DistributedDataParallel) -> None:
        """Attach the hook to ``ddp`` (on every rank, before its first step)."""

    def gradients_local(self) -> bool:
        """Whether this step's gradients stay on their rank (the step then averages its statistics itself)."""
        return False

    def after_step(self, nonfinite: bool) -> None:
        """After the update, applied or skipped (on every rank alike); ``nonfinite``: the loss or
        the gradient norm was."""

    @contextmanager
    def averaged(self):
        """The parameters as validation and checkpoints describe them, while inside (every rank enters)."""
        yield

    def rank_state(self) -> dict | None:
        """What differs between the ranks, for checkpoints (tensors on the CPU); None when nothing does."""
        return None

    def load_rank_state(self, state: dict | None, step: int) -> None:
        """Continue at ``step`` from this rank's ``rank_state`` (None: none saved for this world size)."""

    def observed(self) -> dict[str, float]:
        """What logged steps log: ``comm/compression_ratio``, how many times fewer bytes than
        ``none`` the step just taken all-reduced for the model's gradients (local SGD: per step,
        averaged over a period, its own small all-reduce of the loss, flag and norm included)."""
        return {}

    def _ratio(self, compressed: bool) -> dict[str, float]:
        return {"comm/compression_ratio": self.full_bytes / self.hook_bytes if compressed else 1.0}

    def describe(self) -> str:
        full, now = self.full_bytes, self.hook_bytes
        return (f"gradient communication: trainer.comm_hook={self.tc.comm_hook}, {now / 2**20:.4g} MiB all-reduced per "
                f"step{self._after_warmup()} against {full / 2**20:.4g} MiB with none ({full / now:.3g}x less)")

    def _after_warmup(self) -> str:
        return ""


class Compression(Communication):
    """``fp16`` / ``bf16``: torch's compress hooks."""

    exact_mean = False

    def observed(self) -> dict[str, float]:
        return self._ratio(compressed=True)

    def register(self, ddp: torch.nn.parallel.DistributedDataParallel) -> None:
        hook = default_hooks.fp16_compress_hook if self.tc.comm_hook == "fp16" else default_hooks.bf16_compress_hook
        try:
            ddp.register_comm_hook(None, hook)
        except TypeError as err:
            # DDP accepts bf16_compress_hook only in CUDA (NCCL >= 2.10) or XPU builds; gloo itself
            # would all-reduce bfloat16 fine (torch 2.13).
            raise ConfigError(f"trainer.comm_hook={self.tc.comm_hook} is refused by DDP with backend "
                              f"{torch.distributed.get_backend()} in this torch build ({err}); "
                              "use trainer.comm_hook=fp16") from None


def matrix_shape(param: torch.Tensor) -> tuple[int, int]:
    """The matrix PowerSGD sees in a gradient tensor: shape[0] rows, everything else as columns."""
    rows = param.shape[0] if param.dim() else 1
    return rows, param.numel() // max(rows, 1)


def compressed_rank(param: torch.Tensor, rank: int) -> int:
    """The rank torch's powerSGD_hook approximates ``param``'s gradient with; 0: sent as it is."""
    n, m = matrix_shape(param)
    r = min(n, m, rank)
    return r if (n + m) * r * MIN_COMPRESSION_RATE < n * m else 0


def bytes_per_step(tc: TrainerConfig, params: list[torch.Tensor]) -> float:
    """The bytes each rank all-reduces per step once warm-up is over, from the parameters' shapes,
    the step statistics included where they travel apart (the payload: a ring all-reduce sends
    about 2 (W - 1) / W times it)."""
    full = sum(p.numel() * p.element_size() for p in params)
    match tc.comm_hook:
        case "fp16" | "bf16":
            return sum(p.numel() for p in params) * 2 + STEP_STATS_BYTES
        case "powersgd":
            return sum((sum(matrix_shape(p)) * r if (r := compressed_rank(p, tc.powersgd_rank)) else p.numel())
                       * p.element_size() for p in params) + STEP_STATS_BYTES
        case "local_sgd":
            return full / tc.local_sgd_period + STEP_STATS_BYTES
    return full


class Matrix(NamedTuple):
    """A gradient tensor as PowerSGD sees it: ``rows`` x ``cols``, approximated at ``rank`` (0: sent as it is)."""

    numel: int
    rows: int
    cols: int
    rank: int


class PowerSGD(Communication):
    """``powersgd``: torch's PowerSGDState and powerSGD_hook, behind a hook that lets the state
    survive a change of DDP's buckets and a checkpoint.

    torch keys the state by DDP bucket (one flat error tensor and one flat Q per bucket), and a
    fresh DDP buckets the parameters differently at first: its first step all-reduces them as one
    bucket in registration order, later steps in buckets ordered as the gradients became ready.
    So checkpoints hold the state per parameter, and whenever a bucket index comes with other
    parameters than the state was built for (after a resume), the state is split per parameter
    into a pool and rebuilt for each bucket as it comes. For the same reason the random Qs that
    start the power iteration (at the first compressed step, and again after a non-finite one) are
    drawn here, per parameter in the model's order, rather than by torch per bucket: whatever the
    buckets are then, a resumed run draws the same Qs as an uninterrupted one.
    """

    exact_mean = False  # and its error feedback would carry the loss into the next step

    def __init__(self, tc: TrainerConfig, params: list[torch.nn.Parameter], scaler: torch.amp.GradScaler) -> None:
        super().__init__(tc, params)
        self.scaler = scaler
        self.state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=tc.powersgd_rank,
                                                 start_powerSGD_iter=tc.powersgd_warmup_steps,
                                                 min_compression_rate=MIN_COMPRESSION_RATE, random_seed=tc.seed)
        check_torch_fields(self.state)
        self.layouts: dict[int, tuple[int, ...]] = {}  # bucket index -> its parameters, as the state holds them
        self.pool: dict[str, dict[int, torch.Tensor]] = {"error": {}, "q": {}}  # per parameter, until its bucket comes
        # fp16: the errors are in units of the scaled gradient, this scale's.
        self.grad_scale = scaler.get_scale() if scaler.is_enabled() else 1.0

    def ddp_options(self) -> dict:
        if torch.distributed.get_backend() != "gloo":
            return {}
        # powerSGD_hook issues a bucket's second and third all-reduce from callbacks of the first,
        # which gloo runs on its own threads: with several buckets, two ranks can issue them in
        # different orders and pair different tensors (torch 2.13: "Received data size doesn't
        # match expected size", then an abort). One bucket keeps the order; NCCL keeps it anyway.
        return {"bucket_cap_mb": sum(p.numel() * p.element_size() for p in self.params) / 2**20 + 1}

    def register(self, ddp: torch.nn.parallel.DistributedDataParallel) -> None:
        params = list(ddp.module.parameters())
        self.index = {id(p): i for i, p in enumerate(params)}
        self.matrices = [Matrix(p.numel(), *matrix_shape(p), compressed_rank(p, self.tc.powersgd_rank)) for p in params]
        ddp.register_comm_hook(self.state, self.hook)

    def hook(self, state: powerSGD_hook.PowerSGDState, bucket):
        """torch's powerSGD_hook, once the bucket has its share of the state."""
        layout = tuple(self.index[id(p)] for p in bucket.parameters())
        if self.layouts.get(bucket.index(), layout) != layout:
            self._pool_all()
        if state.iter >= state.start_powerSGD_iter and not self.pool["q"] and not state.q_memory_dict:
            self._draw_qs()
        if bucket.index() not in self.layouts or (self.pool["q"] and bucket.index() not in state.q_memory_dict):
            self._unpool(bucket.index(), layout)
            self.layouts[bucket.index()] = layout
        return powerSGD_hook.powerSGD_hook(state, bucket)

    def _q_order(self, layout: tuple[int, ...]) -> list[int]:
        """The compressed parameters of a bucket in the order torch lays out their Qs: grouped by
        matrix shape, the groups in the order of their first member."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i in layout:
            if self.matrices[i].rank:
                groups.setdefault((self.matrices[i].rows, self.matrices[i].cols), []).append(i)
        return [i for group in groups.values() for i in group]

    def _draw_qs(self) -> None:
        """Random Qs for every compressed parameter into the pool, from torch's generator of them
        (one draw per start, as torch takes one per bucket; the same on every rank)."""
        generator = torch.Generator().manual_seed(int(self.state.rng.randint(1_000_000_000)))
        device = self.params[0].device
        for i, matrix in enumerate(self.matrices):
            if matrix.rank:
                self.pool["q"][i] = torch.randn(matrix.cols * matrix.rank, generator=generator).to(device)

    def _by_parameter(self) -> dict[str, dict[int, torch.Tensor]]:
        """The state held now (pool included) per parameter: views, no copies."""
        split = {"error": dict(self.pool["error"]), "q": dict(self.pool["q"])}
        for b, layout in self.layouts.items():
            if b in self.state.error_dict:
                sizes = [self.matrices[i].numel for i in layout]
                split["error"].update(zip(layout, self.state.error_dict[b].split(sizes)))
            if b in self.state.q_memory_dict:
                order = self._q_order(layout)
                sizes = [self.matrices[i].cols * self.matrices[i].rank for i in order]
                split["q"].update(zip(order, self.state.q_memory_dict[b].split(sizes)))
        return split

    def _pool_all(self) -> None:
        """Move the whole state into the pool, per parameter: the buckets are changing."""
        self.pool = self._by_parameter()
        for held in (self.state.error_dict, self.state.p_memory_dict, self.state.q_memory_dict, self.layouts):
            held.clear()

    def _unpool(self, b: int, layout: tuple[int, ...]) -> None:
        """Give bucket ``b`` its state from the pool, where the pool holds all of it."""
        if layout and all(i in self.pool["error"] for i in layout):
            self.state.error_dict[b] = torch.cat([self.pool["error"].pop(i) for i in layout])
        order = self._q_order(layout)
        if order and all(i in self.pool["q"] for i in order):
            q = torch.cat([self.pool["q"].pop(i) for i in order])
            self.state.q_memory_dict[b] = q
            # P is recomputed from Q every step; torch reads its presence as "warm-start from Q".
            self.state.p_memory_dict[b] = q.new_empty(sum(self.matrices[i].rows * self.matrices[i].rank for i in order))

    def after_step(self, nonfinite: bool) -> None:
        if nonfinite:
            # The errors and Qs now hold the non-finite values and would spread them to every later
            # step: drop them, on every rank alike; torch starts afresh (zero errors, random Qs).
            for held in (self.state.error_dict, self.state.p_memory_dict, self.state.q_memory_dict,
                         self.pool["error"], self.pool["q"], self.layouts):
                held.clear()
        if self.scaler.is_enabled():
            scale = self.scaler.get_scale()
            if scale != self.grad_scale:  # keep the errors in the units of the next step's gradient
                for error in [*self.state.error_dict.values(), *self.pool["error"].values()]:
                    error.mul_(scale / self.grad_scale)
            self.grad_scale = scale

    def rank_state(self) -> dict | None:
        kind, keys, pos, has_gauss, cached = self.state.rng.get_state()
        split = self._by_parameter()
        return {"powersgd": {
            "error": {i: t.cpu().clone() for i, t in split["error"].items()},
            "q": {i: t.cpu().clone() for i, t in split["q"].items()},
            # The generator of the random Qs (the same on every rank).
            "rng": {"keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos), "has_gauss": int(has_gauss),
                    "cached_gaussian": float(cached)},
        }}

    def load_rank_state(self, state: dict | None, step: int) -> None:
        self.state.iter = step  # the hook counts every step, compressed or not
        saved = (state or {}).get("powersgd")
        if saved is None:
            if step > self.tc.powersgd_warmup_steps:
                log.warning("trainer.comm_hook=powersgd: the checkpoint holds no PowerSGD state for this rank "
                            "(another world size or comm_hook): its error feedback starts afresh")
            return
        device = self.params[0].device
        self.pool = {kind: {i: t.to(device) for i, t in saved[kind].items()} for kind in ("error", "q")}
        rng = saved["rng"]
        self.state.rng.set_state(("MT19937", rng["keys"].numpy().astype("uint32"), rng["pos"], rng["has_gauss"],
                                  rng["cached_gaussian"]))

    def observed(self) -> dict[str, float]:
        return self._ratio(compressed=self.state.iter - 1 >= self.state.start_powerSGD_iter)  # iter: steps taken

    def _after_warmup(self) -> str:
        return f" from step {self.tc.powersgd_warmup_steps} on (rank {self.tc.powersgd_rank})"


class LocalSGD(Communication):
    """``local_sgd``: torch's PostLocalSGDState with post_localSGD_hook (no all-reduce after the
    warm-up) and PeriodicModelAverager, which counts its calls: one per step, so after update t
    it averages when t >= warm-up and t - warm-up is a multiple of the period. The optimizer and
    gradient scaler states are each rank's own too."""

    def __init__(self, tc: TrainerConfig, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler) -> None:
        super().__init__(tc, params)
        self.optimizer, self.scaler = optimizer, scaler
        # No subgroup all-reduce after the warm-up (post_local_gradient_allreduce=False): its default
        # subgroup is the node, i.e. every rank of a one-node run.
        self.state = post_localSGD_hook.PostLocalSGDState(process_group=None, subgroup=None,
                                                          start_localSGD_iter=tc.local_sgd_warmup_steps,
                                                          post_local_gradient_allreduce=False)
        check_torch_fields(self.state)
        self.averager = averagers.PeriodicModelAverager(period=tc.local_sgd_period,
                                                        warmup_steps=tc.local_sgd_warmup_steps)

    def register(self, ddp: torch.nn.parallel.DistributedDataParallel) -> None:
        ddp.register_comm_hook(self.state, post_localSGD_hook.post_localSGD_hook)

    def gradients_local(self) -> bool:
        return self.averager.step >= self.averager.warmup_steps

    def after_step(self, nonfinite: bool) -> None:
        self.averager.average_parameters(self.params)

    def _equal(self) -> bool:
        """Whether the ranks' parameters are equal now: in the warm-up, or right after an average."""
        last = self.averager.step - 1  # the last update
        return last < self.averager.warmup_steps or (last - self.averager.warmup_steps) % self.averager.period == 0

    @contextmanager
    def averaged(self):
        if self._equal():
            yield
            return
        local = [p.data for p in self.params]
        average_parameters(iter(self.params), self.averager.process_group)  # gives each p.data a new tensor
        try:
            yield
        finally:
            for p, data in zip(self.params, local):
                p.data = data

    def rank_state(self) -> dict | None:
        return {"params": [p.detach().cpu().clone() for p in self.params],
                "optimizer": on_cpu(self.optimizer.state_dict()), "scaler": self.scaler.state_dict()}

    def load_rank_state(self, state: dict | None, step: int) -> None:
        # (resume.restore loads this rank's optimizer and scaler states.) The hook counts only the
        # warm-up's steps, the averager every step.
        self.state.iter = min(step, self.tc.local_sgd_warmup_steps)
        self.averager.step = step
        if state is None or "params" not in state:
            if not self._equal():
                log.warning("trainer.comm_hook=local_sgd: the checkpoint holds no parameters for this rank "
                            "(another world size or comm_hook): every rank continues from their average")
            return
        with torch.no_grad():
            for p, saved in zip(self.params, state["params"]):
                p.copy_(saved)

    def observed(self) -> dict[str, float]:
        return self._ratio(compressed=self.averager.step - 1 >= self.averager.warmup_steps)  # step: steps taken

    def _after_warmup(self) -> str:
        return (f" from step {self.tc.local_sgd_warmup_steps} on (parameters averaged every "
                f"{self.tc.local_sgd_period} steps)")


def on_cpu(tree):
    """``tree`` (dicts, lists, tuples) with its tensors copied to the CPU, to gather on rank 0."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu().clone()
    if isinstance(tree, dict):
        return type(tree)((k, on_cpu(v)) for k, v in tree.items())
    if isinstance(tree, (list, tuple)):
        return type(tree)(on_cpu(v) for v in tree)
    return tree
