"""Write Astra's initialisation into PEFT's LoRA layers: B = Q, A = QᵀW, W ← W − s·B·A."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from ._adapter_checks import (check_base_as_loaded, check_materialised, check_plain_lora, check_unshared,
                              mark_residual)
from ._workers import layer_workers, ordered_map
from .calibration import ForwardFn, collect_activation_stats
from .config import AccumulatorKind, AstraConfig
from .layers import check_supported, full_weight, layer_digest, lora_layers, out_in_dims
from .rewrite import residual_weight
from .sharding import assign, check_not_fsdp1, reshard, unwrap
from .spectrum import Selection, select_eigenvectors
from .stats import ActivationStats


@dataclass
class LayerReport:
    name: str
    d_out: int
    d_in: int
    rank: int
    tokens: int
    source: AccumulatorKind  # where the statistic came from
    selection: Optional[Selection]  # set once the layer is decomposed


@dataclass
class AstraReport:
    """What `initialize_astra_weights` did, layer by layer, and how long each phase took.

    Attributes:
        config: The `AstraConfig` used.
        layers: One `LayerReport` per initialised layer: dimensions, rank, calibration tokens, where the
            statistic came from, and the `Selection` (indices, eigenvalues, degenerate directions, effective rank).
        calibration_seconds: Wall time of the calibration pass (0 when precomputed `stats` were passed).
        decomposition_seconds: Wall time of forming the statistics and selecting the eigenvectors.
        write_seconds: Wall time of writing A, B and the residual weights.
    """

    config: AstraConfig
    layers: list[LayerReport] = field(default_factory=list)
    calibration_seconds: float = 0.0
    decomposition_seconds: float = 0.0
    write_seconds: float = 0.0

    @property
    def degenerate_layers(self) -> dict[str, int]:
        """Layers where some selected directions have (numerically) zero eigenvalue, and how many."""
        return {l.name: l.selection.n_selected_degenerate for l in self.layers if l.selection.n_selected_degenerate}

    def summary(self) -> str:
        degenerate = self.degenerate_layers
        return (
            f"Astra initialised {len(self.layers)} layers ({self.config.eigen_selection} eigenvectors of the "
            f"{self.config.statistic}); {len(degenerate)} layers had degenerate directions selected; "
            f"calibration {self.calibration_seconds:.1f}s, decomposition {self.decomposition_seconds:.1f}s, "
            f"write {self.write_seconds:.1f}s."
        )


def initialize_astra_weights(
    peft_model,
    dataloader: Optional[Iterable] = None,
    astra_config: Optional[AstraConfig] = None,
    *,
    stats: Optional[ActivationStats] = None,
    forward_fn: Optional[ForwardFn] = None,
    adapter_name: str = "default",
) -> AstraReport:
    """Initialise adapter `adapter_name` of `peft_model` with Astra (paper Algorithm 1).

    For each LoRA layer: B = Q, the r eigenvectors of its output statistic that `astra_config` selects, and
    A = QᵀW; the frozen weight becomes W − s·B·A, so the model's outputs do not change. Every check runs and
    every eigenvector is computed before the first weight is written, so a failure leaves the model exactly as
    it was.

    Args:
        peft_model: A PeftModel (or a DeepSpeed engine / DDP wrapper around one) whose LoRA layers sit on
            `nn.Linear` or transformers `Conv1D` bases.
        dataloader: Calibration batches: dicts `model(**batch)` accepts (or whatever `forward_fn` takes);
            positions with `attention_mask == 0` are left out. Not needed when `stats` is given.
        astra_config: The choices the paper leaves open; `AstraConfig()` (the paper's tail) by default.
        stats: Statistics from `collect_activation_stats` (for this model and these target layers), instead of
            calibrating here: one calibration serves many ranks and selections.
        forward_fn: `forward_fn(model, batch)` runs one batch, for models that need another call.
        adapter_name: The adapter to initialise.

    Returns:
        An `AstraReport`: what was selected in each layer and how long each phase took.

    Raises:
        ValueError: No LoRA layer of `adapter_name`; neither `dataloader` nor `stats`; `stats` from another model,
            other target layers or another statistic; a layer with too few calibration tokens for its statistic,
            a rank above its output dimension, a DoRA, `lora_bias` or other LoRA-variant adapter; an adapter made
            with an initialisation that rewrites the base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA); a target
            layer whose weight another module shares (tied embeddings, `layer_replication`); a selection the
            `null_space` policy refuses.
        TypeError: A base layer Astra cannot rewrite exactly (quantized, another type, a non-float weight, a weight
            offloaded to the meta device), or a model wrapped by FSDP1.
        RuntimeError: The layer was already initialised by Astra (its weight is a residual), or a sharded weight
            cannot be written where training reads it.
        FloatingPointError: Non-finite activations during calibration (the first layer is named).
    """
    config = astra_config or AstraConfig()
    peft_model = unwrap(peft_model)  # a DeepSpeed engine or DDP: the PeftModel inside
    check_not_fsdp1(peft_model)
    layers = lora_layers(peft_model, adapter_name)
    if not layers:
        raise ValueError(f"No LoRA layer of adapter '{adapter_name}' was found in the model.")
    check_base_as_loaded(peft_model, adapter_name)
    _check_layers(layers, adapter_name)
    check_unshared(peft_model, layers)
    report = AstraReport(config)
    if stats is None:
        if dataloader is None:
            raise ValueError("Pass a calibration `dataloader` or precomputed `stats`.")
        lora_config = peft_model.peft_config[adapter_name] if hasattr(peft_model, "peft_config") else None
        stats = collect_activation_stats(
            peft_model, dataloader, lora_config, config, forward_fn=forward_fn, adapter_name=adapter_name
        )
        report.calibration_seconds = stats.seconds or 0.0
    else:
        _check_stats_match(stats, layers)
    if not stats.supports(config.statistic):
        raise ValueError(
            f"These statistics were collected for '{stats.family}'; statistic='{config.statistic}' needs "
            f"a calibration with AstraConfig(statistic='{config.statistic}')."
        )

    reshard(peft_model)  # FSDP2 keeps the root unit unsharded after calibration's forward: write the shards
    start = time.perf_counter()
    bases = {}

    def statistics():  # made on this thread, in order (a ZeRO-3 / FSDP2 gather is collective), one layer at a time
        for name, layer in layers.items():
            base = layer.get_base_layer()
            d_out, d_in = out_in_dims(base)
            r = layer.r[adapter_name]
            tokens = stats.tokens(name)
            _check_tokens(name, tokens, d_out, d_in, config)
            with full_weight(base) as (w, bias):  # whole, even where ZeRO-3 / FSDP2 shard it
                if stats.factored(name):  # input statistics: F·G·Fᵀ with F the weight, decomposed without forming it
                    statistic = stats.output_factors(name, config.statistic, w, bias)
                else:
                    statistic = stats.output_statistic(name, config.statistic, w, bias)
            yield LayerReport(name, d_out, d_in, r, tokens, stats.source(name), None), statistic
            del statistic  # not held while the next one is made: the worker's call owns it now

    def decompose(job):
        info, statistic = job
        q, info.selection = select_eigenvectors(statistic, info.rank, config, info.name)
        return info, q

    on_cuda = any(a.gram.is_cuda for a in stats.accumulators) or any(
        p.is_cuda for layer in layers.values() for p in layer.get_base_layer().parameters(recurse=False))
    workers = layer_workers((out_in_dims(layer.get_base_layer()) for layer in layers.values()), on_cuda)
    # One bar over the layers: on a large model this phase takes minutes and would otherwise be silent.
    with tqdm(total=len(layers), desc="eigendecomposition", unit="layer", disable=not config.show_progress) as bar:
        for info, q in ordered_map(decompose, statistics(), workers):
            bases[info.name] = q
            report.layers.append(info)
            bar.update()
    report.decomposition_seconds = time.perf_counter() - start

    start = time.perf_counter()
    for info in report.layers:  # the layers' order (ordered_map keeps it)
        _write(layers[info.name], adapter_name, bases.pop(info.name), info.name)
    lora_config = getattr(peft_model, "peft_config", {}).get(adapter_name)
    if lora_config is not None:  # every save of this adapter now says it needs the residual base
        mark_residual(lora_config)
    report.write_seconds = time.perf_counter() - start
    return report


def _check_tokens(name: str, tokens: int, d_out: int, d_in: int, config: AstraConfig) -> None:
    # The statistic of y = Wx + b has rank ≤ min(d_out, d_in) (+1 for the uncentred moments, through b)
    # whatever the data; only below that bound does a short calibration show as extra zero eigenvalues.
    centred = config.statistic == "covariance"
    bound = min(d_out, d_in if centred else d_in + 1)
    needed = bound + 1 if centred else bound
    if config.eigen_selection != "largest" and tokens < needed:
        raise ValueError(
            f"Layer '{name}' saw {tokens} calibration tokens, but its {config.statistic} can have rank "
            f"{bound} (d_out={d_out}, d_in={d_in}): with fewer tokens the low end of the spectrum is an "
            f"artefact of too little data. Use at least {needed} non-padding tokens (more calibration "
            "samples or longer ones)."
        )


def _check_layers(layers: dict, adapter_name: str) -> None:
    for name, layer in layers.items():
        check_supported(name, layer.get_base_layer())
        check_plain_lora(name, layer, adapter_name)
        check_materialised(name, layer, adapter_name)
        d_out, _ = out_in_dims(layer.get_base_layer())
        r = layer.r[adapter_name]
        if r > d_out:
            raise ValueError(f"Layer '{name}': rank r={r} exceeds its output dimension d_out={d_out}.")
        done = getattr(layer, "astra_adapters", ())
        if done:
            raise RuntimeError(
                f"Layer '{name}' was already initialised by Astra (adapter '{sorted(done)[0]}'): its frozen weight "
                "is now a residual, so initialising again would stack a second residual on it. Start from a "
                "fresh PeftModel of the original base model."
            )


def _check_stats_match(stats: ActivationStats, layers: dict) -> None:
    missing = sorted(set(layers) - set(stats.layers))
    if missing:
        raise ValueError(
            f"The statistics have no entry for {len(missing)} target layers (e.g. '{missing[0]}'): they were "
            "collected for other target modules. Collect them with this adapter's LoraConfig."
        )
    for name, layer in layers.items():
        record, base = stats.layers[name], layer.get_base_layer()
        if (record.d_out, record.d_in) != out_in_dims(base) or record.digest != layer_digest(base):
            raise ValueError(
                f"The statistics do not fit layer '{name}': they were collected on another model (weight "
                f"fingerprint {record.digest} vs {layer_digest(base)}), or on this model after its weights "
                "changed (e.g. an earlier Astra initialisation)."
            )


def _write(layer, adapter_name: str, q: torch.Tensor, name: str = "") -> None:
    """A = QᵀW and B = Q, both cast to the adapter's dtype; then W ← W − s·B·A (`rewrite.residual_weight`),
    formed in float32 from the *cast* A and B and cast once, so base + s·B·A reproduces W as closely as the
    base dtype allows."""
    base = layer.get_base_layer()
    lora_a, lora_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
    # Read whole and written through `sharding.assign`, so ZeRO-3 partitions (and a DeepSpeed optimizer's fp32
    # masters) and FSDP2 DTensors hold the result; the residual is rewrite.residual_weight's, bit for bit.
    with full_weight(base) as (w, _):
        w = w.to(torch.float32)
        q = q.to(device=w.device, dtype=torch.float32)
        a = (q.T @ w).to(lora_a.dtype)
        b = q.to(lora_b.dtype)
        residual = residual_weight(w, a, b, layer.scaling[adapter_name], "product")
        del w, q
    assign(name, [(lora_a, a), (lora_b, b), (base.weight, residual.T if isinstance(base, Conv1D) else residual)])
    layer.astra_adapters = {adapter_name}
