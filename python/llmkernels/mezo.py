"""MeZO: zeroth-order fine-tuning with forward passes only (Malladi et al., 2023).

Every operation here is one fused sweep over the parameter list (csrc/mezo/): the random
direction z is never stored, it is regenerated from (seed, tensor index, element index) by a
counter-based Philox generator that gives the same bits on CPU and CUDA (docs/mezo.md).

    perturb_(params, seed, scale)            theta_i += scale * z_i
    update_(params, seed, lr, g, eps, wd)    theta_i += eps * z_i, then theta_i -= lr * (g * z_i + wd * theta_i)
    MeZO(params, lr=..., eps=...)            torch.optim.Optimizer running a whole step in 3 sweeps (or 2)
"""

import math
import numbers
from typing import Iterable, List, Optional, Sequence, Union

import torch

from ._ext import C
from ._tensors import capsule, check_scalar_tensor, check_tensor_list, optional_capsule, stream_handle, FLOAT_DTYPES

__all__ = ["noise", "perturb_", "update_", "MeZO"]

Seed = Union[int, torch.Tensor]
Scalar = Union[float, torch.Tensor]


@torch.library.custom_op("llmkernels::mezo_sweep", mutates_args=("params",))
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
    has_next: bool,
    next_seed: int,
    next_seed_tensor: Optional[torch.Tensor],
    next_scale: float,
) -> None:
    """theta_k <- theta_k + (coef_a_k - coef_b_k g) z(seed, indices_k) - shrink_k theta_k [+ next_scale z(next_seed, indices_k)]."""
    C.mezo_sweep(
        [capsule(p) for p in params], indices, shrink, coef_a, coef_b,
        seed, optional_capsule(seed_tensor), grad, optional_capsule(grad_tensor),
        has_next, next_seed, optional_capsule(next_seed_tensor), next_scale,
        stream_handle(params[0].device),
    )


@_sweep.register_fake
def _sweep_fake(params, indices, shrink, coef_a, coef_b, seed, seed_tensor, grad, grad_tensor,
                has_next, next_seed, next_seed_tensor, next_scale) -> None:
    return None


# MeZO sweeps are gradient-free in-place updates of leaf parameters; there is nothing to
# differentiate, so the op has no autograd formula and the public functions run under no_grad.


def _seed_arg(seed: Seed, name: str, device: torch.device):
    """(value, tensor) for the op. A tensor seed's int64 value is read as a 64-bit pattern."""
    if isinstance(seed, torch.Tensor):
        check_scalar_tensor(seed, name, device, (torch.int64,))
        return 0, seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an int or a one-element int64 tensor; got {type(seed).__name__}")
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"{name} must be in [0, 2**63); got {seed}")
    return int(seed), None


def _as_int64(pattern: int) -> int:
    """A 64-bit seed pattern as the int64 the op schema carries (two's complement)."""
    pattern %= 2**64
    return pattern - 2**64 if pattern >= 2**63 else pattern


