"""MeZO: zeroth-order fine-tuning with forward passes only (Malladi et al., 2023).

Every operation here is one fused sweep over the parameter list (csrc/mezo/): the random
direction z is never stored, it is regenerated from (seed, tensor index, element index) by a
counter-based Philox generator that gives the same bits on CPU and CUDA (docs/mezo.md).

    perturb_(params, seed, scale)            theta_i += scale * z_i
    update_(params, seed, lr, g, eps, wd)    theta_i += eps * z_i, then theta_i -= lr * (g * z_i + wd * theta_i)
    MeZO(params, lr=..., eps=...)            torch.optim.Optimizer running a whole step in 3 sweeps (or 2)
"""

import numbers
from typing import Iterable, List, Optional, Sequence, Union

import torch

from . import _validate as check
from ._ops import native_op
from ._validate import FLOAT_DTYPES

__all__ = ["noise", "perturb_", "update_", "MeZO"]

Seed = Union[int, torch.Tensor]
Scalar = Union[float, torch.Tensor]


@native_op("mezo_sweep", mutates_args=("params",))
def _sweep(
    params: List[torch.Tensor],
    indices: List[int],
    shrink: List[float],
    coef_a: List[float],
    coef_b: List[float],
    seed: int,
    seed_tensor: Optional[torch.Tensor],
    grad: float,
    grad_tensor: Optional[torch.Tensor],
    restore_scale: float,
    has_next: bool,
    next_seed: int,
    next_seed_tensor: Optional[torch.Tensor],
    next_scale: float,
) -> None:
    """theta_k <- theta_k + (coef_a_k - coef_b_k g) z(seed, indices_k) - shrink_k theta_k
    [+ next_scale z(next_seed, indices_k)]; theta_k + restore_scale z(...) [+ ...] when g is not finite."""


# MeZO sweeps are gradient-free in-place updates of leaf parameters; there is nothing to
# differentiate, so the op has no autograd formula and the public functions run under no_grad.


def _grad_arg(projected_grad: Scalar, device: torch.device):
    """(value, tensor) for the op. Any real value is accepted: a non-finite g (in float32) makes
    the sweep restore without updating, like a skipped step of torch.amp.GradScaler."""
    if isinstance(projected_grad, torch.Tensor):
        check.scalar_tensor(projected_grad, "projected_grad", device, FLOAT_DTYPES + (torch.float64,))
        return 0.0, projected_grad.detach().reshape(()).to(torch.float32).contiguous()
    return check.real(projected_grad, "projected_grad"), None


def _check_hyperparameters(lr, weight_decay, eps, where: str = ""):
    """lr >= 0, weight_decay >= 0, eps > 0, each and the kernel's coefficients derived from them
    (docs/mezo.md) finite in float32. Returns (lr, weight_decay, eps)."""
    lr = check.float32_value(lr, f"{where}lr", minimum=0.0)
    weight_decay = check.float32_value(weight_decay, f"{where}weight_decay", minimum=0.0)
    eps = check.float32_value(eps, "eps", positive=True)
    check.float32_value(2.0 * eps, "2 * eps")   # the -2 eps perturbation of a step
    shrink = check.float32_value(lr * weight_decay, f"{where}lr * {where}weight_decay")
    check.float32_value(eps * (1.0 - shrink), f"eps * (1 - {where}lr * {where}weight_decay)")
    return lr, weight_decay, eps


# -- the two kinds of sweep, shared by the functions and the optimizer ---------------------------

def _perturb_sweep(params, indices, seed_value, seed_tensor, scale: float) -> None:
    n = len(params)
    _sweep(params, indices, [0.0] * n, [scale] * n, [0.0] * n,
           seed_value, seed_tensor, 0.0, None, 0.0, False, 0, None, 0.0)


def _update_sweep(params, indices, seed_value, seed_tensor, lrs, weight_decays, eps: float, grad_value,
                  grad_tensor, next_value=None, next_tensor=None, next_scale: float = 0.0) -> None:
    """restore + eps z, then theta -= lr (g z + wd theta): theta + (eps (1 - lr wd) - lr g) z - lr wd theta.
    When g is not finite: the restore alone, theta + eps z."""
    shrink = [lr * wd for lr, wd in zip(lrs, weight_decays)]
    coef_a = [eps * (1.0 - s) for s in shrink]   # finite in float32: _check_hyperparameters
    has_next = next_value is not None or next_tensor is not None
    _sweep(params, indices, shrink, coef_a, list(lrs), seed_value, seed_tensor, grad_value, grad_tensor, eps,
           has_next, next_value or 0, next_tensor, next_scale if has_next else 0.0)


