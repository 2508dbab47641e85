"""Torch stand-ins for mamba_ssm's gated RMSNorm and chunked SSD scan, and for einops' rearrange.

What megatron-core's Mamba mixer calls where those GPU-only packages are absent
(`mapgen.compiler.mamba_model` puts them in): `TorchRMSNormGated`, `torch_chunk_scan`
(`mamba_chunk_scan_combined`'s arithmetic, chunk by chunk) and `torch_rearrange`.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F


class TorchRMSNormGated(torch.nn.Module):
    """mamba_ssm's gated RMSNorm (`mamba_ssm.ops.triton.layernorm_gated.RMSNorm`) with
    `norm_before_gate=False`, as megatron-core's MambaMixer builds it: same constructor, same
    parameter `weight`; forward(x, z) = rmsnorm_groups(x * silu(z)) * weight, in float32, cast
    back to x's dtype."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        group_size: int | None = None,
        norm_before_gate: bool = False,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if norm_before_gate:
            raise ValueError("the torch gated RMSNorm stand-in normalises after the gate only")
        self.eps = eps
        self.group_size = group_size or hidden_size
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        value = x.float()
        if z is not None:
            value = value * F.silu(z.float())
        groups = value.reshape(*value.shape[:-1], -1, self.group_size)
        groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
        normed: torch.Tensor = groups.flatten(-2) * self.weight.float()
        return normed.to(x.dtype)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: Any = (), metadata: Any = None) -> Any:
        """megatron-core's ExtendedRMSNorm's: the weight split over TP along dim 0."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0}, sharded_offsets
        )


def torch_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
    initial_states: torch.Tensor | None = None,
    **_: Any,
) -> Any:
    """The SSD scan of Mamba-2 (`mamba_chunk_scan_combined`'s contract) in float32 torch.

    x [b, l, h, p], dt [b, l, h], A [h] (negative), B and C [b, l, g, n] (h a multiple of g),
    D [h] or [h, p]. Per head, with a_t = dt_t * A and the state S [p, n]:
    S_t = exp(a_t) S_{t-1} + dt_t x_t B_t^T,  y_t = S_t C_t + D x_t  (times silu(z_t) if z).
    Computed per chunk of `chunk_size` positions: inside a chunk the quadratic form
    y_i = sum_{j<=i} exp(sum_{j<k<=i} a_k) (C_i . B_j) dt_j x_j, plus the state entering the
    chunk decayed to i; the state leaving it is carried to the next chunk."""
    batch, length, heads, head_dim = x.shape
    per_group = heads // B.shape[2]
    step = dt.float()
    if dt_bias is not None:
        step = step + dt_bias.float()
    if dt_softplus:
        step = F.softplus(step)
    step = step.clamp(min=dt_limit[0], max=dt_limit[1])
    values = x.float()
    keys = B.float().repeat_interleave(per_group, dim=2)  # [b, l, h, n]
    queries = C.float().repeat_interleave(per_group, dim=2)
    log_decay = step * A.float()  # [b, l, h]
    state = (
        initial_states.float().clone()
        if initial_states is not None
        else values.new_zeros(batch, heads, head_dim, keys.shape[-1])
    )
    outputs = []
    for start in range(0, length, chunk_size):
        span = slice(start, min(start + chunk_size, length))
        size = span.stop - span.start
        cumulative = log_decay[:, span].cumsum(dim=1)  # [b, c, h]: log decay from the chunk start to i
        causal = torch.ones(size, size, dtype=torch.bool, device=x.device).tril()
        between = cumulative[:, :, None, :] - cumulative[:, None, :, :]  # [b, i, j, h]
        decay = torch.where(causal[None, :, :, None], between, float("-inf")).exp()
        scores = torch.einsum("bihn,bjhn->bijh", queries[:, span], keys[:, span]) * decay
        inputs = values[:, span] * step[:, span, :, None]  # dt_j x_j
        y = torch.einsum("bijh,bjhp->bihp", scores, inputs)
        y = y + torch.einsum("bihn,bhpn->bihp", queries[:, span], state) * cumulative.exp()[..., None]
        to_end = (cumulative[:, -1:, :] - cumulative).exp()  # [b, c, h]
        state = state * cumulative[:, -1, :].exp()[:, :, None, None] + torch.einsum(
            "bjh,bjhp,bjhn->bhpn", to_end, inputs, keys[:, span]
        )
        outputs.append(y)
    y = torch.cat(outputs, dim=1) if outputs else values.clone()
    if D is not None:
        skip = D.float()
        y = y + values * (skip[:, None] if skip.dim() == 1 else skip)
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(x.dtype)
    return (y, state) if return_final_states else y


_GROUP = re.compile(r"\(([^)]*)\)|(\S+)")


def _axes(side: str) -> list[list[str]]:
    """einops' axis groups of one side of a pattern: `b l (h p)` -> [[b], [l], [h, p]]."""
    return [match.group(1).split() if match.group(1) is not None else [match.group(2)] for match in _GROUP.finditer(side)]


def torch_rearrange(tensor: torch.Tensor, pattern: str, **sizes: int) -> torch.Tensor:
    """einops' `rearrange` for patterns of named axes, parenthesised groups and the literal 1
    (what megatron-core's Mamba mixer uses): split the input's groups into their axes, permute,
    merge the output's groups."""
    left, right = (_axes(side) for side in pattern.split("->"))
    if len(left) != tensor.dim():
        raise ValueError(f"rearrange {pattern!r}: {tensor.dim()} dims for {len(left)} groups")
    known = dict(sizes)
    shape: list[int] = []
    names: list[str] = []
    for group, extent in zip(left, tensor.shape):
        free = [name for name in group if name != "1" and name not in known]
        fixed = math.prod(known[name] for name in group if name != "1" and name in known)
        if len(free) > 1:
            raise ValueError(f"rearrange {pattern!r}: group {group} has more than one unknown size")
        if free:
            known[free[0]] = extent // fixed
        for name in group:
            if name != "1":
                shape.append(known[name])
                names.append(name)
    value = tensor.reshape(shape)
    order = [name for group in right for name in group if name != "1"]
    value = value.permute([names.index(name) for name in order])
    return value.reshape([math.prod(known[n] for n in group if n != "1") for group in right])


def no_repeat(*args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError("einops.repeat (Mamba context parallelism) has no torch stand-in in mapgen; install einops")