def _finite(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    return value


def _grad_arg(projected_grad: Scalar, device: torch.device):
    if isinstance(projected_grad, torch.Tensor):
        check_scalar_tensor(projected_grad, "projected_grad", device, FLOAT_DTYPES + (torch.float64,))
        return 0.0, projected_grad.detach().reshape(()).to(torch.float32).contiguous()
    return _finite(projected_grad, "projected_grad"), None


def _as_list(tensors, name: str) -> list:
    if isinstance(tensors, torch.Tensor):
        raise TypeError(f"{name} must be a list of tensors; got a single tensor (wrap it in a list)")
    return tensors if isinstance(tensors, list) else list(tensors)


# -- the two kinds of sweep, shared by the functions and the optimizer ---------------------------

def _perturb_sweep(params, seed_value, seed_tensor, scale: float, indices=None) -> None:
    n = len(params)
    _sweep(params, list(range(n)) if indices is None else indices, [0.0] * n, [scale] * n, [0.0] * n,
           seed_value, seed_tensor, 0.0, None, False, 0, None, 0.0)


def _update_sweep(params, seed_value, seed_tensor, lrs, weight_decays, eps: float, grad_value, grad_tensor,
                  next_value=None, next_tensor=None, next_scale: float = 0.0) -> None:
    """restore + eps z, then theta -= lr (g z + wd theta): theta + (eps (1 - lr wd) - lr g) z - lr wd theta."""
    shrink = [lr * wd for lr, wd in zip(lrs, weight_decays)]
    has_next = next_value is not None or next_tensor is not None
    _sweep(params, list(range(len(params))), shrink, [eps * (1.0 - s) for s in shrink], list(lrs),
           seed_value, seed_tensor, grad_value, grad_tensor,
           has_next, next_value or 0, next_tensor, next_scale if has_next else 0.0)


def noise(seed: Seed, tensor_index: int, numel: int, *, dtype: torch.dtype = torch.float32,
          device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """z(seed, tensor_index, j) for j in [0, numel): the standard normal numbers that the sweeps
    use for tensor `tensor_index` of a list. Identical bits on CPU and CUDA (computed in float32)."""
    device = torch.device(device)
    if isinstance(numel, bool) or not isinstance(numel, numbers.Integral) or numel < 0:
        raise ValueError(f"numel must be a non-negative int; got {numel!r}")
    if isinstance(tensor_index, bool) or not isinstance(tensor_index, numbers.Integral) or not 0 <= tensor_index < 2**32:
        raise ValueError(f"tensor_index must be an int in [0, 2**32); got {tensor_index!r}")
    if dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"dtype must be a floating dtype; got {dtype}")
    seed_value, seed_tensor = _seed_arg(seed, "seed", device)
    out = torch.zeros(int(numel), dtype=torch.float32, device=device)
    if numel:
        with torch.no_grad():  # 0 + 1 * z is exactly z
            _perturb_sweep([out], seed_value, seed_tensor, 1.0, indices=[int(tensor_index)])
    return out.to(dtype)


def perturb_(params: Sequence[torch.Tensor], seed: Seed, scale: float) -> None:
    """In place, theta_i += scale * z(seed, i) for every tensor i of `params`, in one multi-tensor
    sweep. fp32/bf16/fp16 parameters; the arithmetic is float32."""
    params = _as_list(params, "params")
    device = check_tensor_list(params, "params")
    scale = _finite(scale, "scale")
    seed_value, seed_tensor = _seed_arg(seed, "seed", device)
    with torch.no_grad():
        _perturb_sweep(params, seed_value, seed_tensor, scale)


def update_(params: Sequence[torch.Tensor], seed: Seed, lr: float, projected_grad: Scalar, eps: float,
            weight_decay: float = 0.0, no_decay: Optional[Iterable[torch.Tensor]] = None, *,
            next_seed: Optional[Seed] = None, next_scale: Optional[float] = None) -> None:
    """One fused sweep: restore theta_i += eps * z_i (undoing the last -eps perturbation), then the
    SGD step theta_i -= lr * (projected_grad * z_i + weight_decay * theta_i), with z_i = z(seed, i).

    `projected_grad` is a float or a one-element tensor on the parameters' device (no host sync).
    Weight decay is skipped for the tensors in `no_decay`. With `next_seed`, the same sweep also adds
    next_scale * z(next_seed, i) (default next_scale = eps): the next step's +eps perturbation."""
    params = _as_list(params, "params")
    device = check_tensor_list(params, "params")
    lr = _finite(lr, "lr")
    eps = _finite(eps, "eps")
    weight_decay = _finite(weight_decay, "weight_decay")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0; got {weight_decay}")
    seed_value, seed_tensor = _seed_arg(seed, "seed", device)
    grad_value, grad_tensor = _grad_arg(projected_grad, device)
    skip = set()
    for position, tensor in enumerate(_as_list(no_decay if no_decay is not None else [], "no_decay")):
        matches = [i for i, p in enumerate(params) if p is tensor]
        if not matches:
            raise ValueError(f"no_decay[{position}] is not one of params (compare by identity)")
        skip.update(matches)
    if next_scale is not None and next_seed is None:
        raise ValueError("next_scale was given without next_seed; pass next_seed to add the next perturbation")
    next_value, next_tensor = _seed_arg(next_seed, "next_seed", device) if next_seed is not None else (None, None)
    next_scale = (eps if next_scale is None else _finite(next_scale, "next_scale")) if next_seed is not None else 0.0
    weight_decays = [0.0 if i in skip else weight_decay for i in range(len(params))]
    with torch.no_grad():
        _update_sweep(params, seed_value, seed_tensor, [lr] * len(params), weight_decays, eps,
                      grad_value, grad_tensor, next_value, next_tensor, next_scale)


class MeZO(torch.optim.Optimizer):
    """MeZO-SGD: a step is two forward passes and at most three parameter sweeps.

        optimizer = MeZO(model.parameters(), lr=1e-6, eps=1e-3)
        for batch in data:
            optimizer.step(lambda: loss_fn(model(batch)))   # returns the loss at theta + eps z

    Per step k with seed s_k = seed + k (mod 2^64; a Philox key after mixing):
      perturb +eps (skipped when folded), L+ = closure(), perturb -2 eps, L- = closure(),
      g = (L+ - L-) / (2 eps), fused restore + update (+ next step's +eps when folded).
    The closure runs under torch.no_grad(); g stays on the device, so a step never synchronizes.
    If the closure raises, the parameters are restored to theta before the exception propagates.

    fold_perturbation=True: 2 sweeps per step; between steps the parameters then hold
    theta + eps z_{k+1}. Call `remove_perturbation()` before evaluating or saving the model.
    capturable=True: the seed lives in a device tensor that the step advances, so a step captured
    in a CUDA graph draws a fresh direction at every replay (capturing a step without it raises).
    A captured step also freezes lr, weight_decay and eps at their values during capture.
    Parameter groups may set lr and weight_decay; eps is shared by all groups.
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0, *,
                 seed: int = 0, fold_perturbation: bool = False, capturable: bool = False):
        _check_hyperparameters(lr, weight_decay, "")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a finite number > 0; got {eps}")
        _seed_arg(seed, "seed", torch.device("cpu"))
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.eps = float(eps)
        self.seed = int(seed)
        self.fold_perturbation = bool(fold_perturbation)
        self.capturable = bool(capturable)
        self.steps_taken = 0
        self._perturbed = False  # parameters currently hold theta + eps z(seed of the next step)
        self._seed_tensor: Optional[torch.Tensor] = None
        if self.capturable:  # allocated now: a first step inside graph capture could not create it
            self._reset_seed_tensor()

    def _reset_seed_tensor(self) -> None:
        device = self.param_groups[0]["params"][0].device
        self._seed_tensor = torch.tensor(_as_int64(self.seed + self.steps_taken), dtype=torch.int64, device=device)

    # -- parameters as one list, with per-tensor coefficients ---------------------------------
    def _flat(self):
        params, lrs, weight_decays = [], [], []
        for index, group in enumerate(self.param_groups):
            _check_hyperparameters(group["lr"], group["weight_decay"], f"param_groups[{index}] ")
            params += group["params"]
            lrs += [float(group["lr"])] * len(group["params"])
            weight_decays += [float(group["weight_decay"])] * len(group["params"])
        return params, lrs, weight_decays

    def _seed(self, ahead: int = 0):
        """(value, tensor) of the seed of step steps_taken + ahead."""
        if self._seed_tensor is None:
            return _as_int64(self.seed + self.steps_taken + ahead), None
        return 0, (self._seed_tensor if ahead == 0 else self._seed_tensor + ahead)

    def _perturb(self, params, scale: float, ahead: int = 0) -> None:
        _perturb_sweep(params, *self._seed(ahead), scale)

    def _forward(self, closure, params, undo_scale: float) -> torch.Tensor:
        """closure() at the current perturbation; if it raises, first perturb by undo_scale (back to theta)."""
        try:
            loss = closure()
        except BaseException:
            self._perturb(params, undo_scale)
            self._perturbed = False
            raise
        if not isinstance(loss, torch.Tensor):
            loss = torch.tensor(float(loss))
        return loss.detach()

    @torch.no_grad()
    def step(self, closure):
        if closure is None:
            raise ValueError("MeZO.step needs a closure that returns the loss (it runs two forward passes)")
        params, lrs, weight_decays = self._flat()
        device = check_tensor_list(params, "parameters")
        if not self.capturable and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("MeZO.step is being captured in a CUDA graph but the optimizer was built with "
                               "capturable=False: every replay would reuse one direction; pass capturable=True")
        eps = self.eps
        if not self._perturbed:
            self._perturb(params, eps)
        loss_pos = self._forward(closure, params, -eps)
        self._perturb(params, -2.0 * eps)
        loss_neg = self._forward(closure, params, eps)
        # The difference of two nearly equal losses: subtract in the losses' precision (at least
        # float32; float64 losses stay float64) and only then round g to float32 for the kernel.
        wide = torch.promote_types(torch.promote_types(loss_pos.dtype, loss_neg.dtype), torch.float32)
        grad = (loss_pos.to(device=device, dtype=wide) - loss_neg.to(device=device, dtype=wide)) / (2.0 * eps)
        grad = grad.reshape(()).to(torch.float32)
        fold = self.fold_perturbation
        next_value, next_tensor = self._seed(1) if fold else (None, None)
        _update_sweep(params, *self._seed(), lrs, weight_decays, eps, 0.0, grad, next_value, next_tensor,
                      eps if fold else 0.0)
        self._perturbed = fold
        self.steps_taken += 1
        if self._seed_tensor is not None:
            self._seed_tensor.add_(1)
        return loss_pos

    @torch.no_grad()
    def remove_perturbation(self) -> None:
        """Subtracts the pending +eps z of the next step (fold_perturbation only); a no-op otherwise."""
        if self._perturbed:
            params, _, _ = self._flat()
            self._perturb(params, -self.eps)
            self._perturbed = False

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self):
        state = super().state_dict()
        steps = self.steps_taken
        if self._seed_tensor is not None:  # graph replays advance the device seed, not steps_taken
            steps = (int(self._seed_tensor.item()) - self.seed) % 2**64
        state["mezo"] = dict(seed=self.seed, steps_taken=steps, eps=self.eps,
                             fold_perturbation=self.fold_perturbation, perturbed=self._perturbed)
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
        self._perturbed = bool(mezo_state["perturbed"])
        if self.capturable:
            self._reset_seed_tensor()


def _check_hyperparameters(lr, weight_decay, where: str) -> None:
    if isinstance(lr, torch.Tensor) or not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"{where}lr must be a finite number >= 0; got {lr}")
    if isinstance(weight_decay, torch.Tensor) or not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"{where}weight_decay must be a finite number >= 0; got {weight_decay}")
