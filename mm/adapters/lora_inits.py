"""LoRA's weight-derived inits, chosen with ``init``: OLoRA (``"olora"``) and LoftQ (``"loftq"``).

OLoRA (Büyükakyüz, 2024): the QR decomposition W = Q R gives B = Q[:, :r] (orthonormal columns) and
A = R[:r]; s B A is taken out of the layer (``ResidualLoRA``, in the base or inside the adapter: the
``residual`` option), so the output is unchanged at init. PEFT's ``init_lora_weights="olora"`` does the same.

LoftQ (Li et al., 2023): for a base that will run quantised, alternate Q = quant(W - s B A) and
s B A = the best rank-r approximation of W - deq(Q), ``loftq_iter`` times, starting from B A = 0; the base
weight becomes deq(Q) (quantising it again gives exactly Q: every NF4 block keeps its absmax), so
deq(Q) + s B A approximates W far better than deq(quant(W)) alone. ``loftq_bits`` 4 is bitsandbytes' NF4
(blocks of 64, what ``Linear4bit`` stores), on whatever device the weight is (the CPU included); 8 is
row-wise absmax int8 (LLM.int8's vector-wise scheme without its outlier columns).
PEFT's ``loftq_init`` sets A = R, B = L without the scaling s (exact only for alpha = r, where s = 1) and
runs on CUDA only; here s B A is the approximation for any alpha.
"""

from __future__ import annotations

import torch

from mm.adapters.lora import LoRA, LoRAConfig, _param_dtype


def _check_rank(config: LoRAConfig, layer_name: str, in_features: int, out_features: int) -> None:
    from mm.config import ConfigError

    if config.r > min(in_features, out_features):
        raise ConfigError(f"{config.method}: init {config.init!r}: key 'r'={config.r} exceeds the rank of "
                          f"{layer_name} ({out_features}x{in_features})")


def _check_writable(config: LoRAConfig, layer_name: str, base_weight: torch.Tensor, what: str) -> None:
    """A quantised base hands adapters a dequantised copy (``mm.layer.weight_out_in``): writes would be lost."""
    from mm.config import ConfigError

    if not isinstance(base_weight, torch.nn.Parameter) and not isinstance(base_weight._base, torch.nn.Parameter):
        raise ConfigError(f"{config.method}: init {config.init!r} at {layer_name}: the layer is quantised, and "
                          f"{what} rewrites the base weight; attach to the float model and quantise afterwards")


def olora_adapter(config: LoRAConfig, layer_name: str, in_features: int, out_features: int,
                  base_weight: torch.Tensor) -> LoRA:
    """A ResidualLoRA started at B = Q_r, A = R_r of W = Q R, with s B A taken out of the layer."""
    from mm.adapters.pissa import ResidualLoRA, check_float_weight  # late: pissa imports mm.adapters.lora

    check_float_weight(f"{config.method} (init 'olora') at {layer_name}", base_weight)
    if config.residual == "base":
        _check_writable(config, layer_name, base_weight, "residual='base' (use residual='adapter' on it)")
    _check_rank(config, layer_name, in_features, out_features)
    module = ResidualLoRA(config, in_features, out_features, residual=config.residual,
                          needs="nothing (OLoRA is data-free)", dtype=_param_dtype(base_weight),
                          device=base_weight.device)
    q, r = torch.linalg.qr(base_weight.detach().float())
    module.initialise(r[:config.r].to(module.lora_A.dtype), q[:, :config.r].to(module.lora_B.dtype), base_weight)
    return module


def quantise_dequantise(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """deq(quant(weight)) with bitsandbytes: NF4 in blocks of 64 (4 bits) or row-wise absmax int8 (8 bits)."""
    import bitsandbytes.functional as bnbf

    weight = weight.float().contiguous()
    if bits == 4:
        packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", blocksize=64, compress_statistics=False)
        return bnbf.dequantize_4bit(packed, state).to(torch.float32)
    scales = weight.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round(weight / scales * 127).clamp(-127, 127) * scales / 127


@torch.no_grad()
def loftq_factors(weight: torch.Tensor, rank: int, scaling: float, bits: int, iterations: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(deq(Q), A, B) with deq(Q) + scaling * B A ~ W (LoftQ's alternating minimisation)."""
    weight = weight.float()
    low_rank = torch.zeros_like(weight)
    for _ in range(iterations):
        dequantised = quantise_dequantise(weight - low_rank, bits)
        u, s, vh = torch.linalg.svd(weight - dequantised, full_matrices=False)
        root = (s[:rank] / scaling).sqrt()
        lora_b, lora_a = u[:, :rank] * root, root[:, None] * vh[:rank]
        low_rank = scaling * lora_b @ lora_a
    return dequantised, lora_a, lora_b


def loftq_adapter(config: LoRAConfig, layer_name: str, in_features: int, out_features: int,
                  base_weight: torch.Tensor) -> LoRA:
    """A LoRA started at LoftQ's A, B; the base weight is overwritten with deq(Q) in place."""
    from mm.adapters.pissa import check_float_weight

    check_float_weight(f"{config.method} (init 'loftq') at {layer_name}", base_weight)
    _check_writable(config, layer_name, base_weight, "LoftQ")
    _check_rank(config, layer_name, in_features, out_features)
    module = LoRA(config, in_features, out_features, dtype=_param_dtype(base_weight), device=base_weight.device)
    dequantised, lora_a, lora_b = loftq_factors(base_weight, config.r, config.scaling, config.loftq_bits,
                                                config.loftq_iter)
    with torch.no_grad():
        module.lora_A.copy_(lora_a)
        module.lora_B.copy_(lora_b)
        base_weight.copy_(dequantised.to(base_weight.dtype))
    return module