def noise(seed: Seed, tensor_index: int, numel: int, *, dtype: torch.dtype = torch.float32,
          device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """z(seed, tensor_index, j) for j in [0, numel): the standard normal numbers that the sweeps
    use for tensor `tensor_index` of a list. Identical bits on CPU and CUDA (computed in float32)."""
    device = check.normalize_device(device)
    numel = check.integer(numel, "numel", 0, 2**63)
    tensor_index = check.integer(tensor_index, "tensor_index", 0, 2**32)
    if dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"dtype must be a floating dtype; got {dtype}")
    seed_value, seed_tensor = check.seed(seed, "seed", device)
    out = torch.zeros(numel, dtype=torch.float32, device=device)
    if numel:
        with torch.no_grad():  # 0 + 1 * z is exactly z
            _perturb_sweep([out], [tensor_index], seed_value, seed_tensor, 1.0)
    return out.to(dtype)


def perturb_(params: Sequence[torch.Tensor], seed: Seed, scale: float) -> None:
    """In place, theta_i += scale * z(seed, i) for every tensor i of `params`, in one multi-tensor
    sweep. fp32/bf16/fp16 parameters in any dense layout; the arithmetic is float32. z is indexed by
    memory order (row-major for contiguous tensors; see docs/mezo.md)."""
    params, device = check.tensor_list(params, "params")
    scale = check.float32_value(scale, "scale")
    seed_value, seed_tensor = check.seed(seed, "seed", device)
    with torch.no_grad():
        _perturb_sweep(params, list(range(len(params))), seed_value, seed_tensor, scale)


def update_(params: Sequence[torch.Tensor], seed: Seed, lr: float, projected_grad: Scalar, eps: float,
            weight_decay: float = 0.0, no_decay: Optional[Iterable[torch.Tensor]] = None, *,
            next_seed: Optional[Seed] = None, next_scale: Optional[float] = None) -> None:
    """One fused sweep: restore theta_i += eps * z_i (undoing the last -eps perturbation), then the
    SGD step theta_i -= lr * (projected_grad * z_i + weight_decay * theta_i), with z_i = z(seed, i).

    `projected_grad` is a float or a one-element tensor on the parameters' device (no host sync).
    If it is not finite in float32 (a NaN or infinite loss), the step is skipped on the device: the
    sweep only restores (theta_i += eps * z_i), as torch.amp.GradScaler skips steps with non-finite
    gradients. Weight decay is skipped for the tensors in `no_decay`. With `next_seed`, the same
    sweep also adds next_scale * z(next_seed, i) (default next_scale = eps): the next step's +eps
    perturbation. lr >= 0, eps > 0 and weight_decay >= 0 as in MeZO."""
    params, device = check.tensor_list(params, "params")
    lr, weight_decay, eps = _check_hyperparameters(lr, weight_decay, eps)
    seed_value, seed_tensor = check.seed(seed, "seed", device)
    grad_value, grad_tensor = _grad_arg(projected_grad, device)
    skip = set(check.members(no_decay if no_decay is not None else [], params, "no_decay"))
    if next_scale is not None and next_seed is None:
        raise ValueError("next_scale was given without next_seed; pass next_seed to add the next perturbation")
    next_value, next_tensor = check.seed(next_seed, "next_seed", device) if next_seed is not None else (None, None)
    if next_seed is not None:
        next_scale = eps if next_scale is None else check.float32_value(next_scale, "next_scale")
    weight_decays = [0.0 if i in skip else weight_decay for i in range(len(params))]
    with torch.no_grad():
        _update_sweep(params, list(range(len(params))), seed_value, seed_tensor, [lr] * len(params),
                      weight_decays, eps, grad_value, grad_tensor, next_value, next_tensor, next_scale or 0.0)


