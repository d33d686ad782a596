"""Checks of the PeftModel before Astra touches it: adapters Astra's rewrite is exact for, on base weights as loaded.

Astra's promise, outputs unchanged at initialisation, holds for a layer that computes W·x + b + s·B·A·x with W the
weight the model was loaded with and owned by that layer alone. Each check refuses one way PEFT can break that,
every one of which otherwise passed with exit code 0 and changed the outputs at init (or made the saved adapter
wrong on the original base). And the marker that an adapter's saves carry once Astra has rewritten its base.
"""

from __future__ import annotations

from peft import LoraConfig
from torch import nn

from .layers import canonical_name

# `init_lora_weights` in the SAVED config of an adapter Astra initialised: its files fit only the residual base
# W − s·B·A, and PEFT refuses to load an unknown value, so they cannot be put on the original base by mistake.
ASTRA_MARKER = "astra"


class ResidualLoraConfig(LoraConfig):
    """A LoraConfig whose saved form says `init_lora_weights: "astra"` while the object itself keeps its value.

    Why not set the attribute: code that makes another adapter from this config (`add_adapter(name, config)`,
    TRL's frozen "ref" copy of the adapter) would then meet PEFT's "Unknown initialization". Why the flag: PEFT's
    own conversion for the original base (`save_pretrained(..., path_initial_model_for_weight_conversion=...)`)
    deep-copies the config and sets `init_lora_weights = True`; any assignment means the caller decides again.
    """

    def __setattr__(self, name, value):
        if name == "init_lora_weights":
            object.__setattr__(self, "_astra_residual", False)
        super().__setattr__(name, value)

    def to_dict(self) -> dict:
        out = super().to_dict()
        if getattr(self, "_astra_residual", False):
            out["init_lora_weights"] = ASTRA_MARKER
        return out


def mark_residual(config) -> None:
    """Make every later save of `config` (a plain LoraConfig) say that the adapter needs the residual base."""
    if type(config) is LoraConfig:  # a subclass someone else made is left alone rather than re-parented
        config.__class__ = ResidualLoraConfig
    if isinstance(config, ResidualLoraConfig):
        object.__setattr__(config, "_astra_residual", True)


def is_residual(config) -> bool:
    """Whether `config` belongs to an adapter Astra initialised (in memory, or as saved)."""
    return getattr(config, "_astra_residual", False) or getattr(config, "init_lora_weights", None) == ASTRA_MARKER


# `LoraConfig.init_lora_weights` values that leave the base weights as they were loaded. The others (PiSSA, OLoRA,
# CorDA, LoftQ, LoRA-GA) subtract their own start from W when the adapter is made, so Astra would calibrate on
# and rewrite a residual, and drop the other start's B·A. An allow-list: a value PEFT adds later is refused until
# it is known to keep the base.
KEEPS_BASE = (True, False, "gaussian", "orthogonal", "eva", "mica")


def check_base_as_loaded(peft_model: nn.Module, adapter_name: str) -> None:
    """Raise if any adapter of `peft_model` was made with an initialisation that rewrote the base weights."""
    for name, config in getattr(peft_model, "peft_config", {}).items():
        init = getattr(config, "init_lora_weights", True)
        if is_residual(config):
            if name == adapter_name:  # e.g. a residual-form adapter loaded back onto its residual base
                raise RuntimeError(
                    f"Adapter '{name}' was already initialised by Astra (it was saved or loaded as Astra's, "
                    f"init_lora_weights '{ASTRA_MARKER}'): the base weights are its residual, so initialising again "
                    "would stack a second residual on them. Start from a fresh PeftModel of the original base model."
                )
            continue  # another adapter's Astra residual: its layers are checked one by one (_check_layers)
        if init not in KEEPS_BASE:
            what = "Astra replaces that initialisation" if name == adapter_name else "it is on the same base"
            raise ValueError(
                f"Adapter '{name}' was made with LoraConfig(init_lora_weights={init!r}), which rewrites the base "
                f"weights when the adapter is created ({what}): Astra's statistics and its residual W − s·B·A "
                "must come from the weights as loaded, or the outputs change at initialisation. Create the "
                "PeftModel from the original base model with init_lora_weights=True (the default)."
            )


def check_plain_lora(name: str, layer: nn.Module, adapter_name: str) -> None:
    """Raise if `layer`'s adapter is a LoRA variant (DoRA, aLoRA, KaSA, MiCA, ...): its forward is not
    W·x + s·B·A·x, so a residual W − s·B·A would not give back the base model's outputs (aLoRA, for one, applies
    B·A only after its invocation tokens), or its training is not LoRA's (MiCA freezes B)."""
    if layer.use_dora.get(adapter_name, False):
        raise ValueError(f"Layer '{name}': Astra does not initialise DoRA adapters (use_dora=True).")
    if getattr(layer, "lora_bias", {}).get(adapter_name, False):
        raise ValueError(f"Layer '{name}': Astra does not support lora_bias=True.")
    variant = getattr(layer, "lora_variant", {}).get(adapter_name)
    if variant is not None:
        raise ValueError(
            f"Layer '{name}': adapter '{adapter_name}' is a LoRA variant ({type(variant).__name__}), whose forward "
            "or training is not plain LoRA's; Astra initialises plain LoRA adapters only. Leave the variant's "
            "option out of the LoraConfig (use_dora, alora_invocation_tokens, kasa_config, velora_config, "
            "monteclora_config, use_bdlora, arrow_config, init_lora_weights='mica')."
        )


def check_materialised(name: str, layer: nn.Module, adapter_name: str) -> None:
    """Raise if `layer`'s adapter weights are on the meta device: `get_peft_model(..., low_cpu_mem_usage=True)`
    leaves them empty for a checkpoint to fill, so A and B written there would be lost while the base still became
    W − s·B·A (the outputs came out NaN with no error)."""
    for part in ("lora_A", "lora_B"):
        if getattr(layer, part)[adapter_name].weight.is_meta:
            raise ValueError(
                f"Layer '{name}': adapter '{adapter_name}' has its {part} weight on the meta device (the PeftModel "
                "was made with low_cpu_mem_usage=True, which leaves adapters empty for a checkpoint to fill). "
                "Create it without low_cpu_mem_usage to initialise it with Astra."
            )


def check_unshared(peft_model: nn.Module, layers: dict) -> None:
    """Raise if a target layer's base weight is also another module's parameter: tied input and output
    embeddings (a targeted `lm_head`), or PEFT's `layer_replication`. Rewriting W ← W − s·B·A would change the
    other module too (and a replicated weight would be rewritten once per copy)."""
    owners: dict[int, list[str]] = {}
    for pname, param in peft_model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(canonical_name(pname.rsplit(".", 1)[0]))
    for name, layer in layers.items():
        others = [o for o in owners.get(id(layer.get_base_layer().weight), []) if o != name]
        if others:
            raise ValueError(
                f"Layer '{name}' shares its weight with '{others[0]}' (tied weights, e.g. tie_word_embeddings, or "
                "LoraConfig(layer_replication=...)): Astra rewrites the frozen weight W ← W − s·B·A, which would "
                f"change '{others[0]}' too and the model's outputs with it. Leave '{name}' out of target_modules, "
                "or untie the weights before get_peft_model."
            )
