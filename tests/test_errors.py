"""Bad input: a clear error, and the model left exactly as it was."""

import pytest
import torch
from conftest import lora_config, make_batches, peft_model, tiny_llama
from peft import LoraConfig, get_peft_model

from astra_peft import AstraConfig, collect_activation_stats, initialize_astra_weights

QUIET = dict(show_progress=False)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, snapshot):
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    for k, v in snapshot.items():
        if v.is_meta:  # offloaded or never materialised: no values to compare (torch.equal has no meta kernel)
            assert state[k].is_meta and state[k].shape == v.shape, f"{k} changed"
        else:
            assert torch.equal(state[k], v), f"{k} changed"


def _fails(model, exc, match, *args, **kwargs):
    snap = _snapshot(model)
    with pytest.raises(exc, match=match):
        initialize_astra_weights(model, *args, **kwargs)
    _assert_unchanged(model, snap)


def test_empty_dataloader():
    _fails(peft_model("llama"), ValueError, "empty", [], AstraConfig(**QUIET))


def test_no_dataloader_no_stats():
    _fails(peft_model("llama"), ValueError, "dataloader", None, AstraConfig(**QUIET))


def test_no_target_layer_matched():
    with pytest.raises(ValueError, match="No target layer matched"):
        collect_activation_stats(tiny_llama(), make_batches(), LoraConfig(target_modules=["nope"]), AstraConfig(**QUIET))
    _fails(peft_model("llama"), ValueError, "No LoRA layer of adapter 'other'", make_batches(), adapter_name="other")


def test_non_finite_activations_name_the_first_layer():
    model = peft_model("llama")
    norm = model.get_base_model().model.layers[1].input_layernorm
    handle = norm.register_forward_hook(lambda m, a, out: out * float("nan"))
    _fails(model, FloatingPointError, r"'model\.layers\.1\.self_attn\.q_proj'", make_batches(), AstraConfig(**QUIET))
    handle.remove()


def test_rank_larger_than_d_out():
    model = get_peft_model(tiny_llama(), LoraConfig(r=20, target_modules=["q_proj", "k_proj"]))  # k_proj: d_out=16
    _fails(model, ValueError, r"r=20 exceeds .* d_out=16", make_batches(), AstraConfig(**QUIET))


def test_too_few_tokens_says_how_many():
    # 20 tokens; every layer's covariance can have rank 32 (hidden 32: q/o/gate/up read 32 inputs, down writes 32)
    few = make_batches(n_batches=1, batch_size=1, pad_rows=False)
    _fails(peft_model("llama"), ValueError, "at least 33 non-padding tokens", few, AstraConfig(**QUIET))
    # gate/up (d_out=64 > d_in=32) only need d_in + 1: 40 tokens are enough for every layer
    enough = make_batches(n_batches=1, batch_size=2, pad_rows=False)
    initialize_astra_weights(peft_model("llama"), enough, AstraConfig(**QUIET))
    # the top of the spectrum is well defined with few tokens, so 'largest' proceeds
    initialize_astra_weights(peft_model("llama"), few, AstraConfig(eigen_selection="largest", **QUIET))


def test_stats_from_another_model():
    torch.manual_seed(123)
    from transformers import LlamaForCausalLM

    other = LlamaForCausalLM(tiny_llama().config).eval()
    stats = collect_activation_stats(other, make_batches(), lora_config("llama"), AstraConfig(**QUIET))
    _fails(peft_model("llama"), ValueError, "collected on another model", stats=stats, astra_config=AstraConfig(**QUIET))


def test_stats_for_other_target_modules():
    stats = collect_activation_stats(
        tiny_llama(), make_batches(), LoraConfig(target_modules=["q_proj", "v_proj"]), AstraConfig(**QUIET)
    )
    _fails(peft_model("llama"), ValueError, "other target modules", stats=stats, astra_config=AstraConfig(**QUIET))


def test_stats_for_another_statistic():
    stats = collect_activation_stats(
        tiny_llama(), make_batches(), lora_config("llama"), AstraConfig(statistic="max_normalized", **QUIET)
    )
    _fails(peft_model("llama"), ValueError, "max_normalized", stats=stats, astra_config=AstraConfig(**QUIET))


