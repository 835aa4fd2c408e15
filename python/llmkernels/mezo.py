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
_SEED_LIMIT = 2**63


@torch.library.custom_op("llmkernels::mezo_sweep", mutates_args=("params",))
def _sweep(
    params: List[torch.Tensor],
    indices: List[int],
    decay: List[float],
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
    """theta_k <- decay_k theta_k + (coef_a_k - coef_b_k g) z(seed, indices_k) [+ next_scale z(next_seed, indices_k)]."""
    C.mezo_sweep(
        [capsule(p) for p in params], indices, decay, coef_a, coef_b,
        seed, optional_capsule(seed_tensor), grad, optional_capsule(grad_tensor),
        has_next, next_seed, optional_capsule(next_seed_tensor), next_scale,
        stream_handle(params[0].device),
    )


@_sweep.register_fake
def _sweep_fake(params, indices, decay, coef_a, coef_b, seed, seed_tensor, grad, grad_tensor,
                has_next, next_seed, next_seed_tensor, next_scale) -> None:
    return None


# MeZO sweeps are gradient-free in-place updates of leaf parameters; there is nothing to
# differentiate, so the op has no autograd formula and the public functions run under no_grad.


def _seed_arg(seed: Seed, name: str, device: torch.device):
    if isinstance(seed, torch.Tensor):
        check_scalar_tensor(seed, name, device, (torch.int64,))
        return 0, seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an int or a one-element int64 tensor; got {type(seed).__name__}")
    if not 0 <= int(seed) < _SEED_LIMIT:
        raise ValueError(f"{name} must be in [0, 2**63); got {seed}")
    return int(seed), None


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


def _as_list(params, name: str) -> list:
    if isinstance(params, torch.Tensor):
        raise TypeError(f"{name} must be a list of tensors; got a single tensor (wrap it in a list)")
    return list(params) if not isinstance(params, (list, tuple)) else params


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
    out = torch.zeros(int(numel), dtype=torch.float32, device=device)
    if numel:
        seed_value, seed_tensor = _seed_arg(seed, "seed", device)
        with torch.no_grad():
            _sweep([out], [int(tensor_index)], [1.0], [1.0], [0.0], seed_value, seed_tensor, 0.0, None,
                   False, 0, None, 0.0)
    return out.to(dtype)


def perturb_(params: Sequence[torch.Tensor], seed: Seed, scale: float) -> None:
    """In place, theta_i += scale * z(seed, i) for every tensor i of `params`, in one multi-tensor
    sweep. fp32/bf16/fp16 parameters; the arithmetic is float32."""
    params = _as_list(params, "params")
    device = check_tensor_list(params, "params")
    scale = _finite(scale, "scale")
    seed_value, seed_tensor = _seed_arg(seed, "seed", device)
    n = len(params)
    with torch.no_grad():
        _sweep(list(params), list(range(n)), [1.0] * n, [scale] * n, [0.0] * n, seed_value, seed_tensor,
               0.0, None, False, 0, None, 0.0)


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
    for position, tensor in enumerate(_as_list(no_decay or [], "no_decay")):
        matches = [i for i, p in enumerate(params) if p is tensor]
        if not matches:
            raise ValueError(f"no_decay[{position}] is not one of params (compare by identity)")
        skip.update(matches)
    has_next = next_seed is not None
    if next_scale is not None and not has_next:
        raise ValueError("next_scale was given without next_seed; pass next_seed to add the next perturbation")
    next_value, next_tensor = _seed_arg(next_seed, "next_seed", device) if has_next else (0, None)
    next_scale = (eps if next_scale is None else _finite(next_scale, "next_scale")) if has_next else 0.0
    decay = [1.0 if i in skip else 1.0 - lr * weight_decay for i in range(len(params))]
    with torch.no_grad():
        _sweep(list(params), list(range(len(params))), decay, [eps * d for d in decay], [lr] * len(params),
               seed_value, seed_tensor, grad_value, grad_tensor, has_next, next_value, next_tensor, next_scale)


class MeZO(torch.optim.Optimizer):
    """MeZO-SGD: a step is two forward passes and at most three parameter sweeps.

        optimizer = MeZO(model.parameters(), lr=1e-6, eps=1e-3)
        for batch in data:
            optimizer.step(lambda: loss_fn(model(batch)))   # returns the loss at theta + eps z

    Per step k with seed s_k = seed + k (a Philox key after mixing):
      perturb +eps (skipped when folded), L+ = closure(), perturb -2 eps, L- = closure(),
      g = (L+ - L-) / (2 eps), fused restore + update (+ next step's +eps when folded).
    The closure runs under torch.no_grad(); g stays on the device, so a step never synchronizes.

    fold_perturbation=True: 2 sweeps per step; between steps the parameters then hold
    theta + eps z_{k+1}. Call `remove_perturbation()` before evaluating or saving the model.
    capturable=True: the seed lives in a device tensor that the step advances, so a step captured
    in a CUDA graph draws a fresh direction at every replay.
    Parameter groups may set lr and weight_decay; eps is shared by all groups.
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0, *,
                 seed: int = 0, fold_perturbation: bool = False, capturable: bool = False):
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr must be a finite number >= 0; got {lr}")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a finite number > 0; got {eps}")
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0; got {weight_decay}")
        _seed_arg(seed, "seed", torch.device("cpu"))
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.eps = float(eps)
        self.seed = int(seed)
        self.fold_perturbation = bool(fold_perturbation)
        self.capturable = bool(capturable)
        self.steps_taken = 0
        self._perturbed = False  # parameters currently hold theta + eps z(seed of the next step)
        self._seed_tensor: Optional[torch.Tensor] = None

    # -- parameters as one list, with per-tensor coefficients ---------------------------------
    def _flat(self):
        params, lrs, decays = [], [], []
        for group in self.param_groups:
            for p in group["params"]:
                params.append(p)
                lrs.append(float(group["lr"]))
                decays.append(float(group["weight_decay"]))
        return params, lrs, decays

    def _seed(self, device: torch.device, ahead: int = 0):
        if not self.capturable:
            return (self.seed + self.steps_taken + ahead) % _SEED_LIMIT, None
        if self._seed_tensor is None or self._seed_tensor.device != device:
            self._seed_tensor = torch.tensor((self.seed + self.steps_taken) % _SEED_LIMIT, dtype=torch.int64, device=device)
        return 0, (self._seed_tensor if ahead == 0 else self._seed_tensor + ahead)

    def _perturb(self, params, scale: float, ahead: int = 0) -> None:
        device = params[0].device
        seed_value, seed_tensor = self._seed(device, ahead)
        n = len(params)
        _sweep(params, list(range(n)), [1.0] * n, [scale] * n, [0.0] * n, seed_value, seed_tensor,
               0.0, None, False, 0, None, 0.0)

    @torch.no_grad()
    def step(self, closure):
        if closure is None:
            raise ValueError("MeZO.step needs a closure that returns the loss (it runs two forward passes)")
        params, lrs, wds = self._flat()
        device = check_tensor_list(params, "parameters")
        eps = self.eps
        if not self._perturbed:
            self._perturb(params, eps)
        loss_pos = closure()
        self._perturb(params, -2.0 * eps)
        loss_neg = closure()
        if not isinstance(loss_pos, torch.Tensor):
            loss_pos = torch.tensor(float(loss_pos), device=device)
        if not isinstance(loss_neg, torch.Tensor):
            loss_neg = torch.tensor(float(loss_neg), device=device)
        # The difference of two nearly equal losses: subtract in the losses' precision (at least
        # float32; float64 losses stay float64) and only then round g to float32 for the kernel.
        wide = torch.promote_types(torch.promote_types(loss_pos.dtype, loss_neg.dtype), torch.float32)
        grad = (loss_pos.detach().to(wide) - loss_neg.detach().to(wide)) / (2.0 * eps)
        grad = grad.reshape(()).to(device=device, dtype=torch.float32)
        decay = [1.0 - lr * wd for lr, wd in zip(lrs, wds)]
        seed_value, seed_tensor = self._seed(device)
        fold = self.fold_perturbation
        next_value, next_tensor = self._seed(device, 1) if fold else (0, None)
        _sweep(params, list(range(len(params))), decay, [eps * d for d in decay], lrs,
               seed_value, seed_tensor, 0.0, grad, fold, next_value, next_tensor, eps if fold else 0.0)
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
            steps = (int(self._seed_tensor.item()) - self.seed) % _SEED_LIMIT
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
        self._seed_tensor = None