class MeZO(torch.optim.Optimizer):
    """MeZO-SGD: a step is two forward passes and at most three parameter sweeps.

        optimizer = MeZO(model.parameters(), lr=1e-6, eps=1e-3)
        for batch in data:
            optimizer.step(lambda: loss_fn(model(batch)))   # returns the loss at theta + eps z

    Per step k with seed s_k = seed + k (mod 2^64; a Philox key after mixing):
      perturb +eps (skipped when folded), L+ = closure(), perturb -2 eps, L- = closure(),
      g = (L+ - L-) / (2 eps), fused restore + update (+ next step's +eps when folded).
    The closure runs under torch.no_grad() and must return the loss: a one-element tensor or a real
    number. g stays on the device, so a step never synchronizes. If the closure raises or returns
    something else, the parameters are restored to theta before the exception propagates.

    Only parameters with requires_grad=True are perturbed and updated, as in the paper's trainer
    (and in effect in every torch optimizer): frozen ones are left exactly as they are. Tensor i of
    the flattened parameter groups always draws z(seed, i), whether or not others are frozen.
    A non-finite g (in float32) skips the update on the device (the parameters are restored to
    theta), as torch.amp.GradScaler does; `skipped_steps` counts those steps.

    fold_perturbation=True: 2 sweeps per step; between steps the parameters then hold
    theta + eps z_{k+1}. Call `remove_perturbation()` before evaluating or saving the model.
    capturable=True: the seed lives in a device tensor that the step advances, so a step captured
    in a CUDA graph draws a fresh direction at every replay (capturing a step without it raises).
    A captured step also freezes lr, weight_decay and eps at their values during capture.
    Parameter groups may set lr and weight_decay; eps is shared by all groups.
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0, *,
                 seed: int = 0, fold_perturbation: bool = False, capturable: bool = False):
        _, _, eps = _check_hyperparameters(lr, weight_decay, eps)
        if isinstance(seed, torch.Tensor):
            raise TypeError("seed must be an int (the optimizer keeps its own device copy when capturable)")
        check.seed(seed, "seed", torch.device("cpu"))
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.eps = float(eps)
        self.seed = int(seed) % 2**64
        self.fold_perturbation = bool(fold_perturbation)
        self.capturable = bool(capturable)
        self.steps_taken = 0
        # (params, indices) that hold theta + eps z(seed of the next step) after a folded step, or None
        self._pending: Optional[tuple] = None
        self._seed_tensor: Optional[torch.Tensor] = None
        self._skipped: Optional[torch.Tensor] = None  # device counter of skipped steps
        self._skipped_base = 0                        # skipped steps restored from a state_dict
        if self.capturable:  # allocated now: a first step inside graph capture could not create them
            self._reset_device_state()

    def _device(self) -> torch.device:
        return self.param_groups[0]["params"][0].device

    def _reset_device_state(self) -> None:
        """The device seed and skip counter; updated in place when they exist, so that a step
        captured in a CUDA graph before a load_state_dict keeps reading and advancing them."""
        seed = check.as_int64_pattern(self.seed + self.steps_taken)
        if self._seed_tensor is None:
            device = self._device()
            self._seed_tensor = torch.tensor(seed, dtype=torch.int64, device=device)
            self._skipped = torch.zeros((), dtype=torch.int64, device=device)
        else:
            self._seed_tensor.fill_(seed)

    # -- the trainable parameters as one list, with per-tensor coefficients -------------------
    def _flat(self):
        """(params, indices, lrs, weight_decays, device) of the parameters that require grad; index
        i is the tensor's position among all parameters of all groups (its generator stream)."""
        params, indices, lrs, weight_decays = [], [], [], []
        position = 0
        for index, group in enumerate(self.param_groups):
            lr, weight_decay, _ = _check_hyperparameters(group["lr"], group["weight_decay"], self.eps,
                                                         f"param_groups[{index}] ")
            for p in group["params"]:
                if p.requires_grad:
                    params.append(p)
                    indices.append(position)
                    lrs.append(lr)
                    weight_decays.append(weight_decay)
                position += 1
        device = None
        if params:
            params, device = check.tensor_list(params, "parameters")
        return params, indices, lrs, weight_decays, device

    def _seed(self, ahead: int = 0):
        """(value, tensor) of the seed of step steps_taken + ahead."""
        if self._seed_tensor is None:
            return check.as_int64_pattern(self.seed + self.steps_taken + ahead), None
        return 0, (self._seed_tensor if ahead == 0 else self._seed_tensor + ahead)

    def _perturb(self, params, indices, scale: float, ahead: int = 0) -> None:
        _perturb_sweep(params, indices, *self._seed(ahead), scale)

    @torch.no_grad()
    def step(self, closure):
        if closure is None:
            raise ValueError("MeZO.step needs a closure that returns the loss (it runs two forward passes)")
        params, indices, lrs, weight_decays, device = self._flat()
        if not params:
            raise ValueError("MeZO.step: no parameter requires grad; there is nothing to optimize")
        if not self.capturable and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("MeZO.step is being captured in a CUDA graph but the optimizer was built with "
                               "capturable=False: every replay would reuse one direction; pass capturable=True")
        eps = self.eps
        if self._pending is not None and not _same_tensors(self._pending, (params, indices)):
            self.remove_perturbation()   # parameters were frozen or unfrozen since the folded step
        if self._pending is None:
            self._perturb(params, indices, eps)
        self._pending = None
        offset = eps                     # the parameters hold theta + offset z until the update sweep
        try:                             # whatever fails before it, the parameters go back to theta
            loss_pos = _as_loss(closure()).to(device)
            self._perturb(params, indices, -2.0 * eps)
            offset = -eps
            loss_neg = _as_loss(closure()).to(device)
            # The difference of two nearly equal losses: subtract in the losses' precision (at least
            # float32; float64 losses stay float64) and only then round g to float32 for the kernel.
            wide = torch.promote_types(torch.promote_types(loss_pos.dtype, loss_neg.dtype), torch.float32)
            grad = ((loss_pos.to(wide) - loss_neg.to(wide)) / (2.0 * eps)).reshape(()).to(torch.float32)
            if self._skipped is None or self._skipped.device != grad.device:
                self._skipped_base = self.skipped_steps
                self._skipped = torch.zeros((), dtype=torch.int64, device=device)
            self._skipped += (~torch.isfinite(grad)).to(torch.int64)   # on the device: no sync
        except BaseException:
            self._perturb(params, indices, -offset)
            raise
        fold = self.fold_perturbation
        next_value, next_tensor = self._seed(1) if fold else (None, None)
        _update_sweep(params, indices, *self._seed(), lrs, weight_decays, eps, 0.0, grad, next_value, next_tensor,
                      eps if fold else 0.0)
        self._pending = (params, indices) if fold else None
        self.steps_taken += 1
        if self._seed_tensor is not None:
            self._seed_tensor.add_(1)
        return loss_pos

    @property
    def skipped_steps(self) -> int:
        """Steps whose projected gradient was not finite, so only the restore ran (synchronizes)."""
        return self._skipped_base + (int(self._skipped.item()) if self._skipped is not None else 0)

    @torch.no_grad()
    def remove_perturbation(self) -> None:
        """Subtracts the pending +eps z of the next step (fold_perturbation only); a no-op otherwise."""
        if self._pending is not None:
            self._perturb(*self._pending, -self.eps)   # the tensors perturbed then, frozen or not now
            self._pending = None

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self):
        state = super().state_dict()
        steps = self.steps_taken
        if self._seed_tensor is not None:  # graph replays advance the device seed, not steps_taken
            steps = (int(self._seed_tensor.item()) - self.seed) % 2**64
        state["mezo"] = dict(seed=self.seed, steps_taken=steps, eps=self.eps, skipped_steps=self.skipped_steps,
                             fold_perturbation=self.fold_perturbation, perturbed=self._pending is not None,
                             # positions (in the flattened parameter groups) holding the pending +eps z
                             perturbed_indices=list(self._pending[1]) if self._pending is not None else [])
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        mezo_state = state_dict.pop("mezo", None)
        if mezo_state is None:
            raise ValueError("state_dict has no 'mezo' entry; it was not saved by llmkernels.mezo.MeZO")
        super().load_state_dict(state_dict)
        self.seed = int(mezo_state["seed"])
        self.steps_taken = int(mezo_state["steps_taken"])
        self.eps = float(mezo_state["eps"])
        self.fold_perturbation = bool(mezo_state["fold_perturbation"])
        # The saved parameters hold +eps z on the tensors at these positions (whatever is trainable
        # now); a pending perturbation of this optimizer's own parameters is replaced, not removed:
        # loading a state goes with loading the parameters saved with it.
        self._pending = None
        if mezo_state["perturbed"]:
            everything = [p for group in self.param_groups for p in group["params"]]
            positions = mezo_state.get("perturbed_indices")
            if positions is None:   # saved before perturbed_indices existed: the trainable ones
                positions = [i for i, p in enumerate(everything) if p.requires_grad]
            if any(not 0 <= i < len(everything) for i in positions):
                raise ValueError(f"state_dict's perturbed_indices {positions} do not fit the "
                                 f"{len(everything)} parameters of this optimizer")
            if positions:
                self._pending = ([everything[i] for i in positions], list(positions))
        self._skipped_base = int(mezo_state.get("skipped_steps", 0))
        if self._skipped is not None:
            self._skipped.zero_()      # in place: a captured CUDA graph keeps using these tensors
        if self.capturable:
            self._reset_device_state()


def _same_tensors(a, b) -> bool:
    """Two (params, indices) pairs name the same tensors (by identity) with the same indices."""
    return a[1] == b[1] and len(a[0]) == len(b[0]) and all(x is y for x, y in zip(a[0], b[0]))


def _as_loss(value) -> torch.Tensor:
    """The closure's result as a one-element tensor: a TypeError or ValueError for anything else."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"the closure must return the loss, a one-element tensor; got shape {tuple(value.shape)}")
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"the closure must return a real-valued loss; got dtype {value.dtype}")
        return value.detach().reshape(())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"the closure must return the loss (a one-element tensor or a real number); "
                        f"got {type(value).__name__}")
    return torch.tensor(float(value), dtype=torch.float64)