def test_calling_twice_on_the_same_adapter():
    model = peft_model("llama")
    initialize_astra_weights(model, make_batches(), AstraConfig(**QUIET))
    _fails(model, RuntimeError, "already initialised by Astra", make_batches(), AstraConfig(**QUIET))


def test_unsupported_base_layer_type():
    class QuantLinear(torch.nn.Linear):  # stands in for bitsandbytes/GPTQ layers, which subclass nn.Linear
        pass

    base = tiny_llama()
    old = base.model.layers[0].self_attn.q_proj
    new = QuantLinear(old.in_features, old.out_features, bias=False)
    new.load_state_dict(old.state_dict())
    base.model.layers[0].self_attn.q_proj = new
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
    _fails(model, TypeError, "quantized layers are not supported", make_batches(), AstraConfig(**QUIET))


def test_offloaded_weight_is_refused_naming_the_layer(tmp_path):
    """accelerate's disk offload leaves the layer's weight on the meta device: torch failed deep inside with
    "Cannot copy out of meta tensor", naming nothing."""
    from transformers import LlamaForCausalLM

    tiny_llama().save_pretrained(tmp_path / "m")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    base = LlamaForCausalLM.from_pretrained(tmp_path / "m", device_map=device_map, offload_folder=tmp_path / "off")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
    _fails(model, TypeError, r"Layer 'model\.layers\.1\.self_attn\.q_proj' has its weight on the meta", make_batches(),
           AstraConfig(**QUIET))


def test_adapter_left_empty_by_low_cpu_mem_usage_is_refused():
    """get_peft_model(..., low_cpu_mem_usage=True) puts the adapter on the meta device: A and B written there were
    lost while the base was rewritten, and the outputs came out NaN with no error."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]), low_cpu_mem_usage=True)
    _fails(model, ValueError, r"Layer 'model\.layers\.0\.self_attn\.q_proj'.*lora_A weight on the meta",
           make_batches(), AstraConfig(**QUIET))


def test_dora_adapter_rejected():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]))
    _fails(model, ValueError, "DoRA", make_batches(), AstraConfig(**QUIET))


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora", "lora_ga"])
def test_initialisation_that_rewrote_the_base_is_refused(init):
    """PiSSA/OLoRA subtract their start from W when the adapter is made: Astra on top changed the outputs at init
    and returned normally."""
    model = peft_model("llama", init_lora_weights=init)
    _fails(model, ValueError, rf"Adapter 'default' .*init_lora_weights='{init}'.*init_lora_weights=True",
           make_batches(), AstraConfig(**QUIET))


def test_another_adapter_that_rewrote_the_base_is_refused():
    model = peft_model("llama")
    model.add_adapter("other", lora_config("llama", init_lora_weights="pissa"))
    _fails(model, ValueError, "Adapter 'other' .*'pissa'", make_batches(), AstraConfig(**QUIET))


@pytest.mark.parametrize("option, variant", [
    (dict(alora_invocation_tokens=[5, 6]), "ALoraLinearVariant"),  # B·A only after the invocation tokens
    (dict(kasa_config={}), "KasaLinearVariant"),
    (dict(init_lora_weights="mica"), "MiCALinearVariant"),  # B frozen in training
])
def test_lora_variants_are_refused_naming_the_layer(option, variant):
    """aLoRA changed the outputs at init (B·A acts only after the invocation tokens); the others train another
    method."""
    _fails(peft_model("llama", **option), ValueError, rf"Layer 'model\.layers\.0\.self_attn\.q_proj'.*{variant}",
           make_batches(), AstraConfig(**QUIET))


def test_tied_output_embedding_is_refused():
    """A targeted lm_head tied to the input embedding: W ← W − s·B·A rewrote the embedding too (outputs off at
    init with `largest`; the tail happened to sit in the null space, so `smallest` hid it)."""
    from conftest import tiny_model

    model = get_peft_model(tiny_model("llama", tie_word_embeddings=True),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]))
    _fails(model, ValueError, "Layer 'lm_head' shares its weight with 'model.embed_tokens'", make_batches(),
           AstraConfig(eigen_selection="largest", **QUIET))


def test_replicated_layers_are_refused():
    """layer_replication shares one base weight between copies: it was rewritten once per copy."""
    model = peft_model("llama", layer_replication=[[0, 2], [1, 2]])
    _fails(model, ValueError, r"Layer 'model\.layers\.1\.self_attn\.q_proj' shares its weight with "
           r"'model\.layers\.2\.self_attn\.q_proj'", make_batches(), AstraConfig(**QUIET))


def test_initialisations_that_keep_the_base_still_work():
    """The allow-list's other members: Astra replaces A and B, outputs unchanged at init."""
    from conftest import logits

    batch = make_batches(1)[0]
    reference = logits(tiny_llama(), batch)
    for init in (False, "gaussian", "orthogonal", "eva"):
        model = peft_model("llama", init_lora_weights=init).eval()
        initialize_astra_weights(model, make_batches(), AstraConfig(**QUIET))
        assert torch.allclose(logits(model, batch), reference, atol=1e-5), init


