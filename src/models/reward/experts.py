"""The experts of a mixture-of-experts judge (Qwen3-VL-MoE): transformers' `grouped_mm` path, its
last step, the combine, done by one Triton kernel on CUDA.

Why: the grouped path sorts each token's routed rows by expert, runs the experts as two grouped
GEMMs, and then combines: it gathers the rows back into token order and sums each token's rows
with its routing weights. Compiled, transformers' combine became one Triton reduction kernel that
took 1.9 ms per layer on an H200 for a batch of 32 prompts with 1024x768 images (~26k tokens x 8
rows x 2,048 values, ~1 GB read; ~0.2 ms at the memory's speed), the largest kernel after the
GEMMs (benchmarks/NOTES.md). The kernel here reads each token's rows whole, one program per token
and block of columns, so neighbouring threads read neighbouring values.

What it computes: the same function as transformers' `grouped_mm` experts forward without its
expert-parallel "sentinel" masks (a judge on one device routes every token to real experts): the
same sort, grouped GEMMs and gate; the combine accumulates the weighted rows in float32, as the
compiled path does. On the CPU the combine is the same gather and sum in torch. It is one opaque
operator (`judge::experts_combine`) to torch.compile, and it has fixed shapes and no host sync,
so the experts stay inside fast_decode's CUDA graph.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("src.models.reward.engine")

NAME = "judge_grouped_mm"  # the experts implementation registered with transformers
_BLOCK = 1024  # columns per program: a 2,048-wide row is two programs, each thread 16 bytes per row
_refused: list[str] = []  # why the kernel failed once in this process: the torch combine since


def combine_reference(rows: torch.Tensor, perm: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * rows[i] where perm[i] = t * top_k + j (summed in float32, or
    float64 for float64 rows).
    rows: (tokens * top_k, hidden) in the sorted order; perm: the sort's permutation; weights:
    (tokens, top_k)."""
    tokens, top_k = weights.shape
    inv = _inverse(perm)
    acc = torch.promote_types(rows.dtype, torch.float32)
    picked = rows[inv].view(tokens, top_k, rows.shape[-1]).to(acc)
    return (picked * weights.to(acc).unsqueeze(-1)).sum(dim=1).to(rows.dtype)


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    # A scatter, not argsort: no second sort, no host sync (fast_decode captures it in a graph).
    return torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype))


_kernel = None


def _triton_kernel():
    global _kernel
    if _kernel is None:
        import triton
        import triton.language as tl

        @triton.jit
        def combine_kernel(rows, inv, weights, out, hidden, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
            t = tl.program_id(0).to(tl.int64)
            cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
            keep = cols < hidden
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for j in tl.static_range(TOP_K):
                src = tl.load(inv + t * TOP_K + j).to(tl.int64)
                w = tl.load(weights + t * TOP_K + j).to(tl.float32)
                acc += w * tl.load(rows + src * hidden + cols, mask=keep, other=0.0).to(tl.float32)
            tl.store(out + t * hidden + cols, acc.to(out.dtype.element_ty), mask=keep)

        _kernel = combine_kernel
    return _kernel


def combine_triton(rows: torch.Tensor, perm: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """combine_reference's result from one Triton kernel (CUDA; on the CPU under TRITON_INTERPRET=1,
    Triton's interpreter, which is how the CPU tests run it)."""
    tokens, top_k = weights.shape
    hidden = rows.shape[-1]
    rows, weights = rows.contiguous(), weights.contiguous()
    out = rows.new_empty((tokens, hidden))
    if tokens:
        grid = (tokens, (hidden + _BLOCK - 1) // _BLOCK)
        _triton_kernel()[grid](rows, _inverse(perm), weights, out, hidden, TOP_K=top_k, BLOCK=_BLOCK, num_warps=4)
    return out


@torch.library.custom_op("judge::experts_combine", mutates_args=())
def experts_combine(rows: torch.Tensor, perm: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    if (rows.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and not _refused:
        try:
            return combine_triton(rows, perm, weights)
        except Exception as e:  # noqa: BLE001 - a Triton build or launch failure: the torch combine instead
            _refused.append(f"{type(e).__name__}: {e}")
            log.warning("experts combine: the Triton kernel failed (%s); using torch's gather and sum from now on",
                        _refused[0][:300])
    return combine_reference(rows, perm, weights)


@experts_combine.register_fake
def _(rows, perm, weights):
    return rows.new_empty((weights.shape[0], rows.shape[-1]))


def grouped_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' grouped_mm experts forward (an experts module's attributes: num_experts,
    gate_up_proj or up_proj, down_proj, has_gate, has_bias, is_transposed), combined by
    experts_combine."""
    from transformers.integrations.moe import _grouped_linear

    top_k = top_k_index.size(-1)
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    rows = hidden_states[perm // top_k]
    # histc, not bincount: no host sync. It takes floats on the CPU and integers on CUDA.
    counts = torch.histc(expert_ids.int() if expert_ids.is_cuda else expert_ids.float(), bins=self.num_experts,
                         min=0, max=self.num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    up, up_bias = (self.gate_up_proj, "gate_up_proj_bias") if self.has_gate else (self.up_proj, "up_proj_bias")
    rows = _grouped_linear(rows, up, offsets, bias=_bias(self, up_bias, expert_ids), is_transposed=self.is_transposed)
    rows = self._apply_gate(rows) if self.has_gate else self.act_fn(rows)
    rows = _grouped_linear(rows, self.down_proj, offsets, bias=_bias(self, "down_proj_bias", expert_ids),
                           is_transposed=self.is_transposed)
    return experts_combine(rows, perm, top_k_weights).to(hidden_states.dtype)


def _weight(experts) -> torch.Tensor:
    return experts.gate_up_proj if hasattr(experts, "gate_up_proj") else experts.up_proj


def _bias(experts, name: str, expert_ids: torch.Tensor):
    return getattr(experts, name)[expert_ids] if experts.has_bias else None


def install(model) -> str | None:
    """Run the model's experts through grouped_experts_forward where transformers would take its
    grouped_mm path; returns the implementation now in use, or None for a model without experts."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    experts = [m for m in model.modules() if type(m).__name__.endswith("Experts")
               and (hasattr(m, "gate_up_proj") or hasattr(m, "up_proj")) and hasattr(m, "config")]
    if not experts:
        return None
    # Float8 experts (quantization: fp8, or an FP8 release) dispatch through transformers' FP8
    # experts functions, which know nothing of this one: they stay as loaded, as eager ones do.
    quantized = any(_weight(m).element_size() < 2 for m in experts)
    if not quantized and {m.config._experts_implementation for m in experts} == {"grouped_mm"}:
        ALL_EXPERTS_FUNCTIONS.register(NAME, grouped_experts_forward)
        model.set_experts_implementation(NAME)
    return "/".join(sorted({str(m.config._experts_implementation) for m in experts}))  # what runs now