def test_null_space_raise_policy_leaves_model_untouched():
    _fails(peft_model("llama"), ValueError, "degenerate", make_batches(), AstraConfig(null_space="raise", **QUIET))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(eigen_selection="tail"), "eigen_selection"),
        (dict(statistic="cov"), "statistic"),
        (dict(null_space="drop"), "null_space"),
        (dict(statistic="max_normalized", statistic_source="input"), "max_normalized"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(null_space_rtol=2.0), "null_space_rtol"),
        (dict(accumulation_dtype="float16"), "accumulation_dtype"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AstraConfig(**kwargs)


def test_every_choice_field_is_checked_against_its_literal():
    """The choice lists are Literal aliases (config.py, harness/kinds.py), checked by one function,
    config.check_choices, wherever the object comes from."""
    from astra_peft.config import EIGEN_SELECTIONS, STATISTICS, EigenSelection, check_choices, literal_choices
    from astra_peft.harness.kinds import TASK_KINDS
    from astra_peft.harness.methods import BuildContext
    from astra_peft.harness.models import ModelSpec
    from astra_peft.harness.tasks import Task
    from astra_peft.stats import Accumulator

    assert literal_choices(EigenSelection) == EIGEN_SELECTIONS and "smallest" in EIGEN_SELECTIONS
    assert STATISTICS == ("covariance", "second_moment", "max_normalized")
    assert TASK_KINDS == ("classification", "generation")
    for make, field in [
        (lambda: Task("t", "regression", None, {}), "Task.kind"),
        (lambda: ModelSpec("m", "d", "decoder", "pkg", [], provision=print), "ModelSpec.kind"),
        (lambda: Accumulator("hidden", torch.zeros(2), torch.zeros(2, 2)), "Accumulator.kind"),
        (lambda: BuildContext(model=None, task_kind="seq2seq", target_modules=[], rank=4, alpha=8),
         "BuildContext.task_kind"),
        (lambda: AstraConfig(stats_device="gpu"), "AstraConfig.stats_device"),
    ]:
        with pytest.raises(ValueError, match=rf"{field} must be one of"):
            make()
    check_choices(AstraConfig(null_space_rtol=None))  # None is fine where the annotation is Optional


@pytest.mark.parametrize("spec, match", [
    ("astra:statistic=max_normalized:statistic_source=input", r"in method spec '.*statistic_source=input'.*max_normalized"),
    ("astra:null_space_rtol=2", r"in method spec 'astra:null_space_rtol=2'.*null_space_rtol"),
    ("astra:eigen_selection=tail", r"eigen_selection: choose one of smallest, largest"),
    ("lora:alpha=nan", r"in method spec 'lora:alpha=nan'.*alpha.*finite"),
    ("astra:lr=inf", r"in method spec 'astra:lr=inf'.*lr.*finite"),
])
def test_method_spec_refused_at_parse_time_naming_it(spec, match):
    """A spec is parsed once, into a typed MethodSpec whose method config is built there: a bad value or a bad
    combination fails at once (before any model is loaded), naming the spec."""
    from astra_peft.harness.specs import parse_method_spec

    with pytest.raises(ValueError, match=match):
        parse_method_spec(spec)
